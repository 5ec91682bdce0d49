"""One small pub/sub for task changes, so routes, streams and callbacks see the same thing.

Two kinds of consumers:

- *listeners*: synchronous functions called in the publisher's task for every change
  (callback delivery uses one to learn that a task finished). They must be quick and must
  not raise; an exception is logged and swallowed so a bad listener cannot break a worker.
- *subscriptions*: readers of one shared change log (the latest change of each task, in the
  order they last changed), each holding only its position, so publishing costs the same
  however many streams are open. A reader takes each task once, in its latest state, so one
  that keeps reading keeps up; one that falls too far behind is ended and flagged
  `overflowed`, so it learns that it missed changes instead of silently losing some.

A third, for `wait()`: *final waiters*, futures keyed by task id that the first final record
published for that id resolves, whichever process wrote it (a store publishes other
processes' changes here too).

Publishing costs one truth test when nobody listens, which keeps submission cheap.
"""

from __future__ import annotations

import asyncio
import logging
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
    subscriptions on first use, its `TaskInfo` JSON and its server-sent event."""

    __slots__ = ("_event", "_json", "record")

    def __init__(self, record: TaskRecord) -> None:
        self.record = record
        self._json: str | None = None
        self._event: str | None = None

    @property
    def json(self) -> str:
        if self._json is None:
            self._json = task_json(self.record)
        return self._json

    @property
    def event(self) -> str:
        """`event: task` with the JSON as its data, as streams send it."""
        if self._event is None:
            self._event = f"event: task\ndata: {self.json}\n\n"
        return self._event


class Subscription:
    """A reader of the hub's change log: each task it follows, in its latest state.

    The hub keeps one log for every subscription: the latest change of each task, ordered
    by when it last changed, each with a sequence number. A subscription holds only its
    position in it, so publishing costs the same with one open stream or two hundred, and
    a reader that does not read costs nothing. When it reads, it takes every task changed
    since its position, each once in its latest state (so a final state is never skipped),
    oldest change first. A reader that fell more than `max_buffer * 64` tasks behind, or
    behind the start of the log, missed changes: it is ended and flagged `overflowed`, so
    it learns that instead of being given a partial picture.
    """

    def __init__(self, hub: EventHub, max_buffer: int, accept: RecordFilter | None) -> None:
        self._hub = hub
        self.accept = accept
        self.max_buffer = max_buffer
        self.overflowed = False
        self.closed = False
        self.ended_by: str | None = None  # "overflow" or "shutdown", once ended
        self._cursor = hub._seq  # the last change seen
        self._ready: dict[str, Change] = {}  # task id -> latest change not handed out yet
        self._waiter: asyncio.Future[None] | None = None

    def _collect(self) -> None:
        """Move the changes since the cursor into `_ready`, oldest first."""
        hub = self._hub
        if hub._seq == self._cursor or self.closed:
            return
        limit = self.max_buffer * _HARD_FACTOR
        fresh: list[Change] = []
        if self._cursor >= hub._floor:
            for seq, change in reversed(hub._log.values()):  # newest first
                if seq <= self._cursor:
                    break
                fresh.append(change)
                if len(fresh) > limit:
                    break
        if self._cursor < hub._floor or len(fresh) > limit:
            self.overflowed = True
            self._ready = {}
            self._end("overflow")
            return
        self._cursor = hub._seq
        ready, accept = self._ready, self.accept
        for change in reversed(fresh):
            if accept is None or accept(change.record):
                ready.pop(change.record.id, None)  # an older state not handed out: replaced
                ready[change.record.id] = change

    def _end(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.ended_by = reason
            self._hub._unsubscribe(self)
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)

    def close(self, reason: str = "closed") -> None:
        """Stop receiving: the reader gets what is pending, then the end of the stream."""
        if not self.closed:
            self._collect()
            self._end(reason)

    def __aiter__(self) -> Subscription:
        return self

    def drain(self) -> list[Change]:
        """Everything ready now, without waiting (after `anext` returned one): lets a reader
        send a burst as one write."""
        self._collect()
        ready = list(self._ready.values())
        self._ready = {}
        return ready

    async def wait(self) -> bool:
        """Wait until something is ready to read; False once the subscription has ended
        and nothing is left."""
        while True:
            if self._ready or (self._hub._seq != self._cursor and not self.closed):
                return True
            if self.closed:
                return False
            await self._park()

    def drain_text(self) -> str:
        """Everything ready now, as the stream's text (the events, joined), without waiting.

        Subscriptions without a filter that read from the same position to the same head
        get one text, made by the first of them: two hundred streams reading together
        cost one pass over the changes, not two hundred.
        """
        hub = self._hub
        shared = self.accept is None and not self._ready and not self.closed
        if shared:
            start, limit = self._cursor, self.max_buffer * _HARD_FACTOR
            if start == hub._seq:
                return ""
            cached = hub._shared_text
            if cached is not None and cached[:3] == (start, hub._seq, limit):
                self._cursor = hub._seq
                return cached[3]
        self._collect()
        text = "".join([change.event for change in self._ready.values()])
        self._ready = {}
        if shared and not self.overflowed:
            hub._shared_text = (start, hub._seq, limit, text)
        return text

    async def __anext__(self) -> Change:
        while True:
            if not self._ready:
                self._collect()
            if self._ready:
                task_id = next(iter(self._ready))
                return self._ready.pop(task_id)
            if self.closed:
                raise StopAsyncIteration
            await self._park()

    async def _park(self) -> None:
        """Wait for the hub's next change (or the end of the subscription)."""
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        self._hub._readers.append(waiter)
        try:
            await waiter
        finally:
            self._waiter = None

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._end("closed")
        self._ready = {}


