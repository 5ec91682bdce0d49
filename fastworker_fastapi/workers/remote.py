"""Remote workers: tasks run on FastWorker control planes, spawned here or reached over the network.

```
scheduler loop ── acquire(record) ──► slot on the least-loaded healthy plane (< max_in_flight)
                                    │ (waits in priority order while every plane is full)
                                    ▼
                  plane outbox ──► sender ── one batch_submit per priority (any reply = ack)
                                                     │
    control plane runs it ── Pair0 callback ──► Pair0Listener ──► wakes that run() call
```

Only the combination measured to be exactly-once and complete on fastworker 0.3.0 is used
(see docs/remote.md): batch submission where any reply is the acknowledgement and nothing is
resent, completion learned only from the task's callback to our own listener (which accepts
many connections at once), an outer deadline on every call and a deadline per task. Every
attempt gets a fresh wire id, so a late callback can never complete another attempt.

A plane whose call fails or times out, whose spawned process exits or whose announcements stop
is marked down and its in-flight tasks fail with `WorkerLost` (the scheduler retries them when
their policy allows). Tasks still in an outbox provably never left and go to another plane.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import math
import os
import re
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

import anyio
import pynng
from anyio.abc import TaskStatus as AnyioTaskStatus

from fastworker_fastapi._control_plane import (
    ControlPlaneConnection,
    ControlPlaneError,
    ControlPlanePorts,
    ControlPlaneProcess,
    ControlPlaneTimeoutError,
    find_control_plane_ports,
    make_task_dict,
)
from fastworker_fastapi._nng import MAX_MESSAGE_SIZE, Pair0Listener, parse_tcp_address
from fastworker_fastapi.errors import ConfigurationError, TaskFailed
from fastworker_fastapi.records import PRIORITY_LEVELS, TaskPolicy
from fastworker_fastapi.tasks import TaskDefinition

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from fastworker_fastapi.records import TaskRecord
    from fastworker_fastapi.tasks import TaskRegistry

__all__ = ["RemoteExecutor", "RemoteWorkers"]

logger = logging.getLogger("fastworker_fastapi")

_LEVELS: Final = PRIORITY_LEVELS
_BY_LEVEL: Final = sorted(_LEVELS, key=_LEVELS.__getitem__)
_NOT_FOUND = re.compile(r"Task (?P<name>.+) not found")
_ANNOUNCE = "WORKER_ANNOUNCE:"
_MAX_LANES: Final = 3  # task ports 0-2; port 3 takes the batches that overflow the lanes
_LANE_PATIENCE: Final = 0.05  # s every lane must have been busy before tasks overflow to a batch


def default_spawn() -> int:
    """Planes that fit this machine: one per core but one (the app's), at least one.

    Measured on 2 cores, a second plane gained nothing (docs/remote.md): a plane runs its
    tasks on one core, and the app needs one for itself.
    """
    return max(1, (os.cpu_count() or 2) - 1)


@dataclass(frozen=True, kw_only=True, slots=True)
class RemoteWorkers:
    """Settings for tasks run on FastWorker control planes.

    Where the control planes are (any combination):

    - `addresses`: base addresses of running control planes (`"tcp://10.0.0.5:5555"`);
    - `discovery`: a control plane's discovery address; planes are learned from its
      announcements and dropped after `discovery_ttl` seconds of silence;
    - `spawn`: start this many `fastworker control-plane` children on free loopback ports,
      loading `task_modules` (default: the modules of the registered tasks) with
      `python_path` plus this process's own import path. Left out with no `addresses` or
      `discovery`, it fits the machine: one plane per core but one (the app keeps a core),
      at least one; `RemoteWorkers()` alone is a complete setting.

    Flow and deadlines: `concurrency` tasks in flight in total, at most `max_in_flight` on one
    plane, at most `max_batch` per request; `call_timeout` bounds every request,
    `task_deadline` bounds tasks without a timeout of their own (a lost callback ends as a
    failure instead of hanging), `unavailable_timeout` is how long a task waits while no plane
    is healthy. `lanes` (0-3) is how many task ports of each *spawned* plane carry one task at
    a time with its result in the reply (no callback; see docs/remote.md); 0 sends every task
    in batches with callbacks, as for planes other processes may share. Callbacks arrive on a
    listener bound to `callback_host:callback_port`; set `callback_address` when planes must
    reach it under another name (NAT, other machines).
    `task_names` declares tasks that exist only on the remote machines.
    """

    addresses: Sequence[str] = ()
    discovery: str | None = None
    spawn: int | None = None
    task_modules: Sequence[str] | None = None
    python_path: Sequence[str] = ()
    task_names: Sequence[str] = ()
    concurrency: int = 64
    max_in_flight: int = 32
    max_batch: int = 256
    lanes: int = 3
    call_timeout: float = 10.0
    task_deadline: float = 300.0
    unavailable_timeout: float = 30.0
    start_timeout: float = 30.0
    health_interval: float = 1.0
    health_timeout: float = 3.0
    discovery_ttl: float = 6.0
    stop_grace: float = 1.0
    callback_host: str = "127.0.0.1"
    callback_port: int = 0
    callback_address: str | None = None

    def __post_init__(self) -> None:
        for name in ("addresses", "python_path", "task_names"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ConfigurationError(f"{name} must be a list of strings, not one string")
            object.__setattr__(self, name, tuple(value))
        if self.task_modules is not None:
            if isinstance(self.task_modules, str):
                raise ConfigurationError("task_modules must be a list of module names")
            object.__setattr__(self, "task_modules", tuple(self.task_modules))
        if self.spawn is None:
            fits = 0 if self.addresses or self.discovery is not None else default_spawn()
            object.__setattr__(self, "spawn", fits)
        if not self.addresses and self.discovery is None and self.spawn == 0:
            raise ConfigurationError(
                "RemoteWorkers needs control planes: give addresses=[...], discovery=... or spawn=N"
            )
        for address in (*self.addresses, *filter(None, [self.discovery, self.callback_address])):
            try:
                parse_tcp_address(address)
            except ValueError as exc:
                raise ConfigurationError(str(exc)) from None
        if len(set(self.addresses)) != len(self.addresses):
            raise ConfigurationError("addresses must not repeat a control plane")
        for name in ("spawn", "callback_port"):
            if getattr(self, name) < 0:
                raise ConfigurationError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.lanes <= _MAX_LANES:
            raise ConfigurationError(f"lanes must be 0 to {_MAX_LANES}, got {self.lanes}")
        for name in ("concurrency", "max_in_flight", "max_batch"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "call_timeout",
            "task_deadline",
            "unavailable_timeout",
            "start_timeout",
            "health_interval",
            "health_timeout",
            "discovery_ttl",
        ):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigurationError(f"{name} must be a finite number > 0, got {value!r}")
        if not (self.stop_grace >= 0 and math.isfinite(self.stop_grace)):
            raise ConfigurationError(f"stop_grace must be >= 0, got {self.stop_grace!r}")

    def build_executor(self, registry: TaskRegistry) -> RemoteExecutor:
        return RemoteExecutor(self, registry)


class _Resubmit(Exception):
    """The task provably never reached its plane: take another slot."""


@dataclass(eq=False, slots=True)
class _Waiter:
    """One attempt in flight: its wire id, its task dict and the future its callback resolves."""

    wire_id: str
    plane: _Plane
    level: int
    task: dict[str, Any]
    future: asyncio.Future[dict[str, Any]]
    state: Literal["queued", "sending", "sent"] = "queued"


@dataclass(eq=False, slots=True)
class _Plane:
    """One control plane as this app sees it."""

    address: str
    source: Literal["spawned", "address", "discovered"]
    connection: ControlPlaneConnection
    process: ControlPlaneProcess | None = None
    healthy: bool = False
    gone: bool = False
    reason: str = "not checked yet"
    last_seen: float = 0.0
    in_flight: dict[str, _Waiter] = field(default_factory=dict)
    zombies: set[str] = field(default_factory=set)  # cancelled or lost, maybe still running
    outbox: list[list[_Waiter]] = field(default_factory=lambda: [[] for _ in _LEVELS])
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    reserved: int = 0  # slots acquired by the scheduler, not dispatched yet
    lanes: int = 0  # task ports used one task at a time (spawned planes only: nobody else sends)
    free_lanes: list[int] = field(default_factory=list)
    lane_started: dict[int, float] = field(default_factory=dict)  # busy lane -> since when

    @property
    def load(self) -> int:
        return len(self.in_flight) + len(self.zombies) + self.reserved


class RemoteExecutor:
    """Hands tasks to control planes and learns their outcome from callbacks."""

    def __init__(self, settings: RemoteWorkers, registry: TaskRegistry) -> None:
        self._settings = settings
        self._registry = registry
        self._planes: dict[str, _Plane] = {}
        self._waiters: dict[str, _Waiter] = {}
        self._zombies: dict[str, tuple[_Plane, float]] = {}
        self._slot_waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._listener: Pair0Listener | None = None
        self._callback_address = ""
        self._processes: list[ControlPlaneProcess] = []
        self._task_group: TaskGroup | None = None
        self._scope: anyio.CancelScope | None = None
        self._loops_done = anyio.Event()
        self._started = False
        self._closed = False
        self.late_callbacks = 0
        """Callbacks that arrived for an attempt already over (timed out, cancelled, lost)."""

    # -- the Executor protocol --------------------------------------------------------------

    @property
    def concurrency(self) -> int:
        return self._settings.concurrency

    @property
    def callback_address(self) -> str:
        """Where control planes send completion callbacks (our listener)."""
        return self._callback_address

    def planes(self) -> dict[str, bool]:
        """Known control planes and whether each is healthy now."""
        return {address: plane.healthy for address, plane in self._planes.items()}

    def resolve(self, name: str) -> TaskDefinition | None:
        definition = self._registry.get(name)
        if definition is None and name in self._settings.task_names:
            return TaskDefinition(
                name=name, func=_remote_only(name), is_async=False, policy=TaskPolicy()
            )
        return definition

    async def start(self, task_group: TaskGroup) -> None:
        """Listen for callbacks, spawn and reach the planes; on failure undo all and raise."""
        if self._started:
            raise RuntimeError("a RemoteExecutor can be started only once")
        self._started = True
        try:
            await self._start(task_group)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self.aclose()
            if isinstance(exc, Exception) and not isinstance(exc, ConfigurationError):
                raise ConfigurationError(f"remote workers could not start: {exc}") from exc
            raise

    async def _start(self, task_group: TaskGroup) -> None:
        s = self._settings
        self._listener = Pair0Listener(
            self._on_callback,
            host=s.callback_host,
            port=s.callback_port,
            on_oversize=self._on_oversize_callback,
        )
        try:
            await self._listener.start()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot listen for callbacks on {s.callback_host}:{s.callback_port}: {exc}; "
                "choose another callback_host/callback_port"
            ) from exc
        self._callback_address = s.callback_address or self._listener.address
        await task_group.start(self._run_loops)
        if s.spawn:
            await self._spawn(s.spawn)
        for address in s.addresses:
            self._add_plane(address, "address")
        # One health check now, so that planes that answer are usable at once.
        await self._check_health()
        if s.discovery is not None:
            assert self._task_group is not None
            self._task_group.start_soon(self._discover, s.discovery)
        logger.info(
            "remote workers ready: %d control plane(s), callbacks at %s",
            len(self._planes),
            self._callback_address,
        )

    async def acquire(self, record: TaskRecord) -> _Plane:
        """Wait for a plane with a free slot, in priority order (the task is not RUNNING yet)."""
        if self._closed:
            raise TaskFailed("WorkerLost", "the remote workers are shut down")
        plane = await self._acquire(_LEVELS[record.priority])
        plane.reserved += 1
        return plane

    def release(self, slot: _Plane) -> None:
        """Give back a slot that `acquire` returned and `run` will not use."""
        slot.reserved -= 1
        self._wake_slots()

    async def run(self, record: TaskRecord, definition: TaskDefinition, slot: _Plane) -> Any:
        """Submit one attempt to the acquired plane and wait for its callback (or a failure
        that says why)."""
        level = _LEVELS[record.priority]
        deadline = self._settings.task_deadline if record.policy.timeout is None else None
        plane = slot
        plane.reserved -= 1  # the slot becomes an in-flight task below
        size = _payload_size(record.args, record.kwargs)
        if size > MAX_MESSAGE_SIZE:
            self._wake_slots()  # the slot is free again
            raise TaskFailed(
                "PayloadTooLarge",
                f"the arguments of task {record.id} are {size} bytes as JSON, over the "
                f"{MAX_MESSAGE_SIZE}-byte limit of a request to a control plane; pass a "
                "reference (a key, a URL) to large data instead",
                retry=False,
            )
        while True:
            waiter = self._dispatch(record, plane, level)
            try:
                async with asyncio.timeout(deadline):
                    outcome = await waiter.future
            except _Resubmit:
                plane = await self._acquire(level)
                continue
            except TimeoutError:
                self._abandon(waiter, "its deadline passed")
                raise TaskFailed(
                    "WorkerLost",
                    f"no result from control plane {plane.address} within task_deadline="
                    f"{deadline:g}s (callback lost, or the plane stalled)",
                ) from None
            except BaseException as exc:
                if not isinstance(exc, TaskFailed):  # cancelled (timeout, cancel, shutdown)
                    self._abandon(waiter, "the attempt was cancelled")
                raise
            finally:
                self._release(waiter)
            return _outcome(outcome, plane.address)

    async def aclose(self) -> None:
        """Fail what is left, stop the loops, close connections and stop spawned planes."""
        if self._closed:
            return
        self._closed = True
        for waiter in list(self._waiters.values()):
            _fail(waiter, TaskFailed("WorkerLost", "the remote workers shut down"))
        if self._scope is not None:
            self._scope.cancel()
            with anyio.move_on_after(5):
                await self._loops_done.wait()
        for plane in list(self._planes.values()):
            await plane.connection.aclose()
        self._planes.clear()
        if self._listener is not None:
            await self._listener.aclose()
        await asyncio.gather(
            *(p.stop(grace=self._settings.stop_grace) for p in self._processes),
            return_exceptions=True,
        )

    # -- slots (flow control) ---------------------------------------------------------------

    def _pick(self) -> _Plane | None:
        best: _Plane | None = None
        limit = self._settings.max_in_flight
        for plane in self._planes.values():
            if plane.healthy and plane.load < limit and (best is None or plane.load < best.load):
                best = plane
        return best

    def _someone_ahead(self, level: int) -> bool:
        heap = self._slot_waiters
        while heap and heap[0][2].done():
            heapq.heappop(heap)
        return bool(heap) and heap[0][0] <= level

    async def _acquire(self, level: int) -> _Plane:
        """A plane with a free slot; waits in priority order, fails if none is healthy."""
        loop = asyncio.get_running_loop()
        give_up: float | None = None
        woken = False  # a woken waiter was chosen in priority order: it must not defer again
        while True:
            if self._closed:
                raise TaskFailed("WorkerLost", "the remote workers are shut down")
            plane = None if not woken and self._someone_ahead(level) else self._pick()
            if plane is not None:
                return plane
            timeout: float | None = None
            if not any(p.healthy for p in self._planes.values()):
                if give_up is None:
                    give_up = loop.time() + self._settings.unavailable_timeout
                timeout = give_up - loop.time()
                if timeout <= 0:
                    raise TaskFailed(
                        "WorkerUnavailable",
                        f"no healthy control plane for {self._settings.unavailable_timeout:g}s "
                        f"({self._describe_planes()})",
                    )
            else:
                give_up = None  # planes are up, only full: flow control, not unavailability
            future: asyncio.Future[None] = loop.create_future()
            heapq.heappush(self._slot_waiters, (level, next(self._seq), future))
            try:
                async with asyncio.timeout(timeout):
                    await future
                woken = True
            except TimeoutError:
                continue
            except BaseException:
                if future.done() and not future.cancelled():
                    self._wake_slots()  # pass the wake-up we got on to the next in line
                raise
            finally:
                future.cancel()

    def _wake_slots(self) -> None:
        free = sum(
            max(0, self._settings.max_in_flight - p.load)
            for p in self._planes.values()
            if p.healthy
        )
        heap = self._slot_waiters
        while heap and free > 0:
            _, _, future = heapq.heappop(heap)
            if not future.done():
                future.set_result(None)
                free -= 1

    def _describe_planes(self) -> str:
        if not self._planes:
            return "no control plane known yet"
        return "; ".join(f"{p.address}: {p.reason}" for p in self._planes.values())

    # -- one attempt --------------------------------------------------------------------------

    def _dispatch(self, record: TaskRecord, plane: _Plane, level: int) -> _Waiter:
        wire_id = f"{record.id}.{record.attempts}.{secrets.token_hex(6)}"
        task = make_task_dict(
            record.name,
            record.args,
            record.kwargs,
            task_id=wire_id,
            priority=record.priority.value,
            callback_address=self._callback_address,
        )
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(wire_id, plane, level, task, future)
        self._waiters[wire_id] = waiter
        plane.in_flight[wire_id] = waiter
        plane.outbox[level].append(waiter)
        plane.wake.set()
        return waiter

    def _release(self, waiter: _Waiter) -> None:
        self._waiters.pop(waiter.wire_id, None)
        waiter.plane.in_flight.pop(waiter.wire_id, None)
        self._wake_slots()

    def _abandon(self, waiter: _Waiter, why: str) -> None:
        """The attempt is over on our side; make sure the plane forgets it too if it can."""
        plane = waiter.plane
        if waiter.state == "queued":
            plane.outbox[waiter.level].remove(waiter)
            return
        if plane.gone or not plane.healthy:
            return
        # Keep its slot until the plane confirms the cancel, the late callback arrives or the
        # deadline passes: the plane may still be running it.
        expires = asyncio.get_running_loop().time() + self._settings.task_deadline
        plane.zombies.add(waiter.wire_id)
        self._zombies[waiter.wire_id] = (plane, expires)
        logger.debug("abandoning %s on %s: %s", waiter.wire_id, plane.address, why)
        if self._task_group is not None:
            self._task_group.start_soon(self._cancel_remote, plane, waiter.wire_id)

    async def _cancel_remote(self, plane: _Plane, wire_id: str) -> None:
        timeout = min(self._settings.call_timeout, self._settings.health_timeout)
        try:
            cancelled = await plane.connection.cancel(wire_id, timeout=timeout)
        except (ControlPlaneError, ValueError) as exc:
            logger.debug("cancel of %s on %s failed: %s", wire_id, plane.address, exc)
            return
        if cancelled:
            self._drop_zombie(wire_id)

    def _drop_zombie(self, wire_id: str) -> None:
        entry = self._zombies.pop(wire_id, None)
        if entry is not None:
            entry[0].zombies.discard(wire_id)
            self._wake_slots()

    def _on_callback(self, message: bytes) -> None:
        try:
            data = json.loads(message)
            wire_id = data["task_id"]
        except (ValueError, TypeError, KeyError):
            logger.warning("ignoring a callback that is not a FastWorker result: %.200r", message)
            return
        self._settle(wire_id, data)

    def _on_oversize_callback(self, head: bytes, size: int) -> None:
        """A callback above the listener's limit: fail its task now, not at the deadline."""
        match = _TASK_ID.search(head)
        waiter = self._waiters.get(match.group(1).decode()) if match else None
        if waiter is None:
            logger.warning("an oversize callback (%d bytes) names no task in flight", size)
            return
        _fail(
            waiter,
            TaskFailed(
                "ResultTooLarge",
                f"the result of task {waiter.wire_id.partition('.')[0]} is {size} bytes as "
                f"JSON, over the {MAX_MESSAGE_SIZE}-byte limit of a callback from a control "
                "plane; return a smaller result (store large data elsewhere, return a key)",
                retry=False,
            ),
        )

    def _settle(self, wire_id: object, data: dict[str, Any]) -> None:
        waiter = self._waiters.get(wire_id) if isinstance(wire_id, str) else None
        if waiter is None or waiter.future.done():
            self.late_callbacks += 1
            logger.debug("discarding the late or unknown callback of %r", wire_id)
            if isinstance(wire_id, str):
                self._drop_zombie(wire_id)
            return
        waiter.future.set_result(data)

    # -- planes -------------------------------------------------------------------------------

    def _add_plane(
        self,
        address: str,
        source: Literal["spawned", "address", "discovered"],
        process: ControlPlaneProcess | None = None,
    ) -> _Plane:
        plane = _Plane(address, source, ControlPlaneConnection(address), process)
        plane.last_seen = asyncio.get_running_loop().time()
        self._planes[address] = plane
        assert self._task_group is not None
        self._task_group.start_soon(self._sender, plane)
        if process is not None:
            self._task_group.start_soon(self._watch_process, plane, process)
        return plane

    def _mark_up(self, plane: _Plane) -> None:
        if plane.healthy or plane.gone or self._closed:
            return
        plane.healthy = True
        plane.reason = "healthy"
        logger.info("control plane %s is up", plane.address)
        self._wake_slots()

    def _mark_down(self, plane: _Plane, reason: str, *, gone: bool = False) -> None:
        """Fail its in-flight tasks as WorkerLost; queued ones go to another plane."""
        if plane.healthy or (gone and not plane.gone):
            logger.warning("control plane %s is down: %s", plane.address, reason)
        plane.healthy = False
        plane.reason = reason
        lost = TaskFailed("WorkerLost", f"control plane {plane.address} {reason}")
        for waiter in list(plane.in_flight.values()):
            _fail(waiter, _Resubmit() if waiter.state == "queued" else lost)
        for queue in plane.outbox:
            queue.clear()
        for wire_id in plane.zombies:
            self._zombies.pop(wire_id, None)
        plane.zombies.clear()
        if gone and not plane.gone:
            plane.gone = True
            plane.wake.set()  # its sender exits
            if self._planes.get(plane.address) is plane:
                del self._planes[plane.address]
            if self._task_group is not None:
                self._task_group.start_soon(plane.connection.aclose)
        self._wake_slots()

    async def _sender(self, plane: _Plane) -> None:
        """Coalesces a plane's outbox into one batch request per priority, highest first."""
        while not plane.gone:
            await plane.wake.wait()
            plane.wake.clear()
            while not plane.gone and any(plane.outbox):
                level = next(n for n, queue in enumerate(plane.outbox) if queue)
                queue = plane.outbox[level]
                if plane.free_lanes and self._task_group is not None:
                    waiter = queue.pop(0)
                    waiter.state = "sent"  # maybe not yet: `_lane` puts it back if it never left
                    port = plane.free_lanes.pop()
                    plane.lane_started[port] = asyncio.get_running_loop().time()
                    self._task_group.start_soon(self._lane, plane, port, waiter)
                    continue
                if plane.lanes and not self._lanes_stuck(plane):
                    break  # a lane frees soon (or the patience runs out: see below)
                batch = queue[: self._settings.max_batch]
                del queue[: self._settings.max_batch]
                await self._send(plane, level, batch)
            if plane.lanes and any(plane.outbox) and not plane.wake.is_set():
                # Every lane is busy: wait for one, or overflow to a batch once all of them have
                # been busy for the patience (long tasks must not hold the rest back).
                with anyio.move_on_after(_LANE_PATIENCE):
                    await plane.wake.wait()
                plane.wake.set()

    def _lanes_stuck(self, plane: _Plane) -> bool:
        now = asyncio.get_running_loop().time()
        youngest = max(plane.lane_started.values(), default=now)
        return now - youngest >= _LANE_PATIENCE

    async def _lane(self, plane: _Plane, port: int, waiter: _Waiter) -> None:
        """One task on one lane: sent alone, its result is the reply (no callback)."""
        s = self._settings
        retire = False
        try:
            reply = await plane.connection.submit_task(
                {**waiter.task, "callback": None},
                port=port,
                timeout=s.call_timeout,
                reply_timeout=s.task_deadline + s.call_timeout,
            )
        except ControlPlaneTimeoutError as exc:
            if not exc.request_sent:
                waiter.state = "queued"
                _fail(waiter, _Resubmit())
            else:  # the lane's reply may still come and would answer the next request
                retire = True
                _fail(waiter, TaskFailed("WorkerLost", f"control plane {plane.address}: {exc}"))
        except ValueError as exc:
            _fail(waiter, TaskFailed("InvalidTask", str(exc)))
        except ControlPlaneError as exc:
            self._mark_down(plane, f"failed a task request: {exc}")
        else:
            if reply["task_id"] == waiter.wire_id:
                self._settle(waiter.wire_id, reply)
            else:
                retire = True
                plane.lanes = 0  # someone else submits to this plane: lanes are not safe there
                logger.warning(
                    "control plane %s answered %s with the result of %r: another client uses "
                    "it, so it gets batches only from now on",
                    plane.address,
                    waiter.wire_id,
                    reply["task_id"],
                )
                _fail(
                    waiter,
                    TaskFailed(
                        "WorkerLost", f"control plane {plane.address} sent another task's result"
                    ),
                )
        finally:
            plane.lane_started.pop(port, None)
            if retire:
                plane.lanes = max(0, plane.lanes - 1) if plane.lanes else 0
            elif plane.lanes:
                plane.free_lanes.append(port)
            if not plane.lanes:
                plane.free_lanes.clear()
            plane.wake.set()

    async def _send(self, plane: _Plane, level: int, batch: list[_Waiter]) -> None:
        for waiter in batch:
            waiter.state = "sending"
        try:
            await plane.connection.submit_batch(
                [w.task for w in batch],
                # A plane with lanes takes batches on its low port only (the lanes use 0-2).
                priority="low" if plane.lanes or plane.lane_started else _BY_LEVEL[level].value,
                timeout=self._settings.call_timeout,
            )
        except ControlPlaneTimeoutError as exc:
            if not exc.request_sent:
                for waiter in batch:
                    waiter.state = "queued"  # never left: free to go elsewhere
            self._mark_down(plane, f"did not take a batch: {exc}")
        except ValueError as exc:  # refused before sending: the tasks are not valid
            for waiter in batch:
                _fail(waiter, TaskFailed("InvalidTask", str(exc)))
        except ControlPlaneError as exc:
            self._mark_down(plane, f"failed a batch request: {exc}")
        else:
            logger.debug("control plane %s took a batch of %d", plane.address, len(batch))
            for waiter in batch:
                waiter.state = "sent"

    async def _watch_process(self, plane: _Plane, process: ControlPlaneProcess) -> None:
        status = await process.wait()
        if not self._closed:
            self._mark_down(plane, f"process exited with status {status}", gone=True)

    async def _check_health(self) -> None:
        """Ping every plane at once; expire silent discovered planes and old zombies."""
        now = asyncio.get_running_loop().time()
        for wire_id, (_, expires) in list(self._zombies.items()):
            if expires <= now:
                self._drop_zombie(wire_id)
        ttl = self._settings.discovery_ttl
        planes = [p for p in self._planes.values() if not p.gone]
        for plane in planes:
            if plane.source == "discovered" and now - plane.last_seen > ttl:
                self._mark_down(plane, f"sent no announcement for {ttl:g}s", gone=True)
        planes = [p for p in planes if not p.gone]
        answers = await asyncio.gather(
            *(p.connection.ping(timeout=self._settings.health_timeout) for p in planes)
        )
        for plane, ok in zip(planes, answers, strict=True):
            if ok:
                self._mark_up(plane)
            elif not plane.gone and (plane.healthy or plane.reason == "not checked yet"):
                self._mark_down(
                    plane, f"stopped answering within {self._settings.health_timeout:g}s"
                )

    async def _monitor(self) -> None:
        while True:
            await anyio.sleep(self._settings.health_interval)  # the health-check period
            await self._check_health()

    async def _discover(self, address: str) -> None:
        """Learn planes from `WORKER_ANNOUNCE:<id>:<address>` messages on the Bus0 address."""
        with pynng.Bus0() as bus:
            bus.dial(address, block=False)
            while True:
                message = (await bus.arecv()).decode(errors="replace")
                if not message.startswith(_ANNOUNCE):
                    continue
                parts = message.split(":", 2)
                try:
                    parse_tcp_address(parts[2])
                except (IndexError, ValueError):
                    logger.warning("ignoring a malformed announcement: %.200r", message)
                    continue
                plane = self._planes.get(parts[2])
                if plane is None:
                    logger.info("discovered control plane %s", parts[2])
                    plane = self._add_plane(parts[2], "discovered")
                    self._mark_up(plane)
                plane.last_seen = asyncio.get_running_loop().time()

    async def _run_loops(self, *, task_status: AnyioTaskStatus[None]) -> None:
        try:
            with anyio.CancelScope() as self._scope:
                async with anyio.create_task_group() as group:
                    self._task_group = group
                    group.start_soon(self._monitor)
                    task_status.started()
                    await anyio.sleep_forever()
        finally:
            self._task_group = None
            self._loops_done.set()

    async def _spawn(self, count: int) -> None:
        s = self._settings
        modules = self._task_modules()
        python_path = [*s.python_path, *_import_path()]
        taken: set[int] = set()
        for _ in range(count):
            ports = _disjoint_ports(taken)
            taken.update(ports.all_ports())
            self._processes.append(
                ControlPlaneProcess(modules, python_path=python_path, ports=ports)
            )
        results = await asyncio.gather(
            *(p.start(ready_timeout=s.start_timeout) for p in self._processes),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise ConfigurationError(
                f"{len(failures)} of {count} spawned control plane(s) did not start: {failures[0]}"
            ) from failures[0]
        for process in self._processes:
            plane = self._add_plane(process.base_address, "spawned", process)
            plane.lanes = s.lanes
            plane.free_lanes = list(range(s.lanes))

    def _task_modules(self) -> list[str]:
        if self._settings.task_modules is not None:
            modules = list(self._settings.task_modules)
        else:
            found = {d.func.__module__ for d in self._registry.definitions()}
            modules = sorted(m for m in found if m != "__main__")
        if not modules:
            raise ConfigurationError(
                "spawn needs task modules for the control planes: register tasks in an "
                "importable module (not __main__) or pass task_modules=[...]"
            )
        return modules


_TASK_ID = re.compile(rb'"task_id"\s*:\s*"([^"\\]{1,200})"')


def _payload_size(args: Any, kwargs: Any) -> int:
    """The JSON size of a task's arguments; quick for the usual small ones."""
    if not args and not kwargs:
        return 0
    return len(json.dumps([args, kwargs], ensure_ascii=False).encode())


def _fail(waiter: _Waiter, exc: BaseException) -> None:
    if not waiter.future.done():
        waiter.future.set_exception(exc)


def _outcome(data: dict[str, Any], address: str) -> Any:
    """The task's value from its callback, or `TaskFailed` with what the plane said."""
    status = data.get("status")
    if status == "success":
        return data.get("result")
    error = str(data.get("error") or "")
    missing = _NOT_FOUND.fullmatch(error)
    if missing is not None:
        raise TaskFailed(
            "UnknownTaskError",
            f"control plane {address} has no task named {missing['name']!r}; "
            "load its module there (task_modules)",
        )
    if status == "failure":
        return_error = error or "the task failed on the control plane"
        raise TaskFailed("RemoteTaskError", return_error)
    raise TaskFailed("RemoteTaskError", f"control plane reported status {status!r}: {error}")


def _remote_only(name: str) -> Any:
    def run_remotely(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"task {name!r} exists only on remote control planes")

    run_remotely.__qualname__ = run_remotely.__name__ = name
    return run_remotely


def _import_path() -> list[str]:
    """The app's own import path (cwd and sys.path, minus the interpreter's), for children."""
    prefixes = {os.path.abspath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    paths: list[str] = []
    for entry in [os.getcwd(), *sys.path]:
        path = os.path.abspath(entry or os.getcwd())
        inside = any(path == p or path.startswith(p + os.sep) for p in prefixes)
        if not inside and os.path.isdir(path) and path not in paths:
            paths.append(path)
    return paths


def _disjoint_ports(taken: set[int]) -> ControlPlanePorts:
    """Ports for one more plane, none shared with the planes being started alongside."""
    while True:
        ports = find_control_plane_ports()
        if taken.isdisjoint(ports.all_ports()):
            return ports
