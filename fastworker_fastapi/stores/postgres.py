"""`PostgresStore`: app processes on many hosts share one PostgreSQL database.

Needs the `postgres` extra (`pip install 'fastworker-fastapi[postgres]'`: psycopg 3 and
psycopg-pool) and PostgreSQL 13 or newer. The semantics are SQLite's (DESIGN section 7);
what differs is how they are reached across hosts:

- **One statement per write.** Connections from a pool run in autocommit mode, and each
  write is one statement: the insert or the compare-and-set `UPDATE ... RETURNING`, with
  `pg_notify` in the same statement, so the notification is sent exactly when the change
  commits. PostgreSQL batches the WAL flushes of concurrent commits itself.
- **Change feed by transaction id.** Every write stamps the row with its transaction's id
  (`pg_current_xact_id()`). A reader takes, in the same statement, the rows whose id is at
  or above the oldest transaction still running at its previous read (`pg_snapshot_xmin`)
  and that horizon anew: whatever commits later had a transaction id above it, so nothing
  is missed however commits interleave, without a counter row that would serialise every
  writer. Rows read twice (their transaction id is still above the horizon) are published
  once, by remembering which `(id, xid)` pairs were published.
- **Notifications are hints.** Each change `NOTIFY`s the channel `<schema>_changes` with the
  writer's owner id (a process ignores its own). One `LISTEN` connection per process wakes
  the feed; it checks itself every `keepalive` seconds and reconnects with back-off, and
  the feed reads after a reconnect (so streams catch up) and every `poll_interval` anyway.
  `LISTEN` needs a session: it does not work through a transaction-pooling proxy
  (PgBouncer in transaction mode); point the store at PostgreSQL or a session pool.
- **Owners and leases on the database clock.** Each `open` registers a fresh owner id with
  a lease (`now() + lease`), renewed by heartbeats; the hosts' clocks never matter. An owner
  is dead when its lease expired, or at once when it ran on this host and its process is
  gone. The living release a dead owner's tasks and claim due, unowned ones with
  `FOR UPDATE SKIP LOCKED`, so two hosts never wait on, or take, the same rows.
- **`peek` from memory.** FastWorker's sync `get_result` cannot await a query, so `peek`
  answers from a bounded LRU cache (`peek_cache` records) of every record this process
  wrote, read or received through the feed: this process's latest view, which may trail
  the database by a feed round; `None` for a task it has not seen. `get` answers from the
  same cache for final records (they no longer change, but for their callback's delivery
  state, which reaches the cache through the feed), so `wait()` and status polls of
  finished tasks cost no query.
- **A database that goes away.** Submissions and reads fail at once with
  `StoreUnavailableError` (HTTP 503), after one retry on a fresh connection. Writes to tasks
  this process runs (status, results, progress) are retried until the database is back, so
  an outcome is never lost; each carries a write id, so a retry of a write whose commit was
  lost with the connection is recognised rather than refused. An insert whose commit is in
  doubt is deleted once the database is back (its caller was told it failed). The pool
  reconnects by itself.

Schema: tables `tasks`, `owners` and `meta` (with the schema version) in the schema given
by `schema=` (or `?schema=` in the URL), created on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import fields
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import psycopg
from fastworker.tasks.models import TaskStatus
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from fastworker_fastapi.errors import (
    ConfigurationError,
    StoreUnavailableError,
    TaskAlreadyFinishedError,
    TaskNotFoundError,
)
from fastworker_fastapi.records import (
    FINAL_STATUSES,
    WAITING_STATUSES,
    TaskRecord,
    dumps,
)
from fastworker_fastapi.stores._fields import encode_field, epoch, micros, schedule_state
from fastworker_fastapi.stores._hosts import host_key, proc_start, process_gone
from fastworker_fastapi.stores.base import ScheduleState, cancelled_changes, released_changes

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from fastworker_fastapi.events import EventHub

__all__ = ["SCHEMA_VERSION", "PostgresStore"]

logger = logging.getLogger("fastworker_fastapi")

SCHEMA_VERSION = 1
"""Bumped by every schema change; `open` migrates older schemas and refuses newer ones."""

_T = TypeVar("_T")
AConn = psycopg.AsyncConnection[Any]

_FINAL = [s.value for s in FINAL_STATUSES]
_WAITING = [s.value for s in WAITING_STATUSES]
_FIELDS = frozenset(f.name for f in fields(TaskRecord)) - {"id"}
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")
_CLAIM_AHEAD = 1.0
"""Seconds ahead of its eta a task may be claimed (the claimer's timer covers the rest)."""
_FEED_PAGE = 500
_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")
_DOWN = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout, PoolClosed)
"""Errors that mean the database cannot be reached (or the connection broke)."""

