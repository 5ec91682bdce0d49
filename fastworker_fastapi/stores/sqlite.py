"""`SQLiteStore`: every app process on one host shares one file; tasks survive restarts.

Why it is shaped this way (numbers from docs/DESIGN section 7, measured on a 2-core box):

- **One writer thread per store, group commit.** A commit costs far more than a statement,
  and SQLite takes one writer at a time anyway, so the thread takes *every* pending write,
  runs them in one `BEGIN IMMEDIATE` transaction and commits once (3.5-5.6k task cycles/s,
  against 1.5k/s for a thread hop and commit per write). Each write runs inside its own
  SAVEPOINT, so one failing write (a duplicate id) fails alone and a batch insert is all or
  none. Results go back to the event loop with one `call_soon_threadsafe` per transaction;
  the loop never waits on the write lock.
- **Reads on the loop.** A read by primary key takes tens of microseconds, less than a hop
  to a thread, so `get`, `peek` and `recent` read on the loop from their own connection
  (WAL readers never wait for the writer).
- **A commit-ordered sequence.** Every write transaction stamps each row it writes with
  `seq` = one more than the highest `seq` in the table, and `writer` = the owner id that
  wrote it. Transactions are serialised by the write lock, so `seq` order is commit order
  and "rows with `seq` above what I have seen" is a complete change feed (a row rewritten
  twice shows its latest state, which is all a reader needs). The highest `seq` is read
  from its index, not counted in a row every transaction would rewrite (one page less per
  commit); `expire`, the only code that deletes rows, first keeps it in `meta`, so the
  sequence never goes back.
- **Change feed.** Each store checks `PRAGMA data_version` every `poll_interval` (it changes
  when another connection commits) and then publishes the new rows other owners wrote. A
  wake-up hint makes that sub-millisecond: each store binds a unix datagram socket named by
  its owner id in a folder next to the file (`<file>-hints/`), and the writer sends one byte
  to the others after each commit. Hints may be lost; the poll is the backstop.
- **Owners and leases.** Each `open` registers a fresh owner id with its host key, pid,
  process start time and lease expiry; a heartbeat renews it. `recover` judges an owner dead
  when its lease expired, or, at once, when it ran on this host (same host key: hostname,
  pid namespace and boot id) and its process is gone (or the pid now belongs to a process
  started at another time). Without a pid namespace to compare, only the lease counts, so
  two containers that share a file and a hostname never judge each other by pid.
- **JSON rows.** The whole record is one JSON text (`TaskRecord.to_json`), next to real
  columns for what queries filter on. An update is one statement: a compare-and-set on
  `owner` and `attempts` that rewrites the changed JSON keys with `json_set` and returns
  the new row.

Local disk only: SQLite's locking does not hold on network file systems.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields
from datetime import datetime
from typing import TYPE_CHECKING, Any

from fastworker.tasks.models import TaskStatus

from fastworker_fastapi.errors import (
    ConfigurationError,
    TaskAlreadyFinishedError,
    TaskNotFoundError,
)
from fastworker_fastapi.records import (
    FINAL_STATUSES,
    WAITING_STATUSES,
    TaskRecord,
    dumps,
    evolve,
)
from fastworker_fastapi.stores._fields import encode_field, epoch, micros, schedule_state
from fastworker_fastapi.stores._hosts import host_key, proc_start, process_gone
from fastworker_fastapi.stores.base import ScheduleState, cancelled_changes, released_changes

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from fastworker_fastapi.events import EventHub

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

logger = logging.getLogger("fastworker_fastapi")

SCHEMA_VERSION = 1
"""Bumped by every schema change; `open` migrates older files and refuses newer ones."""

# Indexes only where a write does not pay for them on every status change: `seq` (the
# feed; it changes with every write anyway), `owner` (recovery; set at insert and claims),
# unowned tasks (claims; only released tasks are in it) and finished ones by completion
# (retention). Listing walks rowids newest first, which is insertion order.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    writer TEXT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    owner TEXT,
    attempts INTEGER NOT NULL,
    eta REAL,
    created REAL NOT NULL,
    completed_at REAL,
    cancel_requested INTEGER NOT NULL,
    delivery_open INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_seq ON tasks (seq);
CREATE INDEX IF NOT EXISTS tasks_owner ON tasks (owner);
CREATE INDEX IF NOT EXISTS tasks_unowned ON tasks (status) WHERE owner IS NULL;
CREATE INDEX IF NOT EXISTS tasks_completed_at ON tasks (completed_at)
    WHERE completed_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS owners (
    owner TEXT PRIMARY KEY,
    host TEXT,
    pid INTEGER NOT NULL,
    started TEXT,
    heartbeat REAL NOT NULL,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS schedules (
    name TEXT PRIMARY KEY,
    paused INTEGER NOT NULL DEFAULT 0,
    last_due INTEGER,
    resumed_at INTEGER
) WITHOUT ROWID;
"""

