"""The app `bench/streams.py` serves with uvicorn: the extension on its default store (a
SQLite file, `FASTWORKER_STORE`) and `POST /burst?n=N`, which submits N trivial tasks with
`delay()`, waits for all of them and answers with the rate, measured inside the server."""

from __future__ import annotations

import time

from fastapi import FastAPI

from bench.tasks import bench_noop  # noqa: F401 - registers the task
from fastworker_fastapi import FastWorker, TaskClientDep

app = FastAPI()
FastWorker(app, max_pending=100_000, max_results=100_000)


@app.get("/ping")
async def ping() -> dict[str, bool]:
    return {"ok": True}


@app.post("/burst")
async def burst(n: int, client: TaskClientDep) -> dict[str, float]:
    start = time.perf_counter()
    ids = [await client.delay("bench_noop", i) for i in range(n)]
    for task_id in ids:
        await client.wait(task_id)
    return {"rate": n / (time.perf_counter() - start)}
