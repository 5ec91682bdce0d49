"""The embedded default: tasks run inside the app's own process and event loop.

Coroutine functions run on the event loop; plain functions run in anyio worker threads
(bounded by `thread_limit`) so a blocking task never blocks request handling. A running
thread cannot be killed: when such a task is cancelled or times out, the scheduler records
that and the thread's late result is discarded.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from fastworker_fastapi._hooks import run_with_hooks
from fastworker_fastapi.errors import ConfigurationError

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from fastworker_fastapi.records import TaskRecord
    from fastworker_fastapi.tasks import TaskDefinition, TaskRegistry

__all__ = ["InProcessExecutor", "InProcessWorkers"]


@dataclass(frozen=True, kw_only=True, slots=True)
class InProcessWorkers:
    """Settings for in-process workers.

    `concurrency`: how many tasks run at once (async and sync together).
    `thread_limit`: how many sync tasks may hold a worker thread at once
    (default: `concurrency`).
    """

    concurrency: int = 8
    thread_limit: int | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigurationError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.thread_limit is not None and self.thread_limit < 1:
            raise ConfigurationError(f"thread_limit must be >= 1, got {self.thread_limit}")

    def build_executor(self, registry: TaskRegistry) -> InProcessExecutor:
        return InProcessExecutor(self, registry)


class InProcessExecutor:
    """Runs registered functions in this process."""

    runs_plain_inline = True  # see workers/base.py: `run()` of a plain task is the call

    def __init__(self, settings: InProcessWorkers, registry: TaskRegistry) -> None:
        self._registry = registry
        # The registry's own lookup, not a method calling it: one call less per submission.
        self.resolve: Callable[[str], TaskDefinition | None] = registry.get
        self._concurrency = settings.concurrency
        self._thread_limit = settings.thread_limit or settings.concurrency
        self._limiter: anyio.CapacityLimiter | None = None

    @property
    def concurrency(self) -> int:
        return self._concurrency

    async def start(self, task_group: TaskGroup) -> None:
        self._limiter = anyio.CapacityLimiter(self._thread_limit)

    def run(self, record: TaskRecord, definition: TaskDefinition, slot: Any) -> Awaitable[Any]:
        if definition.plain:
            coroutine: Awaitable[Any] = definition.func(*record.args, **record.kwargs)
            return coroutine  # the common case first: the task's own coroutine
        if definition.before is not None or definition.after is not None:  # fastworker's
            call = functools.partial(self._call, definition, record)
            return run_with_hooks(definition, record, call, self._limiter)
        return self._call(definition, record)

    def _call(self, definition: TaskDefinition, record: TaskRecord) -> Awaitable[Any]:
        if definition.is_async:  # the task's own coroutine: no wrapper frame
            coroutine: Awaitable[Any] = definition.func(*record.args, **record.kwargs)
            return coroutine
        func = functools.partial(definition.func, *record.args, **record.kwargs)
        return anyio.to_thread.run_sync(func, abandon_on_cancel=True, limiter=self._limiter)

    async def aclose(self) -> None:
        return None
