"""An app shaped like fastworker's own `examples/fastapi_example.py`, on our extension.

Written from that example's behaviour (not copied): tasks declared with fastworker's own
`@task`, the extension created with `FastWorker(app)` and every route going through the
glue's convenience methods (`fw.delay`, `fw.submit_task`, `fw.delay_with_callback`,
`fw.submit_batch`, `fw.get_task_result`, `fw.get_result`, `fw.cancel_task`,
`fw.worker_count`), with its own `/tasks/...` routes next to the extension's. The one line
that differs from an app written for fastworker is the import of `FastWorker` (and one
setting for its local callback listener).

Task names carry an `fwx_` prefix only because the test process also imports our own
example app, whose task names are the same.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastworker import task
from fastworker.tasks.models import TaskPriority

from fastworker_fastapi import CallbackSettings, FastWorker  # was: fastworker.integration...

app = FastAPI(title="fastworker's FastAPI example, on fastworker-fastapi")
# The one change besides the import: tcp:// callbacks to this host are opt-in (see
# docs/callbacks.md, "Threat model"); this example's listener address is fixed in the code.
fw = FastWorker(app, callbacks=CallbackSettings(loopback_listeners=True))

CALLBACK_ADDRESS = "tcp://127.0.0.1:6000"  # a FastWorker callback listener (tests rebind it)
TEMP_FILES_REMOVED = 42


@task
def fwx_send_welcome_email(user_id: int, email: str) -> str:
    return f"welcome mail for user {user_id} went to {email}"


@task
def fwx_generate_report(report_type: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"report_type": report_type, "status": "generated", "params": params}


@task
def fwx_cleanup_temp_files(directory: str) -> int:
    return TEMP_FILES_REMOVED


@app.post("/users/{user_id}/welcome")
async def welcome_user(user_id: int, email: str) -> dict[str, Any]:
    """Queue the mail and answer at once with its id."""
    return {"task_id": await fw.delay("fwx_send_welcome_email", user_id, email), "status": "queued"}


@app.post("/reports/{report_type}")
async def create_report(report_type: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run the report at high priority and answer with its result."""
    outcome = await fw.submit_task(
        "fwx_generate_report", args=(report_type, params), priority=TaskPriority.HIGH
    )
    return {"status": outcome.status.value, "result": outcome.result}


@app.post("/tasks/cleanup")
async def trigger_cleanup() -> dict[str, Any]:
    """Clean up at low priority; a listener hears about it when it is done."""
    task_id = await fw.delay_with_callback(
        "fwx_cleanup_temp_files",
        CALLBACK_ADDRESS,
        "/tmp",
        priority=TaskPriority.LOW,
        callback_data={"notify": "admin"},
    )
    return {"task_id": task_id, "status": "scheduled"}


@app.post("/tasks/batch")
async def batch_submit() -> dict[str, Any]:
    """Three tasks, accepted together."""
    ids = await fw.submit_batch(
        [
            {"task_name": "fwx_send_welcome_email", "args": (101, "a@b.com")},
            {"task_name": "fwx_send_welcome_email", "args": (102, "c@d.com")},
            {"task_name": "fwx_cleanup_temp_files", "args": ("/tmp",)},
        ]
    )
    return {"task_ids": ids, "count": len(ids)}


@app.get("/tasks/{task_id}")
async def task_status(task_id: str) -> dict[str, Any]:
    """The example's own status format (this route wins over the extension's)."""
    found = await fw.get_task_result(task_id)
    if found:
        return {"task_id": task_id, "status": found.status.value, "result": found.result}
    cached = fw.get_result(task_id)
    if cached:  # fastworker's client keeps a local copy; ours has one source of truth
        return {"task_id": task_id, "status": cached.status.value, "local": True}
    return {"task_id": task_id, "status": "not_found"}


@app.delete("/tasks/{task_id}")
async def cancel_task(task_id: str) -> dict[str, Any]:
    return {"task_id": task_id, "cancelled": await fw.cancel_task(task_id)}


@app.get("/health")
async def health() -> dict[str, Any]:
    return {"status": "healthy", "workers_discovered": fw.worker_count}


@app.get("/")
async def root() -> dict[str, str]:
    return {"message": "FastWorker + FastAPI, no broker"}
