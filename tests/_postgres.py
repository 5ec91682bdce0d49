"""A throwaway PostgreSQL server for the tests (and the benchmarks), started and stopped here.

`initdb` and `pg_ctl` come from the machine's PostgreSQL (Debian keeps them in
/usr/lib/postgresql/<version>/bin). PostgreSQL refuses to run as root, so when the tests run
as root the server runs as the `postgres` system user (which Debian's package creates), or
as a `fwtest` system user made for it. The data directory and the unix socket live in a
fresh folder under the system temp dir, the server listens on a free loopback port with
trust authentication, and `stop()` (`pg_ctl stop -m immediate`) always runs.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["PostgresServer", "find_bin", "postgres_server"]


def find_bin(name: str) -> str | None:
    """The newest PostgreSQL's `name` binary: Debian's versioned folders, then PATH."""
    found = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return found[-1] if found else shutil.which(name)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_user() -> str | None:
    """Who runs the server: None for this user, else a non-root system user."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "fwtest"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "fwtest"],
        check=True,
        capture_output=True,
    )
    return "fwtest"


class PostgresServer:
    """One PostgreSQL server in a temp folder; `url` reaches its `postgres` database."""

    def __init__(self, settings: dict[str, str] | None = None) -> None:
        initdb, pg_ctl = find_bin("initdb"), find_bin("pg_ctl")
        if initdb is None or pg_ctl is None:
            raise FileNotFoundError(
                "PostgreSQL is not installed (no initdb/pg_ctl on PATH or in"
                " /usr/lib/postgresql/*/bin): apt-get install postgresql"
            )
        self.initdb, self.pg_ctl = initdb, pg_ctl
        self.settings = {"fsync": "off", "max_connections": "200", **(settings or {})}
        self.user = _server_user()
        self.folder = Path(tempfile.mkdtemp(prefix="fw-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self.port = _free_port()
        self.url = f"postgresql://fw@127.0.0.1:{self.port}/postgres"
        self.started = False

    def _run(self, *args: str, timeout: float = 120) -> None:
        command = list(args)
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(args[:2])} failed ({result.returncode}):"
                f" {result.stdout}{result.stderr}\n{log[-2000:]}"
            )

    def start(self) -> None:
        if self.user is not None:
            shutil.chown(self.folder, self.user)
        if not self.data.exists():
            self._run(
                self.initdb,
                "-D",
                str(self.data),
                "-U",
                "fw",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            )
        self._pg_ctl("start")
        reaper = getattr(self, "_reaper", None)
        if reaper is None or reaper.poll() is not None:  # one reaper, however many starts
            self._start_reaper()

    def _start_reaper(self) -> None:
        """A watcher that stops the server when this process dies in any way (a SIGKILL of
        pytest skips every finalizer): it waits for its stdin to close."""
        stop = [self.pg_ctl, "stop", "-D", str(self.data), "-m", "immediate"]
        if self.user is not None:
            stop = ["runuser", "-u", self.user, "--", *stop]
        script = (
            "import subprocess, sys\n"
            "sys.stdin.buffer.read()\n"
            f"subprocess.run({stop!r}, capture_output=True)\n"
        )
        self._reaper = subprocess.Popen(
            [sys.executable, "-c", script], stdin=subprocess.PIPE, start_new_session=True
        )

    def _pg_ctl(self, action: str, *extra: str) -> None:
        options = " ".join(
            [
                f"-p {self.port}",
                f"-k {self.folder}",
                "-c listen_addresses=127.0.0.1",
                *(f"-c {k}={v}" for k, v in self.settings.items()),
            ]
        )
        self._run(
            self.pg_ctl, action, "-D", str(self.data), "-l", str(self.log), "-o", options,
            "-w", "-t", "60", *extra,
        )  # fmt: skip
        self.started = action != "stop"

    def restart(self) -> None:
        """A fast restart (`pg_ctl restart -m fast`): every connection is cut."""
        self._pg_ctl("restart", "-m", "fast")

    def stop(self) -> None:
        if self.started:
            with contextlib.suppress(Exception):
                self._run(self.pg_ctl, "stop", "-D", str(self.data), "-m", "immediate", "-w")
            self.started = False

    def cleanup(self) -> None:
        self.stop()
        reaper = getattr(self, "_reaper", None)
        if reaper is not None:
            assert reaper.stdin is not None
            reaper.stdin.close()  # the server is stopped already: it exits at once
            reaper.wait(30)
        shutil.rmtree(self.folder, ignore_errors=True)

    def schema(self) -> str:
        """A fresh schema name: each test gets its own tables on the shared server."""
        return f"t_{uuid.uuid4().hex[:16]}"


@contextlib.contextmanager
def postgres_server(settings: dict[str, str] | None = None) -> Iterator[PostgresServer]:
    """A started server, always stopped and removed afterwards."""
    server = PostgresServer(settings)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()
