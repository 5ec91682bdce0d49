"""fastworker's `@task(before=..., after=...)` hooks run in-process as its worker runs them."""

from __future__ import annotations

import inspect
import threading
from typing import Any

from fastapi import FastAPI
from fastworker import task

from fastworker_fastapi import FastWorker, Task, TaskStatus
from fastworker_fastapi.records import TaskPolicy
from fastworker_fastapi.tasks import TaskDefinition, TaskRegistry

CALLS: list[tuple[str, Any]] = []


def sync_before(t: Task) -> None:
    CALLS.append(("before", t))


async def async_after(t: Task) -> None:
    CALLS.append(("after", t))


@task(before=sync_before, after=async_after)
def hk_add(x: int, y: int = 0) -> int:
    CALLS.append(("run", x + y))
    return x + y


@task(before=sync_before, after=async_after)
async def hk_fail() -> None:
    CALLS.append(("run", None))
    raise ValueError("broken")


def refusing_before(t: Task) -> None:
    raise PermissionError(f"not now: {t.name}")


@task(before=refusing_before, after=async_after)
def hk_refused() -> str:
    CALLS.append(("run", None))
    return "ran"


def failing_after(t: Task) -> None:
    raise RuntimeError("after failed")


@task(after=failing_after)
async def hk_after_fails() -> str:
    return "done"


async def test_hooks_run_around_the_function_with_the_running_task() -> None:
    CALLS.clear()
    fw = FastWorker(FastAPI())
    async with fw.run() as client:
        task_id = await client.delay("hk_add", 2, y=3, priority="high")
        result = await client.wait(task_id)
    assert result.status is TaskStatus.SUCCESS and result.result == 5
    assert [name for name, _ in CALLS] == ["before", "run", "after"]
    before, after = CALLS[0][1], CALLS[2][1]
    assert before is after  # one Task per attempt, as fastworker's worker passes
    assert isinstance(before, Task)
    assert before.id == task_id and before.name == "hk_add"
    assert before.args == (2,) and before.kwargs == {"y": 3}
    assert before.priority.value == "high"
    assert before.status is TaskStatus.RUNNING and before.started_at is not None
    assert before.retry_count == 0 and before.result is None


async def test_after_is_skipped_when_the_function_fails() -> None:
    CALLS.clear()
    fw = FastWorker(FastAPI())
    async with fw.run() as client:
        result = await client.wait(await client.delay("hk_fail"))
    assert result.status is TaskStatus.FAILURE and result.error == "ValueError: broken"
    assert [name for name, _ in CALLS] == ["before", "run"]


async def test_a_raising_before_fails_the_task_without_running_it() -> None:
    CALLS.clear()
    fw = FastWorker(FastAPI())
    async with fw.run() as client:
        result = await client.wait(await client.delay("hk_refused"))
    assert result.status is TaskStatus.FAILURE
    assert result.error == "PermissionError: not now: hk_refused"
    assert CALLS == []


async def test_a_raising_after_fails_the_task() -> None:
    fw = FastWorker(FastAPI())
    async with fw.run() as client:
        result = await client.wait(await client.delay("hk_after_fails"))
    assert result.status is TaskStatus.FAILURE and result.error == "RuntimeError: after failed"


async def test_hooks_run_on_every_attempt_and_sync_ones_off_the_event_loop() -> None:
    seen: list[tuple[str, int, bool]] = []
    loop_thread = threading.get_ident()

    def before(t: Task) -> None:
        seen.append(("before", t.retry_count, threading.get_ident() != loop_thread))

    async def after(t: Task) -> None:
        seen.append(("after", t.retry_count, threading.get_ident() != loop_thread))

    attempts = iter([ValueError("first attempt"), None])

    async def flaky() -> str:
        error = next(attempts)
        if error is not None:
            raise error
        return "ok"

    registry = TaskRegistry()
    registry.register(
        TaskDefinition(
            name="hk_flaky",
            func=flaky,
            is_async=inspect.iscoroutinefunction(flaky),
            policy=TaskPolicy(max_retries=1, retry_delay=0),
            before=before,
            after=after,
        )
    )
    fw = FastWorker(FastAPI(), task_registry=registry)
    async with fw.run() as client:
        result = await client.wait(await client.delay("hk_flaky"))
    assert result.status is TaskStatus.SUCCESS
    assert seen == [("before", 0, True), ("before", 1, True), ("after", 1, False)]
