"""The example app: `make run` serves it (in-process workers); `make run-remote` uses
spawned FastWorker control planes instead (`FASTWORKER_MODE=remote`).

Open http://127.0.0.1:8000/docs for the API and http://127.0.0.1:8000/tasks/dashboard for
the live task list.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Path, Query, status
from pydantic import BaseModel, Field

from example_app import tasks, users
from fastworker_fastapi import (
    FastWorker,
    InProcessWorkers,
    RemoteWorkers,
    TaskCallback,
    TaskClientDep,
    TaskPriority,
    TaskResult,
    TaskStatus,
)
from fastworker_fastapi.workers import WorkerSettings


def choose_workers() -> WorkerSettings:
    """In-process by default; FASTWORKER_MODE=remote for spawned control planes."""
    if os.environ.get("FASTWORKER_MODE", "inprocess") == "remote":
        return RemoteWorkers(spawn=2)
    return InProcessWorkers(concurrency=8)


app = FastAPI(title="fastworker-fastapi example")
fw = FastWorker(app, workers=choose_workers())

# -- a tiny bounded "database" ------------------------------------------------------------


class UserIn(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    email: str = Field(pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$", max_length=254)


class User(UserIn):
    id: int
    welcome_email_task_id: str
    welcome_email_sent: bool = False


class Problem(BaseModel):
    """What an error answer carries (FastAPI's `HTTPException` and this package's errors)."""

    detail: str


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The error answers a route declares in the OpenAPI schema, besides FastAPI's 422."""
    described = {
        400: "The body is not valid JSON.",
        404: "Nothing with this id.",
        500: "The task failed.",
    }
    return {code: {"model": Problem, "description": described[code]} for code in codes}


# Finite and bounded: the sum of two such numbers is still a JSON number.
Number = Annotated[float, Query(ge=-1e12, le=1e12, allow_inf_nan=False)]


# -- 1. blocking: submit_task waits for the result ----------------------------------------


@app.post("/math/add", responses=errors(500))
async def add_numbers(x: Number, y: Number, client: TaskClientDep) -> dict[str, Any]:
    """Blocks until the task is done: for quick tasks whose result the response needs."""
    result = await client.submit_task("add", args=(x, y), priority=TaskPriority.HIGH)
    if result.status is not TaskStatus.SUCCESS:
        raise HTTPException(status_code=500, detail=result.error)
    return {"result": result.result}


# -- 2. non-blocking: delay, then poll get_task_result -----------------------------------


@app.post("/reports/{report_id}", status_code=status.HTTP_202_ACCEPTED)
async def start_report(
    report_id: int, client: TaskClientDep, pages: Annotated[int, Query(ge=1, le=50)] = 5
) -> dict[str, str]:
    """Returns at once with a task id; poll `GET /reports/tasks/{task_id}` (or /tasks/...)."""
    task_id = await tasks.build_report.delay(report_id, pages=pages)
    return {"task_id": task_id, "status_url": f"/reports/tasks/{task_id}"}


@app.get("/reports/tasks/{task_id}", responses=errors(404))
async def report_status(task_id: str, client: TaskClientDep) -> TaskResult:
    """FastWorker's polling pattern: `PENDING` until the task is final."""
    result = await client.get_task_result(task_id)
    if result is None:
        raise HTTPException(status_code=404, detail=f"no report task {task_id}")
    return result


# -- 3. a batch, followed through the status routes --------------------------------------


@app.post("/images/thumbnails", status_code=status.HTTP_202_ACCEPTED)
async def make_thumbnails(
    client: TaskClientDep, count: Annotated[int, Query(ge=1, le=100)] = 10
) -> dict[str, Any]:
    """All accepted or none; follow each with `GET /tasks/{id}` or the dashboard."""
    ids = await client.submit_batch(
        [{"task_name": "resize_image", "args": (i,)} for i in range(count)]
    )
    return {"task_ids": ids}


@app.get("/images/thumbnails")
async def thumbnails_progress(
    client: TaskClientDep, ids: Annotated[list[str], Query()]
) -> dict[str, Any]:
    """How far a batch is: finished / total, and its results so far."""
    results = [await client.get_task_result(i) for i in ids]
    done = [r for r in results if r is not None and r.status is not TaskStatus.PENDING]
    return {
        "finished": len(done),
        "total": len(ids),
        "results": [r.result for r in done if r.status is TaskStatus.SUCCESS],
    }


# -- 4. fire and forget -------------------------------------------------------------------


@app.post("/events", status_code=status.HTTP_202_ACCEPTED)
async def track(name: str, client: TaskClientDep) -> None:
    """Queued and forgotten: the response does not wait and returns no id."""
    await client.delay("track_event", name, {"source": "api"}, priority="low")


# -- 5. the web-API pattern: create a user, email in the background, callback when done -


@app.post("/users", status_code=status.HTTP_201_CREATED, responses=errors(400))
async def create_user(body: UserIn, client: TaskClientDep) -> User:
    user_id = await users.create(body.name, body.email)
    task_id = await client.delay_with_callback(
        "send_welcome_email",
        "/hooks/welcome-sent",  # this app's own route, called in-process
        user_id,
        body.email,
        callback_data={"user_id": user_id},
    )
    await users.set_task(user_id, task_id)
    return User(id=user_id, welcome_email_task_id=task_id, **body.model_dump())


UserId = Annotated[int, Path(ge=1, le=2**62)]


@app.get("/users/{user_id}", responses=errors(404))
async def get_user(user_id: UserId) -> User:
    """Any worker process finds any user (the table is shared, like the task store)."""
    user = await users.get(user_id)
    if user is None or user["welcome_email_task_id"] is None:
        raise HTTPException(status_code=404, detail=f"no user {user_id}")
    return User(**user)


@fw.callback_route("/hooks/welcome-sent", include_in_schema=False)
async def welcome_sent(callback: TaskCallback) -> None:
    """Called by the extension when the email task is final (signed: forgeries get 401)."""
    user_id = int((callback.callback_data or {}).get("user_id", 0))
    if callback.status is TaskStatus.SUCCESS:
        await users.mark_sent(user_id)


# -- 6. the status routes are mounted by the extension at /tasks ---------------------------
