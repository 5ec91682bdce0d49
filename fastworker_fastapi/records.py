"""Task records: the plain data every store keeps and every reader sees.

A record holds values only (no events, tasks or handles: those live in the scheduler's own
per-run objects, keyed by id), so it can be a row in SQLite or PostgreSQL, a JSON document, or
an object in a dict, and two records with the same id are the same task. Records are written
through one path only, `await store.update(...)`: nobody mutates a record they were given.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

from fastworker.tasks.models import CallbackInfo, TaskPriority, TaskResult, TaskStatus
from pydantic import BaseModel

__all__ = [
    "FINAL_STATUSES",
    "FINAL_VALUES",
    "MAX_INTERRUPTIONS",
    "PRIORITY_LEVELS",
    "WAITING_STATUSES",
    "CallbackDelivery",
    "TaskPolicy",
    "TaskRecord",
    "evolve",
    "is_final",
    "new_delivery",
    "utcnow",
]

FINAL_STATUSES = frozenset({TaskStatus.SUCCESS, TaskStatus.FAILURE, TaskStatus.CANCELLED})
FINAL_VALUES = frozenset(status.value for status in FINAL_STATUSES)
"""`status._value_ in FINAL_VALUES` is `status in FINAL_STATUSES` without calling the enum's
`__hash__`, which is Python code: hot paths test it several times per task."""


def is_final(status: TaskStatus) -> bool:
    """`status in FINAL_STATUSES`, cheaply (see `FINAL_VALUES`)."""
    return status._value_ in FINAL_VALUES


WAITING_STATUSES = frozenset(
    {TaskStatus.PENDING, TaskStatus.QUEUED, TaskStatus.SCHEDULED, TaskStatus.RETRYING}
)
"""Not started, or between attempts: a new owner may take such a task without losing work."""
PRIORITY_LEVELS = {  # the order tasks are served in: level 0 first, in both modes
    TaskPriority.CRITICAL: 0,
    TaskPriority.HIGH: 1,
    TaskPriority.NORMAL: 2,
    TaskPriority.LOW: 3,
}
MAX_INTERRUPTIONS = 3
"""Attempts a task may lose with its process (kill, shutdown timeout) before it fails."""
DELIVERY_OPEN = frozenset({"pending", "delivering", "retrying"})
"""Callback delivery states still in the outbox (to be delivered, at least once)."""


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


@dataclass(frozen=True, slots=True)
class CallbackDelivery:
    """Where the delivery of a task's completion callback stands (its outbox entry)."""

    state: str = "pending"  # pending | delivering | retrying | delivered | failed
    attempts: int = 0
    last_error: str | None = None
    delivered_at: datetime | None = None
    delivery_id: str | None = None

    @property
    def open(self) -> bool:
        """Still to be delivered: kept in the outbox, resumed after a restart."""
        return self.state in DELIVERY_OPEN


