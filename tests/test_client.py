"""FastWorker's Client API as its docs show it, and refusal of bad input at submission."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from pathlib import Path

import anyio
import pytest
from fastapi import FastAPI
from fastworker.tasks.registry import task as fastworker_task

from fastworker_fastapi import (
    CallbackSettings,
    FastWorker,
    InvalidTaskArgumentsError,
    InvalidTaskOptionsError,
    NotRunningError,
    TaskClient,
    TaskNotFoundError,
    TaskPriority,
    TaskResult,
    TaskStatus,
    UnknownTaskError,
    WaitTimeoutError,
    background_task,
)
from fastworker_fastapi.records import TaskPolicy, TaskRecord
from tests.conftest import eventually, serve

GATE: dict[str, anyio.Event] = {}


@background_task
def cl_add(x: int, y: int) -> int:
    return x + y


@background_task
async def cl_echo(*args: object, **kwargs: object) -> dict[str, object]:
    return {"args": list(args), "kwargs": kwargs}


@background_task
async def cl_wait(key: str) -> str:
    await GATE[key].wait()
    return key


@background_task
async def cl_unjsonable() -> object:
    return {1, 2}


@fastworker_task
def cl_plain_fastworker_task(n: int) -> int:
    """Registered with fastworker's own decorator: must run unchanged."""
    return n * 10


def make() -> tuple[FastAPI, FastWorker]:
    app = FastAPI()
    # Two app paths that may receive callbacks without a receiving route (never delivered).
    return app, FastWorker(app, callbacks=CallbackSettings(app_paths=("/cb", "/hooks/done")))


async def test_submit_task_blocks_and_returns_task_result() -> None:
    app, fw = make()
    async with serve(app):
        result = await fw.client.submit_task("cl_add", args=(2, 3), priority=TaskPriority.HIGH)
    assert isinstance(result, TaskResult)
    assert (result.status, result.result, result.error) == (TaskStatus.SUCCESS, 5, None)
    assert result.started_at is not None and result.completed_at is not None
    assert result.completed_at >= result.started_at


async def test_delay_returns_an_id_at_once_then_polling_works() -> None:
    GATE["poll"] = anyio.Event()
    app, fw = make()
    async with serve(app):
        client = fw.client
        task_id = await client.delay("cl_wait", "poll", priority="high")
        assert isinstance(task_id, str) and len(task_id) == 36
        pending = await client.get_task_result(task_id)
        assert pending is not None and pending.status is TaskStatus.PENDING
        assert client.get_status(task_id) in {TaskStatus.QUEUED, TaskStatus.RUNNING}
        GATE["poll"].set()
        # FastWorker's documented polling loop, unchanged:
        while True:
            result = await client.get_task_result(task_id)
            assert result is not None
            if result.status in (TaskStatus.SUCCESS, TaskStatus.FAILURE):
                break
            await anyio.sleep(0.01)
        assert client.get_result(task_id) == result
    assert result.result == "poll"
    assert await client.get_task_result("unknown-id") is None
    assert client.get_status("unknown-id") is None and client.get_result("unknown-id") is None


async def test_arguments_travel_as_json_in_both_modes() -> None:
    app, fw = make()
    async with serve(app):
        task_id = await fw.client.delay("cl_echo", (1, 2), {"k": (3,)}, flag=True)
        result = await fw.client.wait(task_id)
    assert result.result == {"args": [[1, 2], {"k": [3]}], "kwargs": {"flag": True}}


async def test_kwargs_keys_travel_as_json_strings_too() -> None:
    app, fw = make()
    async with serve(app):
        result = await fw.client.submit_task("cl_echo", kwargs={1: "one"})  # type: ignore[dict-item]
    assert result.status is TaskStatus.SUCCESS
    assert result.result == {"args": [], "kwargs": {"1": "one"}}


async def test_fastworker_task_decorator_tasks_run() -> None:
    app, fw = make()
    async with serve(app):
        result = await fw.client.submit_task("cl_plain_fastworker_task", args=(4,))
    assert result.result == 40


async def test_submit_batch_is_all_or_nothing() -> None:
    app, fw = make()
    async with serve(app):
        client = fw.client
        ids = await client.submit_batch(
            [
                {"task_name": "cl_add", "args": (1, 1)},
                {"task_name": "cl_add", "args": [2, 2], "priority": "critical"},
                {"task_name": "cl_echo", "kwargs": {"a": 1}, "countdown": 0},
            ]
        )
        results = [await client.wait(i, timeout=5) for i in ids]
        before = len(client.store)
        with pytest.raises(UnknownTaskError):
            await client.submit_batch(
                [{"task_name": "cl_add", "args": (1, 1)}, {"task_name": "nope"}]
            )
        with pytest.raises(InvalidTaskOptionsError, match="batch item 0"):
            await client.submit_batch([{"name": "cl_add"}])
        assert len(client.store) == before
    assert [r.result for r in results] == [2, 4, {"args": [], "kwargs": {"a": 1}}]


async def test_wait_timeout_and_unknown_ids() -> None:
    GATE["wait"] = anyio.Event()
    app, fw = make()
    async with serve(app):
        client = fw.client
        task_id = await client.delay("cl_wait", "wait")
        with pytest.raises(WaitTimeoutError, match=r"did not finish within 0\.05s"):
            await client.wait(task_id, timeout=0.05)
        with pytest.raises(TaskNotFoundError):
            await client.wait("missing")
        GATE["wait"].set()
        assert (await client.wait(task_id, timeout=5)).status is TaskStatus.SUCCESS