_HARD_FACTOR = 64
PACE = 0.05  # seconds between two writes of a stream, with up to 20 streams open
_PACE_STREAMS = 20
_PACE_MAX = 1.0
_LOG_MAX = 16_384  # tasks in the change log: a reader further behind has missed changes


class EventHub:
    """Fan-out of task changes to listeners and subscriptions."""

    def __init__(self, *, log_max: int = _LOG_MAX, keep_finals: int = 0) -> None:
        self._listeners: list[Listener] = []
        self._remote_listeners: list[Listener] = []
        self._final_listeners: list[Listener] = []
        self._callback_listeners: list[Listener] = []  # final records with a callback only
        self._subscriptions: set[Subscription] = set()
        # The change log the subscriptions read (kept only while there are any).
        self._log: dict[str, tuple[int, Change]] = {}  # task id -> (seq, latest change)
        self._seq = 0
        self._floor = 0  # the newest seq dropped from the log's start
        self._log_max = log_max
        self._readers: list[asyncio.Future[None]] = []  # subscriptions waiting for a change
        self.waiters: dict[str, list[asyncio.Future[TaskRecord]]] = {}
        """Task ids someone awaits the final record of (`final_waiter`); read-only outside."""
        self._closed: str | None = None  # why subscriptions were ended for good
        # The last text `Subscription.drain_text` made: (from seq, to seq, limit, text).
        self._shared_text: tuple[int, int, int, str] | None = None
        self._pace_waiters: list[asyncio.Future[None]] = []
        self._pace_handle: asyncio.TimerHandle | None = None
        # The last `keep_finals` final records published, by id (see `recent_final`).
        self._keep_finals = keep_finals
        self._finals: dict[str, TaskRecord] = {}
        self.watched = False
        """True while someone follows every change (a listener of all changes, or a
        subscription). While it is False a change to a non-final status reaches nobody, so
        a store may skip publishing it: the memory store's hot path does."""
        self.finals_wanted = bool(keep_finals)
        """True while every final record is wanted (kept for `recent_final`, or a listener
        or subscription takes them all). While it is False a final record reaches nobody
        unless it has a callback or someone waits for its id (`waiters`), so a store may
        skip publishing it: the memory store's hot path does (the call alone costs about
        as much as a twentieth of an in-process task)."""

    def add_listener(
        self,
        listener: Listener,
        *,
        final_only: bool = False,
        with_callback: bool = False,
        remote_only: bool = False,
    ) -> Callable[[], None]:
        """Call `listener(record)` on every change, or with `final_only` only when a task
        reaches a final status, and then, with `with_callback`, only if the task has a
        callback. Returns a function that removes the listener.

        `with_callback` exists because final listeners run for every task: testing an
        attribute costs far less than calling a function that returns at once, and with no
        other final listener a store may skip publishing (see `finals_wanted`). With
        `remote_only`, only changes written by other processes (a store's feed) are passed
        on.
        """
        # Copy on change (rare), so publishing (every task) iterates without copying and a
        # listener may remove itself while it runs.
        if with_callback:
            if not final_only:
                raise ValueError("`with_callback` applies to final_only listeners")
            self._callback_listeners = [*self._callback_listeners, listener]

            def remove_callback() -> None:
                self._callback_listeners = [
                    x for x in self._callback_listeners if x is not listener
                ]

            return remove_callback
        if final_only:
            self._final_listeners = [*self._final_listeners, listener]
            self._rewatch()

            def remove() -> None:
                self._final_listeners = [x for x in self._final_listeners if x is not listener]
                self._rewatch()

            return remove
        if remote_only:
            self._remote_listeners = [*self._remote_listeners, listener]

            def remove_remote() -> None:
                self._remote_listeners = [x for x in self._remote_listeners if x is not listener]

            return remove_remote
        self._listeners = [*self._listeners, listener]
        self._rewatch()

        def remove_any() -> None:
            self._listeners = [x for x in self._listeners if x is not listener]
            self._rewatch()

        return remove_any

    def _rewatch(self) -> None:
        self.watched = bool(self._listeners or self._subscriptions)
        self.finals_wanted = bool(self.watched or self._final_listeners or self._keep_finals)

    def subscribe(
        self, *, max_buffer: int = 256, accept: RecordFilter | None = None
    ) -> Subscription:
        """A new subscription; close it (or use `async with`) to release it.

        After `close()` (shutdown) a new subscription starts ended, so a stream opened while
        the server stops ends at once too.
        """
        subscription = Subscription(self, max_buffer, accept)
        if self._closed is not None:
            subscription.closed = True
            subscription.ended_by = self._closed
            return subscription
        self._subscriptions.add(subscription)
        self._rewatch()
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)
        self._rewatch()
        if not self._subscriptions:  # nobody reads the log: drop it
            self._log = {}
            self._floor = self._seq
            self._shared_text = None

    async def pace(self) -> None:
        """Wait for the streams' next shared tick.

        Every stream waits for the same tick between two writes, so they read together
        (and share one text, see `drain_text`) and each write carries every task changed
        since the last, in its latest state. Ticks come every `PACE` seconds, slower with
        many streams open (one write a stream costs the server tens of microseconds
        whatever it carries): `PACE * streams / 20`, at most one second.
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._pace_waiters.append(waiter)
        if self._pace_handle is None:
            delay = min(_PACE_MAX, PACE * max(1.0, len(self._subscriptions) / _PACE_STREAMS))
            self._pace_handle = loop.call_later(delay, self._tick)
        try:
            await waiter
        finally:
            waiter.cancel()  # a cancelled wait leaves nothing behind but a done future

    def _tick(self) -> None:
        self._pace_handle = None
        waiters, self._pace_waiters = self._pace_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

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
        waiters = self.waiters.get(task_id)
        if waiters is None:
            self.waiters[task_id] = [future]
        else:
            waiters.append(future)
        return future

    def recent_final(self, task_id: str) -> TaskRecord | None:
        """The final record of `task_id` if it is among the last ones published (whichever
        process wrote it): `wait()` after a task finished then needs no store query. A
        final record's status, result and times never change."""
        return self._finals.get(task_id)

    def forget_waiter(self, task_id: str, future: asyncio.Future[TaskRecord]) -> None:
        """Stop waiting (a timeout, a cancelled wait): nothing is kept for `task_id`."""
        future.cancel()
        waiters = self.waiters.get(task_id)
        if waiters is not None and future in waiters:
            waiters.remove(future)
            if not waiters:
                del self.waiters[task_id]

    def publish(self, record: TaskRecord, *, remote: bool = False) -> None:
        """Pass a change on; `remote` when another process wrote it (a store's feed)."""
        if remote and self._remote_listeners:
            for listener in self._remote_listeners:
                self._call(listener, record)
        if record.status._value_ in FINAL_VALUES:
            self.publish_final(record)
            return
        if self._listeners:
            for listener in self._listeners:  # never mutated in place: see add_listener
                self._call(listener, record)
        if self._subscriptions:
            self._log_change(record)

    def publish_final(self, record: TaskRecord) -> None:
        """`publish` of a record known to be final, after the remote listeners: `publish`
        ends here for every final record, and the memory store's hot path (one call per
        task) calls it directly."""
        if self.waiters:
            for future in self.waiters.pop(record.id, ()):
                if not future.done():
                    future.set_result(record)
        if self._keep_finals:
            finals = self._finals
            finals[record.id] = record
            if len(finals) > self._keep_finals:
                del finals[next(iter(finals))]
        if self._listeners:
            for listener in self._listeners:
                self._call(listener, record)
        for listener in self._final_listeners:
            self._call(listener, record)
        if record.callback is not None:
            for listener in self._callback_listeners:
                self._call(listener, record)
        if self._subscriptions:
            self._log_change(record)

    def _log_change(self, record: TaskRecord) -> None:
        """One log entry, however many subscriptions read it; wake the waiting readers."""
        seq = self._seq = self._seq + 1
        log = self._log
        task_id = record.id
        if task_id in log:
            del log[task_id]  # re-added at the end: the log is ordered by last change
        log[task_id] = (seq, Change(record))
        if len(log) > self._log_max:
            self._floor = log.pop(next(iter(log)))[0]
        readers = self._readers
        if readers:
            self._readers = []
            for reader in readers:
                if not reader.done():
                    reader.set_result(None)

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
        if self._pace_handle is not None:  # streams between two writes: now, not later
            self._pace_handle.cancel()
            self._tick()
