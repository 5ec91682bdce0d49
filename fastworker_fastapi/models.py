"""API models: what the status routes return and what `TaskClient.get_status` gives.

FastWorker's own `TaskResult` stays the coarse, compatible view (`PENDING` until final);
`TaskInfo` is the fine one: the exact status, attempts, timings, progress and the delivery of
the completion callback.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any

from fastworker.tasks.models import TaskPriority, TaskStatus
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from fastworker_fastapi.records import TaskRecord

__all__ = ["CallbackState", "TaskInfo", "TaskList", "task_info", "task_json"]

logger = logging.getLogger("fastworker_fastapi")


class CallbackState(BaseModel):
    """A task's completion callback: where it goes and how its delivery stands."""

    address: str = Field(description="App path, http(s) URL or tcp:// FastWorker listener.")
    data: dict[str, Any] | None = Field(default=None, description="Sent back as callback_data.")
    state: str = Field(
        default="pending", description="pending, delivering, retrying, delivered or failed."
    )
    attempts: int = Field(default=0, description="Delivery attempts made so far.")
    last_error: str | None = Field(default=None, description="Why the last attempt failed.")
    delivered_at: datetime | None = None
    delivery_id: str | None = Field(
        default=None, description="Sent as X-FastWorker-Delivery on every attempt (dedupe on it)."
    )


class TaskInfo(BaseModel):
    """The full state of one task."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "id": "0b8e5d1c-3f57-4c2b-9c53-6f0d2f7d2a11",
                "name": "send_welcome_email",
                "status": "success",
                "priority": "normal",
                "result": "sent",
                "error": None,
                "error_type": None,
                "attempts": 1,
                "max_retries": 0,
                "created_at": "2026-11-27T18:00:00Z",
                "eta": None,
                "started_at": "2026-11-27T18:00:00.001Z",
                "completed_at": "2026-11-27T18:00:00.120Z",
                "progress": None,
                "progress_message": None,
                "callback": None,
            }
        }
    )

    id: str = Field(description="The task id returned by delay().")
    name: str = Field(description="The registered task name.")
    status: TaskStatus
    priority: TaskPriority
    result: Any = Field(default=None, description="The return value, once successful.")
    error: str | None = Field(
        default=None, description="'ExceptionType: message' for a failed or cancelled task."
    )
    error_type: str | None = Field(default=None, description="The exception's type name.")
    attempts: int = Field(description="Runs started so far (retries included).")
    max_retries: int
    created_at: datetime
    eta: datetime | None = Field(default=None, description="Not run before this time.")
    started_at: datetime | None = None
    completed_at: datetime | None = None
    progress: float | None = Field(default=None, description="0..1, reported by the task.")
    progress_message: str | None = None
    callback: CallbackState | None = None

    @classmethod
    def from_record(cls, record: TaskRecord) -> TaskInfo:
        callback = None
        if record.callback is not None:
            delivery = record.delivery
            callback = CallbackState(
                address=record.callback.address,
                data=record.callback.data,
                state=delivery.state if delivery else "pending",
                attempts=delivery.attempts if delivery else 0,
                last_error=delivery.last_error if delivery else None,
                delivered_at=delivery.delivered_at if delivery else None,
                delivery_id=delivery.delivery_id if delivery else None,
            )
        return cls(
            id=record.id,
            name=record.name,
            status=record.status,
            priority=record.priority,
            result=record.result,
            error=record.error,
            error_type=record.error_type,
            attempts=record.attempts,
            max_retries=record.policy.max_retries,
            created_at=record.created_at,
            eta=record.eta,
            started_at=record.started_at,
            completed_at=record.completed_at,
            progress=record.progress,
            progress_message=record.progress_message,
            callback=callback,
        )


class TaskList(BaseModel):
    """A page of recent tasks, newest first."""

    tasks: list[TaskInfo]
    count: int = Field(description="How many tasks are in this page.")


def task_info(record: TaskRecord) -> TaskInfo:
    """The API view of a record."""
    return TaskInfo.from_record(record)


def task_json(record: TaskRecord) -> str:
    """The record as `TaskInfo` JSON, built and serialised once.

    A record that cannot be shown (a value no JSON encoder accepts, written before values
    were checked or by a foreign writer) becomes an error entry instead of breaking a whole
    list, stream or dashboard.
    """
    try:
        return TaskInfo.from_record(record).model_dump_json()
    except Exception as exc:
        logger.warning("task %s cannot be shown as stored: %s", record.id, exc)
        return TaskInfo(
            id=record.id,
            name=str(record.name),
            status=record.status,
            priority=record.priority,
            error=f"UnreadableRecord: the stored task cannot be shown ({type(exc).__name__})",
            error_type="UnreadableRecord",
            attempts=record.attempts,
            max_retries=record.policy.max_retries,
            created_at=record.created_at,
        ).model_dump_json()
