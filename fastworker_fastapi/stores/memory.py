"""`MemoryStore`: one process, nothing kept across restarts; for tests and peak speed.

Records live in a dict, newest last. The store owns its record objects and is the only code
that changes them (`update` applies the changes in place: a submission creates one object and
nothing copies it, which keeps the in-process hot path at a few microseconds). Finished ids
and their monotonic finish times sit in two deques, oldest first, so retention by age
(`result_ttl`) and by count (`max_results`) is a pop from the left.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from fastworker.tasks.models import TaskStatus

from fastworker_fastapi.errors import TaskAlreadyFinishedError, TaskNotFoundError
from fastworker_fastapi.records import FINAL_STATUSES, FINAL_VALUES, TaskRecord
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
        self._publish: Callable[[TaskRecord], None] = _not_open
        self._publish_final: Callable[[TaskRecord], None] = _not_open
        self._hub: EventHub | _NotOpen = _NOT_OPEN
        self._records: dict[str, TaskRecord] = {}
        # Two deques rather than one of tuples: no object per task for the GC to walk.
        self._finished: deque[str] = deque()
        self._finished_at: deque[float] = deque()
        self._kept: set[str] = set()  # due to expire, kept until their callback is delivered
        self._schedules: dict[str, ScheduleState] = {}

    def __len__(self) -> int:
        return len(self._records)

    async def open(
        self, hub: EventHub, task_group: TaskGroup, *, result_ttl: float, max_results: int
    ) -> None:
        self._publish = hub.publish
        self._publish_final = hub.publish_final
        self._hub = hub
        self.result_ttl = result_ttl
        self.max_results = max_results

    async def close(self) -> None:
        return None

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
        self._publish(record)

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
        self._publish(record)
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
            self._publish(record)
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
        now = time.monotonic()  # `_finish`, inline: once per task
        finished_at = self._finished_at
        self._finished.append(task_id)
        finished_at.append(now)
        if len(finished_at) > self.max_results or finished_at[0] <= now - self.result_ttl:
            self._expire()
        self._publish_final(record)
        return record

    def _finish(self, record: TaskRecord) -> None:
        """Start a finished task's expiry clock; keep the count bound."""
        now = time.monotonic()
        finished_at = self._finished_at
        self._finished.append(record.id)
        finished_at.append(now)
        if len(finished_at) > self.max_results or finished_at[0] <= now - self.result_ttl:
            self._expire()

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
        return self.peek(task_id)

    def peek(self, task_id: str) -> TaskRecord | None:
        finished_at = self._finished_at
        if finished_at and finished_at[0] <= time.monotonic() - self.result_ttl:
            self._expire()  # (the count bound is kept by _finish)
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

    def _expire(self) -> int:
        finished, finished_at = self._finished, self._finished_at
        deadline = time.monotonic() - self.result_ttl
        records = self._records
        dropped = 0
        while finished_at and (len(finished_at) > self.max_results or finished_at[0] <= deadline):
            finished_at.popleft()
            task_id = finished.popleft()
            record = records.get(task_id)
            if record is not None and record.delivery is not None and record.delivery.open:
                self._kept.add(task_id)  # its callback is still to go: expire it after
                continue
            if records.pop(task_id, None) is not None:
                dropped += 1
        return dropped

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


def _not_open(record: TaskRecord) -> None:
    raise RuntimeError("the store is not open")


class _NotOpen:
    """The hub's place before `open()`: watched, so every write publishes, and fails."""

    watched = True


_NOT_OPEN = _NotOpen()
