"""Periodic tasks: each due time of a schedule becomes one ordinary task, exactly once.

```
declare: @background_task(cron=...) / (every=...)   fw.schedule(func, cron=...)
         schedule(func, ...)   fastworker's @task(repeat_interval=... | cron=...)
                    │
every app process:  ▼
  PeriodicTasks ── sleep until the next due time (an injectable Clock)
       │  paused? (shared state in the store)  already done? (last_due in the store)
       ▼
  task id = uuid5(SCHEDULE_NAMESPACE, "name@<due time, UTC ISO>")
  scheduler.submit_unique ── store.insert_if_absent ──► created: this process runs it
       │                                            └─► existed: another process has it
       ▼
  store.update_schedule(name, last_due=due)   (only ever moves forward)
```

Every process computes the same due times (cron in the schedule's time zone, by `cronsim`;
intervals counted from the Unix epoch), so every process derives the same task id for a
due time, and the store's `insert_if_absent` lets exactly one of them create it, however
many processes or hosts share the store. The task is then an ordinary task: status,
retries, callbacks, leases and the dashboard all apply. With the memory store nothing is
shared, so each process (each extension) creates its own run: once per process.

After downtime, due times that passed while no process ran are *missed*; the schedule's
`missed` policy says what to do at start-up: `"skip"` (the default), `"run_once"` (one run,
for the latest missed due time) or `"run_all"` (each of them, the latest `max_missed` at
most). Their ids are deterministic too, so two processes starting at once catch up once.
"""

from __future__ import annotations

import inspect
import json
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol, TypedDict, Unpack
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio
from cronsim import CronSim, CronSimError
from fastapi import Depends, Path
from fastworker.tasks.models import TaskStatus
from fastworker.tasks.registry import task_registry as fastworker_registry
from pydantic import BaseModel, Field

from fastworker_fastapi.errors import (
    ConfigurationError,
    NotRunningError,
    ScheduleNotFoundError,
)

if TYPE_CHECKING:
    from anyio.abc import TaskGroup
    from fastapi import APIRouter

    from fastworker_fastapi.client import TaskClient
    from fastworker_fastapi.stores.base import ScheduleState

__all__ = [
    "SCHEDULE_NAMESPACE",
    "Clock",
    "MissedPolicy",
    "PeriodicTasks",
    "Schedule",
    "ScheduleInfo",
    "ScheduleList",
    "ScheduleOptions",
    "ScheduleRegistry",
    "SystemClock",
    "add_schedule_routes",
    "make_schedule",
    "schedule",
    "schedule_task_id",
    "schedules",
]

logger = logging.getLogger("fastworker_fastapi")

MissedPolicy = Literal["skip", "run_once", "run_all"]
"""What to do at start-up with due times that passed while no process ran."""
_POLICIES = ("skip", "run_once", "run_all")

SCHEDULE_NAMESPACE = uuid.UUID("8a4c8e0e-52f1-4d6b-9d0c-3b1f6a2e7c15")
"""The uuid5 namespace of periodic task ids (fixed forever: changing it re-runs due times)."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def schedule_task_id(schedule: str, due: datetime) -> str:
    """The id of the task for `schedule`'s run due at `due`: the same in every process."""
    return str(uuid.uuid5(SCHEDULE_NAMESPACE, f"{schedule}@{due.astimezone(UTC).isoformat()}"))


