"""fastworker's own FastAPI example runs on our extension with the import swapped (and its
local callback listener allowed with one setting).

`tests/_fastworker_example.py` reproduces its endpoints; each is driven here through the
app's real lifespan, as a client of the example would use them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from fastworker.tasks.models import TaskStatus

from fastworker_fastapi._nng import Pair0Listener
from tests import _fastworker_example as example
from tests.conftest import eventually, serve


@pytest.fixture
async def callbacks(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[list[dict[str, object]]]:
    """A FastWorker callback listener standing in for the example's `tcp://...:6000`."""
    received: list[dict[str, object]] = []
    async with Pair0Listener(lambda message: received.append(json.loads(message))) as listener:
        monkeypatch.setattr(example, "CALLBACK_ADDRESS", listener.address)
        yield received


async def test_root_and_health_report_the_running_workers() -> None:
    assert example.fw.worker_count == 0  # not running yet
    async with serve(example.app) as http:
        assert (await http.get("/")).json() == {"message": "FastWorker + FastAPI, no broker"}
        health = (await http.get("/health")).json()
        assert health == {"status": "healthy", "workers_discovered": 8}
    assert example.fw.worker_count == 0


async def test_welcome_is_queued_then_followed_with_the_examples_own_status_route() -> None:
    async with serve(example.app) as http:
        answer = await http.post("/users/42/welcome", params={"email": "hi@example.com"})
        assert answer.status_code == 200
        body = answer.json()
        assert body["status"] == "queued"
        task_id = body["task_id"]
        await example.fw.client.wait(task_id, timeout=10)
        status = (await http.get(f"/tasks/{task_id}")).json()  # the example's route, not ours
        assert status == {
            "task_id": task_id,
            "status": "success",
            "result": "welcome mail for user 42 went to hi@example.com",
        }
        unknown = (await http.get("/tasks/no-such-task")).json()
        assert unknown == {"task_id": "no-such-task", "status": "not_found"}
        # The extension's fixed routes stay reachable next to the example's.
        assert (await http.get("/tasks")).json()["count"] >= 1
        assert (await http.get("/tasks/dashboard")).status_code == 200


async def test_report_waits_for_its_result() -> None:
    async with serve(example.app) as http:
        answer = await http.post("/reports/sales", json={"period": "Q1"})
    assert answer.status_code == 200
    assert answer.json() == {
        "status": "success",
        "result": {"report_type": "sales", "status": "generated", "params": {"period": "Q1"}},
    }


async def test_cleanup_runs_at_low_priority_and_calls_back(
    callbacks: list[dict[str, object]],
) -> None:
    async with serve(example.app) as http:
        body = (await http.post("/tasks/cleanup")).json()
        assert body["status"] == "scheduled"
        task_id = body["task_id"]
        await eventually(lambda: callbacks, message="the cleanup callback arrived")
        info = await example.fw.client.get_info(task_id)
        assert info is not None and info.priority.value == "low"
    (message,) = callbacks
    assert message["task_id"] == task_id
    assert message["status"] == "success"
    assert message["result"] == example.TEMP_FILES_REMOVED
    assert message["callback_data"] == {"notify": "admin"}


async def test_batch_submits_three_tasks_that_all_succeed() -> None:
    async with serve(example.app) as http:
        body = (await http.post("/tasks/batch")).json()
        assert body["count"] == 3 and len(body["task_ids"]) == 3
        for task_id in body["task_ids"]:
            await example.fw.client.wait(task_id, timeout=10)
            status = (await http.get(f"/tasks/{task_id}")).json()
            assert status["status"] == "success"
        results = [(await http.get(f"/tasks/{i}")).json()["result"] for i in body["task_ids"]]
    assert results == [
        "welcome mail for user 101 went to a@b.com",
        "welcome mail for user 102 went to c@d.com",
        example.TEMP_FILES_REMOVED,
    ]


async def test_cancel_through_the_examples_own_route() -> None:
    async with serve(example.app) as http:
        # A task that waits for its countdown can be cancelled; a finished one cannot.
        waiting = await example.fw.delay("fwx_cleanup_temp_files", "/tmp", countdown=3600)
        assert example.fw.get_status(waiting) is TaskStatus.SCHEDULED
        answer = (await http.delete(f"/tasks/{waiting}")).json()
        assert answer == {"task_id": waiting, "cancelled": True}
        assert example.fw.get_status(waiting) is TaskStatus.CANCELLED
        again = (await http.delete(f"/tasks/{waiting}")).json()
        assert again == {"task_id": waiting, "cancelled": False}
        unknown = (await http.delete("/tasks/no-such-task")).json()
        assert unknown == {"task_id": "no-such-task", "cancelled": False}
        # Its status route shows the cancellation in FastWorker's terms.
        status = (await http.get(f"/tasks/{waiting}")).json()
        assert status["status"] == "cancelled"
