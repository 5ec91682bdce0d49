"""Progress reported by a running task: `report_progress(0.4, "resizing images")`.

```
async task (event loop) ───► report_progress ───────────────┐
sync task (worker thread) ─► report_progress ─ one hop ─────┤  only when no publish is
                             (anyio.from_thread.run_sync)   │  already armed for the task
                                                            ▼
                  ProgressPublisher (event loop only): writes the latest value with
                  `store.update(progress=...)` as soon as the task's last write is
                  >= `interval` old, always with the latest value
```

A tight loop calling `report_progress` costs a tuple assignment per call: the store and the
subscribers see at most one update per task per `interval`, and never miss the last value
(it is written by the publisher, or with the final status, whichever comes first). The store
is written only from the event loop, never from a worker thread.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import anyio.from_thread
from fastworker.tasks.models import TaskStatus

from fastworker_fastapi import _context
from fastworker_fastapi._json import clean_text

if TYPE_CHECKING:
    from fastworker_fastapi.scheduler import _Run
    from fastworker_fastapi.stores.base import TaskStore

__all__ = ["MAX_MESSAGE_LENGTH", "ProgressPublisher", "report_progress"]

logger = logging.getLogger("fastworker_fastapi")

MAX_MESSAGE_LENGTH = 200
"""Longer progress messages are cut: progress is a status line, not a log."""

_publisher: ContextVar[ProgressPublisher | None] = ContextVar(
    "fastworker_fastapi_progress", default=None
)


def report_progress(fraction: float, message: str | None = None) -> None:
    """Report how far the current task is: `fraction` from 0 to 1, and an optional message.

    Call it from the task's own code, async or sync (it never blocks and never awaits). It
    shows in `GET /tasks/{task_id}` and in the event streams, at most once per ~100 ms per
    task, always ending with the latest value.

    Outside a task run by a FastWorker extension (the function called directly, in a unit
    test, or by `task(...)`) it does nothing, so task functions stay plain functions; bad
    arguments raise `ValueError`/`TypeError` everywhere, so tests still catch them.
    """
    value = _validate(fraction, message)
    run = _context.current_run.get()
    publisher = _publisher.get()
    if run is None or publisher is None:
        return
    publisher.report(run, value)


def _validate(fraction: float, message: str | None) -> tuple[float, str | None]:
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise TypeError(f"progress must be a number from 0 to 1, got {fraction!r}")
    if not (math.isfinite(fraction) and 0 <= fraction <= 1):
        raise ValueError(f"progress must be a number from 0 to 1, got {fraction!r}")
    if message is not None:
        if not isinstance(message, str):
            raise TypeError(f"the progress message must be a string, got {message!r}")
        if len(message) > MAX_MESSAGE_LENGTH:
            message = message[: MAX_MESSAGE_LENGTH - 1] + "…"
        message = clean_text(message, MAX_MESSAGE_LENGTH)
    return float(fraction), message


@dataclass(slots=True, eq=False)
class _State:
    """One task's progress between publishes; `value` and `armed` are set by any thread."""

    value: tuple[float, str | None]
    armed: bool = False  # a publish is due or on its way: reporters only store the value
    published_at: float = -math.inf


class ProgressPublisher:
    """Writes reported progress to the store, throttled, from the event loop.

    One per running extension: `bind()` makes it the publisher of the worker tasks started
    inside it, `run()` (in the extension's task group) does the writes.
    """

    def __init__(self, store: TaskStore, *, interval: float = 0.1) -> None:
        self._store = store
        self.interval = interval
        # (due, tie-break, run, state, value to write or None for the latest)
        self._heap: list[tuple[float, int, _Run, _State, tuple[float, str | None] | None]] = []
        self._seq = itertools.count()
        self._wake = anyio.Event()
        self._loop_thread = threading.get_ident()  # built on the loop, in the extension's run

    @contextmanager
    def bind(self) -> Iterator[None]:
        """Tasks started inside this block (the scheduler's workers) report to this publisher.

        The context is copied when a task starts, so the workers keep it after the block.
        """
        token = _publisher.set(self)
        try:
            yield
        finally:
            _publisher.reset(token)

    def report(self, run: _Run, value: tuple[float, str | None]) -> None:
        """Keep the latest value; arm a write unless one is armed. Any thread."""
        if run.record.status is not _RUNNING:  # a late report from an abandoned thread
            return
        state: _State | None = run.progress
        if state is None:  # one thread runs a task: no other reporter races to create it
            state = run.progress = _State(value)
        state.value = value
        if state.armed:
            return
        state.armed = True
        if threading.get_ident() == self._loop_thread:
            self._arm(run, state)
            return
        try:
            anyio.from_thread.run_sync(self._arm, run, state)
        except RuntimeError:
            # The loop is gone (an abandoned thread outliving the app) or this is not the
            # task's own worker thread; progress is advisory, so it must not fail the task.
            state.armed = False

    async def run(self) -> None:
        """Write armed values once their interval has passed; runs until cancelled."""
        heap = self._heap
        while True:
            self._wake = anyio.Event()
            if not heap:
                await self._wake.wait()
                continue
            wait = heap[0][0] - time.monotonic()
            if wait > 0:
                with anyio.move_on_after(wait):
                    await self._wake.wait()
                continue
            _, _, run, state, value = heapq.heappop(heap)
            await self._write(run, state, value)

    # -- event loop only ------------------------------------------------------------------

    def _arm(self, run: _Run, state: _State) -> None:
        now = time.monotonic()
        due = state.published_at + self.interval
        value = None
        if due <= now:  # the interval has passed: write this very value, now
            due, value = now, state.value
            state.armed = False
            state.published_at = now
        heapq.heappush(self._heap, (due, next(self._seq), run, state, value))
        if self._heap[0][3] is state:
            self._wake.set()

    async def _write(
        self, run: _Run, state: _State, value: tuple[float, str | None] | None
    ) -> None:
        record = run.record
        if record.status is not _RUNNING:
            return  # finished: its final write carried the latest value
        if value is None:
            if not state.armed:
                return
            state.armed = False  # first: a report racing with us arms a new write
            state.published_at = time.monotonic()
            value = state.value
        fraction, message = value
        try:
            await self._store.update(
                record.id,
                record.owner,
                record.attempts,
                progress=fraction,
                progress_message=message,
            )
        except Exception:  # progress is advisory: a failed write must not stop the others
            logger.warning("could not record progress of task %s", record.id, exc_info=True)


_RUNNING = TaskStatus.RUNNING
