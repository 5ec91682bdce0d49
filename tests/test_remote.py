"""Remote workers on real `fastworker control-plane` processes: spawned, by address, discovered.

Every control plane started here is killed in a `finally`; readiness is polled with deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, cast

import _rm_tasks  # noqa: F401 - registers the rm_ tasks in this process too
import anyio
import pynng
import pytest
from fastapi import FastAPI

from fastworker_fastapi import (
    ConfigurationError,
    FastWorker,
    RemoteWorkers,
    TaskFailed,
    TaskPriority,
    TaskStatus,
)
from fastworker_fastapi._control_plane import (
    ControlPlaneError,
    ControlPlanePorts,
    ControlPlaneTimeoutError,
    find_control_plane_ports,
    find_fastworker_executable,
)
from fastworker_fastapi._nng import MAX_MESSAGE_SIZE, format_tcp_address, pair0_send
from fastworker_fastapi.records import TaskPolicy, TaskRecord
from fastworker_fastapi.tasks import TaskRegistry
from fastworker_fastapi.workers.remote import RemoteExecutor, _outcome
from tests.conftest import eventually, group_is_gone, serve

TESTS_DIR = Path(__file__).parent
ROOT = TESTS_DIR.parent
remote = pytest.mark.remote


# -- helpers -------------------------------------------------------------------------------


@dataclass
class ExternalPlane:
    """A control plane started like an operator would, outside the app."""

    proc: subprocess.Popen[bytes]
    ports: ControlPlanePorts
    log: Path

    @property
    def address(self) -> str:
        return format_tcp_address("127.0.0.1", self.ports.base)

    @property
    def discovery(self) -> str:
        return format_tcp_address("127.0.0.1", self.ports.discovery)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


def start_external_plane(log_dir: Path) -> ExternalPlane:
    ports = find_control_plane_ports()
    log = log_dir / f"plane-{ports.base}.log"
    env = {**os.environ, "PYTHONPATH": str(TESTS_DIR), "FASTWORKER_GUI_ENABLED": "false"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                find_fastworker_executable(),
                "control-plane",
                "--task-modules",
                "_rm_tasks",
                "--base-address",
                format_tcp_address("127.0.0.1", ports.base),
                "--discovery-address",
                format_tcp_address("127.0.0.1", ports.discovery),
                "--subworker-port",
                str(ports.subworker),
                "--no-gui",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    plane = ExternalPlane(proc, ports, log)
    try:
        wait_until_answering(plane)
    except BaseException:
        plane.kill()
        raise
    return plane


def wait_until_answering(plane: ExternalPlane, deadline: float = 30.0) -> None:
    """Probe the result port until it answers (it binds after the task modules are loaded)."""
    result_port = format_tcp_address("127.0.0.1", plane.ports.base + 4)
    loop_deadline = time.monotonic() + deadline
    with pynng.Req0(recv_timeout=300, send_timeout=300) as req:
        req.dial(result_port, block=False)
        while time.monotonic() < loop_deadline:
            assert plane.proc.poll() is None, plane.log.read_text()
            with contextlib.suppress(pynng.Timeout):
                req.send(b'{"task_id": "probe"}')
                if json.loads(req.recv()).get("found") is False:
                    return
    raise AssertionError(f"control plane did not answer within {deadline}s")


def executor_of(fw: FastWorker) -> RemoteExecutor:
    return cast(RemoteExecutor, fw.client.scheduler.executor)


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


@pytest.fixture(scope="module")
def shared_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExternalPlane]:
    plane = start_external_plane(tmp_path_factory.mktemp("planes"))
    try:
        yield plane
    finally:
        plane.kill()


@pytest.fixture
def own_plane(tmp_path: Path) -> Iterator[ExternalPlane]:
    plane = start_external_plane(tmp_path)
    try:
        yield plane
    finally:
        plane.kill()


def settings(**options: Any) -> RemoteWorkers:
    base: dict[str, Any] = {"task_modules": ["_rm_tasks"], "python_path": [str(TESTS_DIR)]}
    return RemoteWorkers(**{**base, **options})


@asynccontextmanager
async def remote_app(workers: RemoteWorkers, **options: Any) -> AsyncIterator[Any]:
    app = FastAPI()
    fw = FastWorker(app, workers=workers, **options)
    async with serve(app) as http:
        yield fw, http


# -- settings (no process needed) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"spawn": 0}, "needs control planes"),
        ({"addresses": "tcp://127.0.0.1:5555"}, "list of strings"),
        ({"spawn": 1, "task_modules": "m"}, "list of module names"),
        ({"addresses": ["http://x:1"]}, "expected an nng address"),
        ({"addresses": ["tcp://h:1", "tcp://h:1"]}, "must not repeat"),
        ({"spawn": -1}, "spawn must be >= 0"),
        ({"spawn": 1, "concurrency": 0}, "concurrency must be >= 1"),
        ({"spawn": 1, "max_in_flight": 0}, "max_in_flight must be >= 1"),
        ({"spawn": 1, "call_timeout": 0}, "call_timeout must be"),
        ({"spawn": 1, "task_deadline": float("inf")}, "task_deadline must be"),
        ({"spawn": 1, "stop_grace": -1}, "stop_grace must be"),
        ({"spawn": 1, "callback_address": "nowhere"}, "expected an nng address"),
    ],
)
def test_bad_settings_are_refused(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        RemoteWorkers(**options)


def test_the_default_spawn_fits_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert RemoteWorkers().spawn == 7  # one core stays the app's
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert RemoteWorkers().spawn == 1
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert RemoteWorkers().spawn == 1
    assert RemoteWorkers(addresses=["tcp://127.0.0.1:5555"]).spawn == 0  # planes given
    assert RemoteWorkers(discovery="tcp://127.0.0.1:5556").spawn == 0


def test_settings_are_frozen_and_hashable() -> None:
    workers = RemoteWorkers(addresses=["tcp://127.0.0.1:5555"], task_names=["x"])
    assert workers.addresses == ("tcp://127.0.0.1:5555",)
    assert hash(workers) == hash(
        RemoteWorkers(addresses=("tcp://127.0.0.1:5555",), task_names=("x",))
    )


def test_remote_only_task_names_resolve_to_a_stub() -> None:
    executor = RemoteWorkers(spawn=1, task_names=["rm_only_remote"]).build_executor(TaskRegistry())
    definition = executor.resolve("rm_only_remote")
    assert definition is not None and definition.policy.max_retries == 0
    with pytest.raises(RuntimeError, match="only on remote control planes"):
        definition.func(1)
    assert executor.resolve("rm_nowhere") is None
    assert executor.concurrency == 64


def test_callback_outcomes() -> None:
    assert _outcome({"status": "success", "result": [1]}, "tcp://a:1") == [1]
    with pytest.raises(TaskFailed, match="RemoteTaskError: kaput") as caught:
        _outcome({"status": "failure", "error": "kaput"}, "tcp://a:1")
    assert caught.value.error_type == "RemoteTaskError"
    with pytest.raises(TaskFailed, match="has no task named 'x'"):
        _outcome({"status": "failure", "error": "Task x not found"}, "tcp://a:1")
    with pytest.raises(TaskFailed, match="failed on the control plane"):
        _outcome({"status": "failure", "error": None}, "tcp://a:1")
    with pytest.raises(TaskFailed, match="status 'cancelled'"):
        _outcome({"status": "cancelled", "error": "Task cancelled"}, "tcp://a:1")


def test_spawn_without_importable_task_modules_is_refused() -> None:
    registry = TaskRegistry()
    executor = RemoteWorkers(spawn=1).build_executor(registry)
    with pytest.raises(ConfigurationError, match="spawn needs task modules"):
        executor._task_modules()


# -- against real control planes -------------------------------------------------------------


@remote
async def test_1000_tasks_from_64_submitters_run_exactly_once_on_spawned_planes(
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "ledger.txt"
    async with remote_app(settings(spawn=2), max_pending=2000) as (fw, _):
        executor = executor_of(fw)
        pids = [p.pid for p in executor._processes]
        assert len(pids) == 2 and all(pid is not None for pid in pids)
        assert all(executor.planes().values())

        async def submitter(s: int) -> list[tuple[int, Any]]:
            ids = [
                (n, await fw.client.delay("rm_record", str(ledger), f"t{s}-{n}", n))
                for n in range(s, 1000, 64)
            ]
            return [(n, await fw.client.wait(task_id, timeout=60)) for n, task_id in ids]

        batches = await asyncio.gather(*(submitter(s) for s in range(64)))
    results = [(n, r) for batch in batches for n, r in batch]
    assert len(results) == 1000
    wrong = [
        (n, r) for n, r in results if r.status is not TaskStatus.SUCCESS or r.result[1] != n * n
    ]
    assert not wrong, wrong[:3]
    tags = lines(ledger)
    assert len(tags) == 1000 and len(set(tags)) == 1000  # each task ran exactly once
    assert executor.late_callbacks == 0
    # Shutdown left nothing behind: each child's whole process group is gone.
    for pid in pids:
        assert pid is not None and group_is_gone(pid)


@remote
async def test_two_app_processes_share_one_control_plane_without_cross_talk(
    shared_plane: ExternalPlane, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(ROOT)])}
    other = await asyncio.create_subprocess_exec(
        sys.executable,
        str(TESTS_DIR / "_rm_second_app.py"),
        shared_plane.address,
        str(ledger),
        "other",
        "300",
        stdout=asyncio.subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    try:
        assert other.stdout is not None
        async with asyncio.timeout(30):
            assert (await other.stdout.readline()).strip() == b"READY"
        async with remote_app(settings(addresses=[shared_plane.address])) as (fw, _):
            ids = [
                await fw.client.delay("rm_record", str(ledger), f"me-{n}", n) for n in range(300)
            ]
            mine = [await fw.client.wait(task_id, timeout=60) for task_id in ids]
        async with asyncio.timeout(60):
            output, _ = await other.communicate()
        assert other.returncode == 0
    finally:
        if other.returncode is None:
            other.kill()
            await other.wait()
    theirs = json.loads(output.decode().strip().splitlines()[-1])
    assert theirs == {"correct": 300, "wrong": []}
    assert [r.result for r in mine] == [[f"me-{n}", n * n] for n in range(300)]
    tags = lines(ledger)
    assert sorted(tags) == sorted(
        [f"me-{n}" for n in range(300)] + [f"other-{n}" for n in range(300)]
    )


@remote
async def test_failures_and_unknown_tasks_are_reported(shared_plane: ExternalPlane) -> None:
    workers = settings(addresses=[shared_plane.address], task_names=["rm_missing"])
    async with remote_app(workers) as (fw, http):
        boom = await fw.client.delay("rm_boom", "kaput")
        missing = await fw.client.delay("rm_missing", 1)
        added = await fw.client.delay("rm_add", 2, 3)
        for task_id in (boom, missing, added):
            await fw.client.wait(task_id, timeout=20)
        failed = (await http.get(f"/tasks/{boom}")).json()
        unknown = (await http.get(f"/tasks/{missing}")).json()
        ok = (await http.get(f"/tasks/{added}")).json()
    assert (failed["status"], failed["error_type"]) == ("failure", "RemoteTaskError")
    assert failed["error"] == "RemoteTaskError: kaput"
    assert (unknown["status"], unknown["error_type"]) == ("failure", "UnknownTaskError")
    assert "has no task named 'rm_missing'" in unknown["error"]
    assert (ok["status"], ok["result"]) == ("success", 5)


@remote
async def test_a_task_that_outlives_its_timeout_fails_and_its_late_result_is_discarded(
    shared_plane: ExternalPlane, tmp_path: Path
) -> None:
    done = tmp_path / "done.txt"
    async with remote_app(settings(addresses=[shared_plane.address])) as (fw, http):
        executor = executor_of(fw)
        slow = await fw.client.delay("rm_too_slow", 1.0, str(done))
        await eventually(lambda: len(executor._waiters) == 1)
        wire_id = next(iter(executor._waiters))
        result = await fw.client.wait(slow, timeout=20)
        assert result.status is TaskStatus.FAILURE
        assert "TaskTimeout" in (result.error or "")
        # The control plane runs it to the end anyway (0.3.0 cannot interrupt a running task;
        # the cancel we sent only suppresses its callback). A late callback is discarded.
        await eventually(lambda: lines(done) == ["finished"], timeout=10)
        late = {"task_id": wire_id, "status": "success", "result": "late"}
        await pair0_send(executor.callback_address, json.dumps(late).encode(), timeout=5)
        await eventually(lambda: executor.late_callbacks == 1, timeout=10)
        info = (await http.get(f"/tasks/{slow}")).json()
        assert (info["status"], info["error_type"]) == ("failure", "TaskTimeout")
        # Cancel of a running remote task is final here too.
        running = await fw.client.delay("rm_sleep", 0.5, "cancelled")
        await eventually(lambda: fw.client.get_status(running) is TaskStatus.RUNNING)
        assert (await http.delete(f"/tasks/{running}")).json()["status"] == "cancelled"
        await eventually(lambda: executor.late_callbacks >= 2 or not executor._zombies, timeout=10)
        assert fw.client.get_status(running) is TaskStatus.CANCELLED


@remote
async def test_priorities_and_retries_are_observable_as_in_process(
    shared_plane: ExternalPlane, tmp_path: Path
) -> None:
    order = tmp_path / "order.txt"
    runs = tmp_path / "runs.txt"
    workers = settings(addresses=[shared_plane.address], concurrency=1)
    async with remote_app(workers) as (fw, http):
        client = fw.client
        blocker = await client.delay("rm_sleep", 0.5, "blocker")
        await eventually(lambda: client.get_status(blocker) is TaskStatus.RUNNING)
        ids = [
            await client.delay("rm_log", str(order), "low", priority=TaskPriority.LOW),
            await client.delay("rm_log", str(order), "normal"),
            await client.delay("rm_log", str(order), "critical", priority="critical"),
            await client.delay("rm_log", str(order), "high", priority="high"),
        ]
        assert (await http.get(f"/tasks/{ids[0]}")).json()["status"] == "queued"
        for task_id in ids:
            await client.wait(task_id, timeout=20)
        flaky = await client.delay("rm_flaky", str(runs), 2)
        await eventually(lambda: client.get_status(flaky) is TaskStatus.RETRYING, timeout=10)
        await client.wait(flaky, timeout=20)
        info = (await http.get(f"/tasks/{flaky}")).json()
        listed = (await http.get("/tasks", params={"name": "rm_log"})).json()
    assert lines(order) == ["critical", "high", "normal", "low"]
    assert (info["status"], info["result"], info["attempts"]) == ("success", 3, 3)
    assert listed["count"] == 4


@remote
async def test_discovery_finds_a_plane_and_a_sigkilled_plane_fails_its_tasks_then_is_dropped(
    own_plane: ExternalPlane,
) -> None:
    workers = settings(
        discovery=own_plane.discovery,
        health_interval=0.2,
        health_timeout=1.0,
        discovery_ttl=2.5,
        unavailable_timeout=1.0,
    )
    async with remote_app(workers) as (fw, http):
        executor = executor_of(fw)
        await eventually(lambda: executor.planes() == {own_plane.address: True}, timeout=10)
        assert (await fw.client.submit_task("rm_add", args=(1, 2))).result == 3
        ids = [await fw.client.delay("rm_sleep", 5.0, f"s{n}") for n in range(4)]
        await eventually(
            lambda: (
                len(executor._waiters) == 4
                and all(w.state == "sent" for w in executor._waiters.values())
            )
        )
        own_plane.kill()
        async with asyncio.timeout(10):
            results = [await fw.client.wait(task_id) for task_id in ids]
        assert {r.status for r in results} == {TaskStatus.FAILURE}
        infos = [(await http.get(f"/tasks/{task_id}")).json() for task_id in ids]
        assert {i["error_type"] for i in infos} == {"WorkerLost"}
        assert all(own_plane.address in i["error"] for i in infos)
        # Silent for longer than discovery_ttl: forgotten; new tasks then fail clearly.
        await eventually(lambda: executor.planes() == {}, timeout=10)
        late = await fw.client.submit_task("rm_add", args=(1, 1))
        assert late.status is TaskStatus.FAILURE
        assert "WorkerUnavailable" in (late.error or "")


@remote
async def test_a_sigkilled_spawned_plane_is_detected_and_retries_go_elsewhere() -> None:
    workers = settings(spawn=2, max_in_flight=4)
    async with remote_app(workers) as (fw, _):
        executor = executor_of(fw)
        ids = [await fw.client.delay("rm_sleep_retry", 1.0, f"r{n}") for n in range(8)]
        await eventually(
            lambda: (
                len(executor._waiters) == 8
                and all(w.state == "sent" for w in executor._waiters.values())
            )
        )
        victim = executor._processes[0]
        assert victim.pid is not None
        os.killpg(victim.pid, signal.SIGKILL)
        async with asyncio.timeout(20):
            results = [await fw.client.wait(task_id) for task_id in ids]
        assert [r.result for r in results] == [f"r{n}" for n in range(8)]
        infos = [await fw.client.get_info(task_id) for task_id in ids]
        attempts = sorted(info.attempts for info in infos if info is not None)
        assert attempts == [1, 1, 1, 1, 2, 2, 2, 2]  # the killed plane's half ran again
        assert list(executor.planes()) == [executor._processes[1].base_address]
    assert all(p.pid is not None and group_is_gone(p.pid) for p in executor._processes)


@remote
async def test_a_failed_start_stops_what_it_started_and_says_why() -> None:
    workers = settings(spawn=2, task_modules=["_rm_no_such_module"])
    executor = workers.build_executor(TaskRegistry())
    async with anyio.create_task_group() as group:
        with pytest.raises(ConfigurationError, match="did not start") as caught:
            await executor.start(group)
    assert "_rm_no_such_module" in str(caught.value)
    assert len(executor._processes) == 2
    assert all(p.pid is not None and group_is_gone(p.pid) for p in executor._processes)
    with pytest.raises(TaskFailed, match="shut down"):
        await run_once(executor, cast(Any, None))
    # Through the app: the lifespan fails with the same clear error (in the task group's).
    app = FastAPI()
    FastWorker(app, workers=workers)
    refused = pytest.RaisesExc(ConfigurationError, match="did not start")
    with pytest.RaisesGroup(refused, flatten_subgroups=True):
        async with serve(app):
            pytest.fail("must not start")


@remote
async def test_no_healthy_plane_fails_clearly_and_foreign_callbacks_are_ignored() -> None:
    dead = format_tcp_address("127.0.0.1", find_control_plane_ports().base)
    workers = settings(addresses=[dead], unavailable_timeout=0.5, health_timeout=0.3)
    async with remote_app(workers) as (fw, _):
        executor = executor_of(fw)
        assert executor.planes() == {dead: False}
        result = await fw.client.submit_task("rm_add", args=(1, 2))
        await pair0_send(executor.callback_address, b"not json", timeout=5)
        await pair0_send(executor.callback_address, b'{"task_id": "nobody"}', timeout=5)
        await eventually(lambda: executor.late_callbacks == 1)
    assert result.status is TaskStatus.FAILURE
    assert result.error is not None and "WorkerUnavailable" in result.error
    assert dead in result.error


# -- failure paths, with a test double for the control-plane connection ---------------------


class FakeConnection:
    """Stands in for `ControlPlaneConnection`; each address behaves as the test says."""

    behaviours: ClassVar[dict[str, str]] = {}
    executors: ClassVar[list[RemoteExecutor]] = []

    def __init__(self, base_address: str) -> None:
        self.base_address = base_address
        self.batches: list[list[dict[str, Any]]] = []
        self.cancelled: list[str] = []
        self.gate = asyncio.Event()

    async def submit_batch(
        self, tasks: list[dict[str, Any]], *, priority: str, timeout: float
    ) -> None:
        behaviour = self.behaviours[self.base_address]
        if behaviour == "unsent":
            raise ControlPlaneTimeoutError("no connection", request_sent=False)
        if behaviour == "invalid":
            raise ValueError("invalid FastWorker task")
        if behaviour == "broken":
            raise ControlPlaneError("request failed")
        if behaviour == "slow":
            await self.gate.wait()
        self.batches.append(tasks)
        if behaviour == "echo":
            for task in tasks:
                message = {"task_id": task["id"], "status": "success", "result": task["args"]}
                self.executors[0]._on_callback(json.dumps(message).encode())

    async def cancel(self, task_id: str, *, timeout: float) -> bool:
        self.cancelled.append(task_id)
        if self.behaviours[self.base_address] == "slow":
            raise ControlPlaneError("cancel failed")
        return True

    async def ping(self, *, timeout: float) -> bool:
        return self.behaviours[self.base_address] != "dead"

    async def aclose(self) -> None:
        return None


async def run_once(executor: RemoteExecutor, record: TaskRecord) -> Any:
    """One attempt as the scheduler makes it: a slot, then the run."""
    slot = await executor.acquire(record)
    return await executor.run(record, cast(Any, None), slot)


def fake_record(name: str = "rm_add", *args: Any, timeout: float | None = None) -> TaskRecord:
    return TaskRecord(
        id=f"rec-{name}-{args}",
        name=name,
        args=list(args),
        kwargs={},
        priority=TaskPriority.NORMAL,
        policy=TaskPolicy(timeout=timeout),
        status=TaskStatus.RUNNING,
        created=time.time(),
        attempts=1,
    )


@asynccontextmanager
async def fake_executor(
    monkeypatch: pytest.MonkeyPatch, behaviours: dict[str, str], **options: Any
) -> AsyncIterator[RemoteExecutor]:
    monkeypatch.setattr("fastworker_fastapi.workers.remote.ControlPlaneConnection", FakeConnection)
    monkeypatch.setattr(FakeConnection, "behaviours", behaviours)
    executor = RemoteWorkers(addresses=list(behaviours), **options).build_executor(TaskRegistry())
    monkeypatch.setattr(FakeConnection, "executors", [executor])
    async with anyio.create_task_group() as group:
        await executor.start(group)
        try:
            yield executor
        finally:
            await executor.aclose()


def connection(executor: RemoteExecutor, address: str) -> FakeConnection:
    return cast(FakeConnection, executor._planes[address].connection)


async def test_a_batch_that_never_left_goes_to_another_plane(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    planes = {"tcp://127.0.0.1:1": "unsent", "tcp://127.0.0.1:2": "echo"}
    async with fake_executor(monkeypatch, planes) as executor:
        assert await run_once(executor, fake_record("rm_add", 4, 5)) == [4, 5]
        assert executor.planes() == {"tcp://127.0.0.1:1": False, "tcp://127.0.0.1:2": True}
        with pytest.raises(RuntimeError, match="only once"):
            await executor.start(cast(Any, None))


async def test_refused_and_failed_batches_fail_their_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    async with fake_executor(monkeypatch, {"tcp://127.0.0.1:1": "invalid"}) as executor:
        with pytest.raises(TaskFailed, match="InvalidTask"):
            await run_once(executor, fake_record())
    async with fake_executor(monkeypatch, {"tcp://127.0.0.1:1": "broken"}) as executor:
        with pytest.raises(
            TaskFailed, match=r"WorkerLost: control plane tcp://127\.0\.0\.1:1 failed"
        ):
            await run_once(executor, fake_record())


async def test_a_lost_callback_ends_at_the_task_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    address = "tcp://127.0.0.1:1"
    async with fake_executor(monkeypatch, {address: "silent"}, task_deadline=0.2) as executor:
        with pytest.raises(TaskFailed, match=r"within task_deadline=0\.2s"):
            await run_once(executor, fake_record())
        # The plane is asked to cancel it; once it confirms, the slot is free again.
        await eventually(lambda: not executor._zombies and connection(executor, address).cancelled)


async def test_cancelled_attempts_leave_the_outbox_or_hold_their_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    address = "tcp://127.0.0.1:1"
    async with fake_executor(monkeypatch, {address: "slow"}, max_in_flight=2) as executor:
        sending = asyncio.create_task(run_once(executor, fake_record("rm_add", 1)))
        await eventually(lambda: [w.state for w in executor._waiters.values()] == ["sending"])
        queued = asyncio.create_task(run_once(executor, fake_record("rm_add", 2)))
        waiting = asyncio.create_task(run_once(executor, fake_record("rm_add", 3)))  # plane is full
        await eventually(lambda: len(executor._waiters) == 2 and executor._slot_waiters)
        plane = executor._planes[address]
        assert [len(q) for q in plane.outbox] == [0, 0, 1, 0]
        for task in (queued, waiting, sending):
            task.cancel()
        for task in (queued, waiting, sending):
            with pytest.raises(asyncio.CancelledError):
                await task
        assert plane.outbox == [[], [], [], []]
        # The one being sent may run: its slot stays taken (the cancel on the plane failed).
        assert plane.load == 1 and len(executor._zombies) == 1
        await eventually(lambda: connection(executor, address).cancelled)
        assert plane.load == 1
        # Its late callback frees the slot and is counted.
        wire_id = next(iter(executor._zombies))
        executor._on_callback(json.dumps({"task_id": wire_id, "status": "success"}).encode())
        assert plane.load == 0 and executor.late_callbacks == 1
        connection(executor, address).gate.set()


async def test_a_plane_that_stops_answering_is_marked_down_and_back_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    address = "tcp://127.0.0.1:1"
    behaviours = {address: "silent"}
    async with fake_executor(monkeypatch, behaviours, health_interval=0.01) as executor:
        running = asyncio.create_task(run_once(executor, fake_record()))
        await eventually(lambda: [w.state for w in executor._waiters.values()] == ["sent"])
        behaviours[address] = "dead"
        with pytest.raises(
            TaskFailed, match=r"WorkerLost: control plane tcp://127\.0\.0\.1:1 stopped"
        ):
            await running
        assert executor.planes() == {address: False}
        behaviours[address] = "silent"
        await eventually(lambda: executor.planes() == {address: True})


async def test_a_callback_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        workers = RemoteWorkers(addresses=["tcp://127.0.0.1:1"], callback_port=port)
        executor = workers.build_executor(TaskRegistry())
        async with anyio.create_task_group() as group:
            with pytest.raises(ConfigurationError, match="cannot listen for callbacks"):
                await executor.start(group)


def test_the_example_app_uses_two_spawned_planes_in_remote_mode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from example_app.main import choose_workers

    monkeypatch.setenv("FASTWORKER_MODE", "remote")
    assert choose_workers() == RemoteWorkers(spawn=2)


async def test_oversize_arguments_and_results_fail_at_once_and_clearly() -> None:
    # lanes=0: every result comes back as a callback, whose size the listener bounds.
    workers = settings(spawn=1, lanes=0, task_deadline=120)
    async with remote_app(workers, max_result_bytes=64 << 20) as (fw, _):
        big_argument = await fw.client.delay("rm_length", "y" * (MAX_MESSAGE_SIZE + 1))
        big_result = await fw.client.delay("rm_blob", MAX_MESSAGE_SIZE + 1)
        fine = await fw.client.delay("rm_length", "y" * 1000)
        argument = await fw.client.wait(big_argument, timeout=60)
        result = await fw.client.wait(big_result, timeout=60)
        assert (await fw.client.wait(fine, timeout=60)).result == 1000
    # Their own errors (not WorkerLost at the deadline), and not retried.
    assert argument.error is not None and argument.error.startswith("PayloadTooLarge:")
    assert "limit of a request to a control plane" in argument.error
    assert result.error is not None and result.error.startswith("ResultTooLarge:")
    assert "limit of a callback" in result.error