# The feed's sequence: one more than the highest `seq` written, read (two index lookups)
# rather than counted in a row every transaction would write. Rows go only through
# `expire`, which first keeps the highest seq in `meta`, so the sequence never goes back.
_NEXT_SEQ = (
    "SELECT max(coalesce((SELECT max(seq) FROM tasks), 0),"
    " (SELECT value FROM meta WHERE key = 'seq')) + 1"
)
_KEEP_SEQ = (
    "UPDATE meta SET value = max(value, coalesce((SELECT max(seq) FROM tasks), 0))"
    " WHERE key = 'seq'"
)
_OWN_LIMIT = 100_000  # own unfinished tasks remembered (beyond it, writes read rows back)
_FINAL = tuple(s.value for s in FINAL_STATUSES)
_WAITING = tuple(s.value for s in WAITING_STATUSES)
_UNFINISHED = tuple(s.value for s in TaskStatus if s not in FINAL_STATUSES)
_FINAL_SQL = ", ".join(f"'{s}'" for s in _FINAL)
_WAITING_SQL = ", ".join(f"'{s}'" for s in _WAITING)
_UNFINISHED_SQL = ", ".join(f"'{s}'" for s in _UNFINISHED)
_FIELDS = frozenset(f.name for f in fields(TaskRecord)) - {"id"}
_INSERT = (
    "INSERT INTO tasks (id, seq, writer, name, status, owner, attempts, eta, created,"
    " completed_at, cancel_requested, delivery_open, data)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_CLAIM_AHEAD = 1.0
"""Seconds ahead of its eta a task may be claimed (the claimer's timer covers the rest)."""
_FEED_PAGE = 500
_MAX_GROUP = 2000
_STOP = object()

Op = Callable[[sqlite3.Connection, int], tuple[Any, Sequence[TaskRecord]]]
"""A write: runs in the writer thread inside a transaction whose sequence number it gets;
returns its result and the records to publish once committed."""


class SQLiteStore:
    """Tasks in one SQLite file shared by every app process on this host."""

    durable = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        lease: float = 30.0,
        heartbeat_interval: float | None = None,
        poll_interval: float = 0.1,
        busy_timeout: float = 5.0,
    ) -> None:
        if lease <= 0 or poll_interval <= 0 or busy_timeout < 0:
            raise ConfigurationError("lease and poll_interval must be > 0, busy_timeout >= 0")
        self.path = os.path.abspath(os.fspath(path))
        self.lease = lease
        self.heartbeat_interval = lease / 3 if heartbeat_interval is None else heartbeat_interval
        self.poll_interval = poll_interval
        self.busy_timeout = busy_timeout
        self.owner = uuid.uuid4().hex
        self.result_ttl = 3600.0
        self.max_results = 10_000
        self._hub: EventHub | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._reader: sqlite3.Connection | None = None
        self._thread_readers = threading.local()
        self._thread_conns: list[sqlite3.Connection] = []  # closed with the store
        self._thread_conns_lock = threading.Lock()
        self._closing = False
        self._stopped = asyncio.Event()
        self._wake = asyncio.Event()
        self._last_seq = 0
        self._data_version = -1
        self._host, self._pid, self._started = host_key(), os.getpid(), proc_start(os.getpid())
        self._hints: _Hints | None = None
        self._update_sql: dict[tuple[str, ...], str] = {}
        self._cas_sql: dict[tuple[str, str, bool], str] = {}  # see `_cas`
        # This process's own unfinished tasks as last written, so that a write needs no
        # read back: the writer thread alone reads and changes it (see _cas).
        self._own: dict[str, TaskRecord] = {}

    @property
    def description(self) -> str:
        return f"sqlite:///{self.path}"

    @property
    def hub(self) -> EventHub:
        if self._hub is None:
            raise RuntimeError("the store is not open")
        return self._hub

    # -- life cycle --------------------------------------------------------------------------

    async def open(
        self, hub: EventHub, task_group: TaskGroup, *, result_ttl: float, max_results: int
    ) -> None:
        if self._writer is not None:
            raise RuntimeError("the store is open already")
        self.owner = uuid.uuid4().hex  # a fresh owner per process start, never reused
        self.result_ttl = result_ttl
        self.max_results = max_results
        self._hub = hub
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._closing = False
        self._stopped = asyncio.Event()
        self._wake = asyncio.Event()
        self._queue = queue.SimpleQueue()
        ready: asyncio.Future[int] = self._loop.create_future()
        self._writer = threading.Thread(
            target=self._write_loop, args=(ready,), name=f"fastworker-sqlite-{self.owner[:8]}"
        )
        self._writer.daemon = True
        self._writer.start()
        try:
            self._last_seq = await ready
            self._reader = self._connect()
            self._reader.execute("PRAGMA query_only = ON")
            self._data_version = self._reader.execute("PRAGMA data_version").fetchone()[0]
        except BaseException:
            await self._stop_writer()
            raise
        self._hints = _Hints.start(self.path, self.owner, self._loop, self._wake)
        task_group.start_soon(self._feed)
        task_group.start_soon(self._heartbeats)

    async def close(self) -> None:
        """Release this owner's leftover tasks and unregister it, then stop the feed, the
        heartbeats and the writer thread (pending writes are committed first)."""
        if self._writer is None or self._closing:
            return
        self._closing = True
        self._stopped.set()
        self._wake.set()
        try:
            await self._submit(self._close_op)
        except Exception:
            logger.exception("could not unregister owner %s from %s", self.owner, self.path)
        await self._stop_writer()
        if self._hints is not None:
            self._hints.close()
            self._hints = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        with self._thread_conns_lock:
            conns, self._thread_conns = self._thread_conns, []
        for conn in conns:
            conn.close()

    async def _stop_writer(self) -> None:
        writer = self._writer
        if writer is None:
            return
        self._queue.put(_STOP)
        await asyncio.to_thread(writer.join)  # it commits what is queued, then ends
        self._writer = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
        )
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        return conn

    # -- the writer thread -------------------------------------------------------------------

    def _write_loop(self, ready: asyncio.Future[int]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            conn = self._connect()
            try:
                last_seq = self._setup(conn)
            except BaseException:
                conn.close()
                raise
        except (sqlite3.Error, OSError) as exc:
            error = ConfigurationError(
                f"cannot use the SQLite task store {self.path}: {exc} (is it a SQLite file on a"
                " local disk this process may write, in a folder that exists?)"
            )
            loop.call_soon_threadsafe(_settle, ready, None, error)
            return
        loop.call_soon_threadsafe(_settle, ready, last_seq, None)
        stop = False
        try:
            while not stop:
                batch = [self._queue.get()]
                with contextlib.suppress(queue.Empty):
                    while len(batch) < _MAX_GROUP:
                        batch.append(self._queue.get_nowait())
                ops = []
                for item in batch:
                    if item is _STOP:
                        stop = True
                    else:
                        ops.append(item)
                if ops:
                    self._commit(conn, ops)
        finally:
            conn.close()

    def _setup(self, conn: sqlite3.Connection) -> int:
        # Switching a new file to WAL can answer "locked" at once, without the busy handler,
        # while another process does the same: retry it within the busy timeout.
        give_up = time.monotonic() + self.busy_timeout
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > give_up:
                    raise
                time.sleep(0.01)
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"WAL mode refused (journal_mode is {mode!r})")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?), ('seq', 0)",
                    (SCHEMA_VERSION,),
                )
            elif int(row[0]) > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"schema version {row[0]} is newer than this version understands "
                    f"({SCHEMA_VERSION}): upgrade fastworker-fastapi"
                )
            # (older versions migrate here, step by step, when there are any)
            now = time.time()
            conn.execute(
                "INSERT INTO owners (owner, host, pid, started, heartbeat, expires)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (self.owner, self._host, self._pid, self._started, now, now + self.lease),
            )
            seq = int(conn.execute(_NEXT_SEQ).fetchone()[0]) - 1
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return seq

    def _commit(self, conn: sqlite3.Connection, ops: list[tuple[Op, asyncio.Future[Any]]]) -> None:
        """Run `ops` in one transaction, each in its own savepoint; hand the outcomes to
        the loop with one call."""
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None, Sequence[Any]]]
        outcomes = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                (seq,) = conn.execute(_NEXT_SEQ).fetchone()
                pending = self._coalesce(ops) if len(ops) > 1 else [(ops[0][0], [ops[0][1]])]
                if len(pending) == 1:  # alone in its transaction: no savepoint needed
                    ((op, futures),) = pending
                    result, records = op(conn, seq)  # a failure rolls the whole back
                    _settled(outcomes, futures, result, None, records)
                for op, futures in pending if len(pending) > 1 else ():
                    if getattr(op, "single_statement", False):
                        # One statement is atomic by itself: no savepoint (each statement
                        # is a round trip for the GIL, which the event loop also wants).
                        try:
                            result, records = op(conn, seq)
                        except Exception as exc:
                            _settled(outcomes, futures, None, exc, ())
                        else:
                            _settled(outcomes, futures, result, None, records)
                        continue
                    conn.execute("SAVEPOINT op")
                    try:
                        result, records = op(conn, seq)
                    except Exception as exc:
                        conn.execute("ROLLBACK TO op")
                        conn.execute("RELEASE op")
                        _settled(outcomes, futures, None, exc, ())
                    else:
                        conn.execute("RELEASE op")
                        _settled(outcomes, futures, result, None, records)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except Exception as exc:  # the transaction failed as a whole: every write fails
            outcomes = [(future, None, exc, ()) for _, future in ops]
        else:
            if self._hints is not None:
                self._hints.notify()
        loop = self._loop
        assert loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(self._deliver, outcomes)

    def _deliver(
        self, outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None, Sequence[Any]]]
    ) -> None:
        publish = self._hub.publish if self._hub is not None else None
        for future, result, error, records in outcomes:
            if publish is not None:
                for record in records:
                    publish(record)
            _settle(future, result, error)

    def _submit(self, op: Op) -> asyncio.Future[Any]:
        if self._writer is None or self._loop is None:
            raise RuntimeError("the store is not open")
        future: asyncio.Future[Any] = self._loop.create_future()
        self._queue.put((op, future))
        return future

    # -- writes ------------------------------------------------------------------------------

    async def insert(self, records: Sequence[TaskRecord]) -> None:
        if not records:
            return
        rows = [self._row(record) for record in records]  # JSON errors raise here, not later
        owner = self.owner
        records = tuple(records)

        def op(conn: sqlite3.Connection, seq: int) -> tuple[None, Sequence[TaskRecord]]:
            try:
                if len(rows) == 1:
                    conn.execute(_INSERT, (rows[0][0], seq, owner, *rows[0][1:]))
                else:
                    conn.executemany(_INSERT, [(row[0], seq, owner, *row[1:]) for row in rows])
            except sqlite3.IntegrityError as exc:
                raise ValueError(f"a task in this batch exists already ({exc})") from None
            self._remember(records)
            return None, records

        if len(rows) == 1:
            op.single_statement = True  # type: ignore[attr-defined]

        await self._submit(op)

    async def insert_if_absent(self, record: TaskRecord) -> bool:
        row = self._row(record)
        owner = self.owner

        def op(conn: sqlite3.Connection, seq: int) -> tuple[bool, Sequence[TaskRecord]]:
            cursor = conn.execute(
                _INSERT + " ON CONFLICT (id) DO NOTHING", (row[0], seq, owner, *row[1:])
            )
            added = cursor.rowcount == 1
            if added:
                self._remember((record,))
            return added, (record,) if added else ()

        added: bool = await self._submit(op)
        return added

    async def update(
        self, task_id: str, expect_owner: str | None, expect_attempts: int, **changes: Any
    ) -> TaskRecord | None:
        record: TaskRecord | None = await self.update_nowait(
            task_id, expect_owner, expect_attempts, **changes
        )
        if record is None:
            logger.debug("dropped a write to task %s: owner or attempt changed", task_id)
        return record

    def update_nowait(
        self, task_id: str, expect_owner: str | None, expect_attempts: int, **changes: Any
    ) -> asyncio.Future[TaskRecord | None]:
        """`update`, queued at once: this store applies one process's writes in the order
        they were made, so a caller that needs no answer yet (the scheduler marking a task
        RUNNING) need not wait for the commit before going on."""
        future: asyncio.Future[TaskRecord | None] = self._submit(
            self._update_op(task_id, expect_owner, expect_attempts, changes)
        )
        return future

    def _update_op(
        self, task_id: str, expect_owner: str | None, expect_attempts: int, changes: dict[str, Any]
    ) -> Op:
        self._check_keys(changes)  # a bad field fails the caller, not the writer thread

        def op(conn: sqlite3.Connection, seq: int) -> tuple[TaskRecord | None, Sequence[Any]]:
            # Prepared here, in the writer: a write merged with the next one (`_coalesce`)
            # is then prepared once, and its parts never.
            sql, params = self._prepare(changes)
            record = self._cas(
                conn, seq, sql, params, task_id, expect_owner, expect_attempts, changes=changes
            )
            return record, () if record is None else (record,)

        op.single_statement = True  # type: ignore[attr-defined]
        op.cas = (task_id, expect_owner, expect_attempts, changes)  # type: ignore[attr-defined]
        return op

    def _coalesce(self, ops: list[tuple[Op, asyncio.Future[Any]]]) -> list[_Pending]:
        """Merge the writes of one task that follow each other in this batch (a task marked
        RUNNING and finished before the writer got to it) into one compare-and-set: the
        second expects what the first leaves, so applying both at once is the same, at
        one statement instead of two. Writer thread only."""
        merged: list[_Pending] = []
        last: dict[str, int] = {}  # task id -> index in `merged` of its latest write
        for op, future in ops:
            cas = getattr(op, "cas", None)
            if cas is not None:
                task_id, owner, attempts, changes = cas
                index = last.get(task_id)
                if index is not None:
                    prev_op, prev_futures = merged[index]
                    _, p_owner, p_attempts, p_changes = prev_op.cas  # type: ignore[attr-defined]
                    if (
                        p_changes.get("owner", p_owner) == owner
                        and p_changes.get("attempts", p_attempts) == attempts
                    ):
                        both = self._update_op(
                            task_id, p_owner, p_attempts, {**p_changes, **changes}
                        )
                        merged[index] = (both, [*prev_futures, future])
                        continue
                last[task_id] = len(merged)
            else:
                last.clear()  # an insert or a multi-row op: keep the order as it is
            merged.append((op, [future]))
        return merged

    def _row(self, record: TaskRecord) -> tuple[Any, ...]:
        data = record.to_json()
        delivery = record.delivery
        completed = epoch(record.completed_at)
        if completed is None and record.status in FINAL_STATUSES:
            completed = time.time()
        return (
            record.id,
            record.name,
            record.status.value,
            record.owner,
            record.attempts,
            epoch(record.eta),
            record.created,
            completed,
            int(record.cancel_requested),
            int(delivery is not None and delivery.open),
            dumps(data),
        )

    def _check_keys(self, changes: dict[str, Any]) -> str:
        """The SET clause for the keys of `changes` (cached: the scheduler writes a few
        shapes over and over); ValueError for a key that is not a record field."""
        keys = tuple(changes)
        sql = self._update_sql.get(keys)
        if sql is None:  # a new shape: check its keys once
            unknown = set(keys) - _FIELDS
            if unknown:
                raise ValueError(f"not task record fields: {sorted(unknown)}")
            sql = self._update_sql[keys] = _set_clause(keys)
        return sql

    def _prepare(self, changes: dict[str, Any]) -> tuple[str, list[Any]]:
        """The SET clause and its parameters for `changes`."""
        sql = self._check_keys(changes)
        params: list[Any] = [_field_json(key, value) for key, value in changes.items()]
        for key, value in changes.items():
            if key in _COLUMNS:
                params.append(_COLUMNS[key](value))
                if key == "status" and "completed_at" not in changes:
                    params.extend((params[-1], time.time()))
        return sql, params

    def _cas(
        self,
        conn: sqlite3.Connection,
        seq: int,
        sql: str,
        params: list[Any],
        task_id: str,
        expect_owner: str | None,
        expect_attempts: int,
        extra: str = "",
        changes: dict[str, Any] | None = None,
    ) -> TaskRecord | None:
        """Compare-and-set one task (writer thread only). With `changes` and the task in
        `_own`, the new record is made from the one last written, without reading the row
        back: the JSON decode would cost more than the write."""
        base = self._own.get(task_id) if changes is not None else None
        shape = (sql, extra, base is not None)
        statement = self._cas_sql.get(shape)
        if statement is None:  # a few shapes, written over and over: made once each
            statement = self._cas_sql[shape] = (
                f"UPDATE tasks SET {sql}, seq = ?, writer = ?"
                f" WHERE id = ? AND owner IS ? AND attempts = ?{extra}"
                + ("" if base is not None else " RETURNING data")
            )
        cursor = conn.execute(
            statement, (*params, seq, self.owner, task_id, expect_owner, expect_attempts)
        )
        if base is not None:  # the new record is made here: the row count says it matched
            if cursor.rowcount != 1:
                self._own.pop(task_id, None)
                return None
            record = evolve(base, changes)  # type: ignore[arg-type]
        else:
            row = cursor.fetchone()
            if row is None:
                self._own.pop(task_id, None)
                return None
            record = _decode(row[0])
        if record.owner != self.owner or record.status in FINAL_STATUSES:
            self._own.pop(task_id, None)
        elif task_id in self._own:
            self._own[task_id] = record
        return record

    def _remember(self, records: Sequence[TaskRecord]) -> None:
        own = self._own
        for record in records:
            if record.owner == self.owner and len(own) < _OWN_LIMIT and not record.finished:
                own[record.id] = record

    async def request_cancel(self, task_id: str) -> TaskRecord:
        flag_sql, flag_params = self._prepare({"cancel_requested": True})

        def op(conn: sqlite3.Connection, seq: int) -> tuple[TaskRecord, Sequence[Any]]:
            row = conn.execute("SELECT data FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None:
                raise TaskNotFoundError(f"no task with id {task_id!r} (unknown or expired)")
            record = _decode(row[0])
            if record.finished:
                raise TaskAlreadyFinishedError(
                    f"task {task_id} already finished with status {record.status.value!r}"
                )
            if record.owner is None:  # nobody runs it: cancelled here and now
                sql, params = self._prepare(cancelled_changes(record))
            else:  # its owner acts on the flag
                sql, params = flag_sql, flag_params
            updated = self._cas(conn, seq, sql, params, task_id, record.owner, record.attempts)
            assert updated is not None  # read and write in one transaction: cannot fail
            return updated, (updated,)

        updated: TaskRecord = await self._submit(op)
        return updated

    # -- reads -------------------------------------------------------------------------------

    def _read_conn(self) -> sqlite3.Connection:
        """The loop's connection, or (for FastWorker's sync API called from a worker
        thread) one per thread: a connection is not shared between threads."""
        if threading.get_ident() == self._loop_thread and self._reader is not None:
            return self._reader
        if self._writer is None:
            raise RuntimeError("the store is not open")
        conn: sqlite3.Connection | None = getattr(self._thread_readers, "conn", None)
        if conn is None:
            conn = self._thread_readers.conn = self._connect()
            conn.execute("PRAGMA query_only = ON")
            with self._thread_conns_lock:
                self._thread_conns.append(conn)
        return conn

    async def get(self, task_id: str) -> TaskRecord | None:
        return self.peek(task_id)

    def peek(self, task_id: str) -> TaskRecord | None:
        row = self._read_conn().execute("SELECT data FROM tasks WHERE id = ?", (task_id,))
        found = row.fetchone()
        return None if found is None else _decode(found[0])

    async def recent(
        self, *, limit: int, status: TaskStatus | None = None, name: str | None = None
    ) -> list[TaskRecord]:
        where, params = [], []
        if status is not None:
            where.append("status = ?")
            params.append(status.value)
        if name is not None:
            where.append("name = ?")
            params.append(name)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = self._read_conn().execute(
            f"SELECT data FROM tasks{clause} ORDER BY rowid DESC LIMIT ?",
            (*params, max(limit, 0)),
        )
        return list(_decode_many(row[0] for row in rows))

    # -- leases, recovery, retention -----------------------------------------------------------

    async def heartbeat(self) -> None:
        await self._submit(self._heartbeat_op)

    def _heartbeat_op(self, conn: sqlite3.Connection, seq: int) -> tuple[None, Sequence[Any]]:
        now = time.time()
        cursor = conn.execute(
            "UPDATE owners SET heartbeat = ?, expires = ? WHERE owner = ?",
            (now, now + self.lease, self.owner),
        )
        if cursor.rowcount == 0:  # judged dead (a stall longer than the lease): rejoin
            logger.warning(
                "owner %s had lost its lease on %s; its tasks were released to other processes",
                self.owner,
                self.path,
            )
            conn.execute(
                "INSERT INTO owners (owner, host, pid, started, heartbeat, expires)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (self.owner, self._host, self._pid, self._started, now, now + self.lease),
            )
        return None, ()

    async def _heartbeats(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat_interval):
                    await self._stopped.wait()
            if self._closing:
                return
            try:
                await self.heartbeat()
            except Exception:
                logger.exception("heartbeat to %s failed", self.path)

    async def recover(self, can_run: Callable[[str], bool], limit: int) -> list[TaskRecord]:
        await self._submit(self._release_dead_op)
        if limit <= 0:
            return []
        conn = self._read_conn()
        due = time.time() + _CLAIM_AHEAD
        waiting = f"owner IS NULL AND status IN ({_WAITING_SQL}) AND (eta IS NULL OR eta <= ?)"
        names = [
            name
            for (name,) in conn.execute(f"SELECT DISTINCT name FROM tasks WHERE {waiting}", (due,))
            if can_run(name)
        ]
        marks = ", ".join("?" * len(names))
        candidates = conn.execute(
            f"SELECT id, attempts FROM tasks WHERE ({waiting} AND name IN ({marks}))"
            f" OR (owner IS NULL AND status IN ({_FINAL_SQL}) AND delivery_open = 1)"
            " ORDER BY created LIMIT ?",
            (due, *names, limit),
        ).fetchall()
        if not candidates:
            return []
        sql, params = self._prepare({"owner": self.owner})
        claimable = f" AND (status IN ({_WAITING_SQL}) OR delivery_open = 1)"

        def op(conn: sqlite3.Connection, seq: int) -> tuple[list[TaskRecord], Sequence[Any]]:
            claimed = []
            for task_id, attempts in candidates:
                record = self._cas(conn, seq, sql, params, task_id, None, attempts, claimable)
                if record is not None:
                    claimed.append(record)
            return claimed, claimed

        claimed: list[TaskRecord] = await self._submit(op)
        return claimed

    def _release_dead_op(
        self, conn: sqlite3.Connection, seq: int
    ) -> tuple[None, Sequence[TaskRecord]]:
        now = time.time()
        dead: dict[str, str] = {}
        for owner, host, pid, started, expires in conn.execute(
            "SELECT owner, host, pid, started, expires FROM owners WHERE owner != ?",
            (self.owner,),
        ):
            if expires < now:
                dead[owner] = f"the lease of owner {owner} expired"
            elif host is not None and host == self._host and process_gone(pid, started):
                dead[owner] = f"process {pid} (owner {owner}) is gone"
        # Tasks whose owner row is gone (closed, or judged dead by a process that died
        # before releasing them) are released too.
        for (owner,) in conn.execute(
            f"SELECT DISTINCT owner FROM tasks WHERE owner IS NOT NULL AND owner != ?"
            f" AND (status IN ({_UNFINISHED_SQL}) OR delivery_open = 1)"
            " AND owner NOT IN (SELECT owner FROM owners)",
            (self.owner,),
        ):
            dead.setdefault(owner, f"owner {owner} is unregistered")
        if not dead:
            return None, ()
        released = []
        for owner, why in dead.items():
            conn.execute("DELETE FROM owners WHERE owner = ?", (owner,))
            logger.warning("releasing the tasks of a dead owner: %s", why)
            released.extend(self._release_owned(conn, seq, owner, why))
        return None, released

    def _release_owned(
        self, conn: sqlite3.Connection, seq: int, owner: str, why: str
    ) -> list[TaskRecord]:
        rows = conn.execute(
            f"SELECT data FROM tasks WHERE owner = ?"
            f" AND (status IN ({_UNFINISHED_SQL}) OR delivery_open = 1)",
            (owner,),
        ).fetchall()
        released = []
        for record in _decode_many(row[0] for row in rows):
            sql, params = self._prepare(released_changes(record, why))
            updated = self._cas(conn, seq, sql, params, record.id, owner, record.attempts)
            if updated is not None:
                released.append(updated)
        return released

    def _close_op(self, conn: sqlite3.Connection, seq: int) -> tuple[None, Sequence[TaskRecord]]:
        conn.execute("DELETE FROM owners WHERE owner = ?", (self.owner,))
        released = self._release_owned(conn, seq, self.owner, "its process closed the store")
        return None, released

    async def expire(self) -> int:
        ttl, keep = self.result_ttl, self.max_results

        def op(conn: sqlite3.Connection, seq: int) -> tuple[int, Sequence[Any]]:
            conn.execute(_KEEP_SEQ)  # the deleted rows may hold the highest seq: keep it
            gone = conn.execute(
                f"DELETE FROM tasks WHERE status IN ({_FINAL_SQL}) AND delivery_open = 0"
                " AND completed_at <= ?",
                (time.time() - ttl,),
            ).rowcount
            gone += conn.execute(
                "DELETE FROM tasks WHERE id IN (SELECT id FROM (SELECT id, delivery_open"
                f" FROM tasks WHERE status IN ({_FINAL_SQL})"
                " ORDER BY completed_at DESC, rowid DESC LIMIT -1 OFFSET ?)"
                " WHERE delivery_open = 0)",
                (max(keep, 0),),
            ).rowcount
            return gone, ()

        gone: int = await self._submit(op)
        return gone

    # -- schedules -----------------------------------------------------------------------------

    async def schedule_states(self) -> dict[str, ScheduleState]:
        rows = self._read_conn().execute("SELECT name, paused, last_due, resumed_at FROM schedules")
        return {row[0]: schedule_state(row) for row in rows}

    async def update_schedule(
        self,
        name: str,
        *,
        paused: bool | None = None,
        last_due: datetime | None = None,
        resumed_at: datetime | None = None,
    ) -> ScheduleState:
        params = (
            name,
            None if paused is None else int(paused),
            micros(last_due),
            micros(resumed_at),
        )

        def op(conn: sqlite3.Connection, seq: int) -> tuple[ScheduleState, Sequence[Any]]:
            row = conn.execute(
                "INSERT INTO schedules (name, paused, last_due, resumed_at)"
                " VALUES (?1, coalesce(?2, 0), ?3, ?4)"
                " ON CONFLICT (name) DO UPDATE SET"
                " paused = coalesce(?2, paused),"
                " last_due = CASE WHEN last_due IS NULL OR ?3 > last_due"
                " THEN coalesce(?3, last_due) ELSE last_due END,"
                " resumed_at = coalesce(?4, resumed_at)"
                " RETURNING name, paused, last_due, resumed_at",
                params,
            ).fetchone()
            return schedule_state(row), ()

        state: ScheduleState = await self._submit(op)
        return state

    # -- the change feed ---------------------------------------------------------------------

    async def _feed(self) -> None:
        """Publish other processes' changes: on a hint, or every `poll_interval`."""
        failures = 0
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._wake.wait()
            self._wake.clear()
            if self._closing:
                return
            try:
                await self._read_changes()
                failures = 0
            except sqlite3.Error:
                failures += 1
                if failures in (1, 100):  # once, then once more if it goes on
                    logger.exception("reading the change feed of %s failed", self.path)

    async def _read_changes(self) -> None:
        conn = self._reader
        if conn is None:
            return
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        if version == self._data_version:
            return
        self._data_version = version
        publish, owner = self.hub.publish, self.owner
        last_seq, last_rowid = self._last_seq, 0
        while True:
            rows = conn.execute(
                "SELECT seq, rowid, writer, data FROM tasks"
                " WHERE seq > ? OR (seq = ? AND rowid > ?) ORDER BY seq, rowid LIMIT ?",
                (last_seq, last_seq, last_rowid, _FEED_PAGE),
            ).fetchall()
            for seq, rowid, writer, data in rows:
                last_seq, last_rowid = seq, rowid
                if writer != owner:
                    record = _decode_or_none(data)
                    if record is not None:
                        publish(record, remote=True)
            self._last_seq = last_seq
            if len(rows) < _FEED_PAGE:
                return
            await asyncio.sleep(0)  # a long backlog: let the loop breathe between pages


# -- encoding -------------------------------------------------------------------------------


def _field_json(key: str, value: Any) -> str:
    """`dumps(encode_field(key, value))`, with the values the scheduler writes for every task
    (statuses, times, counts, plain results) encoded without building a JSON encoder."""
    if value is None:
        return "null"
    kind = type(value)
    if kind is str:
        return _quote(value)
    if kind is int:
        return int.__repr__(value)
    if kind is bool:
        return "true" if value else "false"
    if kind is datetime:
        return _quote(value.isoformat())
    if kind is TaskStatus:
        return _quote(value.value)
    return dumps(encode_field(key, value))


_quote = json.encoder.encode_basestring_ascii  # what `dumps` does with a str (C, ASCII)


def _status_value(value: Any) -> str:
    return value.value if type(value) is TaskStatus else TaskStatus(value).value  # type: ignore[no-any-return]


_COLUMNS: dict[str, Callable[[Any], Any]] = {
    "name": str,
    "status": _status_value,
    "owner": lambda value: value,
    "attempts": int,
    "eta": epoch,
    "created": float,
    "completed_at": epoch,
    "cancel_requested": int,
    "delivery": lambda value: int(value is not None and value.open),
}
_COLUMN_NAMES = {"delivery": "delivery_open"}


def _set_clause(keys: Iterable[str]) -> str:
    keys = tuple(keys)
    paths = ", ".join(f"'$.{key}', json(?)" for key in keys)
    parts = [f"data = json_set(data, {paths})"]
    for key in keys:
        if key in _COLUMNS:
            parts.append(f"{_COLUMN_NAMES.get(key, key)} = ?")
            if key == "status" and "completed_at" not in keys:
                # A final status starts the retention clock even if no time was given.
                # (SET expressions see the old row, so the new status is a parameter.)
                parts.append(
                    f"completed_at = CASE WHEN ? IN ({_FINAL_SQL})"
                    " THEN coalesce(completed_at, ?) ELSE completed_at END"
                )
    return ", ".join(parts)


def _decode(data: str) -> TaskRecord:
    return TaskRecord.from_json(json.loads(data))


def _decode_or_none(data: str) -> TaskRecord | None:
    """A record, or None (logged) for a row that does not decode: one bad row must not
    break a listing or the feed."""
    try:
        return _decode(data)
    except Exception:
        logger.exception("skipping an unreadable task row: %.200s", data)
        return None


def _decode_many(rows: Iterable[str]) -> Iterable[TaskRecord]:
    for data in rows:
        record = _decode_or_none(data)
        if record is not None:
            yield record


_Pending = tuple[Op, list[asyncio.Future[Any]]]


def _settled(
    outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None, Sequence[Any]]],
    futures: list[asyncio.Future[Any]],
    result: Any,
    error: BaseException | None,
    records: Sequence[Any],
) -> None:
    """One outcome per future of a (possibly merged) write; its records published once."""
    for index, future in enumerate(futures):
        outcomes.append((future, result, error, records if index == len(futures) - 1 else ()))


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller gave up waiting; the write stands
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


