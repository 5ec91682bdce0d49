"""PostgreSQL: our store end to end against a raw psycopg task loop, and cross-host event
latency, on a throwaway server started here (fsync on, default settings otherwise).

Skipped (no rows, one line saying why) when PostgreSQL or psycopg is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
import uuid

from bench.tasks import bench_noop  # noqa: F401  (registers the task)
from fastworker_fastapi import FastWorker, InProcessWorkers

N = int(os.environ.get("BENCH_PG_TASKS", "2000"))
REPEATS = int(os.environ.get("BENCH_PG_REPEATS", "3"))
WORKERS = 8
LATENCY_SAMPLES = int(os.environ.get("BENCH_PG_SAMPLES", "300"))


async def raw_loop(url: str, n: int, workers: int) -> float:
    """Tasks/s of the naive loop: one submitter inserts N rows (a commit each) while W
    workers, each on its own connection, claim one with `FOR UPDATE SKIP LOCKED` and finish
    it (a commit each); the clock stops when the last is finished."""
    import psycopg

    table = f"raw_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:
        await admin.execute(
            f"CREATE TABLE {table} (id bigserial PRIMARY KEY, args jsonb NOT NULL,"  # type: ignore[arg-type]
            " status text NOT NULL, result jsonb)"
        )
        await admin.execute(f"CREATE INDEX ON {table} (id) WHERE status = 'queued'")  # type: ignore[arg-type]
    done = 0
    finished = asyncio.Event()

    async def worker() -> None:
        nonlocal done
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            while not finished.is_set():
                cur = await conn.execute(
                    f"UPDATE {table} SET status = 'running' WHERE id = (SELECT id FROM {table}"  # type: ignore[arg-type]
                    " WHERE status = 'queued' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)"
                    " RETURNING id, args"
                )
                row = await cur.fetchone()
                if row is None:
                    await asyncio.sleep(0.001)
                    continue
                await conn.execute(
                    f"UPDATE {table} SET status = 'done', result = %s WHERE id = %s",  # type: ignore[arg-type]
                    (psycopg.types.json.Jsonb(row[1][0]), row[0]),
                )
                done += 1
                if done >= n:
                    finished.set()

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        start = time.perf_counter()
        for i in range(n):
            await conn.execute(
                f"INSERT INTO {table} (args, status) VALUES (%s, 'queued')",  # type: ignore[arg-type]
                (psycopg.types.json.Jsonb([i]),),
            )
        await finished.wait()
        elapsed = time.perf_counter() - start
        await asyncio.gather(*tasks)
        await conn.execute(f"DROP TABLE {table}")  # type: ignore[arg-type]
    return n / elapsed


async def ours(url: str, n: int, workers: int) -> float:
    """Tasks/s of N trivial tasks submitted with `delay` and awaited with `wait`."""
    from fastworker_fastapi.stores.postgres import PostgresStore

    store = PostgresStore(url, schema=f"b_{uuid.uuid4().hex[:12]}")
    fw = FastWorker(
        workers=InProcessWorkers(concurrency=workers), store=store, max_pending=n, max_results=n
    )
    async with fw.run() as client:
        start = time.perf_counter()
        ids = [await client.delay("bench_noop", i) for i in range(n)]
        for task_id in ids:
            await client.wait(task_id)
        elapsed = time.perf_counter() - start
    return n / elapsed


async def event_latency(url: str, samples: int) -> tuple[float, float]:
    """Milliseconds from a write's commit in one store (host A) to its event in another
    store's hub (host B, its own pool and LISTEN connection), p50 and p99."""
    import anyio
    from fastworker.tasks.models import TaskPriority, TaskStatus

    from fastworker_fastapi.events import EventHub
    from fastworker_fastapi.records import TaskPolicy, TaskRecord
    from fastworker_fastapi.stores.postgres import PostgresStore

    schema = f"l_{uuid.uuid4().hex[:12]}"
    a, b = PostgresStore(url, schema=schema), PostgresStore(url, schema=schema)
    arrived: dict[str, float] = {}
    hub_b = EventHub()
    waiting: dict[str, asyncio.Event] = {}

    def on_change(record: TaskRecord) -> None:
        arrived.setdefault(record.id, time.perf_counter())
        if record.id in waiting:
            waiting[record.id].set()

    hub_b.add_listener(on_change)
    latencies: list[float] = []
    async with anyio.create_task_group() as group:
        await a.open(EventHub(), group, result_ttl=3600, max_results=100_000)
        await b.open(hub_b, group, result_ttl=3600, max_results=100_000)
        for i in range(samples):
            record = TaskRecord(
                uuid.uuid4().hex, "x", [i], {}, TaskPriority.NORMAL, TaskPolicy(),
                TaskStatus.QUEUED, time.time(),
            )  # fmt: skip
            await a.insert([record])
            committed = time.perf_counter()
            seen = asyncio.Event()
            waiting[record.id] = seen
            if record.id not in arrived:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(seen.wait(), 5)
            if record.id in arrived:
                latencies.append((arrived[record.id] - committed) * 1000)
        await a.close()
        await b.close()
        group.cancel_scope.cancel()
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return statistics.median(latencies), p99


