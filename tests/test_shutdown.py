"""SIGTERM on a real uvicorn process (`make run`) ends open event streams and the process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest

from fastworker_fastapi import _server_shutdown
from tests.conftest import eventually

ROOT = Path(__file__).parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _events(response: httpx.Response) -> AsyncIterator[str]:
    """The `event:` names of a stream, as they come."""
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            yield line.removeprefix("event: ")


def _start_uvicorn(port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`make run`'s command on `port`, in its own process group, output to `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "example_app.main:app", "--host", "127.0.0.1",
             "--port", str(port)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


async def test_sigterm_ends_open_streams_and_the_server(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "FASTWORKER_STORE": "memory"}
    log = tmp_path / "uvicorn.log"
    server = _start_uvicorn(port, env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:

            async def up() -> bool:
                with contextlib.suppress(httpx.TransportError):
                    return (await http.get("/tasks")).status_code == 200
                return False

            await eventually(up, timeout=30, message="uvicorn started")
            assert (await http.get("/tasks/dashboard")).status_code == 200
            task_id = (await http.post("/reports/1", params={"pages": 50})).json()["task_id"]
            ended: dict[str, list[str]] = {}

            async def follow(path: str) -> None:
                async with http.stream("GET", path) as response:
                    names = ended.setdefault(path, [])
                    async for name in _events(response):
                        names.append(name)

            # A guard against a hang (the bug this test is about), not a timing assertion.
            with anyio.fail_after(60):
                async with anyio.create_task_group() as streams:
                    for path in (
                        "/tasks/events",
                        "/tasks/events?name=x",
                        f"/tasks/{task_id}/events",
                    ):
                        streams.start_soon(follow, path)
                    await eventually(lambda: len(ended) == 3 and ended[f"/tasks/{task_id}/events"])
                    server.send_signal(signal.SIGTERM)
        # Each stream ended by itself (the task group returned), the last event saying why.
        assert {path: names[-1] for path, names in ended.items()} == {
            path: "shutdown" for path in ended
        }
        # uvicorn re-raises the signal once its graceful shutdown is complete.
        status = await anyio.to_thread.run_sync(lambda: server.wait(timeout=30))
        assert status in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in log.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def test_no_server_flag_is_found_without_uvicorn_handlers() -> None:
    assert _server_shutdown.find_server_exit_flag() is None


async def test_the_watch_calls_back_once_the_flag_turns() -> None:
    calls: list[str] = []
    flags = iter([False, False, True])
    await _server_shutdown.watch(lambda: next(flags), lambda: calls.append("end"))
    assert calls == ["end"]


def test_the_flag_is_read_from_the_handler_uvicorn_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Server:
        should_exit = False

        def handle_exit(self, sig: int, frame: object) -> None:  # pragma: no cover
            self.should_exit = True

    server = Server()
    monkeypatch.setattr(signal, "getsignal", lambda sig: server.handle_exit)
    flag = _server_shutdown.find_server_exit_flag()
    assert flag is not None and not flag()
    server.should_exit = True
    assert flag()
