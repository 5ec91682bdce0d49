"""Progress reported by a running task: `report_progress(0.4, "resizing images")`.

```
async task (event loop) ───► report_progress ───────────────┐
sync task (worker thread) ─► report_progress ─ one hop ─────┤  only when no publish is
                             (anyio.from_thread.run_sync)   │  already armed for the task
                                                            ▼
                  ProgressPublisher (event loop only): record.progress = latest value;
                  publish at once if the task's last publish is >= `interval` old,
                  else once `interval` has passed (its flusher), always with the latest value
```

A tight loop calling `report_progress` costs a tuple assignment per call: the store and the
subscribers see at most one update per task per `interval`, and never miss the last value
(it is published by the flusher, or by the final status, whichever comes first). The store
and the event hub are touched only on the event loop, never from a worker thread.
"""

from __future__ import annotations

import heapq
import itertools
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

from fastworker_fastapi import _context

if TYPE_CHECKING:
    from fastworker_fastapi.store import TaskRecord, TaskStore

__all__ = ["MAX_MESSAGE_LENGTH", "ProgressPublisher", "report_progress"]

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
    record = _context.current_record.get()
    publisher = _publisher.get()
    if record is None or publisher is None:
        return
    publisher.report(record, value)


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
    return float(fraction), message


@dataclass(slots=True, eq=False)
class _State:
    """One task's progress between publishes; `value` and `armed` are set by any thread."""

    value: tuple[float, str | None]
    armed: bool = False  # a publish is due or on its way: reporters only store the value
    published_at: float = -math.inf


class ProgressPublisher:
    """Applies reported progress to records and publishes it, throttled, on the event loop.

    One per running extension: `bind()` makes it the publisher of the worker tasks started
    inside it, `run()` (in the extension's task group) publishes what was held back.
    """

    def __init__(self, store: TaskStore, *, interval: float = 0.1) -> None:
        self._store = store
        self.interval = interval
        self._heap: list[tuple[float, int, TaskRecord, _State]] = []
        self._seq = itertools.count()
        self._wake = anyio.Event()
        self._loop_thread = threading.get_ident()  # built on the loop, in the extension's run
        # Only records that reported progress carry a state: the rest cost an attribute check.
        store.events.add_listener(self._forget, final_only=True, when="progress_state")

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

    def report(self, record: TaskRecord, value: tuple[float, str | None]) -> None:
        """Store the latest value; arm a publish unless one is armed. Any thread."""
        if record.finished:  # a late report from an abandoned thread: nobody reads it
            return
        state: _State | None = record.progress_state
        if state is None:  # one thread runs a task: no other reporter races to create it
            state = record.progress_state = _State(value)
        state.value = value
        if state.armed:
            return
        state.armed = True
        if threading.get_ident() == self._loop_thread:
            self._arm(record, state)
            return
        try:
            anyio.from_thread.run_sync(self._arm, record, state)
        except RuntimeError:
            # The loop is gone (an abandoned thread outliving the app) or this is not the
            # task's own worker thread; progress is advisory, so it must not fail the task.
            state.armed = False

    async def run(self) -> None:
        """Publish held-back values when their interval has passed; runs until cancelled."""
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
            _, _, record, state = heapq.heappop(heap)
            self._publish(record, state, time.monotonic())

    # -- event loop only ------------------------------------------------------------------

    def _arm(self, record: TaskRecord, state: _State) -> None:
        now = time.monotonic()
        due = state.published_at + self.interval
        if now >= due:
            self._publish(record, state, now)
            return
        heapq.heappush(self._heap, (due, next(self._seq), record, state))
        if self._heap[0][3] is state:
            self._wake.set()

    def _publish(self, record: TaskRecord, state: _State, now: float) -> None:
        state.armed = False  # first: a report racing with us arms a new publish
        if record.finished:
            record.progress_state = None
            return
        record.progress, record.progress_message = state.value
        state.published_at = now
        self._store.changed(record)

    def _forget(self, record: TaskRecord) -> None:
        """On a task's final status: apply a held-back value, then drop its state.

        Listeners run before the hub snapshots the record for streams, so the final event
        carries the task's last reported progress.
        """
        state: _State | None = record.progress_state
        record.progress_state = None
        if state is not None and state.armed:
            record.progress, record.progress_message = state.value
