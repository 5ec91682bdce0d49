"""Spawning and talking to real FastWorker 0.3.0 control planes, with their defects in mind.

A control plane listens on five consecutive ports from its base port B (Req0 -> Rep0, JSON):

```
B + 0 .. B + 3   critical / high / normal / low task ports: one Rep0 socket each, no contexts,
                 so a reply goes to whichever request arrived last (replies get misrouted)
B + 4            result port: `{"task_id"}` queries and `{"action": "cancel"}`, one at a time
```

plus a discovery port (Bus0) and a subworker registration port. The only combination measured
to be exactly-once and complete (see `fastworker-0.3.0-notes.md`) is used here: tasks travel in
`batch_submit` requests where *any* reply is the acknowledgement and nothing is ever resent,
requests to one port are serialised, and every call has an outer deadline. Completion is learned
from the task's Pair0 callback (see `_nng.Pair0Listener`), never from these replies.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import pynng
from fastworker.tasks.models import Task
from pydantic import ValidationError

from fastworker_fastapi import _plane_main
from fastworker_fastapi._nng import format_tcp_address, parse_tcp_address

__all__ = [
    "PRIORITIES",
    "ControlPlaneConnection",
    "ControlPlaneError",
    "ControlPlanePorts",
    "ControlPlaneProcess",
    "ControlPlaneProtocolError",
    "ControlPlaneStartError",
    "ControlPlaneTimeoutError",
    "find_control_plane_ports",
    "find_fastworker_executable",
    "make_task_dict",
]

PRIORITIES: Final[Mapping[str, int]] = {"critical": 0, "high": 1, "normal": 2, "low": 3}
"""Task priority name -> offset of its port from the base port."""

_RESULT_PORT_OFFSET: Final = 4
_PORT_SPAN: Final = 5
_PROBE_TASK_ID: Final = "__fastworker_fastapi_probe__"
_PLANE_MAIN: Final = Path(__file__).with_name("_plane_main.py")
_FORWARDED: Final = {
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
}

plane_logger = logging.getLogger("fastworker_fastapi.plane")
"""Where the warnings and errors of spawned control planes go."""


class ControlPlaneError(ConnectionError):
    """A control plane did not answer as expected; treat it as suspect."""


class ControlPlaneTimeoutError(ControlPlaneError, TimeoutError):
    """No reply within the deadline.

    ``request_sent`` is False only when the request certainly never left this process (the
    deadline passed while waiting for the port's lock or for a connection): only then is it safe
    to hand the same tasks to another control plane.
    """

    def __init__(self, message: str, *, request_sent: bool) -> None:
        super().__init__(message)
        self.request_sent = request_sent


class ControlPlaneProtocolError(ControlPlaneError):
    """The control plane replied with something that is not the expected JSON shape."""


class ControlPlaneStartError(RuntimeError):
    """A spawned control plane exited or never answered; the message ends with its log tail."""


# --- ports and executables ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ControlPlanePorts:
    """The ports one control plane binds: ``base`` .. ``base + 4``, discovery and subworker."""

    base: int
    discovery: int
    subworker: int

    def all_ports(self) -> list[int]:
        """Every port the control plane binds."""
        return [*range(self.base, self.base + _PORT_SPAN), self.discovery, self.subworker]


def _bind(host: str, port: int) -> socket.socket | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        return None
    return sock


def find_control_plane_ports(host: str = "127.0.0.1", *, attempts: int = 100) -> ControlPlanePorts:
    """Pick free ports for one control plane: five consecutive ones, a discovery and a subworker.

    Every candidate is bind-tested while the others are still held, so the seven ports are
    distinct and free at the moment of return (another process may still take one before the
    control plane binds; `ControlPlaneProcess.start` then fails with a clear error).
    """
    for _ in range(attempts):
        held: list[socket.socket] = []
        try:
            first = _bind(host, 0)
            if first is None:
                raise OSError(f"cannot bind any port on {host}")
            held.append(first)
            base = int(first.getsockname()[1])
            if base + _PORT_SPAN > 65536:
                continue
            rest = [_bind(host, base + offset) for offset in range(1, _PORT_SPAN)]
            held.extend(s for s in rest if s is not None)
            if any(s is None for s in rest):
                continue
            extra: list[int] = []
            for _ in range(2):
                sock = _bind(host, 0)
                if sock is None:
                    raise OSError(f"cannot bind any port on {host}")
                held.append(sock)
                extra.append(int(sock.getsockname()[1]))
            if any(base <= port < base + _PORT_SPAN for port in extra):
                continue
            return ControlPlanePorts(base=base, discovery=extra[0], subworker=extra[1])
        finally:
            for sock in held:
                sock.close()
    raise OSError(f"found no {_PORT_SPAN} consecutive free ports on {host} in {attempts} tries")


def find_fastworker_executable() -> str:
    """The ``fastworker`` CLI of this interpreter's environment, else the one on PATH."""
    beside = Path(sys.executable).parent / "fastworker"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("fastworker")
    if found is None:
        raise FileNotFoundError(
            "the `fastworker` command was not found next to "
            f"{sys.executable} nor on PATH; install it with `pip install fastworker`"
        )
    return found


# --- task dicts ------------------------------------------------------------------------------


def make_task_dict(
    name: str,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    task_id: str,
    priority: str = "normal",
    callback_address: str | None = None,
    callback_data: Mapping[str, Any] | None = None,
    timeout: float | None = None,
    eta: datetime | None = None,
) -> dict[str, Any]:
    """One task in the JSON form the control plane parses (``Task.model_dump(mode="json")``).

    Datetimes go out as ISO strings with ``T`` (pydantic parses them as well as the
    ``str(datetime)`` form upstream sends). ``eta`` is sent as naive local time because the
    control plane compares it with a naive ``datetime.now()``; an aware ``eta`` would raise
    inside the control plane and the task would vanish without a callback.
    """
    if priority not in PRIORITIES:
        raise ValueError(f"unknown priority {priority!r}; expected one of {sorted(PRIORITIES)}")
    if eta is not None and eta.tzinfo is not None:
        eta = eta.astimezone().replace(tzinfo=None)
    callback = (
        None
        if callback_address is None
        else {"address": callback_address, "data": dict(callback_data or {})}
    )
    task = Task(
        id=task_id,
        name=name,
        args=tuple(args),
        kwargs=dict(kwargs or {}),
        priority=priority,
        created_at=datetime.now(),
        callback=callback,
        timeout=timeout,
        eta=eta,
    )
    result: dict[str, Any] = task.model_dump(mode="json")
    return result


def _check_task_dict(task: Mapping[str, Any]) -> None:
    # The control plane answers an invalid task with no reply at all (and the tasks before it in
    # the batch already run), so every task is validated here before anything is sent.
    try:
        Task.model_validate(task)
    except ValidationError as exc:
        raise ValueError(f"invalid FastWorker task {task.get('id')!r}: {exc}") from exc


# --- the app-side client ---------------------------------------------------------------------


class ControlPlaneConnection:
    """App-side client of one control plane: one persistent Req0 socket per port.

    Requests to one port are serialised (the control plane's Rep0 sockets have no contexts), and
    each request uses a fresh nng context, so a reply that arrives after its deadline is dropped
    instead of answering the next request. Resends are disabled: a task is never submitted twice.
    """

    def __init__(self, base_address: str) -> None:
        host, port = parse_tcp_address(base_address)
        if port + _PORT_SPAN > 65536:
            raise ValueError(f"base port of {base_address!r} leaves no room for its 5 ports")
        self._host = host
        self._base_port = port
        self._base_address = base_address
        self._sockets: dict[int, Any] = {}
        self._locks = {offset: asyncio.Lock() for offset in range(_PORT_SPAN)}
        self._closed = False

    @property
    def base_address(self) -> str:
        """The control plane's base address, as given."""
        return self._base_address

    def _address(self, offset: int) -> str:
        return format_tcp_address(self._host, self._base_port + offset)

    def _socket(self, offset: int) -> Any:
        sock = self._sockets.get(offset)
        if sock is None:
            sock = pynng.Req0(resend_time=-1)  # -1: never resend a request
            try:
                # Non-blocking: nng keeps redialing in the background until the port listens.
                sock.dial(self._address(offset), block=False)
            except pynng.NNGException:
                sock.close()
                raise
            self._sockets[offset] = sock
        return sock

    async def _request(
        self,
        offset: int,
        payload: Mapping[str, Any],
        *,
        timeout: float,
        reply_timeout: float | None = None,
    ) -> Any:
        """One request/reply on one port; returns the decoded JSON.

        The request must be sent within ``timeout`` seconds and the reply must arrive within
        ``reply_timeout`` (default: the same ``timeout``), both counted from now.
        """
        if self._closed:
            raise ControlPlaneError(f"connection to {self._base_address} is closed")
        try:
            data = json.dumps(payload).encode()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"request is not JSON-serialisable: {exc}") from exc
        address = self._address(offset)
        now = asyncio.get_running_loop().time()
        deadline = now + timeout
        reply_deadline = now + (timeout if reply_timeout is None else reply_timeout)
        sent = False
        try:
            async with asyncio.timeout_at(deadline):
                await self._locks[offset].acquire()
            try:
                ctx = self._socket(offset).new_context()
                try:
                    await _until(deadline, ctx.asend(data))
                    sent = True
                    reply = await _until(reply_deadline, ctx.arecv())
                finally:
                    with contextlib.suppress(pynng.NNGException):
                        ctx.close()
            finally:
                self._locks[offset].release()
        except TimeoutError as exc:
            connected = offset in self._sockets and bool(self._sockets[offset].pipes)
            why = "no reply" if connected else "no connection (is the control plane running?)"
            waited = reply_deadline - now if sent else timeout
            raise ControlPlaneTimeoutError(
                f"{why} from {address} within {waited:g}s", request_sent=sent
            ) from exc
        except pynng.NNGException as exc:
            raise ControlPlaneError(f"request to {address} failed: {exc}") from exc
        try:
            return json.loads(reply)
        except (UnicodeDecodeError, ValueError) as exc:
            raise ControlPlaneProtocolError(
                f"{address} sent a reply that is not JSON: {reply[:200]!r}"
            ) from exc

    async def submit_batch(
        self,
        tasks: Sequence[Mapping[str, Any]],
        *,
        priority: str,
        timeout: float,
    ) -> None:
        """Send tasks as one ``batch_submit`` to the priority's port; any reply acknowledges it.

        The reply may be another request's ack or some task's result (the control plane
        misroutes replies), but every batch received gets exactly one reply, so any reply means
        "received". Never resubmit after a timeout: the tasks may be running.
        """
        offset = PRIORITIES.get(priority)
        if offset is None:
            raise ValueError(f"unknown priority {priority!r}; expected one of {sorted(PRIORITIES)}")
        if not tasks:
            raise ValueError("a batch needs at least one task")
        for task in tasks:
            _check_task_dict(task)
        await self._request(
            offset, {"action": "batch_submit", "tasks": list(tasks)}, timeout=timeout
        )

    async def submit_task(
        self,
        task: Mapping[str, Any],
        *,
        port: int,
        timeout: float,
        reply_timeout: float,
    ) -> dict[str, Any]:
        """Send one task on task port ``port`` (0-3) and return the ``TaskResult`` dict it gets.

        Correct only while this is the *one* request in flight on that port of that control
        plane, from any process: the plane answers whichever request it received last. So use
        it only on a plane nobody else submits to (one this process spawned), one request per
        port at a time, and check the reply's ``task_id``. The reply comes when the task has
        finished; ``reply_timeout`` bounds that wait. Not resent on a timeout.
        """
        if port not in PRIORITIES.values():
            raise ValueError(f"task ports are 0-3 from the base port, not {port!r}")
        _check_task_dict(task)
        reply = await self._request(port, task, timeout=timeout, reply_timeout=reply_timeout)
        if not isinstance(reply, dict) or not isinstance(reply.get("task_id"), str):
            raise ControlPlaneProtocolError(f"unexpected task reply: {reply!r:.200}")
        return reply

    async def get_result(
        self,
        task_id: str,
        *,
        timeout: float,
    ) -> dict[str, Any] | None:
        """The stored ``TaskResult`` dict, or None when the control plane does not know the id.

        Stored results of batch tasks are unreliable upstream (overwritten with
        ``FAILURE "Incorrect state"``); use callbacks for outcomes.
        """
        reply = await self._request(_RESULT_PORT_OFFSET, {"task_id": task_id}, timeout=timeout)
        if isinstance(reply, dict) and reply.get("found") is False:
            return None
        if isinstance(reply, dict) and reply.get("found") is True:
            result = reply.get("result")
            if isinstance(result, dict) and result.get("task_id") == task_id:
                return result
        raise ControlPlaneProtocolError(f"unexpected result reply for {task_id!r}: {reply!r}")

    async def cancel(self, task_id: str, *, timeout: float) -> bool:
        """Ask the control plane to cancel a task; True if it says it did.

        A cancelled task gets no callback from the control plane: the caller settles it.
        """
        reply = await self._request(
            _RESULT_PORT_OFFSET, {"action": "cancel", "task_id": task_id}, timeout=timeout
        )
        if (
            isinstance(reply, dict)
            and reply.get("task_id") == task_id
            and isinstance(reply.get("cancelled"), bool)
        ):
            return bool(reply["cancelled"])
        raise ControlPlaneProtocolError(f"unexpected cancel reply for {task_id!r}: {reply!r}")

    async def ping(self, *, timeout: float) -> bool:
        """True if the result port answers a probe query correctly within ``timeout``."""
        try:
            return await self.get_result(_PROBE_TASK_ID, timeout=timeout) is None
        except ControlPlaneError:
            return False

    async def aclose(self) -> None:
        """Close every socket; requests still waiting fail with `ControlPlaneError`."""
        self._closed = True
        sockets, self._sockets = self._sockets, {}
        for sock in sockets.values():
            sock.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


