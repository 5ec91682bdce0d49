"""`FastWorker` as a drop-in for fastworker's FastAPI glue, and code written for its Client."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from fastworker_fastapi import (
    CallbackSettings,
    ConfigurationError,
    FastWorker,
    InProcessWorkers,
    InvalidTaskOptionsError,
    TaskPriority,
    TaskStatus,
    background_task,
)
from tests.conftest import serve


@background_task
def dr_double(n: int) -> int:
    return 2 * n


async def test_every_convenience_method_delegates_to_the_client() -> None:
    fw = FastWorker(
        FastAPI(),
        workers=InProcessWorkers(concurrency=3),
        callbacks=CallbackSettings(app_paths=("/hooks/x",)),
    )
    assert fw.worker_count == 0
    async with fw.run() as client:
        assert fw.worker_count == 3
        first = await fw.delay("dr_double", 1, priority=TaskPriority.HIGH)
        done = await fw.submit_task("dr_double", args=(2,))
        assert done.status is TaskStatus.SUCCESS and done.result == 4
        called_back = await fw.delay_with_callback("dr_double", "/hooks/x", 3)
        batch = await fw.submit_batch([{"task_name": "dr_double", "args": (4,)}])
        for task_id in [first, called_back, *batch]:
            await client.wait(task_id)
        result = await fw.get_task_result(first)
        assert result is not None and result.result == 2
        assert fw.get_result(batch[0]) == await client.get_task_result(batch[0])
        assert fw.get_status(first) is TaskStatus.SUCCESS
        assert await fw.get_task_result("unknown") is None
        later = await fw.delay("dr_double", 5, countdown=3600)
        assert await fw.cancel_task(later) is True
        assert await fw.cancel_task(later) is False
    assert fw.worker_count == 0


async def test_client_start_and_stop_are_harmless_wherever_they_are_called() -> None:
    app = FastAPI()
    calls: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:  # what an app written for fastworker's Client does
        await fw.client.start()
        calls.append("started")
        yield
        fw.client.stop()
        calls.append("stopped")

    app.router.lifespan_context = lifespan
    fw = FastWorker(app)
    async with serve(app):
        await fw.client.start()
        fw.client.stop()  # the lifespan owns the workers: tasks still run
        assert (await fw.submit_task("dr_double", (21,))).result == 42
    assert calls == ["started", "stopped"]


def test_client_kwargs_are_accepted_and_typos_refused() -> None:
    fw = FastWorker(FastAPI(), client_kwargs={"timeout": 60, "retries": 5})
    assert fw.client_kwargs == {"timeout": 60, "retries": 5}
    assert FastWorker(FastAPI()).client_kwargs == {}
    with pytest.raises(ConfigurationError, match=r"unknown client_kwargs \['timout'\]"):
        FastWorker(FastAPI(), client_kwargs={"timout": 60})


async def test_the_apps_own_routes_win_over_the_status_routes() -> None:
    app = FastAPI()
    fw = FastWorker(app)

    @app.get("/tasks/{task_id}")
    async def mine(task_id: str) -> dict[str, str]:
        return {"mine": task_id}

    @app.get("/{full_path:path}")  # a single-page app's catch-all: not under the prefix
    async def spa(full_path: str) -> dict[str, str]:
        return {"page": full_path}

    async with serve(app) as http:
        task_id = await fw.delay("dr_double", 1)
        assert (await http.get(f"/tasks/{task_id}")).json() == {"mine": task_id}
        # Other methods and the fixed paths are still the extension's, catch-all or not.
        assert (await http.delete(f"/tasks/{task_id}")).status_code in (200, 409)
        assert (await http.get("/tasks")).json()["count"] == 1
        assert (await http.get(f"/tasks/{task_id}/events")).status_code == 200
        assert (await http.get("/about")).json() == {"page": "about"}


async def test_precedence_on_a_plain_starlette_app() -> None:
    async def mine(request: Request) -> JSONResponse:
        return JSONResponse({"mine": request.path_params["task_id"]})

    app = Starlette()
    fw = FastWorker(app)
    app.router.routes.append(Route("/tasks/{task_id}", mine, methods=["DELETE"]))
    async with serve(app) as http:
        task_id = await fw.delay("dr_double", 1, countdown=3600)
        assert (await http.delete(f"/tasks/{task_id}")).json() == {"mine": task_id}
        assert (await http.get(f"/tasks/{task_id}")).json()["status"] == "scheduled"


async def test_an_app_route_added_after_the_first_request_still_wins() -> None:
    # The status routes keep the list of the app's own routes, made anew when it grows.
    async def mine(request: Request) -> JSONResponse:
        return JSONResponse({"mine": request.path_params["task_id"]})

    app = Starlette()
    fw = FastWorker(app)
    async with serve(app) as http:
        task_id = await fw.delay("dr_double", 1, countdown=3600)
        assert (await http.get(f"/tasks/{task_id}")).json()["status"] == "scheduled"
        app.router.routes.append(Route("/tasks/{task_id}", mine, methods=["GET"]))
        assert (await http.get(f"/tasks/{task_id}")).json() == {"mine": task_id}


async def test_the_start_up_line_names_mode_workers_store_and_routes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="fastworker_fastapi")
    async with FastWorker(FastAPI(), workers=InProcessWorkers(concurrency=2)).run():
        pass
    async with FastWorker(FastAPI(), prefix=None).run():
        pass
    async with FastWorker(FastAPI(), dashboard=False).run():
        pass
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("FastWorker st")]
    assert lines == [
        "FastWorker started: mode=in-process workers=2 store=memory "
        "routes=/tasks (dashboard /tasks/dashboard)",
        "FastWorker stopped",
        "FastWorker started: mode=in-process workers=8 store=memory routes=none",
        "FastWorker stopped",
        "FastWorker started: mode=in-process workers=8 store=memory routes=/tasks",
        "FastWorker stopped",
    ]


async def test_loopback_listeners_are_allowed_only_when_turned_on() -> None:
    lenient = CallbackSettings(loopback_listeners=True, max_attempts=1, timeout=0.1)
    async with FastWorker(FastAPI(), callbacks=lenient).run() as client:
        for host in ("127.0.0.1", "localhost", "[::1]"):
            await client.delay_with_callback("dr_double", f"tcp://{host}:9", 1)
    async with FastWorker(FastAPI()).run() as client:  # off by default
        with pytest.raises(InvalidTaskOptionsError, match="allowed_hosts"):
            await client.delay_with_callback("dr_double", "tcp://127.0.0.1:9", 1)
