"""fastworker-fastapi: background tasks for FastAPI and Starlette on FastWorker.

One extension, no broker: `FastWorker(app)` starts workers with the app's lifespan, routes
get FastWorker's Client API by dependency injection, `@background_task` registers tasks.
"""

from fastworker.tasks.models import CallbackInfo, Task, TaskPriority, TaskResult, TaskStatus

from fastworker_fastapi.callbacks import (
    CallbackSettings,
    TaskCallback,
    VerifiedCallback,
    sign_callback,
    verify_callback_signature,
)
from fastworker_fastapi.client import TaskClient
from fastworker_fastapi.dependencies import TaskClientDep, get_fastworker
from fastworker_fastapi.errors import (
    CallbackSignatureError,
    CapacityError,
    ConfigurationError,
    FastWorkerError,
    InvalidTaskArgumentsError,
    InvalidTaskOptionsError,
    NotRunningError,
    QueueFullError,
    ScheduleNotFoundError,
    ShuttingDownError,
    StoreUnavailableError,
    SubmissionError,
    TaskAlreadyFinishedError,
    TaskFailed,
    TaskNotFoundError,
    UnknownTaskError,
    WaitTimeoutError,
)
from fastworker_fastapi.extension import FastWorker
from fastworker_fastapi.models import CallbackState, TaskInfo, TaskList
from fastworker_fastapi.periodic import Schedule, ScheduleInfo, ScheduleList, schedule
from fastworker_fastapi.progress import report_progress
from fastworker_fastapi.stores import MemoryStore, SQLiteStore, TaskStore
from fastworker_fastapi.tasks import BackgroundTask, TaskCall, background_task
from fastworker_fastapi.workers import InProcessWorkers, RemoteWorkers

__version__ = "0.1.0"

__all__ = [
    "BackgroundTask",
    "CallbackInfo",
    "CallbackSettings",
    "CallbackSignatureError",
    "CallbackState",
    "CapacityError",
    "ConfigurationError",
    "FastWorker",
    "FastWorkerError",
    "InProcessWorkers",
    "InvalidTaskArgumentsError",
    "InvalidTaskOptionsError",
    "MemoryStore",
    "NotRunningError",
    "QueueFullError",
    "RemoteWorkers",
    "SQLiteStore",
    "Schedule",
    "ScheduleInfo",
    "ScheduleList",
    "ScheduleNotFoundError",
    "ShuttingDownError",
    "StoreUnavailableError",
    "SubmissionError",
    "Task",
    "TaskAlreadyFinishedError",
    "TaskCall",
    "TaskCallback",
    "TaskClient",
    "TaskClientDep",
    "TaskFailed",
    "TaskInfo",
    "TaskList",
    "TaskNotFoundError",
    "TaskPriority",
    "TaskResult",
    "TaskStatus",
    "TaskStore",
    "UnknownTaskError",
    "VerifiedCallback",
    "WaitTimeoutError",
    "background_task",
    "get_fastworker",
    "report_progress",
    "schedule",
    "sign_callback",
    "verify_callback_signature",
]
