"""One scheduler for both modes: queues, eta, retries, timeouts, cancellation, flow control.

```
submit ──► timer (SCHEDULED / RETRYING: loop.call_at) ──┐
   │                                                    ▼
   └──────────────► 4 FIFO queues (critical > high > normal > low) ──► N worker loops
                                                                          │ executor.run()
                      RETRYING ◄── failure with retries left ◄────────────┤
                                                                          ▼
                                          SUCCESS / FAILURE / CANCELLED ──► store
```

`N` is the executor's concurrency, so flow control is simply the number of worker loops;
each loop takes the oldest task of the highest non-empty priority. A worker that finds the
queues empty parks on a future and is woken by the next submission, so an idle scheduler
costs nothing and a submission costs a deque append.

The worker loops live in the extension's task group: nothing is fire-and-forget. The hot
path uses asyncio's own primitives (futures, `call_at`, `Task.cancel`/`uncancel`, which cost
a fraction of anyio's cancel scopes): a task is one deque append, one loop iteration and a
few attribute writes. FastAPI and Starlette run on asyncio, which `start()` checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections import deque
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
from fastworker.tasks.models import TaskStatus

from fastworker_fastapi import _context
from fastworker_fastapi.errors import (
    ConfigurationError,
    NotRunningError,
    QueueFullError,
    ShuttingDownError,
    TaskAlreadyFinishedError,
    TaskFailed,
    TaskNotFoundError,
)
from fastworker_fastapi.store import FINAL_STATUSES, PRIORITY_LEVELS, TaskRecord, TaskStore

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from fastworker_fastapi.client import TaskClient
    from fastworker_fastapi.workers.base import Executor

__all__ = ["Scheduler"]

logger = logging.getLogger("fastworker_fastapi")

_now = datetime.now  # `_now(UTC)`: one call less than store.utcnow on the hot path

_LEVELS = PRIORITY_LEVELS


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
        self._timers: dict[TaskRecord, asyncio.TimerHandle] = {}
        self._idle: deque[asyncio.Future[None]] = deque()
        self._running: dict[TaskRecord, asyncio.Task[Any]] = {}
        self._cancel_requested: set[TaskRecord] = set()
        self._live = 0
        self._active_workers = 0
        self._workers_done: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self.accepting = False

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, task_group: TaskGroup) -> None:
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            raise ConfigurationError(
                "FastWorker's scheduler needs the asyncio event loop (FastAPI's and "
                "uvicorn's default); trio is not supported"
            ) from None
        self._workers_done = asyncio.Event()
        for _ in range(self.executor.concurrency):
            self._active_workers += 1
            task_group.start_soon(self._worker)
        self.accepting = True

    async def shutdown(self, timeout: float) -> None:
        """Refuse new tasks, let running and queued ones finish within `timeout`, cancel rest.

        Tasks waiting for their eta or for a retry are cancelled at once: their time has
        not come, and waiting for it would hold the shutdown hostage.
        """
        self.accepting = False
        self._closing = True
        for record in list(self._timers):
            self._cancel_record(
                record, "ShutdownCancelled", "the app shut down before its scheduled time"
            )
        self._wake_all()
        done = self._workers_done
        if done is None:
            return
        with anyio.move_on_after(timeout):
            await done.wait()
        if done.is_set():
            return
        why = f"shutdown_timeout ({timeout:g}s) elapsed"
        for queue in self._queues:
            for record in list(queue):
                self._cancel_record(record, "ShutdownCancelled", f"{why} before it ran")
        for record in list(self._running):
            self._cancel_record(record, "ShutdownCancelled", f"{why} before it finished")
        with anyio.move_on_after(5):
            await done.wait()
        if not done.is_set():  # pragma: no cover - a task that ignores cancellation
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
        """Accept a validated record, `delay` seconds before it may run (<= 0: now); raises
        as `check_capacity` does when it cannot be accepted now."""
        if not self.accepting or self._live >= self.max_pending:
            self.check_capacity()
        self._accept(record, delay)

    def submit_many(self, prepared: Sequence[tuple[TaskRecord, float]]) -> None:
        """Accept all of them, or (raising) none."""
        self.check_capacity(len(prepared))
        for record, delay in prepared:
            self._accept(record, delay)

    def _accept(self, record: TaskRecord, delay: float) -> None:
        self._live += 1
        if delay > 0:
            record.status = TaskStatus.SCHEDULED
            self.store.add(record)
            self._call_later(record, delay)
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

    # -- internals ------------------------------------------------------------------------

    def _enqueue(self, record: TaskRecord) -> None:
        self._queues[_LEVELS[record.priority]].append(record)
        idle = self._idle
        while idle:
            waiter = idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _wake_all(self) -> None:
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _call_later(self, record: TaskRecord, delay: float) -> None:
        assert self._loop is not None
        self._timers[record] = self._loop.call_later(delay, self._due, record)

    def _due(self, record: TaskRecord) -> None:
        """A scheduled task's eta, or a retry's delay, has come."""
        del self._timers[record]
        if record.status is TaskStatus.SCHEDULED:
            record.status = TaskStatus.QUEUED
            self.store.changed(record)
        self._enqueue(record)

    def _cancel_record(self, record: TaskRecord, error_type: str, message: str) -> None:
        """Finalize as CANCELLED and take the record out of wherever it waits or runs."""
        if record.status in FINAL_STATUSES:
            return
        timer = self._timers.pop(record, None)
        if timer is not None:
            timer.cancel()
        else:
            queue = self._queues[_LEVELS[record.priority]]
            with contextlib.suppress(ValueError):  # not queued: it is running
                queue.remove(record)
        self._finalize(
            record, TaskStatus.CANCELLED, error_type=error_type, error=f"{error_type}: {message}"
        )
        runner = self._running.get(record)
        if runner is not None and record not in self._cancel_requested:
            self._cancel_requested.add(record)
            runner.cancel(f"fastworker task {record.id}: {message}")

    def _finalize(
        self,
        record: TaskRecord,
        status: TaskStatus,
        result: Any = None,
        *,
        error_type: str | None = None,
        error: str | None = None,
    ) -> None:
        record.status = status
        record.result = result
        record.error = error
        record.error_type = error_type
        record.completed_at = _now(UTC)
        self._live -= 1
        self.store.finished(record)

    async def _worker(self) -> None:
        _context.current_client.set(self._client)
        runner = asyncio.current_task()
        assert runner is not None and self._loop is not None
        queues = self._queues
        publish = self.store.events.publish
        set_current = _context.current_record.set
        try:
            while True:
                for queue in queues:
                    if queue:
                        record = queue.popleft()
                        break
                else:
                    if self._closing:
                        return
                    waiter = self._loop.create_future()
                    self._idle.append(waiter)
                    await waiter
                    continue
                # One attempt, inline: this loop is the throughput path.
                record.status = TaskStatus.RUNNING
                record.started_at = _now(UTC)
                record.attempts += 1
                self._running[record] = runner
                publish(record)
                # The worker's own context: the next task overwrites it, so no reset is needed;
                # threads and sub-tasks copy it when they start, so each sees its own record.
                set_current(record)
                try:
                    if record.policy.timeout is None:
                        value = await self.executor.run(record)
                    else:
                        value = await self._run_with_timeout(record)
                except asyncio.CancelledError:
                    if record not in self._cancel_requested:
                        raise  # not ours: the extension is being torn down
                    self._cancel_requested.discard(record)
                    if runner.uncancel() > 0:
                        raise  # someone else cancelled the worker too
                    continue  # already final: cancelled while running
                except BaseException as exc:  # SystemExit from a task must not stop a worker
                    self._outcome_failed(record, runner, exc)
                    continue
                finally:
                    del self._running[record]
                kind = type(value)
                if not self._cancel_requested and (
                    value is None or kind is str or kind is int or kind is bool
                ):  # the common case: a plain value, nobody cancelling
                    self._finalize(record, TaskStatus.SUCCESS, value)
                else:
                    self._outcome_value(record, runner, value)
        finally:
            self._active_workers -= 1
            if self._active_workers == 0 and self._workers_done is not None:
                self._workers_done.set()

    async def _run_with_timeout(self, record: TaskRecord) -> Any:
        timeout = record.policy.timeout
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                return await self.executor.run(record)
        except TimeoutError:
            if not deadline.expired():
                raise  # the task's own TimeoutError: an ordinary failure
            raise _TimedOut(f"the task exceeded its timeout of {timeout:g}s") from None

    def _settle_cancel(self, record: TaskRecord, runner: asyncio.Task[Any]) -> bool:
        """True when the record was cancelled while running (its outcome is discarded)."""
        if record in self._cancel_requested:  # the task swallowed our cancellation
            self._cancel_requested.discard(record)
            runner.uncancel()
        return record.status is not TaskStatus.RUNNING

    def _outcome_value(self, record: TaskRecord, runner: asyncio.Task[Any], value: Any) -> None:
        if self._cancel_requested and self._settle_cancel(record, runner):
            return
        kind = type(value)
        if not (value is None or kind is str or kind is int or kind is bool):
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
        self._finalize(record, TaskStatus.SUCCESS, value)

    def _outcome_failed(
        self, record: TaskRecord, runner: asyncio.Task[Any], failure: BaseException
    ) -> None:
        if self._settle_cancel(record, runner):
            return
        if isinstance(failure, _TimedOut):
            self._failed(record, "TaskTimeout", str(failure), None)
        elif isinstance(failure, TaskFailed):
            self._failed(record, failure.error_type, failure.message, None)
        else:
            self._failed(record, type(failure).__name__, str(failure), failure)

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
        self._call_later(record, policy.retry_delay_for(record.attempts))


class _TimedOut(Exception):  # an internal signal: it never escapes the scheduler
    """The task's own timeout expired (a task raising TimeoutError is an ordinary failure)."""


def _json_value(value: Any) -> Any:
    """The value as it would arrive through JSON: the same in both modes."""
    if value is None or type(value) in (str, int, bool):
        return value
    if type(value) is float and math.isfinite(value):
        return value
    return json.loads(json.dumps(value, allow_nan=False))
