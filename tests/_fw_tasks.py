"""Tasks for the real control planes started by the remote tests (module name `_fw_tasks`)."""

from __future__ import annotations

import asyncio
import os

from fastworker.tasks.registry import task


@task  # type: ignore[untyped-decorator]
def add(a: int, b: int) -> int:
    """A trivial result to check values travel both ways."""
    return a + b


@task  # type: ignore[untyped-decorator]
async def sleep_then(x: object, seconds: float) -> object:
    """Keeps a task running long enough to cancel it or to finish many at once."""
    await asyncio.sleep(seconds)
    return x


@task  # type: ignore[untyped-decorator]
def boom(msg: str) -> None:
    """A failing task, to see how the control plane reports errors."""
    raise ValueError(msg)


@task  # type: ignore[untyped-decorator]
def record(path: str, tag: str) -> str:
    """Appends one line per execution, so tests can count executions across processes."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{tag}\n".encode())
    finally:
        os.close(fd)
    return tag
