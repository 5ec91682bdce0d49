"""Shared test helpers: apps run through their real lifespan, driven over ASGI."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.types import ASGIApp

from fastworker_fastapi._control_plane import ControlPlaneProcess
from tests._postgres import PostgresServer

TESTS_DIR = Path(__file__).parent
# The example app's users table: in a folder of its own, not in the checkout.
os.environ.setdefault("EXAMPLE_USERS_DB", str(Path(tempfile.mkdtemp()) / "users.db"))


@pytest.fixture(autouse=True)
def _memory_store_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests keep tasks in memory; tests about a store say which one they use."""
    monkeypatch.setenv("FASTWORKER_STORE", "memory")


@asynccontextmanager
async def serve(app: ASGIApp, *, shutdown_timeout: float = 30) -> AsyncIterator[httpx.AsyncClient]:
    """Run `app`'s lifespan and give an HTTP client talking to it in-process."""
    async with LifespanManager(app, shutdown_timeout=shutdown_timeout) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            yield http


async def eventually(
    check: Callable[[], Any] | Callable[[], Awaitable[Any]],
    *,
    timeout: float = 10.0,
    interval: float = 0.005,
    message: str = "condition not met",
) -> Any:
    """Poll `check` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} within {timeout}s (last value: {value!r})")
        await anyio.sleep(interval)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for a listener the test starts itself)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def group_is_gone(pgid: int) -> bool:
    """True once no process of the process group `pgid` is left."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


async def stop_for_sure(process: ControlPlaneProcess) -> None:
    """`stop()`, and should it fail or hang, SIGKILL the group anyway: no test leaks a process."""
    try:
        await asyncio.wait_for(process.stop(grace=0.5), 10.0)
    finally:
        if process.pid is not None and process.returncode is None:  # never reaped: pgid is ours
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
async def control_plane() -> AsyncIterator[ControlPlaneProcess]:
    """A real `fastworker control-plane` loading tests/_fw_tasks.py, always stopped."""
    process = ControlPlaneProcess(["_fw_tasks"], python_path=[TESTS_DIR])
    try:
        await process.start(ready_timeout=30.0)
        yield process
    finally:
        await stop_for_sure(process)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the whole run (tests take a schema each);
    skipped with the reason when PostgreSQL is not installed. Always stopped."""
    try:
        server = PostgresServer()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    try:
        server.start()
        yield server
    finally:
        server.cleanup()
