"""Helpers for the store tests (a module, not conftest, so child processes can import it)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from fastworker_fastapi.events import EventHub
    from fastworker_fastapi.records import TaskRecord
    from fastworker_fastapi.stores.base import TaskStore


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