_COLUMNS: dict[str, Callable[[Any], Any]] = {
    "name": str,
    "status": lambda value: TaskStatus(value).value,
    "owner": lambda value: value,
    "attempts": int,
    "eta": epoch,
    "created": float,
    "completed_at": epoch,
    "cancel_requested": bool,
    "delivery": lambda value: value is not None and value.open,
}
_COLUMN_NAMES = {"delivery": "delivery_open"}


def _schema_sql(s: str) -> str:
    return f"""
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.meta (key text PRIMARY KEY, value bigint NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.tasks (
    id text PRIMARY KEY,
    n bigint GENERATED ALWAYS AS IDENTITY,
    xid xid8 NOT NULL,
    writer text NOT NULL,
    write_id text,
    name text NOT NULL,
    status text NOT NULL,
    owner text,
    attempts integer NOT NULL,
    eta double precision,
    created double precision NOT NULL,
    completed_at double precision,
    cancel_requested boolean NOT NULL,
    delivery_open boolean NOT NULL,
    data jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_xid ON {s}.tasks (xid, id);
CREATE INDEX IF NOT EXISTS tasks_created ON {s}.tasks (created DESC, n DESC);
CREATE INDEX IF NOT EXISTS tasks_status ON {s}.tasks (status, created DESC);
CREATE INDEX IF NOT EXISTS tasks_name ON {s}.tasks (name, created DESC);
CREATE INDEX IF NOT EXISTS tasks_owner ON {s}.tasks (owner) WHERE owner IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_claimable ON {s}.tasks (created) WHERE owner IS NULL;
CREATE INDEX IF NOT EXISTS tasks_completed ON {s}.tasks (completed_at, n)
    WHERE completed_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS {s}.schedules (
    name text PRIMARY KEY,
    paused boolean NOT NULL DEFAULT false,
    last_due bigint,
    resumed_at bigint
);
CREATE TABLE IF NOT EXISTS {s}.owners (
    owner text PRIMARY KEY,
    host text,
    pid integer NOT NULL,
    started text,
    heartbeat timestamptz NOT NULL,
    expires timestamptz NOT NULL
);
"""


