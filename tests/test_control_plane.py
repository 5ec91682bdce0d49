"""Spawning real `fastworker control-plane` processes and talking to them as the app does."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import signal
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pynng
import pytest

from fastworker_fastapi._control_plane import (
    ControlPlaneConnection,
    ControlPlaneError,
    ControlPlaneProcess,
    ControlPlaneProtocolError,
    ControlPlaneStartError,
    ControlPlaneTimeoutError,
    find_control_plane_ports,
    find_fastworker_executable,
    make_task_dict,
)
from fastworker_fastapi._nng import Pair0Listener, format_tcp_address
from tests.conftest import eventually, group_is_gone, stop_for_sure

pytestmark = pytest.mark.remote

TESTS_DIR = Path(__file__).parent
DEADLINE = 10.0


class Callbacks:
    """Decoded completion callbacks by task id, with a way to wait for a number of them."""

    def __init__(self) -> None:
        self.by_id: dict[str, dict[str, Any]] = {}
        self.duplicates: list[str] = []
        self._changed = asyncio.Event()

    def __call__(self, message: bytes) -> None:
        data = json.loads(message)
        if data["task_id"] in self.by_id:
            self.duplicates.append(data["task_id"])
        self.by_id[data["task_id"]] = data
        self._changed.set()

    async def wait_for(self, count: int, timeout: float = 30.0) -> dict[str, dict[str, Any]]:
        async with asyncio.timeout(timeout):
            while len(self.by_id) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.by_id


@pytest.fixture
async def callbacks() -> AsyncIterator[tuple[Callbacks, str]]:
    inbox = Callbacks()
    async with Pair0Listener(inbox) as listener:
        yield inbox, listener.address


def test_ports_are_distinct_free_and_consecutive_from_base() -> None:
    ports = find_control_plane_ports()
    assert len(set(ports.all_ports())) == 7
    assert ports.all_ports()[:5] == list(range(ports.base, ports.base + 5))
    for port in ports.all_ports():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_the_fastworker_cli_is_found() -> None:
    assert Path(find_fastworker_executable()).name == "fastworker"


def test_make_task_dict_sends_naive_local_eta_and_json_dates() -> None:
    eta = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    task = make_task_dict("add", [1, 2], task_id="t", eta=eta, callback_address="tcp://h:1")
    assert task["eta"] == eta.astimezone().replace(tzinfo=None).isoformat()
    assert "T" in task["created_at"]
    assert task["callback"] == {"address": "tcp://h:1", "data": {}}
    with pytest.raises(ValueError, match="unknown priority"):
        make_task_dict("add", task_id="t", priority="urgent")


async def test_invalid_requests_are_refused_before_anything_is_sent() -> None:
    async with ControlPlaneConnection("tcp://127.0.0.1:9") as connection:
        valid = make_task_dict("add", [1, 2], task_id="t")
        with pytest.raises(ValueError, match="unknown priority"):
            await connection.submit_batch([valid], priority="urgent", timeout=1.0)
        with pytest.raises(ValueError, match="at least one"):
            await connection.submit_batch([], priority="normal", timeout=1.0)
        # The control plane would answer this with no reply at all.
        with pytest.raises(ValueError, match="invalid FastWorker task"):
            await connection.submit_batch([{"id": "x"}], priority="normal", timeout=1.0)
        with pytest.raises(ValueError, match="JSON"):
            await connection.submit_batch(
                [{**valid, "kwargs": {"x": object()}}], priority="normal", timeout=1.0
            )


async def test_batch_with_callbacks_reports_results_and_errors(
    control_plane: ControlPlaneProcess, callbacks: tuple[Callbacks, str]
) -> None:
    inbox, address = callbacks
    async with ControlPlaneConnection(control_plane.base_address) as connection:
        assert await connection.ping(timeout=DEADLINE)
        space_dates = make_task_dict("add", [5, 5], task_id="space", callback_address=address)
        space_dates["created_at"] = str(datetime.now())  # upstream's own "YYYY-MM-DD hh:mm:ss"
        tasks = [
            make_task_dict(
                "add", [2, 3], task_id="add", callback_address=address, callback_data={"k": "v"}
            ),
            make_task_dict("boom", ["kaput"], task_id="boom", callback_address=address),
            make_task_dict(
                "sleep_then", [[1, "a"], 0.05], task_id="sleep", callback_address=address
            ),
            make_task_dict("no_such_task", [], task_id="unknown", callback_address=address),
            space_dates,
        ]
        await connection.submit_batch(tasks, priority="high", timeout=DEADLINE)
        got = await inbox.wait_for(5)

        assert got["add"]["status"] == "success"
        assert got["add"]["result"] == 5
        assert got["add"]["error"] is None
        assert got["add"]["callback_data"] == {"k": "v"}
        assert got["sleep"]["result"] == [1, "a"]
        assert got["space"]["result"] == 10  # both date formats are accepted
        # A failing task's `error` is only `str(exception)`: no type name, no traceback.
        # ValueError("kaput") arrives as "kaput"; an unregistered name as "Task <name> not found".
        assert got["boom"]["status"] == "failure"
        assert got["boom"]["result"] is None
        assert got["boom"]["error"] == "kaput"
        assert got["unknown"]["error"] == "Task no_such_task not found"
        # Callback datetimes are ISO with "T" (the result port's are "YYYY-MM-DD hh:mm:ss").
        started = datetime.fromisoformat(got["add"]["started_at"])
        assert "T" in got["add"]["completed_at"]
        assert datetime.fromisoformat(got["add"]["completed_at"]) >= started
        assert not inbox.duplicates

        # The stored result is unreliable for batch tasks (often "Incorrect state"): only its
        # identity is asserted here; outcomes come from callbacks.
        stored = await connection.get_result("add", timeout=DEADLINE)
        assert stored is not None
        assert stored["task_id"] == "add"
        assert await connection.get_result("never-submitted", timeout=DEADLINE) is None


async def test_a_spawned_plane_is_quiet_but_its_real_errors_reach_our_log(
    control_plane: ControlPlaneProcess,
    callbacks: tuple[Callbacks, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Per-task INFO lines and the per-task "Incorrect state" reply failure of a batch are not
    printed at all; a task's own failure (an ERROR of the plane) is forwarded to our logger."""
    caplog.set_level(logging.WARNING, logger="fastworker_fastapi.plane")
    inbox, address = callbacks
    async with ControlPlaneConnection(control_plane.base_address) as connection:
        tasks = [
            make_task_dict("add", [n, 1], task_id=f"add-{n}", callback_address=address)
            for n in range(20)
        ]
        tasks.append(make_task_dict("boom", ["loud"], task_id="boom", callback_address=address))
        await connection.submit_batch(tasks, priority="normal", timeout=DEADLINE)
        await inbox.wait_for(21)
        await eventually(lambda: "loud" in caplog.text, message="the task's error forwarded")
    tail = control_plane.log_tail()
    assert "Incorrect state" not in tail
    assert "add-3" not in tail  # no per-task INFO line
    assert "Task boom failed: loud" in tail
    assert all(r.name == "fastworker_fastapi.plane" for r in caplog.records)


