"""What only the SQLite store promises: crash safety, clear errors, a sane file."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from _records import make_record, same
from _support import opened
from fastworker.tasks.models import TaskStatus

from fastworker_fastapi.errors import ConfigurationError
from fastworker_fastapi.events import EventHub
from fastworker_fastapi.stores import resolve_store
from fastworker_fastapi.stores.sqlite import SCHEMA_VERSION, SQLiteStore
from tests.conftest import eventually

CHILD = """
import asyncio, sys, time, uuid
sys.path.insert(0, {tests!r})
from fastworker.tasks.models import TaskPriority, TaskStatus
from fastworker_fastapi.events import EventHub
from fastworker_fastapi.records import TaskPolicy, TaskRecord
from fastworker_fastapi.stores.sqlite import SQLiteStore
import anyio

async def main():
    store = SQLiteStore({path!r})
    async with anyio.create_task_group() as tg:
        await store.open(EventHub(), tg, result_ttl=3600, max_results=100000)
        print("owner", store.owner, flush=True)

        async def writer():
            while True:
                record = TaskRecord(uuid.uuid4().hex, "job", [1], {{}}, TaskPriority.NORMAL,
                                    TaskPolicy(), TaskStatus.QUEUED, time.time(),
                                    owner=store.owner)
                await store.insert([record])
                print(record.id, flush=True)

        for _ in range(8):
            tg.start_soon(writer)

