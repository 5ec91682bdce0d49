"""What only the PostgreSQL store promises: clear errors when the database is away, 503
while it is down and recovery after, a LISTEN that reconnects and catches up, `peek` from
a bounded cache, URLs without passwords in messages."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from _records import make_record, same
from _support import eventually, opened
from fastworker.tasks.models import TaskStatus

from fastworker_fastapi.errors import ConfigurationError, StoreUnavailableError
from fastworker_fastapi.events import EventHub
from fastworker_fastapi.stores import resolve_store
from tests._postgres import PostgresServer, postgres_server

psycopg = pytest.importorskip("psycopg")
from fastworker_fastapi.stores.postgres import PostgresStore  # noqa: E402


def test_resolve_store_and_description_hide_the_password(postgres: PostgresServer) -> None:
    url = postgres.url.replace("fw@", "fw:s3cret@") + "?schema=elsewhere&application_name=x"
    store = resolve_store(url)
    assert isinstance(store, PostgresStore)
    assert store.schema == "elsewhere" and "s3cret" not in store.description
    assert "schema=" not in store.url and "application_name=x" in store.url
    assert isinstance(resolve_store(postgres.url.replace("postgresql", "postgres")), PostgresStore)
    with pytest.raises(ConfigurationError, match="schema"):
        PostgresStore(postgres.url, schema="Bad-Name")
    with pytest.raises(ConfigurationError):
        PostgresStore(postgres.url, lease=0)
    with pytest.raises(ConfigurationError):
        PostgresStore(postgres.url, min_pool=3, max_pool=2)


async def test_a_database_that_is_down_at_start_is_a_clear_error(
    postgres: PostgresServer,
) -> None:
    from tests.conftest import free_port

    url = f"postgresql://fw:pw@127.0.0.1:{free_port()}/postgres"
    store = PostgresStore(url, connect_timeout=1.0)
    async with anyio.create_task_group() as group:
        with pytest.raises(ConfigurationError, match="cannot use the PostgreSQL task store") as e:
            await store.open(EventHub(), group, result_ttl=60, max_results=10)
        assert "pw" not in str(e.value)
        assert store._pool is None  # nothing left half-open


async def test_down_while_running_then_back(caplog: pytest.LogCaptureFixture) -> None:
    """Reads and inserts fail with 503 while the server is down; writes of running tasks
    wait for it; everything works again once it is back, without a restart of the app."""
    with postgres_server() as server:
        store = PostgresStore(server.url, schema=server.schema(), poll_interval=0.05)
        async with opened(store) as a:
            record = make_record(owner=a.store.owner)
            await a.store.insert([record])
            await anyio.to_thread.run_sync(server.stop)
            with pytest.raises(StoreUnavailableError) as down:
                await a.store.insert([make_record()])
            assert down.value.status_code == 503
            with pytest.raises(StoreUnavailableError):
                await a.store.get(record.id)
            assert same(a.store.peek(record.id), record)  # from memory, down or not
            results: list[Any] = []

            async def finish() -> None:
                results.append(
                    await a.store.update(
                        record.id, a.store.owner, 0, status=TaskStatus.SUCCESS, result=7
                    )
                )

            async with anyio.create_task_group() as group:
                group.start_soon(finish)
                await eventually(
                    lambda: "retrying a write" in caplog.text, message="the write retries"
                )
                assert results == []
                await anyio.to_thread.run_sync(server.start)
            assert results[0] is not None and results[0].result == 7
            got = await a.store.get(record.id)
            assert got is not None and got.status is TaskStatus.SUCCESS
            await a.store.heartbeat()
            await a.store.insert([make_record()])


async def test_listen_reconnects_and_the_feed_catches_up(postgres: PostgresServer) -> None:
    schema = postgres.schema()
    make = lambda **o: PostgresStore(postgres.url, schema=schema, **o)  # noqa: E731
    async with (
        opened(make()) as a,
        opened(make(poll_interval=3600, keepalive=0.2)) as b,
    ):
        async with await psycopg.AsyncConnection.connect(postgres.url, autocommit=True) as admin:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE query LIKE 'LISTEN%%' OR query = 'SELECT 1'"
            )
        record = make_record()
        await a.store.insert([record])
        await eventually(lambda: b.saw(record.id), timeout=15, message="B caught up")


async def test_peek_cache_is_bounded_and_fed_by_reads(postgres: PostgresServer) -> None:
    schema = postgres.schema()
    async with (
        opened(PostgresStore(postgres.url, schema=schema, peek_cache=2)) as a,
        opened(PostgresStore(postgres.url, schema=schema, poll_interval=3600)) as b,
    ):
        records = [make_record() for _ in range(3)]
        await a.store.insert(records)
        assert a.store.peek(records[0].id) is None  # evicted: the cache holds two
        assert same(a.store.peek(records[2].id), records[2])
        # B may have heard of it through its feed already; a read certainly caches it.
        assert same(await b.store.get(records[0].id), records[0])
        assert same(b.store.peek(records[0].id), records[0])


async def test_a_nul_character_is_stored_as_a_replacement(postgres: PostgresServer) -> None:
    async with opened(PostgresStore(postgres.url, schema=postgres.schema())) as a:
        record = make_record(args=["a\x00b"])
        await a.store.insert([record])
        updated = await a.store.update(record.id, None, 0, result="x\x00y")
        assert updated is not None and updated.result == "x\ufffdy"
        got = await a.store.get(record.id)
        assert got is not None and got.args == ["a\ufffdb"]
