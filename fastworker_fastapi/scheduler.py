"""One scheduler for both modes: queues, eta, retries, timeouts, cancellation, flow control.

```
submit ──► eta heap (SCHEDULED / RETRYING) ──timer──┐
   │                                                 ▼
   └──────────────► 4 FIFO queues (critical > high > normal > low) ──► N worker loops
                                                                          │ executor.run()
                      RETRYING ◄── failure with retries left ◄────────────┤
                                                                          ▼
                                          SUCCESS / FAILURE / CANCELLED ──► store
```

`N` is the executor's concurrency, so flow control is simply the number of worker loops;
each loop takes the oldest task of the highest non-empty priority. A worker that finds the
queues empty parks on its own event and is woken by the next submission, so an idle
scheduler costs nothing and a submission costs a deque append.

The worker loops and the timer live in the extension's task group: nothing is fire-and-forget.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import logging
import math
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import anyio
from fastworker.tasks.models import TaskPriority, TaskStatus

from fastworker_fastapi import _context
from fastworker_fastapi.errors import (
    NotRunningError,
    QueueFullError,
    ShuttingDownError,
    TaskAlreadyFinishedError,
    TaskFailed,
    TaskNotFoundError,
)
from fastworker_fastapi.store import FINAL_STATUSES, TaskRecord, TaskStore, utcnow

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from fastworker_fastapi.client import TaskClient
    from fastworker_fastapi.workers.base import Executor

__all__ = ["Scheduler"]

logger = logging.getLogger("fastworker_fastapi")

_LEVELS = {
    TaskPriority.CRITICAL: 0,
    TaskPriority.HIGH: 1,
    TaskPriority.NORMAL: 2,
    TaskPriority.LOW: 3,
}


class Scheduler:
    """Decides what runs when; the executor only runs what it is given."""

    def __init__(
        self,
        executor: Executor,
        store: TaskStore,
        client: TaskClient,
        *,
        max_pending: int,
    ) -> None:
        self.executor = executor
        self.store = store
        self._client = client
        self.max_pending = max_pending
        self._queues: tuple[deque[TaskRecord], ...] = tuple(deque() for _ in _LEVELS)
        self._heap: list[tuple[float, int, TaskRecord]] = []
        self._seq = itertools.count()
        self._idle: deque[anyio.Event] = deque()
        self._timer_wake = anyio.Event()
        self._running: set[TaskRecord] = set()
        self._live = 0
        self._active_workers = 0
        self._workers_done = anyio.Event()
        self._started = False
        self._closing = False
        self.accepting = False

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, task_group: TaskGroup) -> None:
        for _ in range(self.executor.concurrency):
            self._active_workers += 1
            task_group.start_soon(self._worker)
        task_group.start_soon(self._timer)
        self._started = True
        self.accepting = True

    async def shutdown(self, timeout: float) -> None:
        """Refuse new tasks, let running and queued ones finish within `timeout`, cancel rest.

        Tasks waiting for their eta or for a retry are cancelled at once: their time has
        not come, and waiting for it would hold the shutdown hostage.
        """
        self.accepting = False
        self._closing = True
        for _, _, record in list(self._heap):
            if record.status not in FINAL_STATUSES:
                self._cancel_record(
                    record, "ShutdownCancelled", "the app shut down before its scheduled time"
                )
        self._heap.clear()
        self._timer_wake.set()
        self._wake_all()
        if not self._started:
            return
        with anyio.move_on_after(timeout):
            await self._workers_done.wait()
        if self._workers_done.is_set():
            return
        why = f"shutdown_timeout ({timeout:g}s) elapsed"
        for queue in self._queues:
            for record in list(queue):
                self._cancel_record(record, "ShutdownCancelled", f"{why} before it ran")
            queue.clear()
        for record in list(self._running):
            self._cancel_record(record, "ShutdownCancelled", f"{why} before it finished")
        with anyio.move_on_after(5):
            await self._workers_done.wait()
        if not self._workers_done.is_set():  # pragma: no cover - a task that ignores cancel
            logger.warning("some tasks ignored cancellation at shutdown; abandoning them")

    # -- submission -----------------------------------------------------------------------

    def check_capacity(self, count: int = 1) -> None:
        """Raise unless `count` more tasks can be accepted now."""
        if not self.accepting:
            if self._closing:
                raise ShuttingDownError("the app is shutting down; no new tasks are accepted")
            raise NotRunningError("the FastWorker extension is not running yet")
        if self._live + count > self.max_pending:
            raise QueueFullError(
                f"{self._live} tasks are already pending (max_pending={self.max_pending}); "
                "try again later"
            )

    def submit(self, record: TaskRecord, delay: float) -> None:
        """Accept a validated record; `delay` seconds before it may run (<= 0: now)."""
        self._live += 1
        if delay > 0:
            record.status = TaskStatus.SCHEDULED
            self.store.add(record)
            self._push_timer(record, delay)
        else:
            record.status = TaskStatus.QUEUED
            self.store.add(record)
            self._enqueue(record)

    def cancel(self, task_id: str) -> TaskRecord:
        """Cancel a task that has not finished; raises for unknown and finished ones."""
        record = self.store.get(task_id)
        if record is None:
            raise TaskNotFoundError(f"no task with id {task_id!r} (unknown or expired)")
        if record.status in FINAL_STATUSES:
            raise TaskAlreadyFinishedError(
                f"task {task_id} already finished with status {record.status.value!r}"
            )
        self._cancel_record(record, "TaskCancelled", "cancelled by request")
        return record

    @property
    def pending(self) -> int:
        """Tasks accepted and not final yet."""
        return self._live

    # -- internals ------------------------------------------------------------------------

    def _enqueue(self, record: TaskRecord) -> None:
        self._queues[_LEVELS[record.priority]].append(record)
        if self._idle:
            self._idle.popleft().set()

    def _wake_all(self) -> None:
        while self._idle:
            self._idle.popleft().set()

    def _push_timer(self, record: TaskRecord, delay: float) -> None:
        due = time.monotonic() + delay
        heapq.heappush(self._heap, (due, next(self._seq), record))
        if self._heap[0][2] is record:
            self._timer_wake.set()

    def _pop(self) -> TaskRecord | None:
        for queue in self._queues:
            if queue:
                return queue.popleft()
        return None

    def _cancel_record(self, record: TaskRecord, error_type: str, message: str) -> None:
        """Finalize as CANCELLED and take the record out of wherever it waits or runs."""
        if record.status in FINAL_STATUSES:
            return
        queue = self._queues[_LEVELS[record.priority]]
        with contextlib.suppress(ValueError):
            queue.remove(record)
        for index, entry in enumerate(self._heap):
            if entry[2] is record:
                self._heap[index] = self._heap[-1]
                self._heap.pop()
                heapq.heapify(self._heap)
                break
        scope = record.cancel_scope
        self._finalize(
            record, TaskStatus.CANCELLED, error_type=error_type, error=f"{error_type}: {message}"
        )
        if scope is not None:
            scope.cancel()

    def _finalize(
        self,
        record: TaskRecord,
        status: TaskStatus,
        *,
        result: Any = None,
        error_type: str | None = None,
        error: str | None = None,
    ) -> None:
        record.status = status
        record.result = result
        record.error = error
        record.error_type = error_type
        record.completed_at = utcnow()
        self._live -= 1
        self.store.finished(record)

    async def _timer(self) -> None:
        heap = self._heap
        while not self._closing:
            self._timer_wake = anyio.Event()
            if not heap:
                await self._timer_wake.wait()
                continue
            wait = heap[0][0] - time.monotonic()
            if wait > 0:
                with anyio.move_on_after(wait):
                    await self._timer_wake.wait()
                continue
            _, _, record = heapq.heappop(heap)
            if record.status is TaskStatus.SCHEDULED:
                record.status = TaskStatus.QUEUED
                self.store.changed(record)
                self._enqueue(record)
            elif record.status is TaskStatus.RETRYING:
                self._enqueue(record)

    async def _worker(self) -> None:
        _context.current_client.set(self._client)
        try:
            while True:
                record = self._pop()
                if record is None:
                    if self._closing:
                        return
                    event = anyio.Event()
                    self._idle.append(event)
                    await event.wait()
                    continue
                await self._run(record)
        finally:
            self._active_workers -= 1
            if self._active_workers == 0:
                self._workers_done.set()

    async def _run(self, record: TaskRecord) -> None:
        record.status = TaskStatus.RUNNING
        record.started_at = utcnow()
        record.attempts += 1
        self._running.add(record)
        self.store.changed(record)
        timeout = record.policy.timeout
        timed_out = False
        failure: BaseException | None = None
        value: Any = None
        token = _context.current_record.set(record)
        try:
            with anyio.CancelScope() as scope:
                record.cancel_scope = scope
                try:
                    if timeout is None:
                        value = await self.executor.run(record)
                    else:
                        with anyio.move_on_after(timeout) as deadline:
                            value = await self.executor.run(record)
                        timed_out = deadline.cancelled_caught
                except BaseException as exc:
                    if isinstance(exc, anyio.get_cancelled_exc_class()):
                        raise
                    failure = exc  # SystemExit from a task must not stop a worker either
        finally:
            _context.current_record.reset(token)
            record.cancel_scope = None
            self._running.discard(record)
        if record.status is not TaskStatus.RUNNING:
            return  # cancelled while running: already final, a late outcome is discarded
        if timed_out:
            self._failed(
                record, "TaskTimeout", f"the task exceeded its timeout of {timeout:g}s", None
            )
        elif failure is not None:
            if isinstance(failure, TaskFailed):
                self._failed(record, failure.error_type, failure.message, None)
            else:
                self._failed(record, type(failure).__name__, str(failure), failure)
        else:
            try:
                value = _json_value(value)
            except (TypeError, ValueError) as exc:
                self._failed(
                    record,
                    "TypeError",
                    f"the task's return value is not JSON-serialisable: {exc}",
                    None,
                    retry=False,
                )
                return
            self._finalize(record, TaskStatus.SUCCESS, result=value)

    def _failed(
        self,
        record: TaskRecord,
        error_type: str,
        message: str,
        exc: BaseException | None,
        *,
        retry: bool = True,
    ) -> None:
        error = f"{error_type}: {message}" if message else error_type
        policy = record.policy
        will_retry = retry and record.attempts <= policy.max_retries and self.accepting
        logger.error(
            "task %s [%s] attempt %d failed: %s%s",
            record.name,
            record.id,
            record.attempts,
            error,
            " (will retry)" if will_retry else "",
            exc_info=(type(exc), exc, exc.__traceback__) if exc is not None else None,
        )
        if not will_retry:
            self._finalize(record, TaskStatus.FAILURE, error_type=error_type, error=error)
            return
        record.status = TaskStatus.RETRYING
        record.error = error
        record.error_type = error_type
        self.store.changed(record)
        self._push_timer(record, policy.retry_delay_for(record.attempts))


def _json_value(value: Any) -> Any:
    """The value as it would arrive through JSON: the same in both modes."""
    if value is None or type(value) in (str, int, bool):
        return value
    if type(value) is float and math.isfinite(value):
        return value
    return json.loads(json.dumps(value, allow_nan=False))
