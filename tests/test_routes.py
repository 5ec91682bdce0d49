"""The status routes: answers, error statuses and the OpenAPI schema."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
from fastapi import FastAPI

from fastworker_fastapi import FastWorker, InProcessWorkers, TaskStatus, background_task
from tests.conftest import eventually, serve

GATE: dict[str, anyio.Event] = {}


@background_task
async def rt_hold(key: str) -> str:
    await GATE[key].wait()
    return key


@background_task
def rt_fail() -> None:
    raise KeyError("missing")


@background_task
def rt_ok(n: int) -> int:
    return n


async def test_get_task_shows_the_full_state() -> None:
    app = FastAPI()
    fw = FastWorker(app)
    async with serve(app) as http:
        ok = (await fw.client.submit_task("rt_ok", args=(1,))).task_id
        failed = (await fw.client.submit_task("rt_fail")).task_id
        body = (await http.get(f"/tasks/{ok}")).json()
        assert body["status"] == "success" and body["result"] == 1 and body["attempts"] == 1
        assert body["name"] == "rt_ok" and body["priority"] == "normal"
        assert body["created_at"].endswith("Z") and body["completed_at"] is not None
        failure = (await http.get(f"/tasks/{failed}")).json()
        assert failure["status"] == "failure"
        assert failure["error"] == "KeyError: 'missing'" and failure["error_type"] == "KeyError"


async def test_unknown_malformed_and_finished_ids() -> None:
    app = FastAPI()
    fw = FastWorker(app)
    async with serve(app) as http:
        missing = "0b8e5d1c-3f57-4c2b-9c53-6f0d2f7d2a11"
        response = await http.get(f"/tasks/{missing}")
        assert response.status_code == 404 and missing in response.json()["detail"]
        assert (await http.delete(f"/tasks/{missing}")).status_code == 404
        assert (await http.get("/tasks/not-a-uuid")).status_code == 404  # no such route
        # Fixed paths are never taken for ids: other methods on them are 405s.
        assert (await http.delete("/tasks/events")).status_code == 405
        assert (await http.delete("/tasks/dashboard")).status_code == 405
        done = (await fw.client.submit_task("rt_ok", args=(2,))).task_id
        conflict = await http.delete(f"/tasks/{done}")
        assert conflict.status_code == 409 and "already finished" in conflict.json()["detail"]


async def test_delete_cancels_a_running_task() -> None:
    GATE["del"] = anyio.Event()
    app = FastAPI()
    fw = FastWorker(app)
    async with serve(app) as http:
        task_id = await fw.client.delay("rt_hold", "del")
        await eventually(lambda: fw.client.get_status(task_id) is TaskStatus.RUNNING)
        response = await http.delete(f"/tasks/{task_id}")
        assert response.status_code == 200
        assert response.json()["status"] == "cancelled"
        assert fw.client.get_status(task_id) is TaskStatus.CANCELLED


async def test_list_filters_and_limits() -> None:
    GATE["list"] = anyio.Event()
    app = FastAPI()
    fw = FastWorker(app, workers=InProcessWorkers(concurrency=1))
    async with serve(app) as http:
        done = [(await fw.client.submit_task("rt_ok", args=(i,))).task_id for i in range(3)]
        held = await fw.client.delay("rt_hold", "list")

        async def held_runs() -> bool:
            record = await fw.client.store.get(held)
            return record is not None and record.status is TaskStatus.RUNNING

        await eventually(held_runs, message="the held task running")
        everything = (await http.get("/tasks")).json()
        assert everything["count"] == 4
        assert [t["id"] for t in everything["tasks"]] == [held, *reversed(done)]
        only_ok = (await http.get("/tasks", params={"name": "rt_ok", "limit": 2})).json()
        assert [t["id"] for t in only_ok["tasks"]] == [done[2], done[1]]
        running = (await http.get("/tasks", params={"status": "running"})).json()
        assert [t["id"] for t in running["tasks"]] == [held]
        assert (await http.get("/tasks", params={"limit": 0})).status_code == 422
        assert (await http.get("/tasks", params={"limit": 501})).status_code == 422
        assert (await http.get("/tasks", params={"status": "weird"})).status_code == 422
        GATE["list"].set()


async def test_openapi_documents_the_routes_with_models() -> None:
    app = FastAPI()
    FastWorker(app)
    async with serve(app) as http:
        schema = (await http.get("/openapi.json")).json()
    paths = schema["paths"]
    get_one = paths["/tasks/{task_id}"]["get"]
    assert get_one["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/TaskInfo"
    }
    assert set(get_one["responses"]) >= {"200", "404", "422", "503"}
    assert "409" in paths["/tasks/{task_id}"]["delete"]["responses"]
    assert "TaskList" in schema["components"]["schemas"]


async def test_prefix_none_mounts_no_routes() -> None:
    app = FastAPI()
    FastWorker(app, prefix=None)
    async with serve(app) as http:
        assert (await http.get("/tasks")).status_code == 404


async def test_routes_answer_under_a_mount_and_a_custom_prefix() -> None:
    """The router refuses paths without its prefix before matching its routes: under a
    mount (a root path) and with another prefix, its routes still answer, and the app's
    own routes too."""
    inner = FastAPI()
    fw = FastWorker(inner, prefix="/jobs")

    @inner.get("/other")
    async def other() -> dict[str, bool]:
        return {"ok": True}

    outer = FastAPI()
    outer.mount("/api", inner)
    async with serve(inner):  # the inner app's lifespan starts the extension
        transport = httpx.ASGITransport(app=outer)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            task_id = (await fw.client.submit_task("rt_ok", args=(5,))).task_id
            body = (await http.get(f"/api/jobs/{task_id}")).json()
            assert body["status"] == "success" and body["result"] == 5
            assert (await http.get("/api/jobs")).json()["count"] == 1
            assert (await http.get("/api/other")).json() == {"ok": True}
            assert (await http.get(f"/api/tasks/{task_id}")).status_code == 404


async def test_status_routes_never_use_the_thread_pool() -> None:
    """Every status route's dependencies are `async def`: a plain `def` dependency makes
    FastAPI hop to its thread pool on every request (a status poll cost 20x a trivial
    route that way)."""
    import inspect

    from fastapi.routing import APIRoute

    def sync_calls(dependant: Any) -> list[str]:
        found = []
        for sub in dependant.dependencies:
            call = sub.call
            if not (inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)):
                found.append(getattr(call, "__qualname__", repr(call)))
            found += sync_calls(sub)
        return found

    def api_routes(routes: list[Any]) -> list[APIRoute]:
        found: list[APIRoute] = []
        for route in routes:
            if isinstance(route, APIRoute):
                found.append(route)
            elif hasattr(route, "original_router"):  # an included router (FastAPI >= 0.120)
                found += api_routes(route.original_router.routes)
        return found

    app = FastAPI()
    FastWorker(app, store="memory")
    routes = [r for r in api_routes(app.routes) if r.path.startswith("/tasks")]
    assert len(routes) >= 6  # list, one, cancel, both event streams, schedules...
    offenders = {route.path: sync_calls(route.dependant) for route in routes}
    assert {path: calls for path, calls in offenders.items() if calls} == {}
