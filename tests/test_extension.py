"""The extension: lifespan chaining, DI, two apps, Starlette, errors as HTTP answers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from fastworker_fastapi import (
    ConfigurationError,
    FastWorker,
    InProcessWorkers,
    NotRunningError,
    TaskClient,
    TaskClientDep,
    background_task,
    get_fastworker,
)
from tests.conftest import serve

EVENTS: list[str] = []


@background_task
async def ext_uses_app_state(key: str) -> str:
    """A task that needs what the app's own lifespan opened."""
    EVENTS.append(f"task {key}")
    return key


@background_task
def ext_square(n: int) -> int:
    return n * n


async def test_chains_the_apps_lifespan_and_its_state() -> None:
    EVENTS.clear()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        EVENTS.append("app start")
        yield {"db": "pool"}
        EVENTS.append("app stop")

    app = FastAPI(lifespan=lifespan)
    fw = FastWorker(app)

    @app.get("/state")
    async def state(request: Request, client: TaskClientDep) -> dict[str, Any]:
        task_id = await client.delay("ext_uses_app_state", "from-route")
        await client.wait(task_id)
        return {"db": request.state.db, "running": client.running}

    async with serve(app) as http:
        assert EVENTS == ["app start"]
        response = await http.get("/state")
        assert response.json() == {"db": "pool", "running": True}
        assert fw.client.running
    assert EVENTS == ["app start", "task from-route", "app stop"]
    assert not fw.client.running


async def test_plain_starlette_lifespan_is_chained() -> None:
    started: list[bool] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        started.append(True)
        yield

    app = Starlette(lifespan=lifespan)
    fw = FastWorker(app)
    async with serve(app):
        assert started == [True] and fw.client.running


async def test_factory_form_and_attaching_twice_is_an_error() -> None:
    fw = FastWorker(workers=InProcessWorkers(concurrency=2))
    app = FastAPI()
    fw.init_app(app)
    with pytest.raises(ConfigurationError, match="already attached"):
        fw.init_app(FastAPI())
    with pytest.raises(ConfigurationError, match="already has a FastWorker"):
        FastWorker(app)
    async with serve(app):
        assert (await fw.client.submit_task("ext_square", args=(3,))).result == 9


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"result_ttl": 0}, "result_ttl"),
        ({"max_results": 0}, "max_results"),
        ({"max_pending": 0}, "max_pending"),
        ({"shutdown_timeout": -1}, "shutdown_timeout"),
        ({"prefix": "tasks"}, "prefix"),
        ({"prefix": "/tasks/"}, "prefix"),
    ],
)
def test_bad_settings_are_refused(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        FastWorker(FastAPI(), **options)


def test_bad_worker_settings_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="concurrency"):
        InProcessWorkers(concurrency=0)
    with pytest.raises(ConfigurationError, match="thread_limit"):
        InProcessWorkers(thread_limit=0)


async def test_two_apps_in_one_process_are_independent() -> None:
    apps = []
    for label in ("a", "b"):
        app = FastAPI()
        fw = FastWorker(app)

        @app.post("/square/{n}")
        async def square(n: int, client: TaskClientDep) -> dict[str, Any]:
            task_id = await ext_square.delay(n)  # the handle finds *this* app's client
            return {"task_id": task_id, "mine": client.get_status(task_id) is not None}

        apps.append((label, app, fw))

    (_, app_a, fw_a), (_, app_b, fw_b) = apps
    async with serve(app_a) as http_a, serve(app_b) as http_b:
        id_a = (await http_a.post("/square/2")).json()
        id_b = (await http_b.post("/square/3")).json()
        assert id_a["mine"] and id_b["mine"]
        await fw_a.client.wait(id_a["task_id"])
        await fw_b.client.wait(id_b["task_id"])
        assert fw_b.client.get_result(id_a["task_id"]) is None
        assert fw_a.client.get_result(id_b["task_id"]) is None
        assert (await http_a.get(f"/tasks/{id_b['task_id']}")).status_code == 404
        assert (await http_b.get(f"/tasks/{id_b['task_id']}")).json()["result"] == 9


