"""One scheduler for both modes: this process's queues, timers, retries, cancels and leases.

```
submit ─► store.insert ─► timer (SCHEDULED / RETRYING: loop.call_at) ──┐
                  │                                                    ▼
                  └──────────► 4 FIFO queues (critical > high > normal > low) ─► N worker loops
                                                                          │ executor.acquire()
  recover (dead owners' and released tasks) ──► queues / timers           │ RUNNING, then
                                                                          │ executor.run()
                      RETRYING ◄── failure with retries left ◄────────────┤
                                                                          ▼
                                    SUCCESS / FAILURE / CANCELLED ─► await store.update(...)
```

The store keeps every task's shared copy; the scheduler keeps, for the tasks this process
owns, a `_Run` with the live handles (definition, timer, worker task, progress) keyed by
id. Every state change is one `await store.update(...)`, a compare-and-set on owner and
attempt: a write after another process took the task over matches nothing and is dropped.
Only one coroutine writes a run at a time (the worker while it holds the run, otherwise
whoever removed it from its queue or timer), so writes never race each other.

`N` is the executor's concurrency; a task waiting for a slot (`executor.acquire`) is still
QUEUED and its timeout has not started. A worker that finds the queues empty parks on a
future and is woken by the next submission, so an idle scheduler costs nothing.

With a durable store, a sweeper renews this process's lease, takes over the tasks of
processes that died (and tasks released at shutdown), and expires old results; at
shutdown, queued and scheduled tasks are released for the next process instead of being
cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
from fastworker.tasks.models import TaskStatus

from fastworker_fastapi import _context
from fastworker_fastapi._json import StoredValueError, clean_text, json_value
from fastworker_fastapi.errors import (
    ConfigurationError,
    NotRunningError,
    QueueFullError,
    ShuttingDownError,
    TaskFailed,
)
from fastworker_fastapi.records import (
    FINAL_STATUSES,
    PRIORITY_LEVELS,
    TaskRecord,
    evolve,
    is_final,
)
from fastworker_fastapi.stores.base import final_changes, interrupted_changes

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from fastworker_fastapi.client import TaskClient
    from fastworker_fastapi.events import EventHub
    from fastworker_fastapi.stores.base import TaskStore
    from fastworker_fastapi.tasks import TaskDefinition
    from fastworker_fastapi.workers.base import Executor

__all__ = ["Scheduler"]

logger = logging.getLogger("fastworker_fastapi")

_now = datetime.now  # `_now(UTC)`: one call less than records.utcnow on the hot path
_LEVELS = PRIORITY_LEVELS
_QUEUED = TaskStatus.QUEUED
_RUNNING = TaskStatus.RUNNING
_SUCCESS = TaskStatus.SUCCESS
_MAX_ERROR = 4000  # characters of an error message kept

# Where a run is; only the holder of a run writes its record. SUBMITTING: its submitter
# awaits the store's insert and then places it (nobody else may take it meanwhile).
QUEUED, TIMER, ACQUIRING, STARTING, RUNNING, FINISHING, SUBMITTING = range(7)


class _Run:
    """This process's live handles for one task it owns.

    No `__slots__`: the four handles most runs never set are class-level defaults, so making
    a run sets three attributes rather than seven (half the cost, once per task).
    """

    timer: asyncio.TimerHandle | None = None
    runner: asyncio.Task[Any] | None = None
    # Set to stop the run: ("TaskCancelled", why) cancels it; ("", why) releases it as
    # interrupted (durable store at shutdown).
    reason: tuple[str, str] | None = None
    progress: Any = None  # progress.py's state, once the task reports

    def __init__(
        self, record: TaskRecord, definition: TaskDefinition, stage: int = SUBMITTING
    ) -> None:
        self.record = record  # the latest record the store returned
        self.definition = definition
        self.stage = stage  # SUBMITTING: until placed in a queue or a timer

    @property
    def id(self) -> str:
        return self.record.id


class Scheduler:
    """Decides what runs when; the executor only runs what it is given."""

    def __init__(
        self,
        executor: Executor,
        store: TaskStore,
        hub: EventHub,
        client: TaskClient,
        *,
        max_pending: int,
        max_result_bytes: int,
        sweep_interval: float = 2.0,
    ) -> None:
        self.executor = executor
        self.store = store
        self.hub = hub
        self._client = client
        self.max_pending = max_pending
        self.max_result_bytes = max_result_bytes
        self.sweep_interval = sweep_interval
        self._queues: tuple[deque[_Run], ...] = tuple(deque() for _ in _LEVELS)
        self._idle: deque[asyncio.Future[None]] = deque()
        self._due_runs: deque[_Run] = deque()
        self._due_wake = asyncio.Event()
        self._runs: dict[str, _Run] = {}
        self._active_workers = 0
        self._workers_done: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task_group: TaskGroup | None = None
        self._sweeper: anyio.CancelScope | None = None
        self._closing = False
        self.accepting = False
        # Stores that never wait (memory) also offer their writes as plain calls.
        self._add = getattr(store, "add_one", None)
        self._mark_running = getattr(store, "mark_running", None)
        self._mark_succeeded = getattr(store, "mark_succeeded", None)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, task_group: TaskGroup) -> None:
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            raise ConfigurationError(
                "FastWorker's scheduler needs the asyncio event loop (FastAPI's and "
                "uvicorn's default); trio is not supported"
            ) from None
        self._task_group = task_group
        self._workers_done = asyncio.Event()
        for _ in range(self.executor.concurrency):
            self._active_workers += 1
            task_group.start_soon(self._worker)
        task_group.start_soon(self._due_loop)
        self.hub.add_listener(self._on_remote_change, remote_only=True)
        self.accepting = True
        if self.store.durable:
            await self._sweep()  # a restart takes its dead predecessor's work back at once
            self._sweeper = anyio.CancelScope()
            task_group.start_soon(self._sweep_forever, self._sweeper)

    async def shutdown(self, timeout: float) -> None:
        """Refuse new tasks, let running ones finish within `timeout`, settle the rest.

        Memory store: queued tasks may run within `timeout` too; tasks waiting for their eta
        or a retry are cancelled at once (waiting for them would hold shutdown hostage).
        Durable store: queued and waiting tasks are released at once for the next process,
        and running ones still unfinished at `timeout` are released as interrupted.
        """
        self.accepting = False
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        durable = self.store.durable
        async with anyio.create_task_group() as settle:
            for run in list(self._runs.values()):
                if run.stage == TIMER or (durable and run.stage == QUEUED):
                    self._take(run)
                    if durable:
                        settle.start_soon(self._release, run)
                    else:
                        settle.start_soon(
                            self._finish_cancelled,
                            run,
                            "ShutdownCancelled",
                            "the app shut down before its scheduled time",
                        )
        self._wake_all()
        done = self._workers_done
        if done is None:
            return
        with anyio.move_on_after(timeout):
            await done.wait()
        if not done.is_set():
            why = f"shutdown_timeout ({timeout:g}s) elapsed"
            async with anyio.create_task_group() as settle:
                for run in list(self._runs.values()):
                    if run.stage == QUEUED:
                        self._take(run)
                        settle.start_soon(
                            self._finish_cancelled, run, "ShutdownCancelled", f"{why} before it ran"
                        )
                    else:
                        kind = "" if durable else "ShutdownCancelled"
                        self._stop(run, kind, f"{why} before it finished")
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
        if len(self._runs) + count > self.max_pending:
            raise QueueFullError(
                f"{len(self._runs)} tasks are already pending (max_pending={self.max_pending}); "
                "try again later"
            )

    def submit_now(self, record: TaskRecord, definition: TaskDefinition, delay: float) -> bool:
        """`submit` without awaiting, when the store never waits (memory); False otherwise
        (nothing done: await `submit`)."""
        add = self._add
        if add is None:
            return False
        runs = self._runs
        if not self.accepting or len(runs) >= self.max_pending:
            self.check_capacity()
        record.owner = self.store.owner  # still being built: nobody else holds it yet
        if delay > 0 or self._closing:
            record.status = TaskStatus.SCHEDULED if delay > 0 else _QUEUED
            add(record)
            run = runs[record.id] = _Run(record, definition)
            self._place(run, delay)
            return True
        record.status = _QUEUED
        add(record)
        run = runs[record.id] = _Run(record, definition, QUEUED)  # `_enqueue`, inline
        self._queues[_LEVELS[record.priority]].append(run)
        if self._idle:
            self._wake_one()
        return True

    async def submit(self, record: TaskRecord, definition: TaskDefinition, delay: float) -> None:
        """Record a validated task (owned by this process) and queue it, or raise."""
        runs = self._runs
        if not self.accepting or len(runs) >= self.max_pending:
            self.check_capacity()
        record.owner = self.store.owner  # still being built: nobody else holds it yet
        record.status = TaskStatus.SCHEDULED if delay > 0 else TaskStatus.QUEUED
        run = _Run(record, definition)
        runs[record.id] = run  # counts against max_pending while the insert is awaited
        try:
            await self.store.insert((record,))
        except BaseException:
            del runs[record.id]
            raise
        self._place(run, delay)

    async def submit_unique(
        self, record: TaskRecord, definition: TaskDefinition, delay: float
    ) -> bool:
        """Like `submit`, but only if no task with `record.id` exists in the store (which
        every process sharing it sees): True when this call created and placed it."""
        self.check_capacity()
        if record.id in self._runs:
            return False
        record.owner = self.store.owner
        record.status = TaskStatus.SCHEDULED if delay > 0 else TaskStatus.QUEUED
        run = _Run(record, definition)
        self._runs[record.id] = run
        try:
            added = await self.store.insert_if_absent(record)
        except BaseException:
            del self._runs[record.id]
            raise
        if not added:
            del self._runs[record.id]
            return False
        self._place(run, delay)
        return True

    async def submit_many(
        self, prepared: Sequence[tuple[TaskRecord, TaskDefinition, float]]
    ) -> None:
        """Record and queue all of them, or (raising) none."""
        self.check_capacity(len(prepared))
        owner = self.store.owner
        runs = []
        for record, definition, delay in prepared:
            record.owner = owner
            record.status = TaskStatus.SCHEDULED if delay > 0 else TaskStatus.QUEUED
            run = _Run(record, definition)
            self._runs[record.id] = run
            runs.append((run, delay))
        try:
            await self.store.insert([record for record, _, _ in prepared])
        except BaseException:
            for run, _ in runs:
                self._runs.pop(run.id, None)
            raise
        for run, delay in runs:
            self._place(run, delay)

    async def cancel(self, task_id: str) -> TaskRecord:
        """Cancel a task that has not finished, wherever it runs; raises for unknown and
        finished ones. Returns the task's record: final when this process (or nobody)
        owned it; for a task another process runs, as soon as it is final or after ~2 s."""
        run = self._runs.get(task_id)
        if run is None:
            record = await self.store.request_cancel(task_id)
            if record.status in FINAL_STATUSES:
                return record
            return await self._await_final(task_id, 2.0) or record
        waiter = self.hub.final_waiter(task_id)
        try:
            if run.stage in (QUEUED, TIMER):
                self._take(run)
                await self._finish_cancelled(run, "TaskCancelled", "cancelled by request")
            else:
                self._stop(run, "TaskCancelled", "cancelled by request")
            async with asyncio.timeout(5.0):
                return await waiter
        except TimeoutError:  # pragma: no cover - a worker that cannot settle in 5 s
            return run.record
        finally:
            self.hub.forget_waiter(task_id, waiter)

    async def _await_final(self, task_id: str, timeout: float) -> TaskRecord | None:
        waiter = self.hub.final_waiter(task_id)
        try:
            record = await self.store.get(task_id)
            if record is not None and record.status in FINAL_STATUSES:
                return record
            with anyio.move_on_after(timeout):
                return await waiter
            return await self.store.get(task_id)
        finally:
            self.hub.forget_waiter(task_id, waiter)

    # -- placing and taking runs ----------------------------------------------------------

    def _place(self, run: _Run, delay: float) -> None:
        if run.reason is not None:  # cancelled (or released) while its insert was awaited
            run.stage = FINISHING
            self._spawn(self._settle_stopped, run)
            return
        if self._closing and self.store.durable:  # accepted as shutdown began: release it
            self._spawn(self._release, run)
            return
        if delay > 0:
            assert self._loop is not None
            run.stage = TIMER
            run.timer = self._loop.call_later(delay, self._due, run)
        else:
            self._enqueue(run)

    def _enqueue(self, run: _Run) -> None:
        run.stage = QUEUED
        self._queues[_LEVELS[run.record.priority]].append(run)
        if self._idle:
            self._wake_one()

    def _wake_one(self) -> None:
        """Wake one parked worker (the queues just got a run)."""
        idle = self._idle
        while idle:
            waiter = idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _take(self, run: _Run) -> None:
        """Take a waiting run out of its queue or timer: the caller now writes it."""
        if run.stage == TIMER:
            assert run.timer is not None
            run.timer.cancel()
            run.timer = None
        else:
            self._queues[_LEVELS[run.record.priority]].remove(run)
        run.stage = FINISHING

    def _stop(self, run: _Run, kind: str, why: str) -> None:
        """Ask the worker holding `run` to stop it (`kind` "": release as interrupted)."""
        if run.reason is not None:
            return
        run.reason = (kind, why)
        if run.stage in (ACQUIRING, RUNNING) and run.runner is not None:
            run.runner.cancel(f"fastworker task {run.id}: {why}")

    def _wake_all(self) -> None:
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _spawn(self, func: Any, *args: Any) -> None:
        assert self._task_group is not None
        self._task_group.start_soon(func, *args)

    def _due(self, run: _Run) -> None:
        """A scheduled task's eta, or a retry's delay, has come (a loop callback)."""
        run.timer = None
        if run.record.status is TaskStatus.SCHEDULED:
            run.stage = FINISHING  # held by the due loop until it is queued
            self._due_runs.append(run)
            self._due_wake.set()
        else:
            self._enqueue(run)

    async def _due_loop(self) -> None:
        """Write SCHEDULED -> QUEUED for the runs whose eta came, then queue them."""
        while True:
            await self._due_wake.wait()
            self._due_wake.clear()
            while self._due_runs:
                run = self._due_runs.popleft()
                if await self._write(run, status=TaskStatus.QUEUED):
                    self._enqueue(run)

    # -- writes -----------------------------------------------------------------------------

    async def _write(self, run: _Run, **changes: Any) -> bool:
        """One compare-and-set write of this run's record; False (and the run forgotten)
        when the store no longer has it as ours."""
        record = run.record
        updated = await self.store.update(record.id, record.owner, record.attempts, **changes)
        if updated is None:
            logger.warning(
                "task %s [%s]: this process no longer owns it (taken over, or cancelled "
                "elsewhere); dropping its state here",
                record.name,
                record.id,
            )
            self._runs.pop(record.id, None)
            return False
        run.record = updated
        if is_final(updated.status) or updated.owner != record.owner:
            self._runs.pop(record.id, None)
        return True

    async def _finish(
        self,
        run: _Run,
        status: TaskStatus,
        result: Any = None,
        error_type: str | None = None,
        error: str | None = None,
    ) -> None:
        changes = final_changes(
            run.record, status=status, result=result, error=error, error_type=error_type
        )
        progress = run.progress
        if progress is not None:  # the latest value, held back by the throttle or not
            changes["progress"], changes["progress_message"] = progress.value
        await self._write(run, **changes)

    async def _finish_cancelled(self, run: _Run, error_type: str, message: str) -> None:
        await self._finish(
            run, TaskStatus.CANCELLED, error_type=error_type, error=f"{error_type}: {message}"
        )

    async def _release(self, run: _Run) -> None:
        """Give a waiting task back to the store, for any process to run."""
        await self._write(run, owner=None)

    # -- the worker loop --------------------------------------------------------------------

    async def _worker(self) -> None:
        _context.current_client.set(self._client)
        runner = asyncio.current_task()
        assert runner is not None and self._loop is not None
        queues = self._queues
        update = self.store.update
        update_nowait = getattr(self.store, "update_nowait", None)
        mark_running, mark_succeeded = self._mark_running, self._mark_succeeded
        run_task = self.executor.run
        acquire = getattr(self.executor, "acquire", None)
        release = getattr(self.executor, "release", None)
        set_current = _context.current_run.set
        inline = getattr(self.executor, "runs_plain_inline", False)
        small = min(4096, self.max_result_bytes)  # ASCII strings below it need no check
        # The clock reading that ended the previous task, when nothing was awaited since: a
        # worker going straight on to the next task takes one reading for both (datetimes
        # have microsecond resolution; the two instants are about a microsecond apart).
        handover: datetime | None = None
        try:
            while True:
                for queue in queues:
                    if queue:
                        run = queue.popleft()
                        break
                else:
                    handover = None
                    if self._closing:
                        return
                    waiter = self._loop.create_future()
                    self._idle.append(waiter)
                    await waiter
                    continue
                run.runner = runner
                slot = None
                if acquire is not None:
                    run.stage = ACQUIRING
                    handover = None
                    try:
                        slot = await acquire(run.record)
                    except asyncio.CancelledError:
                        if run.reason is None or runner.uncancel() > 0:
                            raise
                        await self._settle_stopped(run)
                        continue
                    except Exception as exc:  # no capacity to be had (no healthy plane...)
                        run.stage = FINISHING
                        # It counts as an attempt, so retries stay bounded by the policy.
                        if await self._write(run, attempts=run.record.attempts + 1):
                            await self._failed_with(run, exc)
                        continue
                # One attempt, inline: this loop is the throughput path.
                run.stage = STARTING
                record = run.record
                owner = record.owner
                if handover is None:
                    started = _now(UTC)
                else:
                    started, handover = handover, None
                updated: TaskRecord | None
                if mark_running is not None:
                    updated = mark_running(record.id, owner, record.attempts, started)
                elif update_nowait is not None and run.reason is None:
                    # The store applies our writes in order: queue RUNNING and go on; should
                    # it not match (the task was taken over), the final write will not either.
                    running = {
                        "status": _RUNNING,
                        "started_at": started,
                        "attempts": record.attempts + 1,
                    }
                    update_nowait(record.id, owner, record.attempts, **running).add_done_callback(
                        _consume
                    )
                    updated = evolve(record, running)
                else:
                    updated = await update(
                        record.id,
                        owner,
                        record.attempts,
                        status=_RUNNING,
                        started_at=started,
                        attempts=record.attempts + 1,
                    )
                if updated is None or run.reason is not None:
                    if slot is not None and release is not None:
                        release(slot)
                    if updated is None:
                        self._runs.pop(record.id, None)
                        continue
                    run.record = updated
                    await self._settle_stopped(run)
                    continue
                run.record = record = updated
                run.stage = RUNNING
                # The worker's own context: the next task overwrites it, so no reset is needed;
                # threads and sub-tasks copy it when they start, so each sees its own run.
                set_current(run)
                try:
                    definition = run.definition
                    if record.policy.timeout is not None:
                        value = await self._run_with_timeout(run, slot)
                    elif inline and definition.plain:
                        kwargs = record.kwargs
                        if kwargs:
                            value = await definition.func(*record.args, **kwargs)
                        else:  # no keyword dict to unpack: a cheaper call
                            value = await definition.func(*record.args)
                    else:
                        value = await run_task(record, definition, slot)
                except asyncio.CancelledError:
                    if run.reason is None:
                        raise  # not ours: the extension is being torn down
                    if runner.uncancel() > 0:
                        raise  # someone else cancelled the worker too
                    run.stage = FINISHING
                    await self._settle_stopped(run)
                    continue
                except BaseException as exc:  # SystemExit from a task must not stop a worker
                    run.stage = FINISHING
                    await self._failed_with(run, exc)
                    continue
                run.stage = FINISHING
                if run.reason is not None:  # stopped while the result was on its way
                    if runner.cancelling():
                        runner.uncancel()
                    await self._settle_stopped(run)
                    continue
                kind = type(value)
                if (
                    run.progress is None
                    and record.callback is None
                    and record.error is None
                    and (
                        value is None
                        or kind is int
                        or kind is bool
                        or (kind is str and len(value) < small and value.isascii())
                    )
                ):  # the common case, inline: a plain value, nothing else to write
                    if mark_succeeded is not None:
                        handover = _now(UTC)
                        done = mark_succeeded(record.id, owner, record.attempts, value, handover)
                    else:
                        done = await update(
                            record.id,
                            owner,
                            record.attempts,
                            status=_SUCCESS,
                            result=value,
                            completed_at=_now(UTC),
                        )
                    if done:
                        del self._runs[record.id]
                    else:
                        self._runs.pop(record.id, None)
                    continue
                await self._succeeded(run, value)
        finally:
            self._active_workers -= 1
            if self._active_workers == 0 and self._workers_done is not None:
                self._workers_done.set()

    async def _run_with_timeout(self, run: _Run, slot: Any) -> Any:
        timeout = run.record.policy.timeout
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                return await self.executor.run(run.record, run.definition, slot)
        except TimeoutError:
            if not deadline.expired():
                raise  # the task's own TimeoutError: an ordinary failure
            raise _TimedOut(f"the task exceeded its timeout of {timeout:g}s") from None

    async def _settle_stopped(self, run: _Run) -> None:
        """The worker held a run that was asked to stop: cancel it, or release it."""
        assert run.reason is not None
        kind, why = run.reason
        if kind:
            await self._finish_cancelled(run, kind, why)
        else:
            await self._write(run, **interrupted_changes(run.record, why))

    async def _succeeded(self, run: _Run, value: Any) -> None:
        try:
            value = json_value(value, self.max_result_bytes)
        except StoredValueError as exc:
            await self._failed(
                run,
                "ResultError",
                f"the task's return value cannot be stored: {exc}",
                None,
                retry=False,
            )
            return
        await self._finish(run, _SUCCESS, value)

    async def _failed_with(self, run: _Run, failure: BaseException) -> None:
        if isinstance(failure, _TimedOut):
            await self._failed(run, "TaskTimeout", str(failure), None)
        elif isinstance(failure, TaskFailed):
            await self._failed(run, failure.error_type, failure.message, None, retry=failure.retry)
        else:
            await self._failed(run, type(failure).__name__, str(failure), failure)

    async def _failed(
        self,
        run: _Run,
        error_type: str,
        message: str,
        exc: BaseException | None,
        *,
        retry: bool = True,
    ) -> None:
        record = run.record
        error = clean_text(f"{error_type}: {message}" if message else error_type, _MAX_ERROR)
        error_type = clean_text(error_type, 200)
        policy = record.policy
        failures = record.attempts - record.interruptions
        will_retry = retry and failures <= policy.max_retries and self.accepting
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
            await self._finish(run, TaskStatus.FAILURE, error_type=error_type, error=error)
            return
        delay = policy.retry_delay_for(failures)
        if await self._write(
            run,
            status=TaskStatus.RETRYING,
            error=error,
            error_type=error_type,
            eta=_now(UTC) + timedelta(seconds=delay),
        ):
            self._place(run, delay)

    # -- other processes ----------------------------------------------------------------------

    def _on_remote_change(self, record: TaskRecord) -> None:
        """Another process asked to cancel a task this one runs."""
        if record.cancel_requested and record.owner == self.store.owner:
            run = self._runs.get(record.id)
            if run is not None and run.reason is None:
                self._spawn(self._cancel_requested, run)

    async def _cancel_requested(self, run: _Run) -> None:
        if run.stage in (QUEUED, TIMER):
            self._take(run)
            # The flag raised the record's version elsewhere: read the attempt count anew.
            fresh = await self.store.get(run.id)
            if fresh is not None:
                run.record = fresh
            await self._finish_cancelled(run, "TaskCancelled", "cancelled by request")
        elif run.stage != FINISHING:
            self._stop(run, "TaskCancelled", "cancelled by request")

    async def _sweep_forever(self, scope: anyio.CancelScope) -> None:
        with scope:
            while True:
                await anyio.sleep(self.sweep_interval * random.uniform(0.75, 1.25))
                try:
                    await self._sweep()
                except Exception:  # the store is down for a moment: try again next round
                    logger.exception("task store maintenance failed; retrying")

    async def _sweep(self) -> None:
        """Renew the lease, adopt released and dead owners' tasks, expire old results."""
        store = self.store
        await store.heartbeat()
        free = self.max_pending - len(self._runs)
        if free > 0 and self.accepting:
            for record in await store.recover(self._can_run, min(free, 500)):
                self._adopt(record)
        await store.expire()

    def _can_run(self, name: str) -> bool:
        return self.executor.resolve(name) is not None

    def _adopt(self, record: TaskRecord) -> None:
        """Run a task this process just claimed (a finished one only has a callback left)."""
        if record.status in FINAL_STATUSES or record.id in self._runs:
            return
        definition = self.executor.resolve(record.name)
        if definition is None:  # pragma: no cover - recover() asked can_run
            return
        run = _Run(record, definition)
        self._runs[record.id] = run
        if record.cancel_requested:
            run.stage = FINISHING
            self._spawn(self._finish_cancelled, run, "TaskCancelled", "cancelled by request")
            return
        delay = 0.0
        if record.eta is not None and record.status is not TaskStatus.QUEUED:
            delay = (record.eta - _now(UTC)).total_seconds()
        self._place(run, delay)


def _consume(future: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of a write nobody awaits (its failure is logged, not lost)."""
    if not future.cancelled() and future.exception() is not None:
        logger.warning("a task status write failed: %s", future.exception())


class _TimedOut(Exception):  # an internal signal: it never escapes the scheduler
    """The task's own timeout expired (a task raising TimeoutError is an ordinary failure)."""
