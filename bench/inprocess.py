"""In-process throughput against a bare asyncio queue, and the cost of one `delay()`."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.tasks import bench_noop
from fastworker_fastapi import FastWorker, InProcessWorkers


async def asyncio_queue_ceiling(n: int, workers: int) -> float:
    """Tasks/s of N trivial coroutines through a bare asyncio.Queue and W workers, awaited.

    The canonical hand-written pattern: `await queue.put(...)`, workers `await queue.get()`
    and `task_done()`, one future per task for its result. No ids, no status, no records:
    the ceiling that any task queue running in the same loop pays on top of.
    """
    queue: asyncio.Queue[tuple[Callable[[int], Awaitable[Any]], int, asyncio.Future[Any]]]
    queue = asyncio.Queue()
    loop = asyncio.get_running_loop()

    async def worker() -> None:
        while True:
            func, arg, future = await queue.get()
            future.set_result(await func(arg))
            queue.task_done()

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    start = time.perf_counter()
    futures = []
    for i in range(n):
        future = loop.create_future()
        await queue.put((bench_noop.__wrapped__, i, future))
        futures.append(future)
    for future in futures:
        await future
    elapsed = time.perf_counter() - start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return n / elapsed


async def fastworker_fastapi_throughput(n: int, workers: int) -> float:
    """Tasks/s of N trivial tasks submitted with `delay` and awaited with `wait`."""
    fw = FastWorker(
        workers=InProcessWorkers(concurrency=workers), store="memory", max_pending=n, max_results=n
    )
    async with fw.run() as client:
        start = time.perf_counter()
        ids = [await client.delay("bench_noop", i) for i in range(n)]
        for task_id in ids:
            await client.wait(task_id)
        elapsed = time.perf_counter() - start
    return n / elapsed


async def delay_cost_us(n: int, rounds: int) -> float:
    """Median microseconds of one `delay()` call (workers drained between rounds)."""
    fw = FastWorker(
        workers=InProcessWorkers(concurrency=8), store="memory", max_pending=n, max_results=n
    )
    samples: list[int] = []
    clock = time.perf_counter_ns
    async with fw.run() as client:
        for _ in range(rounds):
            ids = []
            for i in range(n):
                t0 = clock()
                task_id = await client.delay("bench_noop", i)
                samples.append(clock() - t0)
                ids.append(task_id)
            for task_id in ids:
                await client.wait(task_id)
    return statistics.median(samples) / 1000
