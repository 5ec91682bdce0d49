"""The seam between the scheduler and whatever runs a task.

An executor runs *one* task and reports its outcome: it returns the task's value, or raises
the task's exception (or `TaskFailed` when the failure is known only as text). Everything
else (queues, priorities, eta, retries, timeouts, cancellation, flow control) belongs to the
scheduler, so both modes behave the same. Cancellation reaches an executor as ordinary
anyio cancellation of its `run()` call.

An executor whose capacity is not simply its `concurrency` (remote planes come and go, each
with its own limit) also has `async acquire(record) -> slot`: the scheduler awaits it before
it marks the task RUNNING and starts its timeout, so waiting for capacity is not running.

An executor whose `run()` of a `plain` definition (a coroutine function without hooks) is
only the call `definition.func(*record.args, **record.kwargs)` says so with a true
`runs_plain_inline` attribute: the scheduler then makes that call itself, one frame less on
the in-process hot path.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from fastworker_fastapi.records import TaskRecord
    from fastworker_fastapi.tasks import TaskDefinition, TaskRegistry

__all__ = ["Executor", "WorkerSettings"]


class Executor(Protocol):
    """Runs tasks for the scheduler."""

    @property
    def concurrency(self) -> int:
        """How many tasks may run at once; the scheduler never exceeds it."""
        ...

    def resolve(self, name: str) -> TaskDefinition | None:
        """The definition of a task this executor can run, or None (refused at submission)."""
        ...

    async def start(self, task_group: TaskGroup) -> None:
        """Get ready to run tasks; background loops go in `task_group`."""
        ...

    def run(self, record: TaskRecord, definition: TaskDefinition, slot: Any) -> Awaitable[Any]:
        """Run one attempt of the task: an awaitable of its value (or raising its error).

        `slot` is what `acquire` returned (None for executors without one). `async def
        run(...)` satisfies this; returning the task's own coroutine saves a frame.
        """
        ...

    async def aclose(self) -> None:
        """Release everything; called after the scheduler has drained."""
        ...


class WorkerSettings(Protocol):
    """What `FastWorker(workers=...)` takes: a small settings object that builds an executor."""

    def build_executor(self, registry: TaskRegistry) -> Executor: ...
