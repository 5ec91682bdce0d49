"""Records: FastWorker's coarse view of them; bounded retention of finished tasks."""

from __future__ import annotations

from datetime import UTC, datetime

import anyio
from fastapi import FastAPI
from fastworker.tasks.models import CallbackInfo

from fastworker_fastapi import (
    FastWorker,
    InProcessWorkers,
    TaskPriority,
    TaskResult,
    TaskStatus,
    background_task,
)
from fastworker_fastapi.records import TaskPolicy, TaskRecord
from tests.conftest import eventually, serve

GATE: dict[str, anyio.Event] = {}


@background_task
def st_echo(n: int) -> int:
    return n


@background_task
async def st_hold(key: str) -> str:
    await GATE[key].wait()
    return key


def record(status: TaskStatus) -> TaskRecord:
    return TaskRecord(
        id="x",
        name="n",
        args=[],
        kwargs={},
        priority=TaskPriority.NORMAL,
        policy=TaskPolicy(),
        status=status,
        created=0.0,
    )


def test_fastworkers_view_is_pending_until_final() -> None:
    for status in (TaskStatus.QUEUED, TaskStatus.SCHEDULED, TaskStatus.RETRYING):
        assert record(status).to_task_result().status is TaskStatus.PENDING


def test_task_results_built_by_the_store_equal_validated_ones() -> None:
    """The store builds `TaskResult`s without validation; this catches a pydantic change."""
    now = datetime.now(UTC)
    callback = CallbackInfo(address="/cb", data={"a": 1})
    done = record(TaskStatus.SUCCESS)
    done.started_at = done.completed_at = now
    done.result = {"k": [1]}
    done.callback = callback
    built = done.to_task_result()
    validated = TaskResult(
        task_id="x",
        status=TaskStatus.SUCCESS,
        result={"k": [1]},
        started_at=now,
        completed_at=now,
        callback=callback,
    )
    assert built == validated
    assert built.model_dump_json() == validated.model_dump_json()
    assert repr(built) == repr(validated)
    other = done.to_task_result()
    built.result = 2  # assignment on one result touches no other
    assert other.result == {"k": [1]}
    assert other.model_fields_set == set(TaskResult.model_fields)  # still every field


async def test_finished_tasks_are_kept_up_to_max_results_oldest_first() -> None:
    GATE["count"] = anyio.Event()
    app = FastAPI()
    fw = FastWorker(app, max_results=3, workers=InProcessWorkers(concurrency=1))
    async with serve(app) as http:
        client = fw.client
        held = await client.delay("st_hold", "count")  # unfinished: never expired by count
        ids = [await client.delay("st_echo", i) for i in range(5)]
        GATE["count"].set()
        for task_id in [held, *ids]:
            await client.wait(task_id, timeout=5)
        kept = [await client.get_task_result(i) for i in [held, *ids]]
        assert [r is not None for r in kept] == [False, False, False, True, True, True]
        assert (await http.get(f"/tasks/{ids[0]}")).status_code == 404
        assert (await http.get(f"/tasks/{ids[4]}")).json()["result"] == 4
        assert len(client.store) == 3


async def test_finished_tasks_expire_after_result_ttl() -> None:
    app = FastAPI()
    fw = FastWorker(app, result_ttl=0.2)
    async with serve(app):
        client = fw.client
        task_id = (await client.submit_task("st_echo", args=(1,))).task_id
        assert client.get_result(task_id) is not None
        await eventually(lambda: client.get_result(task_id) is None, timeout=5)
        assert await client.store.recent(limit=10) == []
