"""The task store: the single source of truth for every task's state.

Records are plain slotted dataclasses rather than pydantic models because a submission
creates one on the hot path; they are turned into API models only when somebody reads them.
Memory is bounded: live tasks are capped by the scheduler (`max_pending`), finished ones
expire by age (`result_ttl`) and by count (`max_results`), oldest first.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fastworker.tasks.models import CallbackInfo, TaskPriority, TaskResult, TaskStatus

if TYPE_CHECKING:
    from fastworker_fastapi.events import EventHub
    from fastworker_fastapi.tasks import TaskDefinition

__all__ = ["FINAL_STATUSES", "PRIORITY_LEVELS", "TaskPolicy", "TaskRecord", "TaskStore"]

FINAL_STATUSES = frozenset({TaskStatus.SUCCESS, TaskStatus.FAILURE, TaskStatus.CANCELLED})
PRIORITY_LEVELS = {  # the order tasks are served in: level 0 first, in both modes
    TaskPriority.CRITICAL: 0,
    TaskPriority.HIGH: 1,
    TaskPriority.NORMAL: 2,
    TaskPriority.LOW: 3,
}


def utcnow() -> datetime:
    """Aware UTC time: unambiguous in JSON, comparable across machines."""
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class TaskPolicy:
    """How a task runs: the retry and timeout fields of fastworker's `Task`, same defaults."""

    timeout: float | None = None
    max_retries: int = 0
    retry_delay: float = 60.0
    retry_backoff: float = 2.0
    retry_backoff_max: float = 3600.0

    def retry_delay_for(self, attempt: int) -> float:
        """Seconds to wait before attempt `attempt + 1`, after `attempt` failed runs."""
        delay = self.retry_delay * self.retry_backoff ** max(attempt - 1, 0)
        return float(min(delay, self.retry_backoff_max))


@dataclass(slots=True, eq=False)
class CallbackDelivery:
    """Where the delivery of a task's completion callback stands."""

    state: str = "pending"  # pending | delivering | retrying | delivered | failed
    attempts: int = 0
    last_error: str | None = None
    delivered_at: datetime | None = None
    delivery_id: str | None = None


@dataclass(slots=True, eq=False)
class TaskRecord:
    """Everything known about one task; mutated only by the scheduler and its helpers."""

    id: str
    name: str
    args: Sequence[Any]  # as JSON delivers them: a tuple or list of plain values
    kwargs: dict[str, Any]
    priority: TaskPriority
    policy: TaskPolicy
    status: TaskStatus
    created: float  # time.time(): cheap to take; `created_at` makes the datetime when read
    eta: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    result: Any = None
    error: str | None = None
    error_type: str | None = None
    attempts: int = 0
    callback: CallbackInfo | None = None
    delivery: CallbackDelivery | None = None
    progress: float | None = None
    progress_message: str | None = None
    # Runtime only: never shown, never serialised.
    definition: TaskDefinition | None = field(default=None, repr=False)  # resolved at submit
    progress_state: Any = field(default=None, repr=False)  # progress.py's, once reported
    done: asyncio.Event | None = field(default=None, repr=False)

    @property
    def created_at(self) -> datetime:
        return datetime.fromtimestamp(self.created, UTC)

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATUSES

    def to_task_result(self) -> TaskResult:
        """FastWorker's view: `PENDING` until final, whatever the finer state."""
        if self.status not in FINAL_STATUSES:
            return _task_result(self.id, TaskStatus.PENDING, None, None, None, None, self.callback)
        return _task_result(
            self.id,
            self.status,
            self.result,
            self.error,
            self.started_at,
            self.completed_at,
            self.callback,
        )


# Shared by every result built here: it holds every field already, so pydantic's in-place
# `add` on assignment never changes it.
_TASK_RESULT_FIELDS = set(TaskResult.model_fields)
_new_task_result = TaskResult.__new__
_set = object.__setattr__


def _task_result(
    task_id: str,
    status: TaskStatus,
    result: Any,
    error: str | None,
    started_at: datetime | None,
    completed_at: datetime | None,
    callback: CallbackInfo | None,
) -> TaskResult:
    """A `TaskResult` from values the store already holds valid, without re-validating.

    This is what pydantic's `model_construct` does, at half its cost: `wait()` builds one per
    task, so it is on the throughput path. A test compares it with a validated instance, so
    a pydantic change that breaks it is caught.
    """
    model = _new_task_result(TaskResult)
    _set(
        model,
        "__dict__",
        {
            "task_id": task_id,
            "status": status,
            "result": result,
            "error": error,
            "started_at": started_at,
            "completed_at": completed_at,
            "callback": callback,
        },
    )
    _set(model, "__pydantic_fields_set__", _TASK_RESULT_FIELDS)
    _set(model, "__pydantic_extra__", None)
    _set(model, "__pydantic_private__", None)
    return model


class TaskStore:
    """In-memory records with bounded retention of finished tasks."""

    def __init__(self, *, events: EventHub, result_ttl: float, max_results: int) -> None:
        self.events = events
        self.result_ttl = result_ttl
        self.max_results = max_results
        self._records: dict[str, TaskRecord] = {}
        # Finished ids and their monotonic finish times, oldest first (two deques rather than
        # one of tuples: no object per task for the garbage collector to walk).
        self._finished: deque[str] = deque()
        self._finished_at: deque[float] = deque()

    def __len__(self) -> int:
        return len(self._records)

    def add(self, record: TaskRecord) -> None:
        self._records[record.id] = record
        self.events.publish(record)

    def get(self, task_id: str) -> TaskRecord | None:
        finished_at = self._finished_at
        if finished_at and finished_at[0] <= time.monotonic() - self.result_ttl:
            self._expire()  # (the count bound is kept by finished())
        return self._records.get(task_id)

    def changed(self, record: TaskRecord) -> None:
        """Tell subscribers that `record` changed (status, progress, delivery...)."""
        self.events.publish(record)

    def finished(self, record: TaskRecord) -> None:
        """Record that a task reached a final status: wake waiters, start its expiry clock."""
        now = time.monotonic()
        finished_at = self._finished_at
        self._finished.append(record.id)
        finished_at.append(now)
        if record.done is not None:
            record.done.set()
        self.events.publish(record)
        if len(finished_at) > self.max_results or finished_at[0] <= now - self.result_ttl:
            self._expire()

    def recent(
        self,
        *,
        limit: int,
        status: TaskStatus | None = None,
        name: str | None = None,
    ) -> list[TaskRecord]:
        """Newest first, filtered."""
        self._expire()
        out: list[TaskRecord] = []
        for record in reversed(self._records.values()):
            if status is not None and record.status is not status:
                continue
            if name is not None and record.name != name:
                continue
            out.append(record)
            if len(out) >= limit:
                break
        return out

    def live(self) -> Iterator[TaskRecord]:
        """Records that have not reached a final status yet."""
        return (r for r in list(self._records.values()) if r.status not in FINAL_STATUSES)

    def _expire(self) -> None:
        finished, finished_at = self._finished, self._finished_at
        deadline = time.monotonic() - self.result_ttl
        records = self._records
        while finished_at and (len(finished_at) > self.max_results or finished_at[0] <= deadline):
            finished_at.popleft()
            records.pop(finished.popleft(), None)