async def test_two_connections_at_once_run_every_task_exactly_once(
    control_plane: ControlPlaneProcess, callbacks: tuple[Callbacks, str], tmp_path: Path
) -> None:
    inbox, address = callbacks
    ledger = tmp_path / "ledger.txt"

    async def client(name: str) -> None:
        async with ControlPlaneConnection(control_plane.base_address) as connection:
            batches = [
                [
                    make_task_dict(
                        "record",
                        [str(ledger), f"{name}-{b}-{n}"],
                        task_id=f"{name}-{b}-{n}",
                        callback_address=address,
                    )
                    for n in range(10)
                ]
                for b in range(4)
            ]
            # Same port, concurrently: the per-port lock serialises them; replies get misrouted
            # by the control plane but any reply counts.
            await asyncio.gather(
                *(
                    connection.submit_batch(batch, priority="normal", timeout=DEADLINE)
                    for batch in batches
                )
            )

    await asyncio.gather(client("a"), client("b"))
    got = await inbox.wait_for(80)
    expected = {f"{c}-{b}-{n}" for c in "ab" for b in range(4) for n in range(10)}
    assert set(got) == expected
    assert all(r["status"] == "success" and r["result"] == tid for tid, r in got.items())
    assert not inbox.duplicates
    lines = ledger.read_text().split()
    assert sorted(lines) == sorted(expected)  # each task ran exactly once


async def test_result_port_requests_are_serialised(control_plane: ControlPlaneProcess) -> None:
    async with ControlPlaneConnection(control_plane.base_address) as connection:
        # `cancel` checks that the reply names its own task id, so cross-talk would raise.
        replies = await asyncio.gather(
            *(connection.cancel(f"unknown-{n}", timeout=DEADLINE) for n in range(20))
        )
    assert replies == [False] * 20


async def test_cancel_of_a_running_task_is_acknowledged(
    control_plane: ControlPlaneProcess,
) -> None:
    async with ControlPlaneConnection(control_plane.base_address) as connection:
        task = make_task_dict("sleep_then", [1, 1.0], task_id="long")
        await connection.submit_batch([task], priority="low", timeout=DEADLINE)
        # Batch tasks are registered as active when the batch arrives, so this finds it.
        assert await connection.cancel("long", timeout=DEADLINE) is True