async def _until[T](deadline: float, awaitable: Awaitable[T]) -> T:
    # One deadline per step: pynng can swallow a cancellation that races with completion, and a
    # single `timeout` block around several steps would then let the next step run unbounded.
    async with asyncio.timeout_at(deadline):
        return await awaitable


# --- the child process -----------------------------------------------------------------------


class ControlPlaneProcess:
    """A ``fastworker control-plane`` child process on free loopback ports.

    Its output goes to a bounded in-memory tail (never an unread pipe). It runs in its own
    process group, and `stop` sends SIGTERM and then SIGKILL to the whole group: the 0.3.0 CLI
    never exits on SIGTERM.
    """

    def __init__(
        self,
        task_modules: Sequence[str],
        *,
        python_path: Sequence[str | os.PathLike[str]] = (),
        host: str = "127.0.0.1",
        ports: ControlPlanePorts | None = None,
        concurrency: int | None = None,
        executable: str | None = None,
        env: Mapping[str, str] | None = None,
        log_lines: int = 200,
        quiet: bool = True,
    ) -> None:
        if not task_modules:
            raise ValueError("a control plane needs at least one task module")
        self._task_modules = list(task_modules)
        self._python_path = [os.fspath(p) for p in python_path]
        self._host = host
        self._ports = ports
        self._concurrency = concurrency
        self._executable = executable
        self._env = dict(env) if env is not None else None
        self._quiet = quiet
        self._forward_level = 0  # the level of the plane's last log record, for its tracebacks
        self._last_line = ""
        self._stopping = False  # after SIGTERM the 0.3.0 plane spins logging "Object closed"
        self._log: collections.deque[str] = collections.deque(maxlen=log_lines)
        self._log_changed = asyncio.Event()
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._watch_write: int | None = None  # the app's end of the parent-death pipe

    @property
    def ports(self) -> ControlPlanePorts:
        """The ports in use (picked at `start` unless given)."""
        if self._ports is None:
            raise RuntimeError("ports are picked by start(); the control plane is not started")
        return self._ports

    @property
    def base_address(self) -> str:
        """``tcp://host:B``, the address a `ControlPlaneConnection` needs."""
        return format_tcp_address(self._host, self.ports.base)

    @property
    def pid(self) -> int | None:
        """The child's pid (also its process group id), once spawned."""
        return None if self._proc is None else self._proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once reaped (negative: killed by that signal)."""
        return None if self._proc is None else self._proc.returncode

    async def wait(self) -> int:
        """Until the child exits (for whatever reason); its exit status."""
        if self._proc is None:
            raise RuntimeError("the control plane is not started")
        return await self._proc.wait()

    def log_tail(self) -> str:
        """The last lines the control plane printed."""
        return "\n".join(self._log)

    def _command(self) -> list[str]:
        ports = self.ports
        if self._executable is not None:
            launcher = [self._executable, *(["--log-level", "WARNING"] if self._quiet else [])]
        else:  # our launcher: dies with the app (see `_plane_main`)
            launcher = [sys.executable, str(_PLANE_MAIN), *([] if self._quiet else ["--verbose"])]
        command = [
            *launcher,
            "control-plane",
            "--task-modules",
            *self._task_modules,
            "--base-address",
            format_tcp_address(self._host, ports.base),
            "--discovery-address",
            format_tcp_address(self._host, ports.discovery),
            "--subworker-port",
            str(ports.subworker),
            "--no-gui",
        ]
        if self._concurrency is not None:
            command += ["--concurrency", str(self._concurrency)]
        return command

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ if self._env is None else self._env)
        paths = [*self._python_path]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        if paths:
            env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"  # so "Failed to import ..." is seen before readiness
        env["FASTWORKER_GUI_ENABLED"] = "false"
        return env

    async def start(self, *, ready_timeout: float = 30.0) -> None:
        """Spawn and wait until the result port answers; on any failure kill it and raise."""
        if self._proc is not None:
            raise RuntimeError("this ControlPlaneProcess was already started")
        if self._ports is None:
            self._ports = find_control_plane_ports(self._host)
        # The child watches the read end; only this process holds the write end (not
        # inheritable), so the child sees end of file exactly when this process is gone.
        watch_read, self._watch_write = os.pipe()
        env = self._child_env()
        env[_plane_main.PARENT_FD_ENV] = str(watch_read)
        env[_plane_main.PARENT_PID_ENV] = str(os.getpid())
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self._command(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,
                pass_fds=(watch_read,),
            )
        except BaseException:
            self._close_watch()
            raise
        finally:
            os.close(watch_read)
        self._reader = asyncio.create_task(self._read_output(self._proc))
        try:
            await self._wait_ready(ready_timeout)
        except BaseException as exc:
            await self.stop(grace=0)
            if isinstance(exc, ControlPlaneStartError):
                raise ControlPlaneStartError(
                    f"{exc}\n--- log tail ---\n{self.log_tail()}"
                ) from None
            raise

    async def _wait_ready(self, ready_timeout: float) -> None:
        assert self._proc is not None
        proc = self._proc
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ready_timeout
        where = self.base_address
        async with ControlPlaneConnection(self.base_address) as connection:
            while True:
                if proc.returncode is not None:
                    raise ControlPlaneStartError(
                        f"control plane at {where} exited with status {proc.returncode} "
                        "before it answered (port taken? bad arguments?)"
                    )
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise ControlPlaneStartError(
                        f"control plane at {where} did not answer within {ready_timeout}s"
                    )
                if await connection.ping(timeout=min(0.5, remaining)):
                    break
                # A probe can fail fast (not only time out): wait on the process, not a sleep.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), timeout=min(0.1, remaining))
        # Module imports are printed before any port is bound; a failed one does not stop it.
        remaining = max(0.0, deadline - loop.time())
        async with asyncio.timeout(max(remaining, 1.0)):
            for module in self._task_modules:
                line = await self._wait_for_line(
                    (f"Loaded tasks from {module}", f"Failed to import {module}:")
                )
                if line.startswith("Failed"):
                    raise ControlPlaneStartError(
                        f"control plane at {where} could not import task module {module!r} "
                        f"({line}); check the module name and the python_path"
                    )

    async def _wait_for_line(self, prefixes: tuple[str, ...]) -> str:
        while True:
            for line in self._log:
                if line.startswith(prefixes):
                    return line
            if self._reader is None or self._reader.done():
                raise ControlPlaneStartError("control plane output ended unexpectedly")
            self._log_changed.clear()
            await self._log_changed.wait()

    async def _read_output(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        try:
            while line := await proc.stdout.readline():
                text = line.decode(errors="replace").rstrip()
                self._log.append(text)
                self._log_changed.set()
                self._forward(text)
        finally:
            self._log_changed.set()

    def _forward(self, line: str) -> None:
        # A quiet plane prints only warnings and errors (rate-limited at the source, see
        # `_plane_main`) as `LEVEL name: message`, a traceback's lines after its record, and a
        # few plain lines at start (`Loaded tasks from ...`), which stay in the tail only.
        first, _, _ = line.partition(" ")
        last_of_record = False
        if first in _FORWARDED:
            self._forward_level = _FORWARDED[first]
        elif line.startswith((" ", "Traceback", "During handling", "The above exception")):
            pass  # inside the traceback of the last record
        elif self._forward_level and self._last_line.startswith(" "):
            last_of_record = True  # the exception line that ends a traceback
        else:
            self._forward_level = 0
        self._last_line = line
        if self._forward_level and not self._stopping:
            plane_logger.log(self._forward_level, "control plane %s: %s", self._where(), line)
            if last_of_record:
                self._forward_level = 0

    def _where(self) -> str:
        return "?" if self._ports is None else self.base_address

    async def stop(self, *, grace: float = 3.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds, reap it. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        self._stopping = True
        if proc.returncode is None:
            _signal_group(proc.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), timeout=grace)
        # Also after a clean exit: whatever else is left in the group must not outlive it.
        # (A pgid stays reserved while any member lives, so this cannot hit a stranger.)
        _signal_group(proc.pid, signal.SIGKILL)
        await proc.wait()
        self._close_watch()
        reader, self._reader = self._reader, None
        if reader is not None:
            # A grandchild could keep the pipe open: then give up on the rest of the output.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader, timeout=5.0)

    def _close_watch(self) -> None:
        fd, self._watch_write = self._watch_write, None
        if fd is not None:
            os.close(fd)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