@dataclass(slots=True, eq=False)
class TaskRecord:
    """Everything known about one task, as plain values.

    `owner` is the id of the process start that runs the task (None: any process may claim
    it); `cancel_requested` asks the owner to cancel it; `interruptions` counts attempts lost
    with their process (a kill, a shutdown that ran out of time).
    """

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
    owner: str | None = None
    cancel_requested: bool = False
    interruptions: int = 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskRecord) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def created_at(self) -> datetime:
        return datetime.fromtimestamp(self.created, UTC)

    @property
    def finished(self) -> bool:
        return self.status._value_ in FINAL_VALUES

    def to_task_result(self) -> TaskResult:
        """FastWorker's view: `PENDING` until final, whatever the finer state.

        Built from values the store already holds valid, without re-validating: what
        pydantic's `model_construct` does, at a third of its cost (`wait()` builds one per
        task, so it is on the throughput path). A test compares it with a validated
        instance, so a pydantic change that breaks it is caught.
        """
        if self.status._value_ in FINAL_VALUES:
            values = {
                "task_id": self.id,
                "status": self.status,
                "result": self.result,
                "error": self.error,
                "started_at": self.started_at,
                "completed_at": self.completed_at,
                "callback": self.callback,
            }
        else:
            values = {
                "task_id": self.id,
                "status": TaskStatus.PENDING,
                "result": None,
                "error": None,
                "started_at": None,
                "completed_at": None,
                "callback": self.callback,
            }
        model = _new(TaskResult)
        _set_dict(model, values)
        _set_fields_set(model, _TASK_RESULT_FIELDS)
        _set_extra(model, None)
        _set_private(model, None)
        return model

    # -- JSON (what stores keep) -----------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The record as JSON-ready values (datetimes as ISO text, enums as their values)."""
        delivery = self.delivery
        return {
            "id": self.id,
            "name": self.name,
            "args": list(self.args),
            "kwargs": self.kwargs,
            "priority": self.priority.value,
            "policy": [
                self.policy.timeout,
                self.policy.max_retries,
                self.policy.retry_delay,
                self.policy.retry_backoff,
                self.policy.retry_backoff_max,
            ],
            "status": self.status.value,
            "created": self.created,
            "eta": _iso(self.eta),
            "started_at": _iso(self.started_at),
            "completed_at": _iso(self.completed_at),
            "result": self.result,
            "error": self.error,
            "error_type": self.error_type,
            "attempts": self.attempts,
            "callback": None
            if self.callback is None
            else [self.callback.address, self.callback.data],
            "delivery": None
            if delivery is None
            else [
                delivery.state,
                delivery.attempts,
                delivery.last_error,
                _iso(delivery.delivered_at),
                delivery.delivery_id,
            ],
            "progress": self.progress,
            "progress_message": self.progress_message,
            "owner": self.owner,
            "cancel_requested": self.cancel_requested,
            "interruptions": self.interruptions,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskRecord:
        callback = data.get("callback")
        delivery = data.get("delivery")
        return cls(
            data["id"],
            data["name"],
            data["args"],
            data["kwargs"],
            TaskPriority(data["priority"]),
            TaskPolicy(*data["policy"]),
            TaskStatus(data["status"]),
            data["created"],
            _from_iso(data.get("eta")),
            _from_iso(data.get("started_at")),
            _from_iso(data.get("completed_at")),
            data.get("result"),
            data.get("error"),
            data.get("error_type"),
            data.get("attempts", 0),
            None if callback is None else CallbackInfo(address=callback[0], data=callback[1]),
            None
            if delivery is None
            else CallbackDelivery(
                delivery[0], delivery[1], delivery[2], _from_iso(delivery[3]), delivery[4]
            ),
            data.get("progress"),
            data.get("progress_message"),
            data.get("owner"),
            bool(data.get("cancel_requested", False)),
            data.get("interruptions", 0),
        )


def new_delivery() -> CallbackDelivery:
    """A fresh outbox entry: written with the task's final status, in the same update."""
    return CallbackDelivery(delivery_id=uuid.uuid4().hex)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _from_iso(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


_FIELD_NAMES = tuple(f.name for f in fields(TaskRecord))
_new_object = object.__new__


def evolve(record: TaskRecord, changes: dict[str, Any]) -> TaskRecord:
    """`dataclasses.replace(record, **changes)` for known field names, at a third of its
    cost (stores make one per write)."""
    new: TaskRecord = _new_object(TaskRecord)
    for name in _FIELD_NAMES:
        setattr(new, name, changes[name] if name in changes else getattr(record, name))
    return new


_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def dumps(value: Any) -> str:
    """Compact JSON, as stores write it (`json.dumps` with these options would build a new
    encoder on every call; stores call this several times per task)."""
    return _ENCODER.encode(value)


# Shared by every result built here: it holds every field already, so pydantic's in-place
# `add` on assignment never changes it.
_TASK_RESULT_FIELDS = set(TaskResult.model_fields)
_new = object.__new__  # pydantic models define no __new__ of their own
# Setters of the four slots every pydantic model has, taken from BaseModel once: calling a
# slot's own setter skips the attribute lookup `object.__setattr__` makes on each call.
_set_dict = BaseModel.__dict__["__dict__"].__set__
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__