async def test_an_aware_eta_runs_later_and_calls_back(
    control_plane: ControlPlaneProcess, callbacks: tuple[Callbacks, str]
) -> None:
    inbox, address = callbacks
    eta = datetime.now(UTC) + timedelta(seconds=1)
    task = make_task_dict("add", [1, 1], task_id="later", eta=eta, callback_address=address)
    async with ControlPlaneConnection(control_plane.base_address) as connection:
        await connection.submit_batch([task], priority="normal", timeout=DEADLINE)
    got = await inbox.wait_for(1, timeout=DEADLINE)
    assert got["later"]["result"] == 2
    assert datetime.fromisoformat(got["later"]["started_at"]).astimezone() >= eta


async def test_stop_kills_the_process_group_although_sigterm_does_not(
    control_plane: ControlPlaneProcess,
) -> None:
    pgid = control_plane.pid
    assert pgid is not None
    assert not group_is_gone(pgid)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(control_plane.stop(grace=1.0), DEADLINE)
    assert loop.time() - started < 5.0
    # It was still alive 1 s after SIGTERM, so SIGKILL ended it.
    assert control_plane.returncode == -signal.SIGKILL
    assert group_is_gone(pgid)
    await control_plane.stop(grace=1.0)  # idempotent
    async with ControlPlaneConnection(control_plane.base_address) as connection:
        assert await connection.ping(timeout=0.5) is False


async def test_a_task_module_that_does_not_import_fails_start_and_leaves_no_process() -> None:
    process = ControlPlaneProcess(["_fw_no_such_module"], python_path=[TESTS_DIR])
    try:
        with pytest.raises(ControlPlaneStartError, match="_fw_no_such_module") as caught:
            await process.start(ready_timeout=30.0)
        assert "No module named" in str(caught.value)
        assert "log tail" in str(caught.value)
        assert process.returncode is not None
        assert process.pid is not None
        assert group_is_gone(process.pid)
    finally:
        await process.stop(grace=0.5)


async def test_start_fails_clearly_when_the_process_exits_early() -> None:
    false = shutil.which("false")
    assert false is not None
    process = ControlPlaneProcess(["_fw_tasks"], executable=false)
    try:
        with pytest.raises(ControlPlaneStartError, match="exited with status 1"):
            await process.start(ready_timeout=30.0)
        assert process.returncode == 1
    finally:
        await process.stop(grace=0.5)


async def test_requests_to_a_dead_address_fail_within_their_timeout() -> None:
    ports = find_control_plane_ports()
    address = format_tcp_address("127.0.0.1", ports.base)
    loop = asyncio.get_running_loop()
    async with ControlPlaneConnection(address) as connection:
        started = loop.time()
        with pytest.raises(ControlPlaneTimeoutError, match="no connection") as caught:
            await connection.submit_batch(
                [make_task_dict("add", [1, 2], task_id="t")], priority="critical", timeout=0.5
            )
        assert loop.time() - started < 1.5
        assert caught.value.request_sent is False  # safe to give the tasks to another one
        assert isinstance(caught.value, TimeoutError)
        assert await connection.ping(timeout=0.3) is False


async def test_a_late_reply_never_answers_the_next_request() -> None:
    ports = find_control_plane_ports()
    base = format_tcp_address("127.0.0.1", ports.base)
    result_port = format_tcp_address("127.0.0.1", ports.base + 4)
    first_timed_out = asyncio.Event()

    async def slow_server(rep: Any) -> None:
        first = json.loads(await rep.arecv())
        await first_timed_out.wait()
        await rep.asend(json.dumps({"cancelled": True, "task_id": first["task_id"]}).encode())
        second = json.loads(await rep.arecv())
        await rep.asend(json.dumps({"cancelled": False, "task_id": second["task_id"]}).encode())

    with pynng.Rep0(listen=result_port) as rep:
        async with ControlPlaneConnection(base) as connection, asyncio.timeout(DEADLINE):
            server = asyncio.create_task(slow_server(rep))
            try:
                with pytest.raises(ControlPlaneTimeoutError, match="no reply") as caught:
                    await connection.cancel("first", timeout=0.3)
                assert caught.value.request_sent is True
                first_timed_out.set()
                assert await connection.cancel("second", timeout=DEADLINE) is False
                await server
            finally:
                server.cancel()


async def test_a_closed_connection_refuses_requests() -> None:
    connection = ControlPlaneConnection("tcp://127.0.0.1:9")
    await connection.aclose()
    assert await connection.ping(timeout=1.0) is False
    with pytest.raises(ConnectionError, match="closed"):
        await connection.cancel("x", timeout=1.0)


