"""`TaskClient`: FastWorker's Client API, served by this app's scheduler and store.

Code written for `fastworker.clients.Client` runs unchanged: the same method names,
arguments, return types and models (`TaskPriority`, `TaskStatus`, `TaskResult`). What
differs is what happens behind them: submissions are validated up front (unknown names,
arguments that are not JSON, bad options raise at once instead of failing later), nothing
blocks the event loop, and results never get lost or mixed up.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn

from fastworker.tasks.models import CallbackInfo, TaskPriority, TaskResult, TaskStatus

from fastworker_fastapi._arguments import check_arguments
from fastworker_fastapi._ids import TaskIds
from fastworker_fastapi.errors import (
    InvalidTaskArgumentsError,
    InvalidTaskOptionsError,
    NotRunningError,
    TaskAlreadyFinishedError,
    TaskNotFoundError,
    UnknownTaskError,
    WaitTimeoutError,
)
from fastworker_fastapi.models import TaskInfo, task_info
from fastworker_fastapi.records import FINAL_STATUSES, FINAL_VALUES, TaskRecord, utcnow

if TYPE_CHECKING:
    from collections.abc import Callable

    from fastworker_fastapi.events import EventHub
    from fastworker_fastapi.scheduler import Scheduler
    from fastworker_fastapi.stores.base import TaskStore
    from fastworker_fastapi.tasks import TaskDefinition

__all__ = ["TaskClient", "parse_priority"]

_PRIORITIES = {p.value: p for p in TaskPriority}


def _simple(values: Any) -> bool:
    """True when every value is an ASCII str, int, bool, None or finite float: JSON as it is
    (other strings take the JSON path, which refuses lone surrogates)."""
    for value in values:
        kind = type(value)
        if kind is int or kind is bool or value is None or (kind is str and value.isascii()):
            continue
        if kind is float and value - value == 0:  # inf - inf and nan - nan are nan
            continue
        return False
    return True


_NO_KWARGS: dict[str, Any] = {}  # shared and never mutated: records only unpack it
_BATCH_KEYS = frozenset({"task_name", "args", "kwargs", "priority", "eta", "countdown"})


def parse_priority(priority: TaskPriority | str) -> TaskPriority:
    """The enum itself, or its value in any case (`"high"`, `"HIGH"`)."""
    if isinstance(priority, TaskPriority):
        return priority
    if isinstance(priority, str):
        found = _PRIORITIES.get(priority.lower())
        if found is not None:
            return found
    raise InvalidTaskOptionsError(
        f"unknown priority {priority!r}; use one of {', '.join(_PRIORITIES)} "
        "or fastworker.tasks.models.TaskPriority"
    )


class TaskClient:
    """Submit tasks and read their results: FastWorker's `Client` API.

    Get it in a route with `client: TaskClientDep` (or `Depends(get_fastworker)`), or as
    `fw.client`. It works while the app's lifespan runs; results stay readable after.
    """

    def __init__(self) -> None:
        self._scheduler: Scheduler | None = None
        self._store: TaskStore | None = None
        self._hub: EventHub | None = None
        self._validate_callback: Callable[[str], None] | None = None
        self._resolve: Callable[[str], TaskDefinition | None] | None = None
        self._ids = TaskIds()
        self._id_pool = self._ids.pool

    def _bind(
        self,
        scheduler: Scheduler,
        validate_callback: Callable[[str], None] | None = None,
    ) -> None:
        self._scheduler = scheduler
        self._store = scheduler.store
        self._hub = scheduler.hub
        self._validate_callback = validate_callback
        self._resolve = scheduler.executor.resolve

    @property
    def running(self) -> bool:
        """True while tasks are accepted."""
        return self._scheduler is not None and self._scheduler.accepting

    @property
    def started(self) -> bool:
        """True once the extension has started (results stay readable after shutdown)."""
        return self._store is not None

    @property
    def store(self) -> TaskStore:
        """The extension's task store (`NotRunningError` before it has started)."""
        if self._store is None:
            _not_started()
        return self._store

    @property
    def events(self) -> EventHub:
        """Every task change this process sees, its own and other processes'."""
        if self._hub is None:
            _not_started()
        return self._hub

    @property
    def scheduler(self) -> Scheduler:
        """The extension's scheduler (`NotRunningError` before it has started)."""
        if self._scheduler is None:
            _not_started()
        return self._scheduler

    # -- FastWorker's API -----------------------------------------------------------------

    async def start(self) -> None:
        """Nothing to do: the app's lifespan starts the extension, and with it this client.

        fastworker's `Client` must be started by hand (`await client.start()`); code that
        does so runs unchanged here, at any point of the app's life.
        """

    def stop(self) -> None:
        """Nothing to do: the app's lifespan drains the workers and stops this client.

        fastworker's `Client` must be stopped by hand (`client.stop()`); here stopping is the
        lifespan's job, so running tasks are never cut short by a stray call.
        """

    async def submit_task(
        self,
        task_name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        priority: TaskPriority | str | None = None,
        eta: datetime | None = None,
        countdown: float | None = None,
    ) -> TaskResult:
        """Submit a task and wait until it finishes; returns its final `TaskResult`."""
        task_id = await self._submit(
            task_name, args, kwargs, priority=priority, eta=eta, countdown=countdown
        )
        return await self.wait(task_id)

    async def delay(
        self,
        task_name: str,
        *args: Any,
        priority: TaskPriority | str | None = None,
        eta: datetime | None = None,
        countdown: float | None = None,
        **kwargs: Any,
    ) -> str:
        """Submit a task and return its id at once (the task runs in the background)."""
        scheduler, resolve = self._scheduler, self._resolve  # `_submit`, inlined: the hot path
        if scheduler is None or resolve is None:
            _not_started()
        if not kwargs and priority is None and eta is None and countdown is None and _simple(args):
            # The common call, `delay("name", *plain_values)`: what `_prepare` does for it.
            definition = resolve(task_name)
            if definition is None:
                _unknown_task(task_name)
            pool = self._id_pool
            record = TaskRecord(
                pool.pop() if pool else self._ids.next(),
                definition.name,
                args,
                _NO_KWARGS,
                definition.priority,
                definition.policy,
                TaskStatus.PENDING,
                time.time(),
            )
            wait = 0.0
        else:
            record, definition, wait = self._prepare(
                task_name, args, kwargs, priority, eta, countdown
            )
        if not scheduler.submit_now(record, definition, wait):
            await scheduler.submit(record, definition, wait)
        return record.id

    async def delay_with_callback(
        self,
        task_name: str,
        callback_address: str,
        *args: Any,
        callback_data: dict[str, Any] | None = None,
        priority: TaskPriority | str | None = None,
        eta: datetime | None = None,
        countdown: float | None = None,
        **kwargs: Any,
    ) -> str:
        """Like `delay`, and deliver a completion message to `callback_address` at the end."""
        return await self._submit(
            task_name,
            args,
            kwargs,
            priority=priority,
            eta=eta,
            countdown=countdown,
            callback_address=callback_address,
            callback_data=callback_data,
        )

    async def submit_batch(
        self,
        tasks: Sequence[Mapping[str, Any]],
        default_priority: TaskPriority | str = TaskPriority.NORMAL,
    ) -> list[str]:
        """Submit several tasks at once: all are accepted, or none (the error says why).

        Each item is a dict with `task_name` and optionally `args`, `kwargs`, `priority`,
        `eta` and `countdown`, as in FastWorker.
        """
        scheduler = self.scheduler
        prepared: list[tuple[TaskRecord, TaskDefinition, float]] = []
        for index, spec in enumerate(tasks):
            if not isinstance(spec, Mapping):
                raise InvalidTaskOptionsError(
                    f"batch item {index}: must be a dict with 'task_name', got {spec!r}"
                )
            unknown = set(spec) - _BATCH_KEYS
            if "task_name" not in spec or unknown:
                raise InvalidTaskOptionsError(
                    f"batch item {index}: needs 'task_name' and only "
                    f"{sorted(_BATCH_KEYS)}; got {sorted(spec)}"
                )
            prepared.append(
                self._prepare(
                    spec["task_name"],
                    spec.get("args", ()),
                    spec.get("kwargs"),
                    spec.get("priority", default_priority),
                    spec.get("eta"),
                    spec.get("countdown"),
                )
            )
        await scheduler.submit_many(prepared)
        return [record.id for record, _, _ in prepared]

    async def get_task_result(self, task_id: str) -> TaskResult | None:
        """`None` for an unknown id; status `PENDING` until the task is final; then final."""
        return self.get_result(task_id)

    def get_result(self, task_id: str) -> TaskResult | None:
        """The same as `get_task_result`, without awaiting (FastWorker's `get_result`).

        A direct read of the store: a dict lookup in memory, ~20-60 us on the event loop with
        SQLite; with PostgreSQL, this process's latest view of the task.
        """
        record = self.store.peek(task_id)
        return None if record is None else record.to_task_result()

    def get_status(self, task_id: str) -> TaskStatus | None:
        """The fine status (`QUEUED`, `RUNNING`, `RETRYING`...), or None for an unknown id."""
        record = self.store.peek(task_id)
        return None if record is None else record.status

    async def get_info(self, task_id: str) -> TaskInfo | None:
        """Everything known about a task (what `GET /tasks/{task_id}` shows), or None."""
        record = await self.store.get(task_id)
        return None if record is None else task_info(record)

    async def cancel_task(self, task_id: str) -> bool:
        """Cancel a task; False when it is unknown or already finished (as FastWorker)."""
        try:
            await self.scheduler.cancel(task_id)
        except (TaskNotFoundError, TaskAlreadyFinishedError):
            return False
        return True

    async def wait(self, task_id: str, timeout: float | None = None) -> TaskResult:
        """Wait for a task's final `TaskResult`, wherever it runs; `WaitTimeoutError` after
        `timeout` seconds."""
        store = self._store
        hub = self._hub
        if store is None or hub is None:
            _not_started()
        # A durable store's read is a query: a result this process saw published needs none.
        record = hub.recent_final(task_id) if store.durable else None
        if record is None:
            record = store.peek(task_id)
        if record is not None and record.status._value_ in FINAL_VALUES:  # done: no waiter
            return record.to_task_result()
        waiter = hub.final_waiter(task_id)  # first, so a change during the read is not missed
        try:
            record = await store.get(task_id)
            if record is None:
                raise TaskNotFoundError(f"no task with id {task_id!r} (unknown or expired)")
            if record.status not in FINAL_STATUSES:
                try:
                    async with asyncio.timeout(timeout):
                        record = await waiter
                except TimeoutError:
                    raise WaitTimeoutError(
                        f"task {task_id} did not finish within {timeout:g}s "
                        f"(status {record.status.value!r}); it goes on running"
                    ) from None
        finally:
            if not waiter.done():
                hub.forget_waiter(task_id, waiter)
        return record.to_task_result()

    # -- submission -----------------------------------------------------------------------

    async def _submit(
        self,
        task_name: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any] | None,
        priority: TaskPriority | str | None,
        eta: datetime | None,
        countdown: float | None,
        callback_address: str | None = None,
        callback_data: dict[str, Any] | None = None,
    ) -> str:
        scheduler = self._scheduler
        if scheduler is None:
            _not_started()
        record, definition, delay = self._prepare(
            task_name, args, kwargs, priority, eta, countdown, callback_address, callback_data
        )
        if not scheduler.submit_now(record, definition, delay):
            await scheduler.submit(record, definition, delay)
        return record.id

    def _prepare(
        self,
        task_name: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any] | None,
        priority: TaskPriority | str | None,
        eta: datetime | None,
        countdown: float | None,
        callback_address: str | None = None,
        callback_data: dict[str, Any] | None = None,
    ) -> tuple[TaskRecord, TaskDefinition, float]:
        """Validate everything and build the record; raises before anything is recorded."""
        if type(args) is not tuple or type(kwargs) is not dict:  # delay() passes these
            check_arguments(task_name, args, kwargs)
            if kwargs is None:
                kwargs = _NO_KWARGS
        resolve = self._resolve
        if resolve is None:
            _not_started()
        definition = resolve(task_name)
        if definition is None:
            _unknown_task(task_name)
        level = definition.priority if priority is None else parse_priority(priority)
        if eta is None and countdown is None:
            delay, eta_utc = 0.0, None
        else:
            delay, eta_utc = _schedule(eta, countdown)
        if _simple(args) and (
            not kwargs or (_simple(kwargs.values()) and all(type(k) is str for k in kwargs))
        ):
            # As JSON would deliver them; a tuple of plain values is kept as it is (it costs
            # no copy and, immutable, nothing for the garbage collector to track).
            wire_args = args if type(args) is tuple else list(args)
            wire_kwargs = dict(kwargs) if kwargs else _NO_KWARGS
        else:  # what the task receives is what JSON would deliver, in both modes
            try:
                encoded = json.dumps(
                    (args, kwargs), allow_nan=False, ensure_ascii=False, separators=(",", ":")
                )
                encoded.encode("utf-8")  # a lone surrogate cannot travel or be stored
            except (TypeError, ValueError, RecursionError) as exc:
                raise InvalidTaskArgumentsError(
                    f"arguments of task {task_name!r} must be JSON-serialisable so that they "
                    f"can also travel to remote workers: {exc}"
                ) from None
            wire_args, wire_kwargs = json.loads(encoded)
        callback = None
        if callback_address is not None:
            if not isinstance(callback_address, str) or not callback_address:
                raise InvalidTaskOptionsError("callback_address must be a non-empty string")
            if self._validate_callback is not None:
                self._validate_callback(callback_address)
            if callback_data is not None:
                try:
                    callback_data = json.loads(json.dumps(callback_data, allow_nan=False))
                except (TypeError, ValueError) as exc:
                    raise InvalidTaskArgumentsError(
                        f"callback_data must be JSON-serialisable: {exc}"
                    ) from None
            callback = CallbackInfo(address=callback_address, data=callback_data)
        record = TaskRecord(  # positional: this runs once per submission
            self._ids.next(),
            definition.name,
            wire_args,
            wire_kwargs,
            level,
            definition.policy,
            TaskStatus.PENDING,
            time.time(),
            eta_utc,
        )
        if callback is not None:
            record.callback = callback
        return record, definition, delay


