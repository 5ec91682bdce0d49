"""Spawned control planes die with the app, however it dies (SIGKILL included)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import eventually

pytestmark = pytest.mark.remote
TESTS_DIR = Path(__file__).parent


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (PID 1 of a container may never reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    except OSError:  # pragma: no cover - not Linux
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def _free(port: int) -> bool:
    """Nobody listens there: a new listener can take it (connections of the dead plane may
    linger in TIME_WAIT; a listener with SO_REUSEADDR, as nng's, is not held up by those)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
        return True


def _reap(process: subprocess.Popen[bytes]) -> None:
    """Kill the process's group, wait for it and close its pipes, whatever the test did."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    for pipe in (process.stdin, process.stdout):
        if pipe is not None:
            pipe.close()


async def test_sigkill_of_the_app_takes_its_spawned_planes_with_it() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(TESTS_DIR.parent)])}
    app = subprocess.Popen(  # noqa: ASYNC220 - started once; its pipe read is one line
        [sys.executable, str(TESTS_DIR / "_orphan_app.py")],
        stdout=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    planes: list[dict[str, object]] = []
    try:
        assert app.stdout is not None
        planes = json.loads(app.stdout.readline())
        assert len(planes) == 2
        pids = [int(str(p["pid"])) for p in planes]
        assert not any(_gone(pid) for pid in pids)
        app.send_signal(signal.SIGKILL)
        app.wait()
        await eventually(
            lambda: all(_gone(pid) for pid in pids), timeout=5, message="planes outlived the app"
        )
        ports = [int(port) for p in planes for port in p["ports"]]  # type: ignore[attr-defined]
        await eventually(lambda: all(_free(port) for port in ports), timeout=5)
    finally:
        _reap(app)
        for plane in planes:  # should the test fail: never leave a plane behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(str(plane["pid"])), signal.SIGKILL)


_ARMED_CHILD = """
import sys
from fastworker_fastapi import _plane_main
_plane_main._set_parent_death_signal = lambda: False  # test the portable watch alone
_plane_main.die_with_parent()
print("armed", flush=True)
sys.stdin.read()
"""


def test_the_portable_watch_kills_the_group_when_the_app_end_of_the_pipe_closes() -> None:
    read_end, write_end = os.pipe()
    env = {**os.environ, "FASTWORKER_PARENT_FD": str(read_end)}
    child = subprocess.Popen(
        [sys.executable, "-c", _ARMED_CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        pass_fds=(read_end,),
        start_new_session=True,
    )
    os.close(read_end)
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"armed\n"
        os.close(write_end)  # as the app's exit would
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        _reap(child)


def test_a_plane_whose_app_died_during_the_spawn_kills_itself() -> None:
    env = {**os.environ, "FASTWORKER_PARENT_PID": "1"}  # not our parent: as if reparented
    child = subprocess.Popen(
        [sys.executable, "-c", _ARMED_CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        _reap(child)


def test_the_parent_death_signal_is_armed_on_linux() -> None:
    # In a child: arming it here would tie pytest's own life to its parent's.
    code = "from fastworker_fastapi import _plane_main as m; print(m._set_parent_death_signal())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    assert out.stdout.strip() == str(sys.platform.startswith("linux")).encode()
