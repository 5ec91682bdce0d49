"""`args` must be a sequence and `kwargs` a mapping, in every submission path."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import MappingProxyType
from typing import Any

import pytest
from fastapi import FastAPI

from fastworker_fastapi import (
    CallbackSettings,
    FastWorker,
    InvalidTaskArgumentsError,
    InvalidTaskOptionsError,
    TaskClient,
    TaskClientDep,
    TaskStatus,
    background_task,
)
from fastworker_fastapi._arguments import check_arguments
from tests.conftest import serve


@background_task
def ar_echo(*args: Any, **kwargs: Any) -> list[Any]:
    return [list(args), kwargs]


NOT_ARGS = ["a@b.c", b"bytes", bytearray(b"x"), {"email": "a@b.c"}, {1, 2}, frozenset(), 7, None]
NOT_KWARGS = [["a", 1], "text", (("a", 1),), 3]


@pytest.mark.parametrize("args", NOT_ARGS, ids=lambda a: type(a).__name__)
def test_non_sequence_args_are_refused(args: Any) -> None:
    with pytest.raises(InvalidTaskArgumentsError, match=r"args of task 'x' must be a list"):
        check_arguments("x", args, None)


@pytest.mark.parametrize("kwargs", NOT_KWARGS, ids=lambda k: type(k).__name__)
def test_non_mapping_kwargs_are_refused(kwargs: Any) -> None:
    with pytest.raises(InvalidTaskArgumentsError, match=r"kwargs of task 'x' must be a dict"):
        check_arguments("x", (), kwargs)


def test_sequences_and_mappings_pass_and_long_values_are_cut() -> None:
    for args in [(), [], (1,), [1, 2], range(3)]:
        check_arguments("x", args, MappingProxyType({"a": 1}))
    with pytest.raises(InvalidTaskArgumentsError) as caught:
        check_arguments("x", "y" * 500, None)
    assert "..." in str(caught.value) and len(str(caught.value)) < 250


Submit = Callable[[TaskClient], Awaitable[Any]]
PATHS: dict[str, Submit] = {
    "submit_task args": lambda c: c.submit_task("ar_echo", "a@b.c"),  # type: ignore[arg-type]
    "submit_task dict args": lambda c: c.submit_task("ar_echo", args={"a": 1}),  # type: ignore[arg-type]
    "submit_task kwargs": lambda c: c.submit_task("ar_echo", (), ["a"]),  # type: ignore[arg-type]
    "submit_task empty kwargs": lambda c: c.submit_task("ar_echo", (), []),  # type: ignore[arg-type]
    "submit_batch args": lambda c: c.submit_batch([{"task_name": "ar_echo", "args": "ab"}]),
    "submit_batch set args": lambda c: c.submit_batch([{"task_name": "ar_echo", "args": {1}}]),
    "submit_batch kwargs": lambda c: c.submit_batch([{"task_name": "ar_echo", "kwargs": "k"}]),
}


@pytest.mark.parametrize("submit", PATHS.values(), ids=PATHS.keys())
async def test_every_path_refuses_before_recording_anything(submit: Submit) -> None:
    fw = FastWorker(FastAPI())
    async with fw.run() as client:
        with pytest.raises(InvalidTaskArgumentsError):
            await submit(client)
        with pytest.raises(InvalidTaskArgumentsError):  # the extension's own methods too
            await submit(fw)  # type: ignore[arg-type]
        assert len(client.store) == 0


async def test_a_batch_item_that_is_not_a_dict_is_refused() -> None:
    fw = FastWorker(FastAPI())
    async with fw.run() as client:
        with pytest.raises(InvalidTaskOptionsError, match="batch item 1: must be a dict"):
            await client.submit_batch([{"task_name": "ar_echo"}, "ar_echo"])  # type: ignore[list-item]
        assert len(client.store) == 0


async def test_valid_shapes_in_every_path_arrive_as_given() -> None:
    fw = FastWorker(FastAPI(), callbacks=CallbackSettings(app_paths=("/nowhere",)))
    async with fw.run() as client:
        done = await client.submit_task("ar_echo", [1, 2], {"k": "v"})
        assert done.result == [[1, 2], {"k": "v"}]
        assert (await client.submit_task("ar_echo", range(2))).result == [[0, 1], {}]
        assert (await client.submit_task("ar_echo", (), None)).result == [[], {}]
        ids = await client.submit_batch(
            [{"task_name": "ar_echo", "args": [3], "kwargs": MappingProxyType({"m": 1})}]
        )
        assert (await client.wait(ids[0])).result == [[3], {"m": 1}]
        by_id = await client.delay("ar_echo", "a@b.c", flag=True)  # one str argument is fine
        assert (await client.wait(by_id)).result == [["a@b.c"], {"flag": True}]
        cb = await client.delay_with_callback("ar_echo", "/nowhere", "x")
        assert (await client.wait(cb)).status is TaskStatus.SUCCESS
        handle = await ar_echo.options(client=client).submit("z", n=1)  # the typed handle
        assert handle.result == [["z"], {"n": 1}]


async def test_a_route_answers_422_with_the_reason() -> None:
    app = FastAPI()
    FastWorker(app)

    @app.post("/send")
    async def send(email: str, client: TaskClientDep) -> dict[str, str]:
        result = await client.submit_task("ar_echo", email)  # type: ignore[arg-type] # the slip
        return {"status": result.status.value}

    async with serve(app) as http:
        answer = await http.post("/send", params={"email": "a@b.c"})
    assert answer.status_code == 422
    assert "args=(value,)" in answer.json()["detail"]