def _not_started() -> NoReturn:
    raise NotRunningError(
        "the FastWorker extension has not started: run the app's lifespan first "
        "(uvicorn does; in tests use asgi_lifespan.LifespanManager or `with TestClient(app)`)"
    )


def _unknown_task(task_name: str) -> NoReturn:
    raise UnknownTaskError(
        f"no task registered under {task_name!r}; register it with "
        "@background_task (or fastworker's @task) in a module the app imports"
    )


def _schedule(eta: datetime | None, countdown: float | None) -> tuple[float, datetime | None]:
    """Seconds to wait and the absolute eta (aware UTC); naive etas are local time."""
    if eta is not None and countdown is not None:
        raise InvalidTaskOptionsError("give eta or countdown, not both")
    now = utcnow()
    if countdown is not None:
        if isinstance(countdown, bool) or not isinstance(countdown, int | float):
            raise InvalidTaskOptionsError(f"countdown must be a number, got {countdown!r}")
        if not math.isfinite(countdown) or countdown < 0:
            raise InvalidTaskOptionsError(
                f"countdown must be a finite number of seconds >= 0, got {countdown!r}"
            )
        return float(countdown), now + timedelta(seconds=countdown)
    if not isinstance(eta, datetime):
        raise InvalidTaskOptionsError(f"eta must be a datetime, got {eta!r}")
    eta_utc = eta.astimezone(UTC)
    return (eta_utc - now).total_seconds(), eta_utc
