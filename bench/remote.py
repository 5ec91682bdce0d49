"""Remote throughput: our client against fastworker 0.3.0's own, on the same control plane.

One spawned control plane loads `bench.tasks`; the same trivial task runs through (1) our
`RemoteWorkers` executor, (2) fastworker's `Client.submit_task` one call at a time, (3) the same
with 8 calls in flight. Only correct results count: a success whose value is the one this
call's own argument produces. Wrong (another call's), failed and lost results count as zero,
and every fastworker call has an outer deadline so a lost reply cannot stall the run.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import cast

from fastworker.clients.client import Client
from fastworker.tasks.models import TaskStatus

import bench.tasks  # noqa: F401 - registers the benchmark tasks
from fastworker_fastapi import FastWorker, RemoteWorkers, TaskClient
from fastworker_fastapi._control_plane import ControlPlaneProcess
from fastworker_fastapi.workers.remote import RemoteExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS_N = int(os.environ.get("BENCH_REMOTE_TASKS", "2000"))
THEIRS_N = int(os.environ.get("BENCH_REMOTE_FASTWORKER_TASKS", "300"))
CONCURRENT = 8
CALL_DEADLINE = 3.0  # an outer deadline per fastworker call: its replies can be lost
PHASE_BUDGET = 30.0  # seconds a fastworker phase may take before its unfinished calls count 0


async def ours(workers: RemoteWorkers, n: int) -> tuple[int, float]:
    """Correct results and seconds for N tasks through our RemoteWorkers executor."""
    fw = FastWorker(workers=workers, store="memory", max_pending=n, max_results=n)
    async with fw.run() as client:
        return await _ours(client, n)


async def _ours(client: TaskClient, n: int) -> tuple[int, float]:
    start = time.perf_counter()
    ids = [await client.delay("bench_noop_sync", i) for i in range(n)]
    results = [await client.wait(task_id, timeout=120) for task_id in ids]
    elapsed = time.perf_counter() - start
    correct = sum(
        1 for i, r in enumerate(results) if r.status is TaskStatus.SUCCESS and r.result == i
    )
    return correct, elapsed


async def ours_and_theirs(
    n: int, theirs_n: int, *, lanes: int = 3
) -> tuple[tuple[int, float], tuple[int, float]]:
    """Ours on one spawned plane, then fastworker's sequential client on that same plane."""
    workers = RemoteWorkers(spawn=1, python_path=[ROOT], lanes=lanes)
    fw = FastWorker(workers=workers, store="memory", max_pending=n, max_results=n)
    async with fw.run() as client:
        mine = await _ours(client, n)
        executor = cast(RemoteExecutor, client.scheduler.executor)
        plane = executor._processes[0]
        theirs_client = Client(
            discovery_address=f"tcp://127.0.0.1:{plane.ports.discovery}", timeout=2, retries=1
        )
        await theirs_client.start()  # sleeps 2 s by design (upstream); not timed
        try:
            seq = await theirs(theirs_client, theirs_n, 1)
        finally:
            theirs_client.stop()
    return mine, seq


async def theirs(client: Client, n: int, in_flight: int) -> tuple[int, float]:
    """Correct results and seconds for N `submit_task` calls, `in_flight` at a time."""
    queue = iter(range(n))
    correct = 0

    async def one(i: int) -> bool:
        try:
            result = await asyncio.wait_for(
                client.submit_task("bench_noop_sync", args=(i,)), CALL_DEADLINE
            )
        except Exception:  # a timeout or the client's own error: not a correct result
            return False
        return result.status is TaskStatus.SUCCESS and result.result == i

    async def caller() -> None:
        nonlocal correct
        for i in queue:
            correct += await one(i)

    start = time.perf_counter()
    callers = [asyncio.create_task(caller()) for _ in range(in_flight)]
    _, late = await asyncio.wait(callers, timeout=PHASE_BUDGET)
    for task in late:
        task.cancel()
    await asyncio.gather(*late, return_exceptions=True)
    return correct, time.perf_counter() - start


async def run() -> list[str]:
    """Measure all three on one spawned control plane; print and return the doc's lines."""
    (ours_ok, ours_s), (seq_ok, seq_s) = await ours_and_theirs(OURS_N, THEIRS_N)
    async with ControlPlaneProcess(["bench.tasks"], python_path=[ROOT]) as plane:
        # Batches with callbacks: the path for planes other processes may share.
        batch_ok, batch_s = await ours(RemoteWorkers(addresses=[plane.base_address]), OURS_N)
        client = Client(
            discovery_address=f"tcp://127.0.0.1:{plane.ports.discovery}", timeout=2, retries=1
        )
        await client.start()  # sleeps 2 s by design (upstream); not timed
        try:
            par_ok, par_s = await theirs(client, THEIRS_N, CONCURRENT)
        finally:
            client.stop()
    # Not the same plane, so not in the comparison: how far spreading over two planes goes.
    two_ok, two_s = await ours(RemoteWorkers(spawn=2, python_path=[ROOT]), OURS_N)
    rows = [
        ("fastworker-fastapi `RemoteWorkers(spawn=1)` (delay + wait)", OURS_N, ours_ok, ours_s),
        ("fastworker 0.3.0 `Client.submit_task`, sequential", THEIRS_N, seq_ok, seq_s),
        ("fastworker-fastapi, batches + callbacks (shared plane)", OURS_N, batch_ok, batch_s),
        (f"fastworker 0.3.0 `Client.submit_task`, {CONCURRENT} in flight", THEIRS_N, par_ok, par_s),
        ("fastworker-fastapi `RemoteWorkers(spawn=2)`, two planes", OURS_N, two_ok, two_s),
    ]
    rate: Callable[[int, float], float] = lambda ok, s: ok / s if s > 0 else 0.0  # noqa: E731
    base = rate(ours_ok, ours_s)
    lines = [
        "## Remote throughput (one spawned control plane, trivial sync task)",
        "",
        "Same run, same task; the first two rows share one spawned control plane (ours, then",
        "fastworker's own client on it). Only correct results count (a success carrying this",
        "call's own value): wrong, failed and lost results count as zero. The batch row is the",
        "path for planes that other processes may share (`addresses=`, `discovery=`), on a",
        "plane of its own; the last row spreads the tasks over two spawned planes (scale-out).",
        "",
        "| client | tasks | correct | correct results/s | ours / this |",
        "|---|---|---|---|---|",
    ]
    for what, n, ok, seconds in rows:
        r = rate(ok, seconds)
        ratio = f"{base / r:.1f} x" if r > 0 else "∞"
        lines.append(f"| {what} | {n} | {ok} ({ok / n:.0%}) | {r:,.0f} | {ratio} |")
        print(f"{what:58} {ok:5}/{n:<5} correct  {r:10,.0f} correct/s")
    return [*lines, ""]


if __name__ == "__main__":
    asyncio.run(run())
