"""The task store seam: what the scheduler, routes, streams and callbacks need of a store.

```
this process                                   the store (memory | sqlite | postgres)
scheduler ── insert / update (compare-and-set) ──► every task, one row each
routes, wait() ── get / recent / peek ──────────►   owner leases (heartbeat)
DELETE /tasks/{id} ── request_cancel ───────────►   callback outbox (delivery state)
sweeper ── heartbeat / recover / expire ────────►
EventHub ◄── own writes, then other processes' ─── change feed
```

Rules every store follows (the contract suite in tests/stores checks them):

- `insert` returns once the records are durable (for the store's idea of durable), all or
  none; it publishes each record to the hub.
- `update` is a compare-and-set on `owner` and `attempts`: it applies `changes` only when
  the stored record still has the owner and attempt count the writer expects, then
  publishes the new record and returns it; otherwise it returns None and changes nothing
  (a former owner's late write is dropped).
- Changes written by other processes reach this process's hub through the store's feed
  (promptly; exact latency is the store's), so streams and `wait()` see every task.
- `request_cancel` works from any process: an unowned task is cancelled at once, an owned
  one is flagged for its owner (`cancel_requested`), whose scheduler acts on the change.
- `recover` releases the tasks of dead owners (expired lease, or a process on this host
  that is gone) and claims due, unowned tasks this process can run, at most `limit`.
- Unfinished tasks and undelivered callbacks never expire.
- Schedule state (periodic tasks) is one small row per schedule name, shared by every
  process: `update_schedule` upserts it; `paused` and `resumed_at` are replaced when given,
  `last_due` only ever moves forward (the later of the stored and the given time).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from fastworker.tasks.models import TaskStatus

from fastworker_fastapi.records import MAX_INTERRUPTIONS, TaskRecord, new_delivery, utcnow

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from fastworker_fastapi.events import EventHub

__all__ = [
    "ScheduleState",
    "TaskStore",
    "cancelled_changes",
    "final_changes",
    "interrupted_changes",
    "released_changes",
]


@dataclass(frozen=True, slots=True)
class ScheduleState:
    """What every process shares about one periodic schedule (see `periodic.py`).

    `last_due` is the latest due time a task was created for (it only moves forward);
    `resumed_at` is when the schedule was last resumed, so due times missed while it was
    paused are not caught up after a restart.
    """

    name: str
    paused: bool = False
    last_due: datetime | None = None
    resumed_at: datetime | None = None


class TaskStore(Protocol):
    """Where every task is kept; see the module docstring for the rules."""

    owner: str
    """This process start's id (a fresh uuid4 hex per `open`): the owner of its tasks."""

    durable: bool
    """True when tasks outlive the process (queued tasks are then kept at shutdown)."""

    @property
    def description(self) -> str:
        """What the start-up log shows: the kind and where (no passwords)."""
        ...

    async def open(
        self, hub: EventHub, task_group: TaskGroup, *, result_ttl: float, max_results: int
    ) -> None:
        """Connect, create the schema, register this owner, start the change feed."""
        ...

    async def close(self) -> None:
        """Stop the feed, unregister this owner (its leftover tasks become claimable)."""
        ...

    async def insert(self, records: Sequence[TaskRecord]) -> None:
        """Add new records, all or none; durable when it returns; publishes them."""
        ...

    async def insert_if_absent(self, record: TaskRecord) -> bool:
        """Add `record` unless a task with its id exists; True when it was added."""
        ...

    async def update(
        self, task_id: str, expect_owner: str | None, expect_attempts: int, **changes: Any
    ) -> TaskRecord | None:
        """Compare-and-set: apply `changes` if owner and attempts match; publish; return."""
        ...

    async def get(self, task_id: str) -> TaskRecord | None:
        """The record, or None when unknown or expired."""
        ...

    def peek(self, task_id: str) -> TaskRecord | None:
        """`get` without awaiting (FastWorker's sync `get_result`); may be this process's
        latest view rather than a fresh read where a store cannot read synchronously."""
        ...

    async def recent(
        self, *, limit: int, status: TaskStatus | None = None, name: str | None = None
    ) -> list[TaskRecord]:
        """Newest first, filtered, from every process."""
        ...

    async def request_cancel(self, task_id: str) -> TaskRecord:
        """Cancel an unowned task, or flag an owned one; raises `TaskNotFoundError` or
        `TaskAlreadyFinishedError`."""
        ...

    async def heartbeat(self) -> None:
        """Renew this owner's lease."""
        ...

    async def recover(self, can_run: Callable[[str], bool], limit: int) -> list[TaskRecord]:
        """Release dead owners' tasks; claim up to `limit` due, unowned ones (outbox too)."""
        ...

    async def expire(self) -> int:
        """Drop finished tasks past `result_ttl` or beyond `max_results`; how many went."""
        ...

    async def schedule_states(self) -> dict[str, ScheduleState]:
        """Every schedule's shared state, by name (schedules never touched are absent)."""
        ...

    async def update_schedule(
        self,
        name: str,
        *,
        paused: bool | None = None,
        last_due: datetime | None = None,
        resumed_at: datetime | None = None,
    ) -> ScheduleState:
        """Create or change a schedule's state: `paused` and `resumed_at` replace the
        stored values when given; `last_due` keeps the later of stored and given."""
        ...


def interrupted_changes(record: TaskRecord, why: str) -> dict[str, Any]:
    """The changes that release a task whose attempt was lost with its process.

    The attempt does not count against the task's `max_retries` (it did not fail); after
    `MAX_INTERRUPTIONS` lost attempts the task fails, so a task that kills its process
    cannot go round for ever.
    """
    interruptions = record.interruptions + 1
    error = f"WorkerLost: {why}"
    if interruptions > MAX_INTERRUPTIONS:
        return final_changes(
            record,
            status=TaskStatus.FAILURE,
            owner=None,
            interruptions=interruptions,
            error_type="WorkerLost",
            error=f"{error} ({interruptions} attempts were interrupted; giving up)",
        )
    return {
        "status": TaskStatus.RETRYING,
        "owner": None,
        "interruptions": interruptions,
        "error_type": "WorkerLost",
        "error": error,
        "eta": None,
    }


def released_changes(record: TaskRecord, why: str) -> dict[str, Any]:
    """The changes that release a task of a gone owner (any process may then take it)."""
    if record.cancel_requested and not record.finished:
        return cancelled_changes(record)
    if record.status is TaskStatus.RUNNING:
        return interrupted_changes(record, why)
    return {"owner": None}


def final_changes(record: TaskRecord, **changes: Any) -> dict[str, Any]:
    """`changes` that end a task, with `completed_at` and, when it has a callback, a new
    outbox entry in the same write (so the callback cannot be lost between two writes)."""
    changes["completed_at"] = utcnow()
    if record.callback is not None and record.delivery is None:
        changes["delivery"] = new_delivery()
    return changes


def cancelled_changes(record: TaskRecord, why: str = "cancelled by request") -> dict[str, Any]:
    """The changes that cancel a task that is not running anywhere."""
    return final_changes(
        record,
        status=TaskStatus.CANCELLED,
        owner=None,
        error_type="TaskCancelled",
        error=f"TaskCancelled: {why}",
    )
