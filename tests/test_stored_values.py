"""What a task may store: hostile results fail their task clearly and break no reader."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI

from fastworker_fastapi import FastWorker, TaskPriority, TaskStatus, background_task
from fastworker_fastapi._json import MAX_DEPTH, StoredValueError, clean_text, json_value
from tests.conftest import serve


@background_task(name="sv_echo")
async def sv_echo(value: Any) -> Any:
    return value


@background_task(name="sv_surrogate")
async def sv_surrogate() -> str:
    return "bad \ud800 text"


@background_task(name="sv_deep")
async def sv_deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@background_task(name="sv_raises")
async def sv_raises() -> None:
    raise ValueError("a lone \udc80 surrogate in a message")


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = {"k": value}
    return value


def test_json_value_accepts_plain_values_and_refuses_the_rest() -> None:
    assert json_value("héllo", 100) == "héllo"
    assert json_value((1, 2.5, None), 100) == [1, 2.5, None]
    assert json_value(nested(MAX_DEPTH - 1), 10_000) == nested(MAX_DEPTH - 1)
    with pytest.raises(StoredValueError, match="surrogate"):
        json_value("\ud800", 100)
    with pytest.raises(StoredValueError, match="surrogate"):
        json_value({"k": ["\udfff"]}, 100)
    with pytest.raises(StoredValueError, match="deeper"):
        json_value(nested(MAX_DEPTH + 1), 10_000)
    with pytest.raises(StoredValueError, match="over the 10-byte limit"):
        json_value("x" * 11, 10)
    with pytest.raises(StoredValueError, match="over the 10-byte limit"):
        json_value(["é" * 10], 10)
    with pytest.raises(StoredValueError, match="not JSON"):
        json_value(object(), 100)
    with pytest.raises(StoredValueError, match="not JSON"):
        json_value(float("nan"), 100)
    assert clean_text("a\ud800b", 100) == "a?b"
    assert clean_text("x" * 10, 5) == "xxxx…"


async def test_hostile_results_fail_their_task_and_every_reader_keeps_working() -> None:
    app = FastAPI()
    fw = FastWorker(app, max_result_bytes=1000)
    async with serve(app) as http:
        client = fw.client
        good = await client.submit_task("sv_echo", args=({"ok": [1, 2]},))
        surrogate = await client.submit_task("sv_surrogate")
        deep = await client.submit_task("sv_deep", args=(300,))
        big = await client.submit_task("sv_echo", args=("y" * 2000,))
        raised = await client.submit_task("sv_raises")
        assert good.status is TaskStatus.SUCCESS
        for failed in (surrogate, deep, big):
            assert failed.status is TaskStatus.FAILURE
            assert failed.error is not None
            assert failed.error.startswith("ResultError: the task's return value cannot be stored")
        assert "surrogate" in (surrogate.error or "")
        assert "deeper" in (deep.error or "")
        assert "max_result_bytes" in (big.error or "")
        assert raised.status is TaskStatus.FAILURE
        assert raised.error == "ValueError: a lone ? surrogate in a message"
        listing = await http.get("/tasks", params={"limit": 10})
        assert listing.status_code == 200
        assert listing.json()["count"] == 5
        for result in (good, surrogate, deep, big, raised):
            assert (await http.get(f"/tasks/{result.task_id}")).status_code == 200


async def test_arguments_with_lone_surrogates_are_refused_at_submission() -> None:
    app = FastAPI()
    fw = FastWorker(app)

    @app.post("/submit")
    async def submit(body: dict[str, str]) -> dict[str, str]:
        return {"id": await fw.client.delay("sv_echo", body["value"])}

    async with serve(app) as http:
        # JSON may carry a lone surrogate as an escape; Python then holds it as is.
        answer = await http.post(
            "/submit", content='{"value": "\\ud800"}', headers={"content-type": "application/json"}
        )
        assert answer.status_code == 422
        assert "JSON-serialisable" in answer.json()["detail"]
        assert (await http.get("/tasks")).json()["count"] == 0


def test_fast_encoders_agree_with_the_general_ones() -> None:
    """The SQLite store's per-field JSON and `evolve` are shortcuts of `dumps(_encode(...))`
    and `dataclasses.replace`: they must give the same answers."""
    import dataclasses
    import json
    import time
    from datetime import UTC, datetime

    from fastworker_fastapi.records import TaskPolicy, TaskRecord, dumps, evolve
    from fastworker_fastapi.stores._fields import encode_field
    from fastworker_fastapi.stores.sqlite import _field_json

    values: list[tuple[str, Any]] = [
        ("status", TaskStatus.SUCCESS),
        ("result", "plain"),
        ("result", 'quote " backslash \\ é \ud800 \n'),
        ("result", 7),
        ("result", True),
        ("result", None),
        ("result", 1.5),
        ("result", [1, {"a": [None, "b"]}]),
        ("started_at", datetime.now(UTC)),
        ("attempts", 3),
        ("args", (1, "x")),
        ("policy", TaskPolicy(timeout=2.0)),
    ]
    for key, value in values:
        assert _field_json(key, value) == dumps(encode_field(key, value))
        assert json.loads(_field_json(key, value)) == json.loads(dumps(encode_field(key, value)))
    record = TaskRecord(
        "id-1", "t", (1,), {}, TaskPriority.HIGH, TaskPolicy(), TaskStatus.QUEUED, time.time()
    )
    changes = {"status": TaskStatus.RUNNING, "attempts": 1, "owner": "me", "result": [1]}
    fresh = evolve(record, changes)
    expected = dataclasses.replace(record, **changes)
    assert fresh is not record and record.status is TaskStatus.QUEUED
    assert all(
        getattr(fresh, f.name) == getattr(expected, f.name) for f in dataclasses.fields(TaskRecord)
    )