asyncio.run(main())
"""


async def test_sigkill_loses_no_confirmed_insert(tmp_path: Path) -> None:
    """A writer killed mid-stream: every insert it confirmed is in the file, and a new
    process on the same host takes its tasks at once (its pid is gone), not after a lease."""
    path = tmp_path / "tasks.db"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent), path=str(path)))
    child = subprocess.Popen(  # noqa: ASYNC220 (spawning is quick; reads go through a thread)
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    assert child.stdout is not None
    confirmed: list[str] = []
    try:
        with anyio.fail_after(60):
            owner_line = await anyio.to_thread.run_sync(child.stdout.readline)
            assert owner_line.startswith("owner "), owner_line
            while len(confirmed) < 300:
                line = await anyio.to_thread.run_sync(child.stdout.readline)
                assert line, "the child ended early"
                confirmed.append(line.strip())
        child.send_signal(signal.SIGKILL)
        rest = child.stdout.read()  # lines printed before the kill landed
        confirmed.extend(line for line in rest.split() if line)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    async with opened(SQLiteStore(path)) as b:
        missing = [i for i in confirmed if await b.store.get(i) is None]
        assert not missing, f"{len(missing)} of {len(confirmed)} confirmed inserts lost"
        claimed = await b.store.recover(lambda name: True, 100_000)  # lease is 30 s: no wait
        assert {r.id for r in claimed} >= set(confirmed)
        assert all(r.owner == b.store.owner and r.attempts == 0 for r in claimed)


async def open_fails(store: SQLiteStore, match: str) -> None:
    async with anyio.create_task_group() as task_group:
        with pytest.raises(ConfigurationError, match=match):
            await store.open(EventHub(), task_group, result_ttl=60, max_results=10)
        assert store._writer is None  # nothing left running


async def test_corrupt_file_is_a_clear_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    path.write_bytes(b"this is not a database, " * 200)
    await open_fails(SQLiteStore(path), "cannot use the SQLite task store")


async def test_missing_folder_is_a_clear_configuration_error(tmp_path: Path) -> None:
    await open_fails(SQLiteStore(tmp_path / "no" / "such" / "tasks.db"), "folder that exists")


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    async with opened(SQLiteStore(path)):
        pass
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (99,))
    await open_fails(SQLiteStore(path), "newer")


async def test_schema_version_and_sequence_are_recorded(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    async with opened(SQLiteStore(path)) as a:
        record = make_record()
        await a.store.insert([record])
        await a.store.update(record.id, None, 0, status=TaskStatus.RUNNING)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        assert meta["schema_version"] == SCHEMA_VERSION
        seq, writer = conn.execute("SELECT seq, writer FROM tasks").fetchone()
        assert seq > 0 and writer == a.store.owner
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT count(*) FROM owners").fetchone()[0] == 0  # unregistered


async def test_the_sequence_never_goes_back_when_rows_expire(tmp_path: Path) -> None:
    # The feed reads rows by `seq`: a write after the rows with the highest seq expired
    # (and after a restart) must still get a higher one, or readers would never see it.
    path = tmp_path / "tasks.db"

    def seqs() -> list[int]:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            return [row[0] for row in conn.execute("SELECT seq FROM tasks ORDER BY seq")]

    async with opened(SQLiteStore(path), max_results=0) as a:
        first = make_record(owner=a.store.owner)
        await a.store.insert([first])
        await a.store.update(first.id, a.store.owner, 0, status=TaskStatus.SUCCESS, result=1)
        (highest,) = seqs()
        assert await a.store.expire() == 1 and seqs() == []
        await a.store.insert([make_record(owner=a.store.owner)])
        (after_expiry,) = seqs()
        assert after_expiry > highest
    async with opened(SQLiteStore(path)) as b:
        await b.store.insert([make_record(owner=b.store.owner)])
        assert seqs()[-1] > after_expiry


async def test_failed_writes_raise_to_the_caller(tmp_path: Path) -> None:
    async with opened(SQLiteStore(tmp_path / "tasks.db")) as a:
        with pytest.raises(TypeError):
            await a.store.insert([make_record(args=[object()])])
        record = make_record()
        await a.store.insert([record])
        with pytest.raises(ValueError, match="not task record fields"):
            await a.store.update(record.id, None, 0, colour="blue")
        with pytest.raises(TypeError):
            await a.store.update(record.id, None, 0, result={1j})
        assert same(await a.store.get(record.id), record)


async def test_an_unreadable_row_does_not_break_listings(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    async with opened(SQLiteStore(path)) as a, opened(SQLiteStore(path)) as b:
        good, bad = make_record(), make_record()
        await a.store.insert([good, bad])
        # A write from elsewhere, by the rules (seq).
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            (seq,) = conn.execute(
                "UPDATE meta SET value = value + 1 WHERE key = 'seq' RETURNING value"
            ).fetchone()
            conn.execute(
                "UPDATE tasks SET data = '{\"id\": 1}', seq = ?, writer = 'x' WHERE id = ?",
                (seq, bad.id),
            )
        assert [r.id for r in await b.store.recent(limit=10)] == [good.id]
        later = make_record()
        await a.store.insert([later])
        await eventually(lambda: b.saw(later.id), message="the feed stopped at a bad row")


async def test_url_and_description(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = resolve_store("sqlite:///sub.db")
    assert isinstance(store, SQLiteStore) and store.durable
    assert store.description == f"sqlite:///{tmp_path / 'sub.db'}"
    again = resolve_store(store.description)
    assert isinstance(again, SQLiteStore) and again.path == store.path


def _leave_stale_socket(path: Path) -> None:
    """A socket file nobody listens on: what a process that died leaves behind."""
    path.parent.mkdir()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.close()


async def test_stale_hint_sockets_are_removed(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    hints = Path(f"{path}-hints")
    stale = hints / "0123456789abcdef"
    _leave_stale_socket(stale)
    async with opened(SQLiteStore(path)) as a:
        await a.store.insert([make_record()])
        assert not stale.exists()
        assert os.listdir(hints) == [a.store.owner]
    assert os.listdir(hints) == []


async def test_writes_of_one_task_queued_together_become_one_statement(tmp_path: Path) -> None:
    """RUNNING then SUCCESS of a task queued before the writer got to them: one compare-and-
    set with both changes, both callers answered, the final state published once."""
    store = SQLiteStore(tmp_path / "tasks.db")
    async with opened(store) as a:
        owner = store.owner
        record = make_record(owner=owner)
        await store.insert([record])
        loop = asyncio.get_running_loop()
        running = store._update_op(
            record.id, owner, 0, {"status": TaskStatus.RUNNING, "attempts": 1}
        )
        success = store._update_op(record.id, owner, 1, {"status": TaskStatus.SUCCESS, "result": 3})
        stale = store._update_op(record.id, owner, 0, {"result": 4})  # expects attempt 0: apart
        futures = [loop.create_future() for _ in range(3)]
        merged = store._coalesce(list(zip((running, success, stale), futures, strict=True)))
        assert [len(waiting) for _, waiting in merged] == [2, 1]
        a.seen.clear()
        outcomes: list[Any] = []
        with contextlib.closing(sqlite3.connect(store.path, isolation_level=None)) as conn:
            conn.execute("BEGIN IMMEDIATE")
            for op, waiting in merged:
                result, records = op(conn, 10**9)
                outcomes.append((result, len(waiting), len(records)))
            conn.execute("COMMIT")
        done = outcomes[0][0]
        assert (done.status, done.attempts, done.result) == (TaskStatus.SUCCESS, 1, 3)
        assert outcomes[0][1:] == (2, 1)
        assert outcomes[1][0] is None  # the stale write matched nothing
        got = await store.get(record.id)
        assert got is not None and (got.status, got.attempts) == (TaskStatus.SUCCESS, 1)
