"""Two app processes ("hosts") sharing only a PostgreSQL database, in real uvicorn servers.

Every process a test starts is killed in a finalizer (its whole process group).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests._postgres import PostgresServer
from tests.conftest import eventually, free_port

ROOT = Path(__file__).resolve().parents[1]
FINAL = {"success", "failure", "cancelled"}


@dataclass
class Host:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


class Cluster:
    """Starts app processes on one schema; kills them all at the end."""

    def __init__(self, server: PostgresServer, folder: Path, lease: float) -> None:
        self.server, self.folder, self.lease = server, folder, lease
        self.schema = server.schema()
        self.hosts: list[Host] = []

    async def start(self, concurrency: int = 4) -> Host:
        port = free_port()
        env = {
            **os.environ,
            "FW_PG_URL": self.server.url,
            "FW_PG_SCHEMA": self.schema,
            "FW_PG_LEASE": str(self.lease),
            "FW_PG_DIR": str(self.folder),
            "FW_PG_CONCURRENCY": str(concurrency),
        }
        log = self.folder / f"host-{port}.log"
        process = _spawn(port, env, log)
        host = Host(process, f"http://127.0.0.1:{port}", log)
        self.hosts.append(host)

        async def up() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"the app exited: {log.read_text()[-3000:]}")
            try:
                async with httpx.AsyncClient() as http:
                    return (await http.get(f"{host.url}/pid")).status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(up, timeout=30, interval=0.05, message="the app started")
        return host

    def kill_all(self) -> None:
        for host in self.hosts:
            host.kill()

    def runs(self) -> list[str]:
        path = self.folder / "runs.log"
        return path.read_text().split("\n")[:-1] if path.exists() else []


def _spawn(port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`uvicorn tests._pg_app:app` on `port`, in its own process group, output to `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "tests._pg_app:app", "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "warning"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


@pytest.fixture
def cluster(postgres: PostgresServer, tmp_path: Path) -> Iterator[Cluster]:
    os.chmod(tmp_path, 0o755)
    group = Cluster(postgres, tmp_path, lease=2.0)
    try:
        yield group
    finally:
        group.kill_all()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


async def status_of(http: httpx.AsyncClient, host: Host, task_id: str) -> dict[str, Any]:
    response = await http.get(f"{host.url}/tasks/{task_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def final_on(http: httpx.AsyncClient, host: Host, task_id: str, timeout: float = 30) -> Any:
    async def check() -> dict[str, Any] | None:
        info = await status_of(http, host, task_id)
        return info if info["status"] in FINAL else None

    return await eventually(check, timeout=timeout, interval=0.05, message=f"{task_id} final")


async def test_a_task_is_read_listed_streamed_and_cancelled_on_the_other_host(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    a, b = await cluster.start(), await cluster.start()
    added = (await http.post(f"{a.url}/add", params={"a": 2, "b": 3})).json()["task_id"]
    assert (await final_on(http, b, added))["result"] == 5

    held = (await http.post(f"{a.url}/hold", params={"tag": "x", "gate": "never"})).json()
    task_id = held["task_id"]
    listed = (await http.get(f"{b.url}/tasks", params={"limit": 50})).json()
    assert {added, task_id} <= {t["id"] for t in listed["tasks"]}
    await eventually(
        lambda: _is(http, b, task_id, "running"), timeout=10, message="B saw it running"
    )

    seen: list[str] = []

    async def stream() -> None:
        async with http.stream("GET", f"{b.url}/tasks/{task_id}/events") as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    seen.append(json.loads(line[5:])["status"])

    async with anyio.create_task_group() as group:
        group.start_soon(stream)
        await eventually(lambda: "running" in seen, message="the stream on B began")
        response = await http.delete(f"{b.url}/tasks/{task_id}")
        assert response.status_code in (200, 202), response.text
        with anyio.fail_after(15):
            await eventually(lambda: "cancelled" in seen, timeout=15, message="cancel streamed")
        group.cancel_scope.cancel()
    assert (await status_of(http, a, task_id))["status"] == "cancelled"


async def _is(http: httpx.AsyncClient, host: Host, task_id: str, status: str) -> bool:
    return (await status_of(http, host, task_id))["status"] == status


async def test_a_killed_host_s_queued_and_running_work_finishes_on_the_other(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    a = await cluster.start(concurrency=2)
    gate = f"gate-{uuid.uuid4().hex}"
    tags = [f"t{i}" for i in range(6)]
    ids = {}
    for tag in tags:
        response = await http.post(f"{a.url}/hold", params={"tag": tag, "gate": gate})
        ids[tag] = response.json()["task_id"]
    await eventually(
        lambda: len([r for r in cluster.runs() if r.startswith("start")]) == 2,
        message="two tasks running on A",
    )
    b = await cluster.start(concurrency=8)
    a.kill()  # SIGKILL: two running, four queued
    (cluster.folder / gate).touch()
    for tag, task_id in ids.items():
        info = await final_on(http, b, task_id, timeout=60)
        assert info["status"] == "success" and info["result"] == tag, info
    runs = cluster.runs()
    done = [r.split()[1] for r in runs if r.startswith("done")]
    assert sorted(done) == sorted(tags)  # each finished once, all on B
    b_pid = (await http.get(f"{b.url}/pid")).json()["pid"]
    assert all(r.split()[2] == str(b_pid) for r in runs if r.startswith("done"))


async def test_a_database_restart_loses_nothing_acknowledged(
    cluster: Cluster, postgres: PostgresServer, http: httpx.AsyncClient
) -> None:
    a, b = await cluster.start(), await cluster.start()
    gate = f"gate-{uuid.uuid4().hex}"
    held = [
        (await http.post(f"{a.url}/hold", params={"tag": f"h{i}", "gate": gate})).json()["task_id"]
        for i in range(3)
    ]
    acknowledged: list[str] = []
    statuses: set[int] = set()
    restarted = anyio.Event()

    async def submit() -> None:
        n = 0
        while not restarted.is_set() or n < 20:
            host = (a, b)[n % 2]
            n += 1
            try:
                response = await http.post(f"{host.url}/add", params={"a": n, "b": 1})
            except httpx.HTTPError:
                continue
            statuses.add(response.status_code)
            if response.status_code == 200:
                acknowledged.append(response.json()["task_id"])
            else:
                await anyio.sleep(0.01)

    async with anyio.create_task_group() as group:
        group.start_soon(submit)
        await eventually(lambda: len(acknowledged) >= 5, message="submissions before")
        await anyio.to_thread.run_sync(postgres.restart)
        restarted.set()
    assert statuses <= {200, 503}, statuses
    (cluster.folder / gate).touch()
    for task_id in [*held, *acknowledged]:
        info = await final_on(http, b, task_id, timeout=60)
        assert info["status"] == "success", info
    assert a.process.poll() is None and b.process.poll() is None
