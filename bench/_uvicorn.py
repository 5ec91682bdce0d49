"""Real servers for the HTTP benchmarks: uvicorn on a free loopback port, pinned to a core,
ready when `GET /ping` answers, always stopped (its whole process group)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pin(core: int) -> list[str]:
    """The command prefix that runs a process on one core (nothing where that cannot be)."""
    cores = os.cpu_count() or 1
    return ["taskset", "-c", str(core % cores)] if shutil.which("taskset") and cores > 1 else []


def stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    """SIGTERM the process group, SIGKILL it if it has not gone within 15 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def uvicorn(app: str, env: Mapping[str, str]) -> Iterator[int]:
    """Serve `app` (`module:attribute`) on core 0 with `env` added; yields its port."""
    port = free_port()
    proc = subprocess.Popen(
        [*pin(0), sys.executable, "-m", "uvicorn", app, "--port", str(port),
         "--log-level", "warning", "--no-access-log"],
        cwd=ROOT, env={**os.environ, **env}, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"uvicorn ({app}) did not start") from None
                time.sleep(0.05)
        yield port
    finally:
        stop(proc)
