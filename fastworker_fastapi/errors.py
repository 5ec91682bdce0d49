"""The exceptions this package raises, one tree so callers can catch at the right level.

```
FastWorkerError                       status_code
├── ConfigurationError                500  wrong set-up: attached twice, bad settings
├── NotRunningError                   503  no running extension (lifespan not started)
├── StoreUnavailableError             503  the task store's database cannot be reached now
├── SubmissionError                   422  a submission was refused; nothing was recorded
│   ├── UnknownTaskError              422  no task registered under that name
│   ├── InvalidTaskArgumentsError     422  arguments not JSON-serialisable
│   ├── InvalidTaskOptionsError       422  unknown priority, negative countdown, ...
│   └── CapacityError                 503  the queue is full or shutdown has begun
│       ├── QueueFullError
│       └── ShuttingDownError
├── TaskNotFoundError                 404  unknown or expired task id
├── ScheduleNotFoundError             404  no periodic schedule of that name
├── TaskAlreadyFinishedError          409  cancelling a task that already finished
├── CallbackSignatureError            401  a received callback is forged, altered or stale
└── WaitTimeoutError                  504  `wait()` gave up before the task finished

TaskFailed                            raised by executors: a failure known only by text
```

Every `FastWorkerError` carries the HTTP `status_code` that the extension's exception
handler answers with, so a route that calls `client.delay(...)` with bad input returns a
clear 4xx/5xx with a `detail` instead of a bare 500.
"""

from __future__ import annotations

__all__ = [
    "CallbackSignatureError",
    "CapacityError",
    "ConfigurationError",
    "FastWorkerError",
    "InvalidTaskArgumentsError",
    "InvalidTaskOptionsError",
    "NotRunningError",
    "QueueFullError",
    "ScheduleNotFoundError",
    "ShuttingDownError",
    "StoreUnavailableError",
    "SubmissionError",
    "TaskAlreadyFinishedError",
    "TaskFailed",
    "TaskNotFoundError",
    "UnknownTaskError",
    "WaitTimeoutError",
]


class FastWorkerError(Exception):
    """Base of every error raised by fastworker-fastapi."""

    status_code: int = 500


class ConfigurationError(FastWorkerError):
    """The extension or a task was set up wrongly; the message says how to fix it."""


class NotRunningError(FastWorkerError, RuntimeError):
    """No running extension: the app's lifespan has not started, or has ended."""

    status_code = 503


class StoreUnavailableError(FastWorkerError, ConnectionError):
    """The task store's database cannot be reached now (a server restart, a network cut).

    Nothing was recorded by the call that raised it; trying again later may work. Writes
    to tasks that are already running are not refused: the store retries them until the
    database is back.
    """

    status_code = 503


class SubmissionError(FastWorkerError, ValueError):
    """A submission was refused before anything was recorded."""

    status_code = 422


class UnknownTaskError(SubmissionError, LookupError):
    """No task is registered under the given name."""


class InvalidTaskArgumentsError(SubmissionError, TypeError):
    """The arguments cannot travel as JSON (the same code must work with remote workers)."""


class InvalidTaskOptionsError(SubmissionError):
    """A submission option is invalid: unknown priority, negative countdown, bad eta..."""


class CapacityError(SubmissionError):
    """The extension cannot take the task now; trying again later may work."""

    status_code = 503


class QueueFullError(CapacityError):
    """`max_queued` tasks are already waiting; the submission is refused, not dropped."""


class ShuttingDownError(CapacityError):
    """Shutdown has begun: new tasks are refused so that draining can finish."""


class TaskNotFoundError(FastWorkerError, LookupError):
    """No task with this id: it never existed or its result has expired."""

    status_code = 404


class ScheduleNotFoundError(FastWorkerError, LookupError):
    """No periodic schedule of this name in this app (`fw.schedule(...)`, `cron=`...)."""

    status_code = 404


class TaskAlreadyFinishedError(FastWorkerError):
    """The task reached a final status, so it can no longer be cancelled."""

    status_code = 409


class CallbackSignatureError(FastWorkerError):
    """A received callback's signature is missing, wrong or too old: do not trust it."""

    status_code = 401


class WaitTimeoutError(FastWorkerError, TimeoutError):
    """`wait()` returned control before the task finished; the task itself goes on."""

    status_code = 504


class TaskFailed(Exception):
    """A task failure known only as text (a remote worker's error), with its type name."""

    def __init__(self, error_type: str, message: str, *, retry: bool = True) -> None:
        super().__init__(f"{error_type}: {message}" if message else error_type)
        self.error_type = error_type
        self.message = message
        self.retry = retry  # False: another attempt would fail the same way