async def test_plain_starlette_app_gets_routes_and_di() -> None:
    async def submit(request: Request) -> JSONResponse:
        client = await get_fastworker(request)
        result = await client.submit_task("ext_square", args=(5,))
        return JSONResponse({"task_id": result.task_id, "result": result.result})

    app = Starlette(routes=[Route("/submit", submit, methods=["POST"])])
    FastWorker(app, prefix="/jobs")
    async with serve(app) as http:
        body = (await http.post("/submit")).json()
        assert body["result"] == 25
        status = await http.get(f"/jobs/{body['task_id']}")
        assert status.status_code == 200 and status.json()["status"] == "success"
        assert (await http.get("/jobs")).json()["count"] == 1


async def test_route_dependencies_protect_the_status_routes() -> None:
    def require_token(x_token: Annotated[str | None, Header()] = None) -> None:
        if x_token != "secret":
            raise HTTPException(status_code=401, detail="bad token")

    app = FastAPI()
    fw = FastWorker(app, route_dependencies=[Depends(require_token)])
    async with serve(app) as http:
        task_id = (await fw.client.submit_task("ext_square", args=(2,))).task_id
        for method, path in [
            ("GET", "/tasks"),
            ("GET", f"/tasks/{task_id}"),
            ("DELETE", f"/tasks/{task_id}"),
        ]:
            denied = await http.request(method, path)
            assert denied.status_code == 401, path
        allowed = await http.get(f"/tasks/{task_id}", headers={"x-token": "secret"})
        assert allowed.status_code == 200


async def test_dependency_without_lifespan_is_a_clear_503() -> None:
    app = FastAPI()
    FastWorker(app)

    @app.get("/x")
    async def x(client: Annotated[TaskClient, Depends(get_fastworker)]) -> None:
        raise AssertionError("not reached")

    import httpx

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        response = await http.get("/x")
    assert response.status_code == 503
    assert "lifespan" in response.json()["detail"]


async def test_dependency_on_an_app_without_the_extension() -> None:
    app = FastAPI()

    @app.get("/x")
    async def x(client: TaskClientDep) -> None:
        raise AssertionError("not reached")

    async with serve(app) as http:
        # No extension, so no exception handler either: the error itself explains.
        with pytest.raises(NotRunningError, match=r"FastWorker\(app\)"):
            await http.get("/x")


async def test_submission_errors_become_http_answers() -> None:
    app = FastAPI()
    FastWorker(app, max_pending=1)

    @app.post("/run/{name}")
    async def run(name: str, client: TaskClientDep) -> dict[str, str]:
        return {"id": await client.delay(name, 1)}

    async with serve(app) as http:
        unknown = await http.post("/run/nope")
        assert unknown.status_code == 422
        assert "no task registered under 'nope'" in unknown.json()["detail"]


async def test_handle_outside_any_app_explains_itself() -> None:
    with pytest.raises(NotRunningError, match="No running FastWorker"):
        await ext_square.delay(2)
    app_a, app_b = FastAPI(), FastAPI()
    fw_a, fw_b = FastWorker(app_a), FastWorker(app_b)
    async with serve(app_a), serve(app_b):
        with pytest.raises(NotRunningError, match="2 FastWorker extensions are running"):
            await ext_square.delay(2)
        task_id = await ext_square.options(client=fw_b.client).delay(4)
        assert (await fw_b.client.wait(task_id)).result == 16
        assert fw_a.client.get_result(task_id) is None
    async with serve(app_b):  # the only one running now: found without being named
        task_id = await ext_square.delay(3)
        assert (await fw_b.client.wait(task_id)).result == 9
    with pytest.raises(NotRunningError, match="No running FastWorker"):
        await ext_square.delay(2)  # stopped: not found any more


async def test_run_without_an_app_and_not_twice() -> None:
    fw = FastWorker()
    async with fw.run() as client:
        assert (await client.submit_task("ext_square", args=(6,))).result == 36
        with pytest.raises(ConfigurationError, match="already running"):
            async with fw.run():
                pass  # pragma: no cover
