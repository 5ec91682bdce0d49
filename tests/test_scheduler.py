"""Scheduler semantics, each test failing if its feature were removed."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import anyio
import anyio.lowlevel
import pytest
from fastapi import FastAPI

from fastworker_fastapi import (
    FastWorker,
    InProcessWorkers,
    QueueFullError,
    ShuttingDownError,
    TaskPriority,
    TaskStatus,
    background_task,
)
from fastworker_fastapi.records import TaskRecord
from fastworker_fastapi.stores import MemoryStore
from tests.conftest import eventually, serve

ORDER: list[str] = []
GATES: dict[str, anyio.Event] = {}
THREAD_GATES: dict[str, threading.Event] = {}
CALLS: dict[str, int] = {}


@background_task
async def sched_gate(key: str) -> str:
    """Runs until the test opens gate `key`."""
    await GATES[key].wait()
    return key


@background_task
async def sched_record(tag: str) -> str:
    ORDER.append(tag)
    return tag


@background_task(timeout=0.05)
async def sched_slow(seconds: float) -> str:
    await anyio.sleep(seconds)
    return "finished"


SLOW_SYNC_DONE = threading.Event()


@background_task(timeout=0.05)
def sched_slow_sync(seconds: float) -> str:
    time.sleep(seconds)
    SLOW_SYNC_DONE.set()
    return "finished"


@background_task(max_retries=3, retry_delay=0.01, retry_backoff=2.0)
async def sched_flaky(key: str, fail_times: int) -> int:
    CALLS[key] = CALLS.get(key, 0) + 1
    if CALLS[key] <= fail_times:
        raise ConnectionError(f"attempt {CALLS[key]} failed")
    return CALLS[key]


@background_task
async def sched_boom(message: str) -> None:
    raise ValueError(message)


@background_task
def sched_exit() -> None:
    raise SystemExit(3)


@background_task
def sched_thread_gate(key: str) -> str:
    THREAD_GATES[key].wait(10)
    return "late"


def make(concurrency: int = 1, **options: object) -> tuple[FastAPI, FastWorker]:
    app = FastAPI()
    fw = FastWorker(app, workers=InProcessWorkers(concurrency=concurrency), **options)  # type: ignore[arg-type]
    return app, fw


async def test_strict_priorities_fifo_within_level() -> None:
    ORDER.clear()
    GATES["prio"] = anyio.Event()
    app, fw = make(concurrency=1)
    async with serve(app):
        client = fw.client
        blocker = await client.delay("sched_gate", "prio")
        await eventually(lambda: client.get_status(blocker) is TaskStatus.RUNNING)
        ids = [
            await client.delay("sched_record", "low-1", priority=TaskPriority.LOW),
            await client.delay("sched_record", "normal-1"),
            await client.delay("sched_record", "critical-1", priority="critical"),
            await client.delay("sched_record", "high-1", priority="HIGH"),
            await client.delay("sched_record", "normal-2", priority="normal"),
            await client.delay("sched_record", "critical-2", priority=TaskPriority.CRITICAL),
        ]
        assert client.get_status(ids[0]) is TaskStatus.QUEUED
        GATES["prio"].set()
        for task_id in ids:
            await client.wait(task_id, timeout=5)
    assert ORDER == ["critical-1", "critical-2", "high-1", "normal-1", "normal-2", "low-1"]


async def test_concurrency_is_respected() -> None:
    app, fw = make(concurrency=3)
    keys = [f"conc-{i}" for i in range(5)]
    for key in keys:
        GATES[key] = anyio.Event()
    async with serve(app):
        client = fw.client
        ids = [await client.delay("sched_gate", key) for key in keys]
        await eventually(lambda: sum(client.get_status(i) is TaskStatus.RUNNING for i in ids) == 3)
        assert [client.get_status(i) for i in ids[3:]] == [TaskStatus.QUEUED] * 2
        GATES[keys[0]].set()
        await eventually(lambda: client.get_status(ids[3]) is TaskStatus.RUNNING)
        assert client.get_status(ids[4]) is TaskStatus.QUEUED
        for key in keys:
            GATES[key].set()
        results = [await client.wait(i, timeout=5) for i in ids]
    assert [r.result for r in results] == keys


async def test_async_timeout_is_a_failure_that_says_so() -> None:
    app, fw = make()
    async with serve(app):
        result = await fw.client.submit_task("sched_slow", args=(5,))
        info = await fw.client.get_info(result.task_id)
    assert result.status is TaskStatus.FAILURE
    assert result.error == "TaskTimeout: the task exceeded its timeout of 0.05s"
    assert info is not None and info.error_type == "TaskTimeout"


async def test_sync_timeout_discards_the_late_result() -> None:
    SLOW_SYNC_DONE.clear()
    app, fw = make()
    async with serve(app):
        result = await fw.client.submit_task("sched_slow_sync", args=(0.3,))
        assert result.status is TaskStatus.FAILURE
        assert "TaskTimeout" in (result.error or "")
        # The thread finishes later; its value must not overwrite the recorded failure.
        assert await anyio.to_thread.run_sync(SLOW_SYNC_DONE.wait, 10)
        await anyio.lowlevel.checkpoint()  # let a (wrong) late result land, were it delivered
        again = await fw.client.get_task_result(result.task_id)
    assert again is not None and again.status is TaskStatus.FAILURE and again.result is None


async def test_retries_with_backoff_then_success() -> None:
    CALLS.pop("retry-ok", None)
    app, fw = make()
    seen: list[TaskStatus] = []
    async with serve(app):
        fw.client.events.add_listener(lambda record: seen.append(record.status))
        result = await fw.client.submit_task("sched_flaky", args=("retry-ok", 2))
        info = await fw.client.get_info(result.task_id)
    assert result.status is TaskStatus.SUCCESS and result.result == 3
    assert info is not None and info.attempts == 3 and info.error is None
    assert seen == [
        TaskStatus.QUEUED,
        TaskStatus.RUNNING,
        TaskStatus.RETRYING,
        TaskStatus.RUNNING,
        TaskStatus.RETRYING,
        TaskStatus.RUNNING,
        TaskStatus.SUCCESS,
    ]


async def test_retries_exhausted_records_the_last_error() -> None:
    CALLS.pop("retry-no", None)
    app, fw = make()
    async with serve(app):
        result = await fw.client.submit_task("sched_flaky", args=("retry-no", 10))
        info = await fw.client.get_info(result.task_id)
    assert result.status is TaskStatus.FAILURE
    assert result.error == "ConnectionError: attempt 4 failed"
    assert info is not None and info.attempts == 4 and info.error_type == "ConnectionError"
    assert CALLS["retry-no"] == 4


def test_retry_delay_grows_and_is_capped() -> None:
    policy = sched_flaky.definition.policy
    assert [policy.retry_delay_for(n) for n in (1, 2, 3)] == [0.01, 0.02, 0.04]
    capped = type(policy)(retry_delay=10, retry_backoff=10, retry_backoff_max=50)
    assert capped.retry_delay_for(3) == 50


async def test_exceptions_are_recorded_and_never_kill_a_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, fw = make(concurrency=1)
    async with serve(app):
        failed = await fw.client.submit_task("sched_boom", args=("bad input",))
        exited = await fw.client.submit_task("sched_exit")
        ok = await fw.client.submit_task("sched_record", args=("after",))
    assert (failed.status, failed.error) == (TaskStatus.FAILURE, "ValueError: bad input")
    assert exited.status is TaskStatus.FAILURE and exited.error == "SystemExit: 3"
    assert ok.status is TaskStatus.SUCCESS
    assert any("ValueError: bad input" in r.getMessage() and r.exc_info for r in caplog.records)


async def test_countdown_and_eta_wait_then_run() -> None:
    app, fw = make()
    async with serve(app):
        client = fw.client
        later = await client.delay("sched_record", "later", countdown=0.2)
        at = await client.delay(
            "sched_record", "at", eta=datetime.now(UTC) + timedelta(seconds=0.1)
        )
        naive_past = await client.delay(
            "sched_record", "past", eta=datetime.now() - timedelta(seconds=5)
        )
        assert client.get_status(later) is TaskStatus.SCHEDULED
        assert client.get_status(at) is TaskStatus.SCHEDULED
        assert (await client.get_task_result(later)).status is TaskStatus.PENDING  # type: ignore[union-attr]
        past = await client.wait(naive_past, timeout=5)
        first = await client.wait(at, timeout=5)
        second = await client.wait(later, timeout=5)
    assert past.status is first.status is second.status is TaskStatus.SUCCESS
    assert first.started_at is not None and second.started_at is not None
    assert first.started_at < second.started_at
    info = await client.get_info(later)
    assert info is not None and info.eta is not None and info.started_at is not None
    assert info.started_at >= info.eta


async def test_cancel_queued_scheduled_and_running_coroutine() -> None:
    GATES["cancel"] = anyio.Event()
    app, fw = make(concurrency=1)
    async with serve(app):
        client = fw.client
        running = await client.delay("sched_gate", "cancel")
        queued = await client.delay("sched_record", "never-queued")
        scheduled = await client.delay("sched_record", "never-scheduled", countdown=60)
        await eventually(lambda: client.get_status(running) is TaskStatus.RUNNING)
        assert await client.cancel_task(queued) is True
        assert await client.cancel_task(scheduled) is True
        assert await client.cancel_task(running) is True
        assert await client.cancel_task(running) is False  # already final
        assert await client.cancel_task("no-such-id") is False
        results = [await client.wait(i, timeout=5) for i in (running, queued, scheduled)]
        # The worker is free again: the cancelled coroutine really stopped.
        after = await client.submit_task("sched_record", args=("after-cancel",))
    assert [r.status for r in results] == [TaskStatus.CANCELLED] * 3
    assert all(r.error == "TaskCancelled: cancelled by request" for r in results)
    assert after.status is TaskStatus.SUCCESS
    assert "never-queued" not in ORDER and "never-scheduled" not in ORDER


async def test_cancel_running_thread_discards_its_late_result() -> None:
    THREAD_GATES["t"] = threading.Event()
    app, fw = make(concurrency=1)
    async with serve(app):
        client = fw.client
        task_id = await client.delay("sched_thread_gate", "t")
        await eventually(lambda: client.get_status(task_id) is TaskStatus.RUNNING)
        assert await client.cancel_task(task_id)
        after = await client.submit_task("sched_record", args=("free",))
        THREAD_GATES["t"].set()
        result = await client.wait(task_id)
    assert after.status is TaskStatus.SUCCESS
    assert result.status is TaskStatus.CANCELLED and result.result is None


async def test_shutdown_drains_running_and_queued_tasks() -> None:
    GATES["drain"] = anyio.Event()
    app, fw = make(concurrency=1, shutdown_timeout=10)
    client = fw.client
    refused: list[Exception] = []

    async def during_shutdown() -> None:
        await eventually(lambda: client.started and not client.running)
        try:
            await client.delay("sched_record", "refused")
        except ShuttingDownError as exc:
            refused.append(exc)
        GATES["drain"].set()

    async with anyio.create_task_group() as tg, serve(app):
        running = await client.delay("sched_gate", "drain")
        queued = await client.delay("sched_record", "drained")
        scheduled = await client.delay("sched_record", "too-late", countdown=60)
        await eventually(lambda: client.get_status(running) is TaskStatus.RUNNING)
        tg.start_soon(during_shutdown)
        # Leaving `serve` ran the shutdown, which waited for the gate.
    assert len(refused) == 1
    assert client.get_status(running) is TaskStatus.SUCCESS
    assert client.get_status(queued) is TaskStatus.SUCCESS
    info = await client.get_info(scheduled)
    assert info is not None and info.status is TaskStatus.CANCELLED
    assert info.error == "ShutdownCancelled: the app shut down before its scheduled time"


async def test_shutdown_timeout_cancels_what_is_left_and_says_why() -> None:
    GATES["stuck"] = anyio.Event()
    app, fw = make(concurrency=1, shutdown_timeout=0.2)
    client = fw.client
    async with serve(app):
        running = await client.delay("sched_gate", "stuck")
        queued = await client.delay("sched_record", "never-run")
        await eventually(lambda: client.get_status(running) is TaskStatus.RUNNING)
    running_info, queued_info = await client.get_info(running), await client.get_info(queued)
    assert running_info is not None and queued_info is not None
    assert running_info.status is queued_info.status is TaskStatus.CANCELLED
    assert running_info.error == (
        "ShutdownCancelled: shutdown_timeout (0.2s) elapsed before it finished"
    )
    assert queued_info.error == "ShutdownCancelled: shutdown_timeout (0.2s) elapsed before it ran"


async def test_max_pending_refuses_instead_of_dropping() -> None:
    GATES["full"] = anyio.Event()
    app, fw = make(concurrency=1, max_pending=3)
    async with serve(app):
        client = fw.client
        ids = [await client.delay("sched_gate", "full") for _ in range(3)]
        with pytest.raises(QueueFullError, match="max_pending=3"):
            await client.delay("sched_gate", "full")
        with pytest.raises(QueueFullError):
            await client.submit_batch([{"task_name": "sched_record", "args": ["x"]}])
        GATES["full"].set()
        for task_id in ids:
            await client.wait(task_id, timeout=5)
        assert (await client.submit_task("sched_record", args=("room",))).result == "room"


async def test_a_blocking_sync_task_never_blocks_the_event_loop() -> None:
    THREAD_GATES["loop"] = threading.Event()
    app, fw = make(concurrency=2)
    async with serve(app) as http:
        blocked = await fw.client.delay("sched_thread_gate", "loop")
        await eventually(lambda: fw.client.get_status(blocked) is TaskStatus.RUNNING)
        # The thread is blocked; requests and coroutine tasks still run on the loop.
        assert (await http.get(f"/tasks/{blocked}")).json()["status"] == "running"
        assert (await fw.client.submit_task("sched_record", args=("meanwhile",))).result == (
            "meanwhile"
        )
        THREAD_GATES["loop"].set()
        assert (await fw.client.wait(blocked, timeout=5)).result == "late"


class _SlowInsertStore(MemoryStore):
    """A durable-looking memory store whose inserts wait for `gate`: a submission is then
    held between being counted as pending and being placed in a queue."""

    durable = True
    add_one = None  # type: ignore[assignment]  # no synchronous path: submissions await insert

    def __init__(self) -> None:
        super().__init__()
        self.entered = anyio.Event()
        self.gate = anyio.Event()

    async def insert(self, records: Sequence[TaskRecord]) -> None:
        self.entered.set()
        await self.gate.wait()
        for record in records:
            MemoryStore.add_one(self, record)


async def test_shutdown_leaves_a_submission_in_flight_to_its_submitter() -> None:
    """Shutdown while a submission's insert is awaited must not take the run
    from a queue it is not in yet (this once failed shutdown with "not in deque")."""
    store = _SlowInsertStore()
    fw = FastWorker(store=store)
    async with fw.run() as client, anyio.create_task_group() as group:
        ids: list[str] = []

        async def submit() -> None:
            ids.append(await client.delay("sched_record", "in-flight"))

        group.start_soon(submit)
        await store.entered.wait()
        shutdown_done = anyio.Event()

        async def shut() -> None:
            await client.scheduler.shutdown(5)
            shutdown_done.set()

        group.start_soon(shut)
        await anyio.lowlevel.checkpoint()
        store.gate.set()
        await shutdown_done.wait()
    record = store.peek(ids[0])
    # Accepted as shutdown began, with a durable store: released for the next process.
    assert record is not None and record.owner is None and record.status is TaskStatus.QUEUED


async def test_cancel_of_a_submission_in_flight_cancels_it_once_placed() -> None:
    store = _SlowInsertStore()
    fw = FastWorker(store=store)
    async with fw.run() as client, anyio.create_task_group() as group:
        ids: list[str] = []

        async def submit() -> None:
            ids.append(await client.delay("sched_record", "cancel-me", countdown=3600))

        group.start_soon(submit)
        await store.entered.wait()
        (task_id,) = [run_id for run_id in client.scheduler._runs]
        cancelled: list[TaskStatus] = []

        async def cancel() -> None:
            cancelled.append((await client.scheduler.cancel(task_id)).status)

        group.start_soon(cancel)
        await anyio.lowlevel.checkpoint()
        store.gate.set()
    assert ids == [task_id] and cancelled == [TaskStatus.CANCELLED]


async def test_a_worker_reads_the_clock_anew_after_waiting_for_work() -> None:
    # Back to back, one clock reading ends a task and starts the next; a worker that waited
    # for work in between must not reuse it (the next task would seem to start too early).
    app, fw = make(concurrency=1)
    async with serve(app):
        client = fw.client
        GATES["clock"] = anyio.Event()
        first = await client.delay("sched_gate", "clock")
        second = await client.delay("sched_record", "straight-on")
        GATES["clock"].set()
        done_first, done_second = await client.wait(first, 5), await client.wait(second, 5)
        mark = datetime.now(UTC)  # the worker is idle now: it waits for work
        third = await client.wait(await client.delay("sched_record", "after-a-wait"), 5)
    assert done_first.completed_at is not None and done_second.started_at is not None
    assert done_second.started_at >= done_first.completed_at
    assert third.started_at is not None and third.started_at >= mark