# -- wake-up hints --------------------------------------------------------------------------


class _Hints:
    """Sub-millisecond wake-ups between processes: one datagram socket per owner in a
    folder next to the file; after a commit the writer sends one byte to every other.

    Only a hint: the feed reads the file either way, and polls when hints are lost.
    """

    _REFRESH = 1.0

    def __init__(
        self,
        folder: str,
        dirfd: int,
        sock: socket.socket,
        name: str,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.folder, self.dirfd, self.sock, self.name, self.loop = folder, dirfd, sock, name, loop
        self.sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sender.setblocking(False)
        self.peers: list[str] = []
        self.listed = 0.0

    @classmethod
    def start(
        cls, db_path: str, owner: str, loop: asyncio.AbstractEventLoop, wake: asyncio.Event
    ) -> _Hints | None:
        if not hasattr(socket, "AF_UNIX"):
            return None
        folder = db_path + "-hints"
        sock: socket.socket | None = None
        dirfd = -1
        try:
            os.makedirs(folder, exist_ok=True)
            dirfd = os.open(folder, os.O_RDONLY)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)
            hints = cls(folder, dirfd, sock, owner, loop)
            sock.bind(hints.address(owner))

            def drain() -> None:
                with contextlib.suppress(OSError):
                    while sock.recv(64):
                        pass
                wake.set()

            loop.add_reader(sock.fileno(), drain)
        except (OSError, NotImplementedError, RuntimeError) as exc:
            logger.info("no wake-up hints for %s (%s); polling only", db_path, exc)
            if sock is not None:
                sock.close()
            if dirfd >= 0:
                os.close(dirfd)
            return None
        return hints

    def address(self, name: str) -> str:
        path = os.path.join(self.folder, name)
        if len(path.encode()) < 100:
            return path
        return f"/proc/self/fd/{self.dirfd}/{name}"  # a short way to a long path (Linux)

    def notify(self) -> None:
        """Called by the writer thread after each commit; never raises."""
        now = time.monotonic()
        if now - self.listed > self._REFRESH:
            self.listed = now
            try:
                self.peers = [n for n in os.listdir(self.dirfd) if n != self.name]
            except OSError:
                self.peers = []
        for name in self.peers:
            try:
                self.sender.sendto(b"!", self.address(name))
            except (ConnectionRefusedError, FileNotFoundError):
                # Nobody listens: a process that died without cleaning up.
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=self.dirfd)
                self.listed = 0.0
            except OSError:
                pass  # its buffer is full (it has wake-ups pending) or it is going away

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self.sender.close()
        with contextlib.suppress(OSError):
            os.unlink(self.name, dir_fd=self.dirfd)
        os.close(self.dirfd)