class PostgresStore:
    """Tasks in a PostgreSQL database shared by app processes on any number of hosts."""

    durable = True

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        lease: float = 30.0,
        heartbeat_interval: float | None = None,
        poll_interval: float = 1.0,
        keepalive: float = 10.0,
        min_pool: int = 1,
        max_pool: int = 8,
        acquire_timeout: float = 2.0,
        connect_timeout: float = 5.0,
        peek_cache: int = 10_000,
    ) -> None:
        if lease <= 0 or poll_interval <= 0 or keepalive <= 0 or acquire_timeout <= 0:
            raise ConfigurationError(
                "lease, poll_interval, keepalive and acquire_timeout must be > 0"
            )
        if not 0 <= min_pool <= max_pool or max_pool < 1:
            raise ConfigurationError("the pool needs 0 <= min_pool <= max_pool and max_pool >= 1")
        url, url_schema = _split_schema(url)
        schema = schema or url_schema or "fastworker"
        if not _IDENT.match(schema):
            raise ConfigurationError(
                f"schema {schema!r}: use lower-case letters, digits and _ (at most 41)"
            )
        try:
            self._params = conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise ConfigurationError(f"bad PostgreSQL URL {_safe(url)!r}: {exc}") from None
        self.url = url
        self.schema = schema
        self.channel = f"{schema}_changes"
        self.lease = lease
        self.heartbeat_interval = lease / 3 if heartbeat_interval is None else heartbeat_interval
        self.poll_interval = poll_interval
        self.keepalive = keepalive
        self.min_pool, self.max_pool = min_pool, max_pool
        self.acquire_timeout = acquire_timeout
        self.connect_timeout = connect_timeout
        self.peek_cache = peek_cache
        self.owner = uuid.uuid4().hex
        self.result_ttl = 3600.0
        self.max_results = 10_000
        self._hub: EventHub | None = None
        self._pool: AsyncConnectionPool[AConn] | None = None
        self._cache: OrderedDict[str, TaskRecord] = OrderedDict()
        self._closing = False
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._background: anyio.CancelScope | None = None
        self._background_done = asyncio.Event()
        self._horizon = 0
        self._published: dict[str, int] = {}  # task id -> xid published, above the horizon
        self._writes = itertools.count()
        self._doubtful: list[tuple[list[str], str]] = []  # inserts whose commit is unknown
        self._update_sql: dict[tuple[str, ...], str] = {}
        self._host, self._pid, self._started = host_key(), os.getpid(), proc_start(os.getpid())
        s = schema
        self._sql_insert = (
            f"WITH i AS (INSERT INTO {s}.tasks (id, xid, writer, write_id, name, status, owner,"
            " attempts, eta, created, completed_at, cancel_requested, delivery_open, data)"
            " SELECT u.id, pg_current_xact_id(), %s, %s, u.name, u.status, u.owner,"
            " u.attempts, u.eta, u.created, u.completed_at, u.cancel_requested,"
            " u.delivery_open, u.data::jsonb FROM unnest(%s::text[], %s::text[], %s::text[],"
            " %s::text[], %s::int[], %s::float8[], %s::float8[], %s::float8[], %s::bool[],"
            " %s::bool[], %s::text[]) AS u(id, name, status, owner, attempts, eta, created,"
            " completed_at, cancel_requested, delivery_open, data){conflict} RETURNING 1)"
            " SELECT count(*), pg_notify(%s, %s) FROM (SELECT 1 FROM i LIMIT 1) AS x"
        )

    @property
    def description(self) -> str:
        return f"{_describe(self._params)} (schema {self.schema})"

    @property
    def hub(self) -> EventHub:
        if self._hub is None:
            raise RuntimeError("the store is not open")
        return self._hub

    @property
    def pool(self) -> AsyncConnectionPool[AConn]:
        if self._pool is None:
            raise StoreUnavailableError("the PostgreSQL task store is not open")
        return self._pool

    # -- life cycle --------------------------------------------------------------------------

    async def open(
        self, hub: EventHub, task_group: TaskGroup, *, result_ttl: float, max_results: int
    ) -> None:
        if self._pool is not None:
            raise RuntimeError("the store is open already")
        self.owner = uuid.uuid4().hex  # a fresh owner per process start, never reused
        self.result_ttl = result_ttl
        self.max_results = max_results
        self._hub = hub
        self._closing = False
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._background_done = asyncio.Event()
        self._cache.clear()
        self._published.clear()
        pool: AsyncConnectionPool[AConn] = AsyncConnectionPool(
            self.url,
            min_size=self.min_pool,
            max_size=self.max_pool,
            kwargs={"autocommit": True, "connect_timeout": max(int(self.connect_timeout), 1)},
            timeout=self.acquire_timeout,
            reconnect_timeout=float(365 * 86400),  # never give up: the database comes back
            name=f"fastworker-{self.owner[:8]}",
            open=False,
        )
        try:
            await pool.open(wait=True, timeout=self.connect_timeout)
            async with pool.connection() as conn:
                await self._setup(conn)
        except (*_DOWN, psycopg.Error) as exc:
            await pool.close()
            raise ConfigurationError(
                f"cannot use the PostgreSQL task store {self.description}: {exc}"
                " (is the server running and the URL right? the user needs CREATE on the"
                " database the first time, to make the schema)"
            ) from None
        self._pool = pool
        listener = await self._try_listen()
        if listener is None:
            await self._close_pool()
            raise ConfigurationError(
                f"cannot LISTEN on the PostgreSQL task store {self.description}: is it"
                " behind a transaction-pooling proxy? point it at the server or a session pool"
            )
        scope = self._background = anyio.CancelScope()
        task_group.start_soon(self._run_background, scope, listener)

    async def _setup(self, conn: AConn) -> None:
        s = self.schema
        async with conn.transaction():
            # One process creates or migrates the schema at a time.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"{s}.schema",))
            for statement in _schema_sql(s).split(";"):
                if statement.strip():
                    await conn.execute(statement)
            cur = await conn.execute(f"SELECT value FROM {s}.meta WHERE key = 'schema_version'")
            row = await cur.fetchone()
            if row is None:
                await conn.execute(
                    f"INSERT INTO {s}.meta (key, value) VALUES ('schema_version', %s)",
                    (SCHEMA_VERSION,),
                )
            elif int(row[0]) > SCHEMA_VERSION:
                raise psycopg.DataError(
                    f"schema version {row[0]} is newer than this version understands "
                    f"({SCHEMA_VERSION}): upgrade fastworker-fastapi"
                )
            # (older versions migrate here, step by step, when there are any)
            await conn.execute(
                f"INSERT INTO {s}.owners (owner, host, pid, started, heartbeat, expires)"
                " VALUES (%s, %s, %s, %s, now(), now() + make_interval(secs => %s))",
                (self.owner, self._host, self._pid, self._started, self.lease),
            )
            cur = await conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
            row = await cur.fetchone()
            assert row is not None
            self._horizon = int(row[0])

    async def close(self) -> None:
        """Release this owner's leftover tasks and unregister it; stop the feed, the
        listener and the heartbeats; close the pool."""
        if self._pool is None or self._closing:
            return
        self._closing = True
        self._stop.set()
        self._wake.set()
        try:
            await self._call(self._close_op, retry=False)
        except Exception:
            logger.exception("could not unregister owner %s from %s", self.owner, self.description)
        if self._background is not None:
            self._background.cancel()
            with anyio.move_on_after(5):
                await self._background_done.wait()
            self._background = None
        await self._close_pool()

    async def _close_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close(timeout=5.0)

    async def _run_background(self, scope: anyio.CancelScope, listener: AConn) -> None:
        try:
            with scope:
                async with anyio.create_task_group() as group:
                    group.start_soon(self._feed)
                    group.start_soon(self._listen, listener)
                    group.start_soon(self._heartbeats)
        finally:
            self._background_done.set()

    # -- running statements --------------------------------------------------------------------

    async def _call(self, op: Callable[[AConn], Awaitable[_T]], *, retry: bool = False) -> _T:
        """Run `op` on a pooled connection. A broken connection is retried once at once (the
        pool may hold connections from before a restart); then, with `retry`, again with
        back-off until the database is back; else `StoreUnavailableError`."""
        tries = 0
        delay = 0.1
        while True:
            try:
                async with self.pool.connection() as conn:
                    return await op(conn)
            except _DOWN as exc:
                tries += 1
                if tries == 1 and self._pool is not None:
                    with contextlib.suppress(Exception):
                        await self._pool.check()  # drop every broken idle connection
                    continue
                if not retry or self._pool is None:
                    raise StoreUnavailableError(
                        f"the PostgreSQL task store is unavailable ({_first_line(exc)}); "
                        "try again later"
                    ) from exc
                if tries in (2, 10) or tries % 100 == 0:
                    logger.warning(
                        "PostgreSQL task store unavailable (%s); retrying a write",
                        _first_line(exc),
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _write_id(self) -> str:
        return f"{self.owner}:{next(self._writes)}"

    def _publish(self, record: TaskRecord, remote: bool = False) -> None:
        self._remember(record)
        self.hub.publish(record, remote=remote)

    def _remember(self, record: TaskRecord) -> None:
        cache = self._cache
        cache[record.id] = record
        cache.move_to_end(record.id)
        if len(cache) > self.peek_cache:
            cache.popitem(last=False)

    # -- writes ------------------------------------------------------------------------------

    async def insert(self, records: Sequence[TaskRecord]) -> None:
        if not records:
            return
        records = tuple(records)
        if len(records) > 1 and len({r.id for r in records}) < len(records):
            raise ValueError("a batch names the same task id twice: it exists already")
        params = self._insert_params(records)
        write_id = params[1]
        sql = self._sql_insert.format(conflict="")
        ids = [r.id for r in records]
        first = True

        async def op(conn: AConn) -> None:
            nonlocal first
            retried, first = not first, False
            try:
                await conn.execute(sql, params)
            except pg_errors.UniqueViolation as exc:
                if retried and await self._inserted(conn, ids, write_id):
                    return  # the first try committed before its connection broke
                raise ValueError(f"a task in this batch exists already ({exc})") from None

        try:
            await self._call(op)
        except StoreUnavailableError:
            self._doubtful.append((ids, write_id))  # deleted when the database is back
            raise
        for record in records:
            self._publish(record)

    async def _inserted(self, conn: AConn, ids: list[str], write_id: str) -> bool:
        cur = await conn.execute(
            f"SELECT count(*) FROM {self.schema}.tasks WHERE id = ANY(%s) AND write_id = %s",
            (ids, write_id),
        )
        row = await cur.fetchone()
        return row is not None and row[0] == len(ids)

    async def insert_if_absent(self, record: TaskRecord) -> bool:
        params = self._insert_params((record,))
        sql = self._sql_insert.format(conflict=" ON CONFLICT (id) DO NOTHING")

        async def op(conn: AConn) -> bool:
            cur = await conn.execute(sql, params)
            row = await cur.fetchone()
            return row is not None and row[0] == 1

        added = await self._call(op)
        if added:
            self._publish(record)
        return added

    def _insert_params(self, records: Sequence[TaskRecord]) -> list[Any]:
        columns: list[list[Any]] = [[] for _ in range(11)]
        for record in records:
            delivery = record.delivery
            completed = epoch(record.completed_at)
            if completed is None and record.status in FINAL_STATUSES:
                completed = time.time()
            row = (
                record.id,
                record.name,
                record.status.value,
                record.owner,
                record.attempts,
                epoch(record.eta),
                record.created,
                completed,
                record.cancel_requested,
                delivery is not None and delivery.open,
                _json_text(record.to_json()),  # JSON errors raise here, before any I/O
            )
            for column, value in zip(columns, row, strict=True):
                column.append(value)
        return [self.owner, self._write_id(), *columns, self.channel, self.owner]

    async def update(
        self, task_id: str, expect_owner: str | None, expect_attempts: int, **changes: Any
    ) -> TaskRecord | None:
        sql, params = self._prepare(changes)
        write_id = self._write_id()
        args = (*params, self.owner, write_id, task_id, expect_owner, expect_attempts, write_id)
        args = (*args, self.channel, self.owner)

        async def op(conn: AConn) -> TaskRecord | None:
            cur = await conn.execute(sql, args)
            row = await cur.fetchone()
            return None if row is None else TaskRecord.from_json(row[0])

        # Writes of tasks this process runs must land: retried until the database is back.
        record = await self._call(op, retry=True)
        if record is None:
            logger.debug("dropped a write to task %s: owner or attempt changed", task_id)
            return None
        self._publish(record)
        return record

    def _prepare(self, changes: dict[str, Any]) -> tuple[str, list[Any]]:
        """The compare-and-set statement and its leading parameters for `changes` (the
        statement text is cached per set of keys)."""
        keys = tuple(changes)
        sql = self._update_sql.get(keys)
        if sql is None:
            unknown = set(keys) - _FIELDS
            if unknown:
                raise ValueError(f"not task record fields: {sorted(unknown)}")
            sql = self._update_sql[keys] = _update_sql(self.schema, keys)
        patch = _json_text({key: encode_field(key, value) for key, value in changes.items()})
        params: list[Any] = [patch]
        for key, value in changes.items():
            if key in _COLUMNS:
                params.append(_COLUMNS[key](value))
                if key == "status" and "completed_at" not in changes:
                    params.extend((params[-1], _FINAL, time.time()))
        return sql, params

    async def request_cancel(self, task_id: str) -> TaskRecord:
        flag_sql, flag_params = self._prepare({"cancel_requested": True})
        s = self.schema

        async def op(conn: AConn) -> TaskRecord:
            async with conn.transaction():
                cur = await conn.execute(
                    f"SELECT data FROM {s}.tasks WHERE id = %s FOR UPDATE", (task_id,)
                )
                row = await cur.fetchone()
                if row is None:
                    raise TaskNotFoundError(f"no task with id {task_id!r} (unknown or expired)")
                record = TaskRecord.from_json(row[0])
                if record.finished:
                    raise TaskAlreadyFinishedError(
                        f"task {task_id} already finished with status {record.status.value!r}"
                    )
                if record.owner is None:  # nobody runs it: cancelled here and now
                    sql, params = self._prepare(cancelled_changes(record))
                else:  # its owner acts on the flag
                    sql, params = flag_sql, flag_params
                write_id = self._write_id()
                cur = await conn.execute(
                    sql,
                    (
                        *params,
                        self.owner,
                        write_id,
                        task_id,
                        record.owner,
                        record.attempts,
                        write_id,
                        self.channel,
                        self.owner,
                    ),
                )
                updated = await cur.fetchone()
                assert updated is not None  # the row is locked: the compare cannot fail
                return TaskRecord.from_json(updated[0])

        updated = await self._call(op)
        self._publish(updated)
        return updated

    # -- reads -------------------------------------------------------------------------------

    async def get(self, task_id: str) -> TaskRecord | None:
        cached = self._cache.get(task_id)
        if cached is not None and cached.status in FINAL_STATUSES:
            return cached  # a final record changes no more (but for its callback's outbox)

        async def op(conn: AConn) -> TaskRecord | None:
            cur = await conn.execute(
                f"SELECT data FROM {self.schema}.tasks WHERE id = %s", (task_id,)
            )
            row = await cur.fetchone()
            return None if row is None else _decode_or_none(row[0])

        record = await self._call(op)
        if record is None:
            self._cache.pop(task_id, None)
        else:
            self._remember(record)
        return record

    def peek(self, task_id: str) -> TaskRecord | None:
        """This process's latest view of the task, from memory (see the module docstring)."""
        return self._cache.get(task_id)

    async def recent(
        self, *, limit: int, status: TaskStatus | None = None, name: str | None = None
    ) -> list[TaskRecord]:
        where, params = [], []
        if status is not None:
            where.append("status = %s")
            params.append(status.value)
        if name is not None:
            where.append("name = %s")
            params.append(name)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        sql = f"SELECT data FROM {self.schema}.tasks{clause} ORDER BY created DESC, n DESC LIMIT %s"

        async def op(conn: AConn) -> list[Any]:
            cur = await conn.execute(sql, (*params, max(limit, 0)))
            return await cur.fetchall()

        out = []
        for (data,) in await self._call(op):
            record = _decode_or_none(data)
            if record is not None:
                out.append(record)
        return out

    # -- leases, recovery, retention -----------------------------------------------------------

    async def heartbeat(self) -> None:
        s = self.schema

        async def op(conn: AConn) -> None:
            cur = await conn.execute(
                f"UPDATE {s}.owners SET heartbeat = now(),"
                " expires = now() + make_interval(secs => %s) WHERE owner = %s",
                (self.lease, self.owner),
            )
            if cur.rowcount == 0:  # judged dead (a stall longer than the lease): rejoin
                logger.warning(
                    "owner %s had lost its lease on %s; its tasks were released to others",
                    self.owner,
                    self.description,
                )
                await conn.execute(
                    f"INSERT INTO {s}.owners (owner, host, pid, started, heartbeat, expires)"
                    " VALUES (%s, %s, %s, %s, now(), now() + make_interval(secs => %s))",
                    (self.owner, self._host, self._pid, self._started, self.lease),
                )
            while self._doubtful:
                ids, write_id = self._doubtful[0]
                await conn.execute(
                    f"DELETE FROM {s}.tasks WHERE id = ANY(%s) AND write_id = %s",
                    (ids, write_id),
                )
                self._doubtful.pop(0)

        await self._call(op)

    async def _heartbeats(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat_interval):
                    await self._stop.wait()
            if self._closing:
                return
            try:
                await self.heartbeat()
            except StoreUnavailableError as exc:
                logger.warning("heartbeat to %s failed: %s", self.description, exc)
            except Exception:
                logger.exception("heartbeat to %s failed", self.description)

    async def recover(self, can_run: Callable[[str], bool], limit: int) -> list[TaskRecord]:
        for owner, why in await self._call(self._dead_owners):
            logger.warning("releasing the tasks of a dead owner: %s", why)
            for record in await self._call(functools.partial(self._release, owner=owner, why=why)):
                self._publish(record)
        if limit <= 0:
            return []
        s = self.schema
        due = time.time() + _CLAIM_AHEAD

        async def op(conn: AConn) -> list[TaskRecord]:
            cur = await conn.execute(
                f"SELECT DISTINCT name FROM {s}.tasks WHERE owner IS NULL AND status = ANY(%s)",
                (_WAITING,),
            )
            names = [name for (name,) in await cur.fetchall() if can_run(name)]
            _, params = self._prepare({"owner": self.owner})
            write_id = self._write_id()
            cur = await conn.execute(
                f"WITH c AS (SELECT id FROM {s}.tasks WHERE owner IS NULL AND ("
                " (status = ANY(%s) AND (eta IS NULL OR eta <= %s) AND name = ANY(%s))"
                " OR (status = ANY(%s) AND delivery_open))"
                " ORDER BY created LIMIT %s FOR UPDATE SKIP LOCKED),"
                f" u AS (UPDATE {s}.tasks AS t SET data = t.data || %s::jsonb, owner = %s,"
                " xid = pg_current_xact_id(), writer = %s, write_id = %s"
                " FROM c WHERE t.id = c.id RETURNING t.data)"
                " SELECT data, pg_notify(%s, %s) FROM u",
                (
                    _WAITING,
                    due,
                    names,
                    _FINAL,
                    limit,
                    params[0],
                    self.owner,
                    self.owner,
                    write_id,
                    self.channel,
                    self.owner,
                ),
            )
            return [TaskRecord.from_json(data) for data, _ in await cur.fetchall()]

        claimed = await self._call(op)
        for record in claimed:
            self._publish(record)
        return claimed

    async def _dead_owners(self, conn: AConn) -> list[tuple[str, str]]:
        s = self.schema
        cur = await conn.execute(
            f"SELECT owner, host, pid, started, expires < now() FROM {s}.owners WHERE owner <> %s",
            (self.owner,),
        )
        dead: dict[str, str] = {}
        for owner, host, pid, started, expired in await cur.fetchall():
            if expired:
                dead[owner] = f"the lease of owner {owner} expired"
            elif host is not None and host == self._host and process_gone(pid, started):
                dead[owner] = f"process {pid} (owner {owner}) is gone"
        # Tasks whose owner row is gone (closed, or judged dead by a process that died
        # before releasing them) are released too.
        cur = await conn.execute(
            f"SELECT DISTINCT owner FROM {s}.tasks t WHERE owner IS NOT NULL AND owner <> %s"
            " AND (status <> ALL(%s) OR delivery_open)"
            f" AND NOT EXISTS (SELECT 1 FROM {s}.owners o WHERE o.owner = t.owner)",
            (self.owner, _FINAL),
        )
        for (owner,) in await cur.fetchall():
            dead.setdefault(owner, f"owner {owner} is unregistered")
        return list(dead.items())

    async def _release(self, conn: AConn, owner: str, why: str) -> list[TaskRecord]:
        """Release `owner`'s unfinished tasks and open deliveries, in one transaction."""
        s = self.schema
        released = []
        async with conn.transaction():
            await conn.execute(f"DELETE FROM {s}.owners WHERE owner = %s", (owner,))
            cur = await conn.execute(
                f"SELECT data FROM {s}.tasks WHERE owner = %s"
                " AND (status <> ALL(%s) OR delivery_open) FOR UPDATE SKIP LOCKED",
                (owner, _FINAL),
            )
            for (data,) in await cur.fetchall():
                record = _decode_or_none(data)
                if record is None:
                    continue
                sql, params = self._prepare(released_changes(record, why))
                write_id = self._write_id()
                cur = await conn.execute(
                    sql,
                    (
                        *params,
                        self.owner,
                        write_id,
                        record.id,
                        owner,
                        record.attempts,
                        write_id,
                        self.channel,
                        self.owner,
                    ),
                )
                row = await cur.fetchone()
                if row is not None:
                    released.append(TaskRecord.from_json(row[0]))
        return released

    async def _close_op(self, conn: AConn) -> None:
        for record in await self._release(conn, self.owner, "its process closed the store"):
            self._publish(record)

    async def schedule_states(self) -> dict[str, ScheduleState]:
        s = self.schema

        async def op(conn: AConn) -> list[Any]:
            cur = await conn.execute(
                f"SELECT name, paused, last_due, resumed_at FROM {s}.schedules"
            )
            return await cur.fetchall()

        return {row[0]: schedule_state(row) for row in await self._call(op)}

    async def update_schedule(
        self,
        name: str,
        *,
        paused: bool | None = None,
        last_due: datetime | None = None,
        resumed_at: datetime | None = None,
    ) -> ScheduleState:
        s = self.schema
        params = {
            "name": name,
            "paused": paused,
            "last_due": micros(last_due),
            "resumed_at": micros(resumed_at),
        }

        async def op(conn: AConn) -> Any:
            cur = await conn.execute(
                f"INSERT INTO {s}.schedules AS old (name, paused, last_due, resumed_at)"
                " VALUES (%(name)s, coalesce(%(paused)s, false), %(last_due)s, %(resumed_at)s)"
                " ON CONFLICT (name) DO UPDATE SET"
                " paused = coalesce(%(paused)s, old.paused),"
                " last_due = greatest(old.last_due, %(last_due)s),"
                " resumed_at = coalesce(%(resumed_at)s, old.resumed_at)"
                " RETURNING name, paused, last_due, resumed_at",
                params,
            )
            return await cur.fetchone()

        return schedule_state(await self._call(op, retry=True))

    async def expire(self) -> int:
        s = self.schema
        ttl, keep = self.result_ttl, max(self.max_results, 0)

        async def op(conn: AConn) -> list[Any]:
            cur = await conn.execute(
                f"DELETE FROM {s}.tasks WHERE completed_at <= %s AND status = ANY(%s)"
                " AND NOT delivery_open RETURNING id",
                (time.time() - ttl, _FINAL),
            )
            gone = await cur.fetchall()
            cur = await conn.execute(
                f"DELETE FROM {s}.tasks WHERE id IN (SELECT id FROM {s}.tasks"
                " WHERE completed_at IS NOT NULL AND status = ANY(%s)"
                " ORDER BY completed_at DESC, n DESC OFFSET %s) AND NOT delivery_open"
                " RETURNING id",
                (_FINAL, keep),
            )
            return gone + await cur.fetchall()

        gone = await self._call(op)
        for (task_id,) in gone:
            self._cache.pop(task_id, None)
        return len(gone)

    # -- the change feed ---------------------------------------------------------------------

    async def _try_listen(self) -> AConn | None:
        try:
            conn = await psycopg.AsyncConnection.connect(
                self.url,
                autocommit=True,
                connect_timeout=max(int(self.connect_timeout), 1),
                keepalives=1,
                keepalives_idle=max(int(self.keepalive), 1),
                keepalives_interval=max(int(self.keepalive / 3), 1),
                keepalives_count=3,
            )
        except psycopg.Error:
            return None
        try:
            await conn.execute(f'LISTEN "{self.channel}"')
        except psycopg.Error:
            await conn.close()
            return None
        return conn

    async def _listen(self, conn: AConn | None) -> None:
        """Wake the feed on every other process's notification; check the connection
        every `keepalive` seconds; reconnect with back-off (and catch up) when it breaks."""
        delay = 0.1
        owner = self.owner
        wake = self._wake
        while not self._closing:
            if conn is None:
                conn = await self._try_listen()
                if conn is None:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                delay = 0.1
                logger.info("LISTEN connection to %s restored", self.description)
                wake.set()  # catch up on what changed while it was down
            try:
                async for notify in conn.notifies(timeout=self.keepalive):
                    if notify.payload != owner:
                        wake.set()
                await conn.execute("SELECT 1")  # keepalive: a dead link raises here
            except psycopg.Error as exc:
                logger.warning(
                    "LISTEN connection to %s lost (%s); reconnecting",
                    self.description,
                    _first_line(exc),
                )
                with contextlib.suppress(Exception):
                    await conn.close()
                conn = None
                wake.set()
                if self._pool is not None:
                    with contextlib.suppress(Exception):
                        await self._pool.check()
            finally:
                if self._closing and conn is not None:
                    with anyio.CancelScope(shield=True):
                        await conn.close()
        if conn is not None:
            await conn.close()

    async def _feed(self) -> None:
        """Publish other processes' changes: on a notification, or every `poll_interval`."""
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
            except (StoreUnavailableError, psycopg.Error) as exc:
                failures += 1
                if failures in (1, 100):
                    logger.warning(
                        "reading the change feed of %s failed: %s", self.description, exc
                    )

    async def _read_changes(self) -> None:
        """Publish the rows other processes wrote since the last read, a page at a time.

        Pages follow `(xid, id)`; the horizon moves to the oldest transaction still running
        at the first page (the feed's next read starts there, so no later commit is missed).
        """
        s = self.schema
        horizon = self._horizon
        after_xid, after_id = str(horizon), ""
        new_horizon: int | None = None
        published, owner = self._published, self.owner
        while True:

            async def op(conn: AConn, xid: str = after_xid, tid: str = after_id) -> list[Any]:
                cur = await conn.execute(
                    "WITH h AS (SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS xmin)"
                    " SELECT h.xmin, t.xid::text, t.id, t.writer, t.data FROM h LEFT JOIN"
                    f" (SELECT xid, id, writer, data FROM {s}.tasks"
                    " WHERE xid > %s::xid8 OR (xid = %s::xid8 AND id > %s)"
                    " ORDER BY xid, id LIMIT %s) AS t ON true",
                    (xid, xid, tid, _FEED_PAGE),
                )
                return await cur.fetchall()

            rows = await self._call(op)
            if new_horizon is None:
                new_horizon = int(rows[0][0])
            for _xmin, xid, task_id, writer, data in rows:
                if xid is None:
                    continue
                after_xid, after_id = xid, task_id
                xid_n = int(xid)
                if writer == owner or published.get(task_id) == xid_n:
                    continue
                published[task_id] = xid_n
                record = _decode_or_none(data)
                if record is not None:
                    self._publish(record, remote=True)
            if len(rows) < _FEED_PAGE:
                break
            await asyncio.sleep(0)  # a long backlog: let the loop breathe between pages
        if new_horizon > horizon:
            self._horizon = new_horizon
            self._published = {k: v for k, v in published.items() if v >= new_horizon}


# -- helpers --------------------------------------------------------------------------------


def _update_sql(s: str, keys: tuple[str, ...]) -> str:
    """`UPDATE ... SET <keys> ... WHERE <compare> RETURNING data` with `pg_notify`.

    Parameters, in order: the JSON patch, one per column key (three more after `status`),
    then writer, write id, task id, expected owner, expected attempts, write id (a retry of
    a write that committed matches by it), channel, payload.
    """
    parts = ["data = data || %s::jsonb"]
    for key in keys:
        if key in _COLUMNS:
            parts.append(f"{_COLUMN_NAMES.get(key, key)} = %s")
            if key == "status" and "completed_at" not in keys:
                # A final status starts the retention clock even if no time was given.
                parts.append(
                    "completed_at = CASE WHEN %s = ANY(%s)"
                    " THEN coalesce(completed_at, %s) ELSE completed_at END"
                )
    parts.append("xid = pg_current_xact_id(), writer = %s, write_id = %s")
    return (
        f"WITH u AS (UPDATE {s}.tasks SET {', '.join(parts)} WHERE id = %s"
        " AND ((owner IS NOT DISTINCT FROM %s AND attempts = %s) OR write_id = %s)"
        " RETURNING data) SELECT data, pg_notify(%s, %s) FROM u"
    )


def _decode_or_none(data: dict[str, Any]) -> TaskRecord | None:
    """A record, or None (logged) for a row that does not decode: one bad row must not
    break a listing or the feed."""
    try:
        return TaskRecord.from_json(data)
    except Exception:
        logger.exception("skipping an unreadable task row: %.200s", data)
        return None


def _json_text(value: Any) -> str:
    """JSON for a `jsonb` value. PostgreSQL's jsonb cannot hold U+0000: it is stored as
    U+FFFD (logged), so one odd string cannot make a task's outcome unwritable."""
    text = dumps(value)
    if "\\u0000" in text and _NUL.search(text):
        logger.warning("a NUL character in a task's JSON was stored as U+FFFD (PostgreSQL)")
        text = _NUL.sub(lambda m: m.group(1) + "\\ufffd", text)
    return text


def _split_schema(url: str) -> tuple[str, str | None]:
    """The URL without a `schema=` query parameter (ours, not libpq's), and its value."""
    parts = urlsplit(url)
    if not parts.query:
        return url, None
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = next((v for k, v in query if k == "schema"), None)
    rest = urlencode([(k, v) for k, v in query if k != "schema"])
    return urlunsplit(parts._replace(query=rest)), schema


def _describe(params: dict[str, Any]) -> str:
    """`postgresql://user@host:port/db`, never with the password."""
    user = params.get("user")
    host = params.get("host") or "localhost"
    port = params.get("port")
    where = f"{host}:{port}" if port else str(host)
    return f"postgresql://{user + '@' if user else ''}{where}/{params.get('dbname', '')}"


def _safe(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        credentials, _, host = rest.rpartition("@")
        return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"
    return url


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
