"""The public namespace is exactly what we mean to export, each name documented."""

from __future__ import annotations

from pathlib import Path

import fastworker.tasks.models as fastworker_models

import fastworker_fastapi

EXPECTED = {
    # the extension, its settings and the client
    "FastWorker",
    "InProcessWorkers",
    "RemoteWorkers",
    "CallbackSettings",
    "TaskClient",
    "TaskClientDep",
    "get_fastworker",
    # task stores
    "MemoryStore",
    "SQLiteStore",
    "TaskStore",
    # tasks
    "background_task",
    "BackgroundTask",
    "TaskCall",
    "report_progress",
    # periodic tasks
    "schedule",
    "Schedule",
    "ScheduleInfo",
    "ScheduleList",
    "ScheduleNotFoundError",
    # models: FastWorker's own, and ours
    "TaskPriority",
    "TaskStatus",
    "TaskResult",
    "Task",
    "CallbackInfo",
    "TaskInfo",
    "TaskList",
    "CallbackState",
    "TaskCallback",
    "VerifiedCallback",
    "sign_callback",
    "verify_callback_signature",
    # errors
    "FastWorkerError",
    "ConfigurationError",
    "NotRunningError",
    "SubmissionError",
    "UnknownTaskError",
    "InvalidTaskArgumentsError",
    "InvalidTaskOptionsError",
    "CapacityError",
    "QueueFullError",
    "ShuttingDownError",
    "StoreUnavailableError",
    "TaskNotFoundError",
    "TaskAlreadyFinishedError",
    "WaitTimeoutError",
    "CallbackSignatureError",
    "TaskFailed",
}


def test_exported_names_are_the_intended_ones_and_sorted() -> None:
    assert set(fastworker_fastapi.__all__) == EXPECTED
    assert fastworker_fastapi.__all__ == sorted(fastworker_fastapi.__all__)
    for name in fastworker_fastapi.__all__:
        assert getattr(fastworker_fastapi, name) is not None


def test_fastworker_models_are_fastworkers_own() -> None:
    """Code written for FastWorker must get the very same classes."""
    assert fastworker_fastapi.TaskPriority is fastworker_models.TaskPriority
    assert fastworker_fastapi.TaskStatus is fastworker_models.TaskStatus
    assert fastworker_fastapi.TaskResult is fastworker_models.TaskResult
    assert fastworker_fastapi.Task is fastworker_models.Task
    assert fastworker_fastapi.CallbackInfo is fastworker_models.CallbackInfo


def test_every_public_name_is_documented() -> None:
    docs = "\n".join(p.read_text() for p in (Path(__file__).parents[1] / "docs").glob("*.md"))
    undocumented = [name for name in EXPECTED if f"`{name}" not in docs and name not in docs]
    assert undocumented == []
    for name in EXPECTED:
        assert (getattr(fastworker_fastapi, name).__doc__ or "").strip(), name
