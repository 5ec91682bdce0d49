"""The example app's patterns, through real HTTP requests and the real lifespan."""

from __future__ import annotations

from example_app.main import app, fw
from fastworker_fastapi import TaskStatus
from tests.conftest import eventually, serve


async def test_blocking_submit_task() -> None:
    async with serve(app) as http:
        response = await http.post("/math/add", params={"x": 2, "y": 3.5})
    assert response.status_code == 200 and response.json() == {"result": 5.5}


async def test_delay_then_poll_with_progress() -> None:
    async with serve(app) as http:
        started = (await http.post("/reports/7", params={"pages": 3})).json()
        task_id = started["task_id"]

        async def finished() -> dict[str, object] | None:
            body: dict[str, object] = (await http.get(started["status_url"])).json()
            return body if body["status"] != "pending" else None

        result = await eventually(finished, timeout=10)
        info = (await http.get(f"/tasks/{task_id}")).json()
    assert result["status"] == "success" and result["result"] == {"report_id": 7, "pages": 3}
    assert info["name"] == "reports.build" and info["priority"] == "low"
    assert info["progress"] == 1.0 and info["progress_message"] == "page 3 of 3"


async def test_batch_followed_to_the_end() -> None:
    async with serve(app) as http:
        ids = (await http.post("/images/thumbnails", params={"count": 5})).json()["task_ids"]
        assert len(ids) == 5

        async def all_done() -> dict[str, object] | None:
            body: dict[str, object] = (
                await http.get("/images/thumbnails", params={"ids": ids})
            ).json()
            return body if body["finished"] == 5 else None

        progress = await eventually(all_done, timeout=10)
    assert sorted(progress["results"]) == sorted(f"image-{i}-thumb.png" for i in range(5))  # type: ignore[arg-type]


async def test_fire_and_forget() -> None:
    async with serve(app) as http:
        response = await http.post("/events", params={"name": "signup"})
        assert response.status_code == 202 and response.content == b"null"
        tracked = await eventually(
            lambda: fw.client.store.recent(limit=1, name="track_event"), timeout=5
        )
        await fw.client.wait(tracked[0].id, timeout=5)
        assert fw.client.get_status(tracked[0].id) is TaskStatus.SUCCESS


async def test_web_api_pattern_with_a_callback_route() -> None:
    async with serve(app) as http:
        created = await http.post("/users", json={"name": "Ada", "email": "ada@example.com"})
        assert created.status_code == 201
        user = created.json()
        assert user["welcome_email_sent"] is False

        async def email_sent() -> bool:
            return bool((await http.get(f"/users/{user['id']}")).json()["welcome_email_sent"])

        await eventually(email_sent, timeout=10)
        task = (await http.get(f"/tasks/{user['welcome_email_task_id']}")).json()
        assert task["result"] == f"welcome email sent to ada@example.com for user {user['id']}"
        assert task["callback"]["state"] == "delivered"
        # The hook refuses anything the extension did not sign.
        forged = await http.post(
            "/hooks/welcome-sent",
            json={"task_id": "x", "status": "success", "callback_data": {"user_id": 1}},
        )
        assert forged.status_code == 401
        bad = await http.post("/users", json={"name": "", "email": "nope"})
        assert bad.status_code == 422
        assert (await http.get("/users/99999")).status_code == 404


async def test_status_routes_and_dashboard_are_mounted() -> None:
    async with serve(app) as http:
        assert (await http.get("/tasks")).status_code == 200
        page = await http.get("/tasks/dashboard")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert (await http.get("/tasks/not-an-id")).status_code == 404


async def test_report_status_of_unknown_task() -> None:
    async with serve(app) as http:
        response = await http.get("/reports/tasks/unknown")
    assert response.status_code == 404