async def run() -> tuple[list[str], list[tuple[str, float, str, bool]]]:
    """Rows for docs/benchmarks.md and checks `(what, value, target, ok)`."""
    try:
        import psycopg  # noqa: F401

        from tests._postgres import postgres_server
    except ImportError as exc:
        print(f"PostgreSQL benchmark skipped: {exc}")
        return [f"PostgreSQL rows skipped: {exc}.", ""], []
    try:
        server_cm = postgres_server({"fsync": "on"})
        server = server_cm.__enter__()
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"PostgreSQL benchmark skipped: {exc}")
        return [f"PostgreSQL rows skipped: {str(exc).splitlines()[0]}.", ""], []
    try:
        raw: list[float] = []
        mine: list[float] = []
        for _ in range(REPEATS):  # interleaved, so both see the same machine load
            raw.append(await raw_loop(server.url, N, WORKERS))
            mine.append(await ours(server.url, N, WORKERS))
        raw_rate, our_rate = statistics.median(raw), statistics.median(mine)
        p50, p99 = await event_latency(server.url, LATENCY_SAMPLES)
    finally:
        server_cm.__exit__(None, None, None)
    ratio = our_rate / raw_rate
    print(f"PostgreSQL raw psycopg loop    {raw_rate:11,.0f} tasks/s")
    print(f"PostgreSQL fastworker-fastapi  {our_rate:11,.0f} tasks/s  ({ratio:.2f} of raw)")
    print(f"cross-host event latency      p50 {p50:.2f} ms, p99 {p99:.2f} ms\n")
    lines = [
        f"## PostgreSQL ({N:,} trivial tasks, {WORKERS} workers, median of {REPEATS})",
        "",
        "A throwaway PostgreSQL server started by the benchmark (fsync on), the same for both.",
        "The raw loop: one submitter inserting a row per task (a commit each), eight workers on",
        "their own connections claiming with `FOR UPDATE SKIP LOCKED` and finishing (a commit",
        "each). Ours: `delay` then `wait` through `PostgresStore` (status, attempts and result",
        "written at each step, `NOTIFY` with every change).",
        "",
        "| setup | throughput | ratio to the raw loop |",
        "|---|---|---|",
        f"| raw psycopg loop (insert, SKIP LOCKED claim, finish) | {raw_rate:,.0f} tasks/s"
        " | 1.00 |",
        f"| fastworker-fastapi, `PostgresStore`, delay + wait | {our_rate:,.0f} tasks/s"
        f" | {ratio:.2f} |",
        "",
        f"Cross-host event latency (commit in one store to the event in another's hub, through"
        f" `NOTIFY`/`LISTEN` and the feed query; {LATENCY_SAMPLES} samples): p50 **{p50:.2f} ms**,"
        f" p99 **{p99:.2f} ms**.",
        "",
    ]
    checks = [("PostgreSQL end to end / raw psycopg loop", ratio, ">= 0.5", ratio >= 0.5)]
    return lines, checks


if __name__ == "__main__":
    print("\n".join(asyncio.run(run())[0]))