async def test_non_json_return_value_is_a_clear_failure() -> None:
    app, fw = make()
    async with serve(app):
        result = await fw.client.submit_task("cl_unjsonable")
    assert result.status is TaskStatus.FAILURE
    assert result.error is not None and "not JSON-serialisable" in result.error


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda c: c.delay("no_such_task"), UnknownTaskError, "no task registered"),
        (lambda c: c.delay("cl_add", object(), 1), InvalidTaskArgumentsError, "JSON"),
        (lambda c: c.delay("cl_add", 1, y=Decimal(1)), InvalidTaskArgumentsError, "JSON"),
        (lambda c: c.delay("cl_add", float("nan"), 1), InvalidTaskArgumentsError, "JSON"),
        (lambda c: c.delay("cl_add", 1, 2, priority="urgent"), InvalidTaskOptionsError, "urgent"),
        (lambda c: c.delay("cl_add", 1, 2, priority=3), InvalidTaskOptionsError, "priority"),
        (lambda c: c.delay("cl_add", 1, 2, countdown=-1), InvalidTaskOptionsError, ">= 0"),
        (lambda c: c.delay("cl_add", 1, 2, countdown="5"), InvalidTaskOptionsError, "number"),
        (lambda c: c.delay("cl_add", 1, 2, eta="tomorrow"), InvalidTaskOptionsError, "datetime"),
        (
            lambda c: c.delay("cl_add", 1, 2, eta=datetime.now(), countdown=1),
            InvalidTaskOptionsError,
            "not both",
        ),
        (
            lambda c: c.delay_with_callback("cl_add", "", 1, 2),
            InvalidTaskOptionsError,
            "callback_address",
        ),
        (
            lambda c: c.delay_with_callback("cl_add", "/cb", 1, 2, callback_data={"x": {1}}),
            InvalidTaskArgumentsError,
            "callback_data",
        ),
    ],
)
async def test_bad_input_is_refused_at_submission(
    call: object, error: type[Exception], match: str
) -> None:
    app, fw = make()
    async with serve(app):
        with pytest.raises(error, match=match):
            await call(fw.client)  # type: ignore[operator]
        assert len(fw.client.store) == 0


async def test_client_outside_the_lifespan_explains_itself() -> None:
    client = TaskClient()
    with pytest.raises(NotRunningError, match="LifespanManager"):
        await client.delay("cl_add", 1, 2)
    with pytest.raises(NotRunningError):
        client.get_result("x")
    assert not client.running and not client.started


async def test_delay_with_callback_records_the_callback() -> None:
    app, fw = make()
    async with serve(app):
        task_id = await fw.client.delay_with_callback(
            "cl_add", "/hooks/done", 1, 2, callback_data={"user": 7}
        )
        result = await fw.client.wait(task_id)
        info = await fw.client.get_info(task_id)
    assert result.callback is not None and result.callback.data == {"user": 7}
    assert info is not None and info.callback is not None
    assert info.callback.address == "/hooks/done"


async def test_wait_after_a_task_finished_answers_from_the_hub_with_a_durable_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a store whose reads are queries, `wait()` for a task that finished recently
    needs none: the hub keeps as many final records as `max_pending` (at least 1,024), so a
    batch submitted first and awaited after needs no query either."""
    from fastworker_fastapi.events import EventHub

    app = FastAPI()
    fw = FastWorker(app, store=f"sqlite:///{tmp_path}/tasks.db", max_pending=1500)
    async with serve(app):
        task_id = await fw.client.delay("cl_add", 2, 3)
        assert (await fw.client.wait(task_id, timeout=10)).result == 5
        batch = await fw.client.submit_batch(
            [{"task_name": "cl_add", "args": (n, 1)} for n in range(1200)]
        )
        for one in batch:  # (these may read the store)
            await fw.client.wait(one, timeout=30)
        # A final row can be read before this process has published its change: wait for
        # the hub to have seen every one.
        seen = [task_id, *batch]
        await eventually(lambda: all(fw.client.events.recent_final(one) for one in seen))

        def no_query(task_id: str) -> None:
            raise AssertionError("wait() read the store for a task it saw finish")

        monkeypatch.setattr(fw.client.store, "peek", no_query)
        again = await fw.client.wait(task_id, timeout=10)
        assert again.status is TaskStatus.SUCCESS and again.result == 5
        results = [await fw.client.wait(one, timeout=10) for one in batch]
        assert [result.result for result in results] == [n + 1 for n in range(1200)]
    hub = EventHub(keep_finals=2)
    records = [_final(f"t{n}") for n in range(3)]
    for record in records:
        hub.publish(record)
    hub.publish(_final("running", TaskStatus.RUNNING))
    assert [hub.recent_final(f"t{n}") for n in range(3)] == [None, records[1], records[2]]
    assert hub.recent_final("running") is None
    assert EventHub().recent_final("t0") is None  # the default keeps nothing


def _final(task_id: str, status: TaskStatus = TaskStatus.SUCCESS) -> TaskRecord:
    return TaskRecord(task_id, "cl_add", (1, 2), {}, TaskPriority.NORMAL, TaskPolicy(), status, 0.0)