async def test_aclose_fails_a_request_in_flight_at_once() -> None:
    ports = find_control_plane_ports()
    connection = ControlPlaneConnection(format_tcp_address("127.0.0.1", ports.base))
    pending = asyncio.create_task(connection.cancel("x", timeout=DEADLINE))
    try:
        async with asyncio.timeout(DEADLINE / 2):
            # One turn of the loop: the request runs without suspending until it waits in nng.
            await asyncio.sleep(0)
            assert connection._sockets, "the request should be waiting on its socket"
            await connection.aclose()
            with pytest.raises(ControlPlaneError, match="failed"):
                await pending
    finally:
        pending.cancel()


def test_the_fastworker_cli_falls_back_to_path(monkeypatch: pytest.MonkeyPatch) -> None:
    venv_bin = Path(find_fastworker_executable()).parent
    monkeypatch.setattr("sys.executable", "/nonexistent/bin/python")
    monkeypatch.setenv("PATH", str(venv_bin))
    assert find_fastworker_executable() == str(venv_bin / "fastworker")
    monkeypatch.setenv("PATH", "")
    with pytest.raises(FileNotFoundError, match="pip install fastworker"):
        find_fastworker_executable()


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one task module"):
        ControlPlaneProcess([])
    with pytest.raises(RuntimeError, match="not started"):
        _ = ControlPlaneProcess(["m"]).base_address
    with pytest.raises(ValueError, match="no room"):
        ControlPlaneConnection("tcp://127.0.0.1:65533")


async def test_process_as_context_manager_with_concurrency() -> None:
    process = ControlPlaneProcess(["_fw_tasks"], python_path=[TESTS_DIR], concurrency=2)
    try:
        async with process:
            assert "--concurrency" in " ".join(process._command())
            async with ControlPlaneConnection(process.base_address) as connection:
                assert connection.base_address == process.base_address
                assert await connection.ping(timeout=DEADLINE)
        assert process.returncode == -signal.SIGKILL
        with pytest.raises(RuntimeError, match="already started"):
            await process.start()
    finally:
        await stop_for_sure(process)


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (b"not json", "not JSON"),
        (b'{"found": true, "result": {"task_id": "someone-else"}}', "unexpected result reply"),
        (b'{"error": "Missing task_id"}', "unexpected result reply"),
        (b'{"cancelled": true, "task_id": "someone-else"}', "unexpected cancel reply"),
    ],
)
async def test_malformed_replies_raise_protocol_errors(reply: bytes, match: str) -> None:
    ports = find_control_plane_ports()
    base = format_tcp_address("127.0.0.1", ports.base)

    async def server(rep: Any) -> None:
        await rep.arecv()
        await rep.asend(reply)

    with pynng.Rep0(listen=format_tcp_address("127.0.0.1", ports.base + 4)) as rep:
        async with ControlPlaneConnection(base) as connection, asyncio.timeout(DEADLINE):
            serving = asyncio.create_task(server(rep))
            try:
                call = connection.cancel if "cancel" in match else connection.get_result
                with pytest.raises(ControlPlaneProtocolError, match=match):
                    await call("mine", timeout=DEADLINE)
                await serving
            finally:
                serving.cancel()


def test_the_quiet_filter_drops_the_batch_artefact_and_rate_limits_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fastworker_fastapi import _plane_main

    now = [100.0]
    monkeypatch.setattr(_plane_main.time, "monotonic", lambda: now[0])
    quiet = _plane_main._QuietFilter()

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("fw", logging.ERROR, __file__, 1, msg, None, None)

    assert not quiet.filter(record("Error processing task t1: Incorrect state"))
    passed = [quiet.filter(record(f"Task t{n} failed: x")) for n in range(25)]
    assert passed == [True] * 10 + [False] * 15
    now[0] += 1.5
    late = record("Task t99 failed: x")
    assert quiet.filter(late)
    assert late.getMessage() == "Task t99 failed: x (15 similar messages suppressed)"


async def test_plane_output_is_forwarded_with_its_tracebacks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="fastworker_fastapi.plane")
    process = ControlPlaneProcess(["m"])
    for line in [
        "Loaded tasks from m",
        "WARNING fastworker.x: careful",
        "ERROR fastworker.x: broke",
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in f',
        "ValueError: broke",
        "Starting control plane worker control-plane",
    ]:
        process._forward(line)
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == [
        "WARNING fastworker.x: careful",
        "ERROR fastworker.x: broke",
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in f',
        "ValueError: broke",
    ]
    assert [r.levelno for r in caplog.records] == [logging.WARNING] + [logging.ERROR] * 4
