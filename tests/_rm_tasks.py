"""Tasks for the remote-worker tests, loaded by real control planes as module `_rm_tasks`.

Registered with `@background_task`, so the app side knows their policies (timeouts, retries)
and fastworker's own registry has them for the control plane.
"""

from __future__ import annotations

import asyncio
import os

from fastworker_fastapi import background_task


def _append(path: str, line: str) -> int:
    """Append one line atomically; returns how many lines the file has now."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)
    with open(path) as f:
        return sum(1 for _ in f)


@background_task
def rm_record(path: str, tag: str, n: int) -> list[object]:
    """Counts its executions in `path` and returns something only this call could return."""
    _append(path, tag)
    return [tag, n * n]


@background_task
def rm_add(a: int, b: int) -> int:
    return a + b


@background_task
def rm_boom(message: str) -> None:
    raise ValueError(message)


@background_task
async def rm_sleep(seconds: float, tag: str) -> str:
    await asyncio.sleep(seconds)
    return tag


@background_task(timeout=0.5)
async def rm_too_slow(seconds: float, path: str) -> str:
    """Outlives its timeout; writes `path` when it finishes anyway."""
    await asyncio.sleep(seconds)
    _append(path, "finished")
    return "late"


@background_task(max_retries=2, retry_delay=0.05, retry_backoff=1.0)
def rm_flaky(path: str, fail_times: int) -> int:
    """Fails until it has run `fail_times` times (counted in `path`, across processes)."""
    runs = _append(path, "run")
    if runs <= fail_times:
        raise ConnectionError(f"run {runs} failed")
    return runs


@background_task
def rm_log(path: str, tag: str) -> str:
    _append(path, tag)
    return tag


@background_task(max_retries=1, retry_delay=0.05)
async def rm_sleep_retry(seconds: float, tag: str) -> str:
    await asyncio.sleep(seconds)
    return tag


@background_task
def rm_blob(size: int) -> str:
    """A result of `size` characters (oversize tests)."""
    return "x" * size


@background_task
def rm_length(text: str) -> int:
    """The length of its argument (oversize tests)."""
    return len(text)
