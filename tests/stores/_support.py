"""Helpers for the store tests (a module, not conftest, so child processes can import it)."""

from __future__ import annotations

import importlib
import sys
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from fastworker_fastapi.events import EventHub
    from fastworker_fastapi.records import TaskRecord
    from fastworker_fastapi.stores.base import TaskStore

ROOT = Path(__file__).resolve().parents[2]


def isolate_package() -> None:
    """Let the store modules import while the package's `__init__` does not (issue 8 is
    being rewired in steps): load `fastworker_fastapi.*` submodules without running it.

    A no-op once `import fastworker_fastapi` works.
    """
    try:
        importlib.import_module("fastworker_fastapi")
    except ImportError:
        for name in [n for n in sys.modules if n.partition(".")[0] == "fastworker_fastapi"]:
            del sys.modules[name]
        package = types.ModuleType("fastworker_fastapi")
        package.__path__ = [str(ROOT / "fastworker_fastapi")]
        sys.modules["fastworker_fastapi"] = package


async def eventually(
    check: Callable[[], Any] | Callable[[], Awaitable[Any]],
    *,
    timeout: float = 10.0,
    interval: float = 0.01,
    message: str = "condition not met",
) -> Any:
    """Poll `check` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} within {timeout}s (last value: {value!r})")
        await anyio.sleep(interval)


@dataclass
class Opened:
    """An open store with its hub and every record published to that hub."""

    store: TaskStore
    hub: EventHub
    seen: list[TaskRecord] = field(default_factory=list)

    def saw(self, task_id: str, check: Callable[[TaskRecord], bool] = lambda r: True) -> bool:
        return any(r.id == task_id and check(r) for r in self.seen)


@asynccontextmanager
async def opened(
    store: TaskStore, *, result_ttl: float = 3600.0, max_results: int = 10_000
) -> AsyncIterator[Opened]:
    """Open `store` in its own task group (as the extension's lifespan does); close it after."""
    from fastworker_fastapi.events import EventHub

    hub = EventHub()
    handle = Opened(store, hub)
    hub.add_listener(handle.seen.append)
    async with anyio.create_task_group() as task_group:
        await store.open(hub, task_group, result_ttl=result_ttl, max_results=max_results)
        try:
            yield handle
        finally:
            await store.close()
            task_group.cancel_scope.cancel()
