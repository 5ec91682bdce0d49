"""`MemoryStore`: one process, nothing kept across restarts; for tests and peak speed.

Records live in a dict, newest last. The store owns its record objects and is the only code
that changes them (`update` applies the changes in place: a submission creates one object and
nothing copies it, which keeps the in-process hot path at a few microseconds). Finished ids
sit in a deque, oldest first, so retention by count (`max_results`) and by age (`result_ttl`,
counted from a task's `completed_at`, on the wall clock as in the durable stores) is a pop
from the left. Age is enforced by one loop timer, due when the oldest finished task expires:
finishing a task and reading one take no clock reading for retention (on the in-process hot
path, two clock readings cost as much as a tenth of a task).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from fastworker.tasks.models import TaskStatus

from fastworker_fastapi.errors import TaskAlreadyFinishedError, TaskNotFoundError
from fastworker_fastapi.records import FINAL_STATUSES, FINAL_VALUES, TaskRecord, utcnow
from fastworker_fastapi.stores.base import ScheduleState, cancelled_changes

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from fastworker_fastapi.events import EventHub

__all__ = ["MemoryStore"]


class MemoryStore:
    """Tasks in this process's memory: fast, private to one process, lost on exit."""

    durable = False
    description = "memory"

    def __init__(self) -> None:
        self.owner = uuid.uuid4().hex
        self.result_ttl = 3600.0
        self.max_results = 10_000
        self._hub: EventHub | _NotOpen = _NOT_OPEN
        self._records: dict[str, TaskRecord] = {}
        self.peek: Callable[[str], TaskRecord | None] = self._records.get
        """The record of a task, or None; a C call, no Python frame (`wait()` makes one per
        task). Expired records are gone already: the expiry timer drops them."""
        self._finished: deque[str] = deque()  # finished ids, oldest first
        self._finished_now: dict[str, datetime] = {}  # finish times of finals without one
        self._kept: set[str] = set()  # due to expire, kept until their callback is delivered
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._schedules: dict[str, ScheduleState] = {}

    def __len__(self) -> int:
        return len(self._records)

    async def open(
        self, hub: EventHub, task_group: TaskGroup, *, result_ttl: float, max_results: int
    ) -> None:
        self._hub = hub
        self.result_ttl = result_ttl
        self.max_results = max_results
        self._loop = asyncio.get_running_loop()
        self._arm()

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop = None

    # -- writes ------------------------------------------------------------------------------

    async def insert(self, records: Sequence[TaskRecord]) -> None:
        self.add(records)

    def add(self, records: Sequence[TaskRecord]) -> None:
        """`insert` without awaiting: this store never waits for anything."""
        if len(records) == 1:
            self.add_one(records[0])
            return
        store = self._records
        for record in records:
            if record.id in store:
                raise ValueError(f"a task with id {record.id!r} exists already")
        if len({record.id for record in records}) < len(records):
            raise ValueError("a batch names the same task id twice: it exists already")
        for record in records:
            self.add_one(record)

    def add_one(self, record: TaskRecord) -> None:
        """`add((record,))`, without the tuple: the scheduler's submission hot path."""
        if self._records.setdefault(record.id, record) is not record:  # one lookup, not two
            raise ValueError(f"a task with id {record.id!r} exists already")
        if record.status._value_ in FINAL_VALUES:
            self._finish(record)
        elif not self._hub.watched:
            return  # nobody follows non-final changes (see EventHub.watched)
        self._hub.publish(record)

    async def insert_if_absent(self, record: TaskRecord) -> bool:
        if record.id in self._records:
            return False
        self.add((record,))
        return True

    async def update(
        self, task_id: str, expect_owner: str | None, expect_attempts: int, **changes: Any
    ) -> TaskRecord | None:
        return self.apply(task_id, expect_owner, expect_attempts, **changes)

    def apply(
        self, task_id: str, expect_owner: str | None, expect_attempts: int, **changes: Any
    ) -> TaskRecord | None:
        """`update` without awaiting: the scheduler's hot path calls it directly."""
        record = self._records.get(task_id)
        if record is None or record.attempts != expect_attempts or record.owner != expect_owner:
            return None
        before = record.status
        for key, value in changes.items():
            setattr(record, key, value)
        status = record.status
        if (
            status is not before
            and status._value_ in FINAL_VALUES
            and before._value_ not in FINAL_VALUES
        ):
            self._finish(record)
        elif self._kept and task_id in self._kept and not record.delivery.open:  # type: ignore[union-attr]
            self._kept.discard(task_id)
            self._finish(record)
        self._hub.publish(record)
        return record

    # The two writes every task makes, without building keyword arguments: the in-process
    # hot path (`apply` with the same changes costs four times as much).

    def mark_running(
        self, task_id: str, expect_owner: str | None, expect_attempts: int, started_at: datetime
    ) -> TaskRecord | None:
        """`apply(status=RUNNING, started_at=..., attempts=expect_attempts + 1)`."""
        record = self._records.get(task_id)
        if record is None or record.attempts != expect_attempts or record.owner != expect_owner:
            return None
        record.status = _RUNNING
        record.started_at = started_at
        record.attempts = expect_attempts + 1
        if self._hub.watched:
            self._hub.publish(record)
        return record

    def mark_succeeded(
        self,
        task_id: str,
        expect_owner: str | None,
        expect_attempts: int,
        result: Any,
        completed_at: datetime,
    ) -> TaskRecord | None:
        """`apply(status=SUCCESS, result=..., completed_at=...)` of a running task."""
        record = self._records.get(task_id)
        if (
            record is None
            or record.attempts != expect_attempts
            or record.owner != expect_owner
            or record.status is not _RUNNING
        ):
            return None
        record.status = _SUCCESS
        record.result = result
        record.completed_at = completed_at
        finished = self._finished  # `_finish`, inline: once per task
        finished.append(task_id)
        if len(finished) > self.max_results:
            self._expire(by_age=False)
        if self._timer is None:
            self._arm()
        hub = self._hub  # publish only if it reaches someone (see EventHub.finals_wanted)
        if hub.finals_wanted or record.callback is not None or task_id in hub.waiters:
            hub.publish_final(record)
        return record

    def _finish(self, record: TaskRecord) -> None:
        """Queue a finished task for expiry; keep the count bound."""
        if record.completed_at is None:  # (a final record inserted without a finish time)
            self._finished_now[record.id] = utcnow()
        self._finished.append(record.id)
        if len(self._finished) > self.max_results:
            self._expire(by_age=False)
        if self._timer is None:
            self._arm()

    async def request_cancel(self, task_id: str) -> TaskRecord:
        record = self.peek(task_id)
        if record is None:
            raise TaskNotFoundError(f"no task with id {task_id!r} (unknown or expired)")
        if record.status in FINAL_STATUSES:
            raise TaskAlreadyFinishedError(
                f"task {task_id} already finished with status {record.status.value!r}"
            )
        if record.owner is None:
            updated = await self.update(task_id, None, record.attempts, **cancelled_changes(record))
        else:
            updated = await self.update(
                task_id, record.owner, record.attempts, cancel_requested=True
            )
        assert updated is not None  # nothing awaits in between: the compare cannot fail
        return updated

    # -- reads -------------------------------------------------------------------------------

    async def get(self, task_id: str) -> TaskRecord | None:
        return self._records.get(task_id)

    async def recent(
        self, *, limit: int, status: TaskStatus | None = None, name: str | None = None
    ) -> list[TaskRecord]:
        self._expire()
        out: list[TaskRecord] = []
        for record in reversed(self._records.values()):
            if status is not None and record.status is not status:
                continue
            if name is not None and record.name != name:
                continue
            out.append(record)
            if len(out) >= limit:
                break
        return out

    # -- maintenance -------------------------------------------------------------------------

    async def heartbeat(self) -> None:
        return None  # one process: its lease never lapses

    async def recover(self, can_run: Callable[[str], bool], limit: int) -> list[TaskRecord]:
        return []  # nobody else could have left work here

    async def expire(self) -> int:
        return self._expire()

    def _expire(self, *, by_age: bool = True) -> int:
        """Drop the oldest finished tasks beyond `max_results` and, `by_age`, those past
        `result_ttl` (a finish at the count bound drops one, and leaves age to the timer)."""
        finished, records = self._finished, self._records
        deadline = utcnow() - self._ttl() if by_age else None
        dropped = 0
        while finished and (
            len(finished) > self.max_results
            or (deadline is not None and self._finished_time(finished[0]) <= deadline)
        ):
            task_id = finished.popleft()
            self._finished_now.pop(task_id, None)
            record = records.get(task_id)
            if record is not None and record.delivery is not None and record.delivery.open:
                self._kept.add(task_id)  # its callback is still to go: expire it after
                continue
            if records.pop(task_id, None) is not None:
                dropped += 1
        return dropped

    def _finished_time(self, task_id: str) -> datetime:
        record = self._records.get(task_id)
        when = self._finished_now.get(task_id) or (record and record.completed_at)
        return when or _LONG_AGO  # (a record gone already: drop its id)

    def _ttl(self) -> timedelta:
        return timedelta(seconds=min(self.result_ttl, _TTL_CAP))

    def _arm(self) -> None:
        """Set the expiry timer for the oldest finished task (none while one is set).

        It fires no sooner than `_slack()` from now, so results expiring one after another
        (many tasks a second, a short `result_ttl`) are dropped in batches rather than by a
        timer each: a result may outlive its `result_ttl` by up to a second.
        """
        if self._timer is not None or self._loop is None or not self._finished:
            return
        due = self._finished_time(self._finished[0]) + self._ttl()
        delay = max(self._slack(), (due - utcnow()).total_seconds())
        self._timer = self._loop.call_later(delay, self._on_timer)

    def _slack(self) -> float:
        return min(1.0, self.result_ttl / 10)

    def _on_timer(self) -> None:
        self._timer = None
        self._expire()
        self._arm()

    # -- schedules ---------------------------------------------------------------------------

    async def schedule_states(self) -> dict[str, ScheduleState]:
        return dict(self._schedules)

    async def update_schedule(
        self,
        name: str,
        *,
        paused: bool | None = None,
        last_due: datetime | None = None,
        resumed_at: datetime | None = None,
    ) -> ScheduleState:
        state = self._schedules.get(name) or ScheduleState(name)
        if paused is not None:
            state = replace(state, paused=paused)
        if resumed_at is not None:
            state = replace(state, resumed_at=resumed_at)
        if last_due is not None and (state.last_due is None or last_due > state.last_due):
            state = replace(state, last_due=last_due)
        self._schedules[name] = state
        return state


_RUNNING, _SUCCESS = TaskStatus.RUNNING, TaskStatus.SUCCESS
_LONG_AGO = datetime.min.replace(tzinfo=utcnow().tzinfo)
_TTL_CAP = 1000 * 365 * 86400.0  # "never", within what datetime arithmetic can hold


class _NotOpen:
    """The hub's place before `open()`: watched, so every write publishes, and fails."""

    watched = True
    finals_wanted = True
    waiters: Mapping[str, Any] = MappingProxyType({})

    def publish(self, record: TaskRecord) -> None:
        raise RuntimeError("the store is not open")

    publish_final = publish


_NOT_OPEN = _NotOpen()
