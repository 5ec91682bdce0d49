"""Task throughput with many open event streams against none (`make bench`).

200 subscribers on the all-tasks stream (the body `GET /tasks/events` sends, JSON included):
150 read as fast as they can, 50 never read after their first chunk (a stalled client).
Every reading stream must see the final state of every task.
"""

from __future__ import annotations

import asyncio
import re
import time

import anyio

from bench.tasks import bench_noop  # noqa: F401 - registers the task
from fastworker_fastapi import FastWorker, InProcessWorkers
from fastworker_fastapi.live import task_events

_FINAL = re.compile(r'"id":"([^"]+)","name":"bench_noop","status":"success"')


async def throughput_with_streams(n: int, readers: int, stalled: int) -> tuple[float, bool]:
    """Tasks/s of N trivial tasks (delay, then wait for all); and whether every reading
    stream saw each task's final state."""
    fw = FastWorker(
        store="memory", workers=InProcessWorkers(concurrency=8), max_pending=n, max_results=n
    )
    finals: list[set[str]] = [set() for _ in range(readers)]
    async with fw.run() as client, anyio.create_task_group() as group:
        hub = client.events

        async def read(seen: set[str]) -> None:
            # As light as a client in another process costs this one: no JSON parsing.
            async for chunk in task_events(hub, max_buffer=256, heartbeat=60):
                seen.update(_FINAL.findall(chunk))

        stalled_bodies = []
        for seen in finals:
            group.start_soon(read, seen)
        for _ in range(stalled):
            body = task_events(hub, max_buffer=256, heartbeat=60)
            await anext(body)  # subscribed, then never read again
            stalled_bodies.append(body)
        await asyncio.sleep(0)  # let the readers subscribe
        start = time.perf_counter()
        ids = [await client.delay("bench_noop", i) for i in range(n)]
        for task_id in ids:
            await client.wait(task_id)
        elapsed = time.perf_counter() - start
        # Ending the streams hands each reader what is pending, then the end.
        fw.end_event_streams()
        for body in stalled_bodies:
            await body.aclose()
    return n / elapsed, all(len(seen) == n for seen in finals)
