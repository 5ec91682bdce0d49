"""One SQLite task store shared by real uvicorn processes: what users deploy.

Every test starts its own uvicorn processes on free loopback ports (`tests/_store_app.py`)
and always kills them, whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import eventually, free_port

ROOT = Path(__file__).resolve().parent.parent


class App:
    """One `uvicorn tests._store_app:app` process group."""

    def __init__(self, tmp: Path, env: dict[str, str], workers: int = 1) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "tests._store_app:app",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        if workers > 1:
            command += ["--workers", str(workers)]
        self.process = subprocess.Popen(
            command,
            cwd=tmp,
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            start_new_session=True,
        )

    async def ready(self) -> None:
        async def answers() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"uvicorn exited with {self.process.returncode}")
            try:
                async with httpx.AsyncClient(timeout=1) as http:
                    return (await http.get(f"{self.url}/pid")).status_code == 200
            except httpx.TransportError:
                return False

        await eventually(answers, timeout=30, interval=0.05, message="uvicorn started")

    def kill(self) -> None:
        """SIGKILL the whole group: no shutdown, no cleanup, as a crash does."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    async def stop(self) -> None:
        """SIGTERM, as a deploy does; SIGKILL if it does not exit in time."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(self.process.wait, 20)
        finally:
            self.kill()


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    (tmp_path / "gates").mkdir()
    return tmp_path


@asynccontextmanager
async def running(
    tmp: Path, *, workers: int = 1, store: str | None = "sqlite:///tasks.db", **env: str
) -> AsyncIterator[App]:
    settings = {"RUNS_LOG": str(tmp / "runs.log"), "GATES_DIR": str(tmp / "gates"), **env}
    settings["RECEIVED_LOG"] = str(tmp / "received.log")
    if store is not None:
        settings["FASTWORKER_STORE"] = store
    else:
        settings["FASTWORKER_STORE"] = ""  # unset: the extension's default applies
    app = App(tmp, settings, workers)
    try:
        await app.ready()
        yield app
    finally:
        app.kill()


def runs(tmp: Path) -> Counter[str]:
    path = tmp / "runs.log"
    if not path.exists():
        return Counter()
    return Counter(line.split()[0] for line in path.read_text().splitlines())


async def status_of(http: httpx.AsyncClient, url: str, task_id: str) -> dict[str, Any]:
    response = await http.get(f"{url}/tasks/{task_id}")
    assert response.status_code == 200, (task_id, response.status_code, response.text)
    body: dict[str, Any] = response.json()
    return body


async def all_final(http: httpx.AsyncClient, url: str, ids: list[str], timeout: float) -> list:
    async def done() -> list[dict[str, Any]] | None:
        states = [await status_of(http, url, task_id) for task_id in ids]
        final = all(s["status"] in ("success", "failure", "cancelled") for s in states)
        return states if final else None

    result: list[dict[str, Any]] = await eventually(done, timeout=timeout, interval=0.1)
    return result


async def test_three_workers_answer_for_each_others_tasks(tmp: Path) -> None:
    """uvicorn --workers 3 on one file: every acknowledged task is found by every worker."""
    async with running(tmp, workers=3) as app, httpx.AsyncClient(timeout=10) as http:
        ids: list[str] = []
        pids: set[int] = set()
        for _ in range(30):
            # A fresh connection per request: the kernel spreads them over the workers.
            async with httpx.AsyncClient(timeout=10) as fresh:
                body = (await fresh.post(f"{app.url}/echo", params={"value": "x"})).json()
            pids.add(body["pid"])
            ids.append(body["id"])
            # Read it back at once, over another connection: never a 404.
            async with httpx.AsyncClient(timeout=10) as other:
                assert (await other.get(f"{app.url}/tasks/{body['id']}")).status_code == 200
        states = await all_final(http, app.url, ids, timeout=30)
        assert {s["status"] for s in states} == {"success"}
        listed = (await http.get(f"{app.url}/tasks", params={"limit": 100})).json()
        assert set(ids) <= {t["id"] for t in listed["tasks"]}
    assert len(pids) >= 2, "the test needs requests served by more than one worker"


async def test_cancel_and_events_reach_across_processes(tmp: Path) -> None:
    async with (
        running(tmp) as a,
        running(tmp) as b,
        httpx.AsyncClient(timeout=10) as http,
    ):
        assert (await http.get(f"{a.url}/pid")).json() != (await http.get(f"{b.url}/pid")).json()
        # A stream on B sees tasks submitted on A, to their end.
        held = (await http.post(f"{a.url}/hold/g1")).json()["id"]
        seen: list[str] = []
        async with http.stream("GET", f"{b.url}/tasks/{held}/events") as stream:
            await eventually(
                lambda: _wait_running(http, b.url, held), timeout=10, message="running"
            )
            (tmp / "gates" / "g1").touch()
            async for line in stream.aiter_lines():
                if line.startswith("data:"):
                    seen.append(line)
        assert '"status":"success"' in seen[-1]
        # Cancelled on B while it runs on A: A stops it within about a second.
        victim = (await http.post(f"{a.url}/hold/never")).json()["id"]
        await eventually(lambda: _wait_running(http, b.url, victim), timeout=10)
        response = await http.delete(f"{b.url}/tasks/{victim}")
        assert response.status_code == 200
        assert response.json()["status"] == "cancelled"
        assert (await status_of(http, a.url, victim))["status"] == "cancelled"
        again = await http.delete(f"{a.url}/tasks/{victim}")
        assert again.status_code == 409


async def _wait_running(http: httpx.AsyncClient, url: str, task_id: str) -> bool:
    return (await status_of(http, url, task_id))["status"] == "running"


async def test_sigkill_then_restart_loses_nothing(tmp: Path) -> None:
    """Queued tasks run after the restart, the running one is retried as interrupted, and
    nothing else runs twice; the restart takes its dead predecessor's work at once (it can
    tell by the pid that it is gone) instead of waiting for the 30 s lease."""
    async with httpx.AsyncClient(timeout=10) as http:
        async with running(tmp, CONCURRENCY="1") as first:
            body = (
                await http.post(f"{first.url}/work", params={"count": 12, "seconds": 0.3})
            ).json()
            tasks = body["tasks"]
            await eventually(lambda: len(runs(tmp)) >= 2, timeout=20, message="some ran")
            first.kill()
        before = runs(tmp)
        async with running(tmp, CONCURRENCY="4") as second:
            ids = [t["id"] for t in tasks]
            states = await all_final(http, second.url, ids, timeout=30)
        assert {s["status"] for s in states} == {"success"}
        counts = runs(tmp)
        assert set(counts) == {t["tag"] for t in tasks}  # every task ran
        twice = [tag for tag, n in counts.items() if n > 1]
        assert len(twice) <= 1  # only the one running at the kill
        assert all(before[tag] == 1 for tag in twice)
        interrupted = [s for s in states if s["attempts"] > 1]
        assert len(interrupted) == len(twice)


async def test_graceful_shutdown_keeps_queued_tasks_for_the_next_start(tmp: Path) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        async with running(tmp, CONCURRENCY="1") as first:
            tasks = (
                await http.post(f"{first.url}/work", params={"count": 6, "seconds": 0.2})
            ).json()["tasks"]
            await eventually(lambda: len(runs(tmp)) >= 1, timeout=20)
            await first.stop()
            # uvicorn re-raises SIGTERM once its graceful shutdown is done.
            assert first.process.returncode in (0, -signal.SIGTERM)
        ran_before = runs(tmp)
        assert len(ran_before) < 6
        async with running(tmp) as second:
            states = await all_final(http, second.url, [t["id"] for t in tasks], timeout=30)
        assert {s["status"] for s in states} == {"success"}
        assert all(n == 1 for n in runs(tmp).values())  # graceful: nothing ran twice


async def test_the_default_store_keeps_results_across_a_restart(tmp: Path) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        async with running(tmp, store=None) as first:
            task_id = (await http.post(f"{first.url}/echo", params={"value": "kept"})).json()["id"]
            await all_final(http, first.url, [task_id], timeout=10)
            await first.stop()
        assert (tmp / "fastworker.db").exists()  # sqlite:///fastworker.db in the cwd
        async with running(tmp, store=None) as second:
            body = await status_of(http, second.url, task_id)
        assert (body["status"], body["result"]) == ("success", "kept")


async def test_the_memory_store_keeps_nothing(tmp: Path) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        async with running(tmp, store="memory") as first:
            task_id = (await http.post(f"{first.url}/echo", params={"value": "x"})).json()["id"]
            await all_final(http, first.url, [task_id], timeout=10)
            await first.stop()
        async with running(tmp, store="memory") as second:
            assert (await http.get(f"{second.url}/tasks/{task_id}")).status_code == 404
        assert not (tmp / "fastworker.db").exists()


async def test_a_callback_outstanding_at_a_crash_is_delivered_after_the_restart(
    tmp: Path,
) -> None:
    refuse = tmp / "gates" / "refuse-callbacks"
    refuse.touch()
    received = tmp / "received.log"
    async with httpx.AsyncClient(timeout=10) as http:
        async with running(tmp) as first:
            task_id = (
                await http.post(f"{first.url}/hold/cb", params={"callback": "/hooks/done"})
            ).json()["id"]
            (tmp / "gates" / "cb").touch()

            async def retrying() -> bool:
                callback = (await status_of(http, first.url, task_id))["callback"]
                return callback["state"] == "retrying"

            await eventually(retrying, timeout=20, message="first delivery refused")
            first.kill()
        refuse.unlink()
        async with running(tmp) as second:
            await eventually(received.exists, timeout=30, message="callback delivered")
            body = await status_of(http, second.url, task_id)
        assert received.read_text().split() == [task_id, "success"]
        assert body["callback"]["state"] == "delivered"
        assert body["callback"]["attempts"] >= 2