# -- schedules --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Schedule:
    """One periodic schedule: which task runs, when, and with what arguments.

    Exactly one of `cron` (5 fields, or 6 with seconds first; read in `tz`) and `every`
    (counted from the Unix epoch, so `every=timedelta(hours=1)` runs on the hour, UTC).
    Make one with `schedule(...)`, `fw.schedule(...)` or `@background_task(cron=...)`.
    """

    name: str
    task: str
    cron: str | None = None
    every: timedelta | None = None
    tz: tzinfo = UTC
    jitter: float = 0.0
    enabled: bool = True
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    missed: MissedPolicy = "skip"
    max_missed: int = 10
    until: datetime | None = None

    @property
    def tz_name(self) -> str:
        """The time zone's IANA name (`"Europe/Paris"`), or `"UTC"`."""
        return str(getattr(self.tz, "key", None) or self.tz)

    @property
    def description(self) -> str:
        """A person's reading of when it runs (`"At 09:00 on Monday through Friday"`)."""
        if self.every is not None:
            return f"Every {_human(self.every)}"
        assert self.cron is not None
        try:
            return CronSim(self.cron, _EPOCH).explain()
        except Exception:  # pragma: no cover - cronsim explains every expression it parses
            return self.cron

    def next_after(self, when: datetime) -> datetime | None:
        """The first due time strictly after `when` (aware UTC); None when there is none."""
        if self.every is not None:
            step = self.every // _US
            due = _EPOCH + _US * (((when - _EPOCH) // _US // step + 1) * step)
        else:
            assert self.cron is not None
            try:
                due = next(CronSim(self.cron, when.astimezone(self.tz))).astimezone(UTC)
            except StopIteration:
                return None
        return None if self.until is not None and due > self.until else due

    def due_times(self, after: datetime, upto: datetime, limit: int) -> list[datetime]:
        """Due times `d` with `after < d <= upto`: the latest `limit` of them, oldest first."""
        found: list[datetime] = []
        if self.every is not None:
            step = self.every // _US
            k = (upto - _EPOCH) // _US // step
            while len(found) < limit:
                due = _EPOCH + _US * (k * step)
                if due <= after:
                    break
                found.append(due)
                k -= 1
        else:
            assert self.cron is not None
            start = upto.astimezone(self.tz).replace(microsecond=0) + timedelta(seconds=1)
            backwards = CronSim(self.cron, start, reverse=True)
            while len(found) < limit:
                try:
                    due = next(backwards).astimezone(UTC)
                except StopIteration:
                    break
                if due <= after:
                    break
                found.append(due)
        until = self.until
        return [due for due in reversed(found) if until is None or due <= until]

    def jitter_for(self, task_id: str) -> float:
        """Seconds the run due at this id waits: fixed per id, in `[0, jitter]`."""
        return random.Random(task_id).uniform(0, self.jitter) if self.jitter > 0 else 0.0


def _human(step: timedelta) -> str:
    seconds = step.total_seconds()
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            n = int(seconds // size)
            return f"{n} {unit}s" if n != 1 else unit
    return f"{seconds:g} seconds" if seconds != 1 else "second"


class ScheduleOptions(TypedDict, total=False):
    """The options of `schedule(...)` and `fw.schedule(...)` (all keyword-only):

    - `cron`: a cron expression (`"*/5 * * * *"`; 6 fields put seconds first), or
    - `every`: a `timedelta` or seconds between runs, counted from the Unix epoch;
    - `name`: the schedule's name (default: the task's name); unique in the app;
    - `tz`: the time zone the cron expression is read in (`"Europe/Paris"`; default UTC);
    - `jitter`: up to this many seconds (or a `timedelta`) of delay added to each run,
      the same in every process for one due time;
    - `enabled`: False declares the schedule but never runs it;
    - `args`, `kwargs`: the task's arguments for every run (JSON values);
    - `missed`: `"skip"` (default), `"run_once"` or `"run_all"`: see the module docstring;
    - `max_missed`: how many missed runs `"run_all"` catches up at most (default 10).
    """

    cron: str | None
    every: timedelta | float | None
    name: str | None
    tz: str | tzinfo
    jitter: float | timedelta
    enabled: bool
    args: Sequence[Any]
    kwargs: Mapping[str, Any] | None
    missed: MissedPolicy
    max_missed: int


def make_schedule(
    task: Callable[..., Any] | str,
    /,
    *,
    cron: str | None = None,
    every: timedelta | float | None = None,
    name: str | None = None,
    tz: str | tzinfo = "UTC",
    jitter: float | timedelta = 0.0,
    enabled: bool = True,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    missed: MissedPolicy = "skip",
    max_missed: int = 10,
    until: datetime | None = None,
) -> Schedule:
    """A validated `Schedule` for `task` (a task handle, a function, or a task name); a
    plain function not registered yet is registered as a task. Raises `ConfigurationError`
    with the reason and the fix."""
    task_name, func = _resolve_task(task)
    label = name if name is not None else task_name
    where = f"schedule {label!r}"
    if not label or "/" in label:
        raise ConfigurationError(f"{where}: a schedule name must be non-empty, without '/'")
    if (cron is None) == (every is None):
        raise ConfigurationError(f"{where}: give exactly one of cron= and every=")
    step: timedelta | None = None
    if every is not None:
        step = every if isinstance(every, timedelta) else _seconds(every, where, "every")
        if step < _US:
            raise ConfigurationError(f"{where}: every= must be > 0, got {every!r}")
    zone = _zone(tz, where)
    if cron is not None:
        if not isinstance(cron, str):
            raise ConfigurationError(f"{where}: cron= must be a string, got {cron!r}")
        try:
            next(CronSim(cron, datetime(2000, 1, 1, tzinfo=zone)))
        except (CronSimError, StopIteration) as exc:
            raise ConfigurationError(
                f"{where}: {cron!r} is not a cron expression cronsim accepts ({exc or 'never'});"
                " use 5 fields (minute hour day-of-month month day-of-week)"
            ) from None
    jitter_seconds = jitter.total_seconds() if isinstance(jitter, timedelta) else jitter
    if isinstance(jitter_seconds, bool) or not isinstance(jitter_seconds, int | float):
        raise ConfigurationError(f"{where}: jitter= must be seconds or a timedelta")
    if not 0 <= jitter_seconds < float("inf"):
        raise ConfigurationError(f"{where}: jitter= must be >= 0 seconds, got {jitter!r}")
    if missed not in _POLICIES:
        raise ConfigurationError(f"{where}: missed= must be one of {_POLICIES}, got {missed!r}")
    if isinstance(max_missed, bool) or not isinstance(max_missed, int) or max_missed < 1:
        raise ConfigurationError(f"{where}: max_missed= must be an int >= 1")
    kwargs = dict(kwargs or {})
    try:
        json.dumps([list(args), kwargs], allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{where}: args and kwargs must be JSON values ({exc})") from None
    if func is not None:
        try:
            inspect.signature(func).bind(*args, **kwargs)
        except TypeError as exc:
            raise ConfigurationError(
                f"{where}: task {task_name!r} cannot be called with args={list(args)!r},"
                f" kwargs={kwargs!r} ({exc}); pass them with schedule(..., args=..., kwargs=...)"
            ) from None
        except ValueError:  # pragma: no cover - a builtin without a signature
            pass
    if until is not None and until.tzinfo is None:
        until = until.replace(tzinfo=UTC)
    return Schedule(
        name=label,
        task=task_name,
        cron=cron,
        every=step,
        tz=zone,
        jitter=float(jitter_seconds),
        enabled=bool(enabled),
        args=tuple(args),
        kwargs=kwargs,
        missed=missed,
        max_missed=max_missed,
        until=until,
    )


def _seconds(value: Any, where: str, what: str) -> timedelta:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{where}: {what}= must be a timedelta or seconds")
    if not value < float("inf"):
        raise ConfigurationError(f"{where}: {what}= must be finite")
    return timedelta(seconds=value)


def _zone(tz: str | tzinfo, where: str) -> tzinfo:
    if isinstance(tz, tzinfo):
        return UTC if getattr(tz, "key", None) == "UTC" else tz
    if tz == "UTC":
        return UTC
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise ConfigurationError(
            f"{where}: unknown time zone {tz!r}; use an IANA name such as 'Europe/Paris'"
            " (install the tzdata package where the system has no time zone database)"
        ) from None


def _resolve_task(task: Callable[..., Any] | str) -> tuple[str, Callable[..., Any] | None]:
    """The task name and its function (None for a name not registered here yet)."""
    from fastworker_fastapi.tasks import BackgroundTask, background_task, registry

    if isinstance(task, str):
        definition = registry.get(task)
        return task, None if definition is None else definition.func
    if isinstance(task, BackgroundTask):
        return task.name, task.definition.func
    if not callable(task):
        raise ConfigurationError(f"schedule() needs a task, a function or a task name: {task!r}")
    name = getattr(task, "__name__", None)
    definition = registry.get(name) if isinstance(name, str) else None
    if definition is not None and definition.func is task:
        return definition.name, task
    handle = background_task(task)  # an existing function: register it as a task
    return handle.name, task


class ScheduleRegistry:
    """Schedules declared in code, by name (`schedule(...)`, `@background_task(cron=...)`).

    Like task definitions, declarations are code and global to the process; every
    extension runs them (its own `fw.schedule(...)` ones too).
    """

    def __init__(self) -> None:
        self._schedules: dict[str, Schedule] = {}

    def add(self, schedule: Schedule) -> Schedule:
        """Add `schedule`; a different one under the same name is refused."""
        existing = self._schedules.get(schedule.name)
        if existing is not None and existing != schedule:
            raise ConfigurationError(
                f"a different schedule named {schedule.name!r} exists already; "
                "give one of them another name: schedule(..., name=...)"
            )
        self._schedules[schedule.name] = schedule
        return schedule

    def remove(self, name: str) -> None:
        """Forget the schedule `name` (if any); running extensions keep theirs."""
        self._schedules.pop(name, None)

    def get(self, name: str) -> Schedule | None:
        """The schedule declared under `name`, if any."""
        return self._schedules.get(name)

    def all(self) -> list[Schedule]:
        """Every declared schedule, in declaration order."""
        return list(self._schedules.values())


schedules = ScheduleRegistry()
"""The process's declared schedules (what `schedule(...)` and the decorator add to)."""


def schedule(task: Callable[..., Any] | str, /, **options: Unpack[ScheduleOptions]) -> Schedule:
    """Declare a periodic schedule for `task` in every app of this process.

    `task` is a `@background_task` handle, a plain function (registered as a task if it is
    not yet) or a registered task name; see `ScheduleOptions` for the options:
    `schedule(cleanup, cron="0 3 * * *", tz="Europe/Paris", missed="run_once")`.
    """
    return schedules.add(make_schedule(task, **options))


def _fastworker_schedules() -> list[Schedule]:
    """Schedules of tasks declared with fastworker's own `@task(repeat_interval=...)` or
    `@task(cron=...)` (standard cron: Sunday is day 0; `repeat_count` is not honoured)."""
    found = []
    for name, info in fastworker_registry.get_periodic_tasks().items():
        config = info.schedule
        try:
            found.append(
                make_schedule(
                    name,
                    cron=config.cron_expression or None,
                    every=None if config.cron_expression else config.repeat_interval,
                    until=config.repeat_until,
                )
            )
        except ConfigurationError as exc:
            logger.error("fastworker task %r: its schedule is ignored: %s", name, exc)
    return found


# -- time -------------------------------------------------------------------------------------


class Clock(Protocol):
    """Where periodic tasks read the time and wait for it; tests inject their own."""

    def now(self) -> datetime:
        """The current time, aware (UTC)."""
        ...

    async def sleep_until(self, when: datetime) -> None:
        """Wait until about `when`; may return earlier (the caller looks at `now()` again)."""
        ...


class SystemClock:
    """The real time; naps at most `max_nap` seconds, so a wall clock step is noticed."""

    def __init__(self, max_nap: float = 30.0) -> None:
        self.max_nap = max_nap

    def now(self) -> datetime:
        """`datetime.now(UTC)`."""
        return datetime.now(UTC)

    async def sleep_until(self, when: datetime) -> None:
        """Sleep until `when`, `max_nap` seconds at most."""
        seconds = (when - self.now()).total_seconds()
        await anyio.sleep(min(max(seconds, 0.0), self.max_nap))


# -- the models the routes answer with --------------------------------------------------------


class ScheduleInfo(BaseModel):
    """One schedule as `GET {prefix}/schedules` shows it."""

    name: str = Field(description="The schedule's name (unique in the app).")
    task: str = Field(description="The task each run submits.")
    cron: str | None = Field(description="The cron expression, if it is a cron schedule.")
    every: float | None = Field(description="Seconds between runs, if it is an interval.")
    tz: str = Field(description="The time zone the cron expression is read in.")
    description: str = Field(description="When it runs, in words.")
    jitter: float = Field(description="Up to this many seconds of delay added to each run.")
    missed: MissedPolicy = Field(description="What start-up does with runs missed while down.")
    enabled: bool = Field(description="False: declared but never run.")
    paused: bool = Field(description="Paused for every process (resume by route).")
    next_run: datetime | None = Field(description="The next due time (none while paused).")
    last_run: datetime | None = Field(description="The latest due time a task was made for.")
    last_task_id: str | None = Field(description="That run's task id.")
    last_status: TaskStatus | None = Field(
        description="That task's status (none once expired from the store)."
    )


class ScheduleList(BaseModel):
    """The answer of `GET {prefix}/schedules`."""

    schedules: list[ScheduleInfo]
    count: int


# -- the runtime -----------------------------------------------------------------------------


class PeriodicTasks:
    """The schedules one extension runs (`fw.periodic`): the declared ones, its own
    (`fw.schedule(...)`) and fastworker's `@task(repeat_interval=...)` ones.

    `clock` is where it reads the time (tests give a controllable one).
    """

    def __init__(self, registry: ScheduleRegistry | None = None, *, clock: Clock | None = None):
        self.registry = registry if registry is not None else schedules
        self.clock: Clock = clock if clock is not None else SystemClock()
        self._own: dict[str, Schedule] = {}
        self._client: TaskClient | None = None
        self._scope: anyio.CancelScope | None = None

    def schedule(
        self, task: Callable[..., Any] | str, /, **options: Unpack[ScheduleOptions]
    ) -> Schedule:
        """Add a schedule to this extension only (see `schedule()` for the options)."""
        made = make_schedule(task, **options)
        existing = self._own.get(made.name) or self.registry.get(made.name)
        if existing is not None and existing != made:
            raise ConfigurationError(
                f"a different schedule named {made.name!r} exists already; "
                "give one of them another name: fw.schedule(..., name=...)"
            )
        self._own[made.name] = made
        return made

    def all(self) -> list[Schedule]:
        """Every schedule this extension runs, by name (its own win over declared ones)."""
        found = {s.name: s for s in _fastworker_schedules()}
        found.update((s.name, s) for s in self.registry.all())
        found.update(self._own)
        return list(found.values())

    def get(self, name: str) -> Schedule:
        """The schedule `name`, or `ScheduleNotFoundError`."""
        for item in self.all():
            if item.name == name:
                return item
        raise ScheduleNotFoundError(f"no schedule named {name!r} in this app")

    # -- life cycle ----------------------------------------------------------------------------

    async def start(self, client: TaskClient, task_group: TaskGroup) -> None:
        """Check every schedule's task exists, then run the enabled ones in `task_group`."""
        self._client = client
        active = []
        for item in self.all():
            if client.scheduler.executor.resolve(item.task) is None:
                raise ConfigurationError(
                    f"schedule {item.name!r} runs task {item.task!r}, which is not registered;"
                    " register it with @background_task in a module the app imports"
                )
            if item.enabled:
                active.append(item)
        if active:
            self._scope = anyio.CancelScope()
            task_group.start_soon(self._run, active, self._scope)
            logger.info("periodic tasks: %s", ", ".join(s.name for s in active))

    def stop(self) -> None:
        """Stop creating runs (runs already created go on as ordinary tasks)."""
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None

    @property
    def client(self) -> TaskClient:
        """The running extension's client (`NotRunningError` before start-up)."""
        if self._client is None:
            raise NotRunningError("the FastWorker extension has not started yet")
        return self._client

    async def _run(self, active: list[Schedule], scope: anyio.CancelScope) -> None:
        clock, store = self.clock, self.client.store
        with scope:
            now = clock.now()
            try:
                await self._catch_up(active, now)
            except Exception:
                logger.exception("periodic tasks: catching up missed runs failed")
            upcoming = {s.name: (s, s.next_after(now)) for s in active}
            while True:
                pending = {k: v for k, v in upcoming.items() if v[1] is not None}
                if not pending:
                    return
                soonest = min(due for _, due in pending.values() if due is not None)
                now = clock.now()
                if now < soonest:
                    await clock.sleep_until(soonest)
                    continue
                try:
                    states = await store.schedule_states()
                except Exception:
                    logger.exception("periodic tasks: reading schedule state failed; retrying")
                    await clock.sleep_until(now + timedelta(seconds=1))
                    continue
                for name, (item, due) in pending.items():
                    if due is not None and due <= now:
                        # After a stall (a blocked loop, a suspended host) the latest due
                        # time is the one made; the ones in between are skipped.
                        latest = item.due_times(due - _US, now, 1) or [due]
                        await self._fire(item, latest[-1], states.get(name))
                        upcoming[name] = (item, item.next_after(now))

    async def _catch_up(self, active: list[Schedule], now: datetime) -> None:
        """Apply each schedule's `missed` policy to the due times no process ran."""
        states = await self.client.store.schedule_states()
        for item in active:
            state = states.get(item.name)
            if state is None or state.last_due is None or state.paused:
                continue  # never ran: nothing is owed
            since = state.last_due
            if state.resumed_at is not None and state.resumed_at > since:
                since = state.resumed_at  # runs missed while paused are not owed
            if item.missed == "skip":
                if item.due_times(since, now, 1):
                    logger.info(
                        "schedule %r: runs due since %s were missed and are skipped"
                        " (missed='skip')",
                        item.name,
                        since.isoformat(),
                    )
                continue
            limit = 1 if item.missed == "run_once" else item.max_missed
            for due in item.due_times(since, now, limit):
                await self._fire(item, due, state)

    async def _fire(self, item: Schedule, due: datetime, state: ScheduleState | None) -> bool:
        """Create the run of `item` due at `due` unless paused or made already; True when
        this process created it."""
        if state is not None and (
            state.paused or (state.last_due is not None and due <= state.last_due)
        ):
            return False
        client = self.client
        task_id = schedule_task_id(item.name, due)
        jitter = item.jitter_for(task_id)
        try:
            record, definition, delay = client._prepare(
                item.task, item.args, item.kwargs, None, None, jitter if jitter > 0 else None
            )
            record.id = task_id  # still being built: nobody else holds it yet
            created = await client.scheduler.submit_unique(record, definition, delay)
            await client.store.update_schedule(item.name, last_due=due)
        except Exception:
            logger.exception(
                "schedule %r: could not create the run due at %s", item.name, due.isoformat()
            )
            return False
        if created:
            logger.info(
                "schedule %r: created task %s [%s] due at %s",
                item.name,
                item.task,
                task_id,
                due.isoformat(),
            )
        return created

    # -- what the routes do --------------------------------------------------------------------

    async def infos(self) -> list[ScheduleInfo]:
        """Every schedule with its next and last run, as the routes show them."""
        states = await self.client.store.schedule_states()
        now = self.clock.now()
        return [await self._info(item, states.get(item.name), now) for item in self.all()]

    async def pause(self, name: str) -> ScheduleInfo:
        """Pause `name` in every process sharing the store (`ScheduleNotFoundError`)."""
        item = self.get(name)
        state = await self.client.store.update_schedule(name, paused=True)
        return await self._info(item, state, self.clock.now())

    async def resume(self, name: str) -> ScheduleInfo:
        """Resume `name` in every process; runs missed while paused are not caught up."""
        item = self.get(name)
        now = self.clock.now()
        state = await self.client.store.update_schedule(name, paused=False, resumed_at=now)
        return await self._info(item, state, now)

    async def _info(
        self, item: Schedule, state: ScheduleState | None, now: datetime
    ) -> ScheduleInfo:
        paused = state is not None and state.paused
        last_run = None if state is None else state.last_due
        last_id = last_status = None
        if last_run is not None:
            last_id = schedule_task_id(item.name, last_run)
            record = await self.client.store.get(last_id)
            last_status = None if record is None else record.status
        return ScheduleInfo(
            name=item.name,
            task=item.task,
            cron=item.cron,
            every=None if item.every is None else item.every.total_seconds(),
            tz=item.tz_name,
            description=item.description,
            jitter=item.jitter,
            missed=item.missed,
            enabled=item.enabled,
            paused=paused,
            next_run=item.next_after(now) if item.enabled and not paused else None,
            last_run=last_run,
            last_task_id=last_id,
            last_status=last_status,
        )


def add_schedule_routes(
    router: APIRouter,
    started: Callable[[], Awaitable[TaskClient]],
    periodic: PeriodicTasks,
    errors: Mapping[int | str, dict[str, Any]],
) -> None:
    """`GET {prefix}/schedules` and `POST {prefix}/schedules/{name}/pause|resume`."""
    dependencies = [Depends(started)]  # 503 before start-up, like every status route
    not_found: dict[int | str, dict[str, Any]] = {
        404: {**errors.get(404, {}), "description": "No schedule of that name."},
        503: errors.get(503, {}),
    }

    @router.get(
        "/schedules",
        response_model=ScheduleList,
        summary="List periodic schedules",
        responses={503: not_found[503]},
        dependencies=dependencies,
    )
    async def list_schedules() -> ScheduleList:
        """Every schedule with its next run, its last run and that run's status."""
        found = await periodic.infos()
        return ScheduleList(schedules=found, count=len(found))

    @router.post(
        "/schedules/{name}/pause",
        response_model=ScheduleInfo,
        summary="Pause a schedule",
        responses=not_found,
        dependencies=dependencies,
    )
    async def pause_schedule(
        name: Annotated[str, Path(description="The schedule's name.")],
    ) -> ScheduleInfo:
        """No new runs in any process until resumed (runs already made go on)."""
        return await periodic.pause(name)

    @router.post(
        "/schedules/{name}/resume",
        response_model=ScheduleInfo,
        summary="Resume a schedule",
        responses=not_found,
        dependencies=dependencies,
    )
    async def resume_schedule(
        name: Annotated[str, Path(description="The schedule's name.")],
    ) -> ScheduleInfo:
        """Runs start again at the next due time (those missed while paused are skipped)."""
        return await periodic.resume(name)
