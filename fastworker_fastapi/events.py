"""One small pub/sub for task changes, so routes, streams and callbacks see the same thing.

Two kinds of consumers:

- *listeners*: synchronous functions called in the publisher's task for every change
  (callback delivery uses one to learn that a task finished). They must be quick and must
  not raise; an exception is logged and swallowed so a bad listener cannot break a worker.
- *subscriptions*: the latest unsent state of each task, read by an async consumer (event
  streams), coalesced per task so a reader that keeps reading keeps up. Publishing never
  waits for a reader: one that stops reading is ended and flagged `overflowed`, so it
  learns that it missed changes instead of silently losing some of them.

A third, for `wait()`: *final waiters*, futures keyed by task id that the first final record
published for that id resolves, whichever process wrote it (a store publishes other
processes' changes here too).

Publishing costs one truth test when nobody listens, which keeps submission cheap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastworker_fastapi.models import task_json
from fastworker_fastapi.records import FINAL_VALUES

if TYPE_CHECKING:
    from fastworker_fastapi.records import TaskRecord

__all__ = ["Change", "EventHub", "Subscription"]

logger = logging.getLogger("fastworker_fastapi")

Listener = Callable[["TaskRecord"], None]
RecordFilter = Callable[["TaskRecord"], bool]


class Change:
    """One published change as a subscription holds it: the record and, made once for all
    subscriptions on first use, its `TaskInfo` JSON."""

    __slots__ = ("_json", "record")

    def __init__(self, record: TaskRecord) -> None:
        self.record = record
        self._json: str | None = None

    @property
    def json(self) -> str:
        if self._json is None:
            self._json = task_json(self.record)
        return self._json


class Subscription:
    """The latest unsent state of each task it follows; iterate it with `async for`.

    Changes are coalesced per task: a task that changes several times before the reader
    gets to it is sent once, in its latest state (so its final state is never skipped), in
    the order its first unsent change came. A reader that keeps reading therefore keeps up
    whatever the rate of changes. Publishing never waits: a subscription holding more than
    `max_buffer` tasks whose reader has taken nothing for `stall_timeout` seconds (or more
    than `_HARD_FACTOR` times as many, whatever the reader does) is ended and flagged
    `overflowed`, so that reader learns it missed changes instead of holding memory.
    """

    def __init__(
        self, hub: EventHub, max_buffer: int, accept: RecordFilter | None, stall_timeout: float
    ) -> None:
        self._hub = hub
        self.accept = accept
        self.max_buffer = max_buffer
        self.stall_timeout = stall_timeout
        self.overflowed = False
        self.closed = False
        self.ended_by: str | None = None  # "overflow" or "shutdown", once ended
        self._pending: dict[str, Change] = {}  # task id -> its latest unsent change
        self._order: list[str] = []  # ids as their first unsent change came
        self._batch: list[str] = []  # ids taken from _order, to send now, last one first
        self._wake = asyncio.Event()
        self._read_at: float | None = None  # when the reader last took a change; None: waiting

    def _offer(self, change: Change) -> None:
        pending = self._pending
        task_id = change.record.id
        if task_id not in pending:
            self._order.append(task_id)
        pending[task_id] = change  # a task already waiting keeps its place, takes the state
        if len(pending) > self.max_buffer and self._stalled(len(pending)):
            self.overflowed = True
            self._forget()
            self._end("overflow")
            return
        self._wake.set()

    def _stalled(self, size: int) -> bool:
        if size > self.max_buffer * _HARD_FACTOR:
            return True
        now = time.monotonic()
        if self._read_at is None:  # the reader waits for changes: it is about to read
            self._read_at = now
            return False
        return now - self._read_at > self.stall_timeout

    def _end(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.ended_by = reason
            self._hub._subscriptions.discard(self)
            self._wake.set()

    def close(self, reason: str = "closed") -> None:
        """Stop receiving: the reader gets what is pending, then the end of the stream."""
        self._end(reason)

    def __aiter__(self) -> Subscription:
        return self

    def drain(self) -> list[Change]:
        """Everything ready now, without waiting (after `anext` returned one): lets a reader
        send a burst as one write."""
        ids = self._batch
        ids.reverse()
        ids += self._order
        self._batch, self._order = [], []
        pending = self._pending
        if ids:
            self._read_at = time.monotonic()
        return [pending.pop(task_id) for task_id in ids]

    async def __anext__(self) -> Change:
        while True:
            if self._batch:
                self._read_at = time.monotonic()
                return self._pending.pop(self._batch.pop())  # its state as of now
            if self._order:
                self._order.reverse()
                self._batch, self._order = self._order, []
                continue
            if self.closed:
                raise StopAsyncIteration
            self._read_at = None
            self._wake.clear()
            await self._wake.wait()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        self._forget()

    def _forget(self) -> None:
        self._pending = {}
        self._order = []
        self._batch = []


_HARD_FACTOR = 64


class EventHub:
    """Fan-out of task changes to listeners and subscriptions."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._remote_listeners: list[Listener] = []
        self._final_listeners: list[tuple[Listener, str | None]] = []
        self._subscriptions: set[Subscription] = set()
        self._waiters: dict[str, list[asyncio.Future[TaskRecord]]] = {}
        self._closed: str | None = None  # why subscriptions were ended for good

    def add_listener(
        self,
        listener: Listener,
        *,
        final_only: bool = False,
        when: str | None = None,
        remote_only: bool = False,
    ) -> Callable[[], None]:
        """Call `listener(record)` on every change, or with `final_only` only when a task
        reaches a final status, and then, with `when`, only if that record attribute is not
        None (`when="callback"`). Returns a function that removes the listener.

        `when` exists because final listeners run for every task: checking an attribute
        costs far less than calling a function that returns at once. With `remote_only`,
        only changes written by other processes (a store's feed) are passed on.
        """
        # Copy on change (rare), so publishing (every task) iterates without copying and a
        # listener may remove itself while it runs.
        if final_only:
            entry = (listener, when)
            self._final_listeners = [*self._final_listeners, entry]

            def remove() -> None:
                self._final_listeners = [x for x in self._final_listeners if x is not entry]

            return remove
        if when is not None:
            raise ValueError("`when` applies to final_only listeners")
        if remote_only:
            self._remote_listeners = [*self._remote_listeners, listener]

            def remove_remote() -> None:
                self._remote_listeners = [x for x in self._remote_listeners if x is not listener]

            return remove_remote
        self._listeners = [*self._listeners, listener]

        def remove_any() -> None:
            self._listeners = [x for x in self._listeners if x is not listener]

        return remove_any

    def subscribe(
        self,
        *,
        max_buffer: int = 256,
        accept: RecordFilter | None = None,
        stall_timeout: float = 5.0,
    ) -> Subscription:
        """A new subscription; close it (or use `async with`) to release it.

        After `close()` (shutdown) a new subscription starts ended, so a stream opened while
        the server stops ends at once too.
        """
        subscription = Subscription(self, max_buffer, accept, stall_timeout)
        if self._closed is not None:
            subscription.closed = True
            subscription.ended_by = self._closed
            return subscription
        self._subscriptions.add(subscription)
        return subscription

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    def final_waiter(self, task_id: str) -> asyncio.Future[TaskRecord]:
        """A future the next final record of `task_id` resolves; `forget_waiter` it when
        giving up.

        Register it *before* reading the store, so a change between the read and the wait
        cannot be missed.
        """
        future: asyncio.Future[TaskRecord] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.get(task_id)
        if waiters is None:
            self._waiters[task_id] = [future]
        else:
            waiters.append(future)
        return future

    def forget_waiter(self, task_id: str, future: asyncio.Future[TaskRecord]) -> None:
        """Stop waiting (a timeout, a cancelled wait): nothing is kept for `task_id`."""
        future.cancel()
        waiters = self._waiters.get(task_id)
        if waiters is not None and future in waiters:
            waiters.remove(future)
            if not waiters:
                del self._waiters[task_id]

    def publish(self, record: TaskRecord, *, remote: bool = False) -> None:
        """Pass a change on; `remote` when another process wrote it (a store's feed)."""
        if remote and self._remote_listeners:
            for listener in self._remote_listeners:
                self._call(listener, record)
        if self._waiters and record.status._value_ in FINAL_VALUES:
            for future in self._waiters.pop(record.id, ()):
                if not future.done():
                    future.set_result(record)
        if self._listeners:
            for listener in self._listeners:  # never mutated in place: see add_listener
                self._call(listener, record)
        if self._final_listeners and record.status._value_ in FINAL_VALUES:
            for listener, when in self._final_listeners:
                if when is None or getattr(record, when) is not None:
                    self._call(listener, record)
        if self._subscriptions:
            change = Change(record)
            for subscription in tuple(self._subscriptions):
                if subscription.accept is None or subscription.accept(record):
                    subscription._offer(change)

    @staticmethod
    def _call(listener: Listener, record: TaskRecord) -> None:
        try:
            listener(record)
        except Exception:
            logger.exception("task event listener %r failed", listener)

    def close(self, reason: str = "shutdown") -> None:
        """End every subscription, and those opened later (shutdown): readers get what is
        pending, then the end of their stream, `ended_by` saying why."""
        if self._closed is None:
            self._closed = reason
        for subscription in tuple(self._subscriptions):
            subscription.close(reason)
