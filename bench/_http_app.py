"""The apps `bench/http.py` serves with uvicorn: `plain` (no extension) and `ext` (with it).

Both have `GET /ping` (no background work); `plain` has `POST /work` using Starlette's
`BackgroundTasks`, and `POST /work-dep`, the same with one dependency that returns a
constant (what FastAPI charges for any dependency); `ext` has `POST /work` calling
`client.delay()` (the client injected with `TaskClientDep`, one dependency) for the same
function, and `POST /work-handle` calling the task's typed handle, `bench_noop.delay()`,
which needs no dependency.
"""

from __future__ import annotations

import os
from typing import Annotated

from fastapi import BackgroundTasks, Depends, FastAPI

from bench.tasks import bench_noop
from fastworker_fastapi import FastWorker, TaskClientDep

app = FastAPI()


@app.get("/ping")
async def ping() -> dict[str, bool]:
    return {"ok": True}


if os.environ.get("BENCH_APP", "plain") == "ext":
    fw = FastWorker(app, store="memory", max_pending=100_000, max_results=1000)

    @app.post("/work")
    async def work_with_delay(client: TaskClientDep) -> dict[str, str]:
        return {"task_id": await client.delay("bench_noop", 1)}

    @app.post("/work-handle")
    async def work_with_handle() -> dict[str, str]:
        return {"task_id": await bench_noop.delay(1)}

else:

    @app.post("/work")
    async def work_with_background_tasks(background: BackgroundTasks) -> dict[str, str]:
        background.add_task(bench_noop.__wrapped__, 1)
        return {"task_id": "-"}

    async def constant() -> int:
        return 1

    @app.post("/work-dep")
    async def work_with_background_tasks_and_a_dependency(
        background: BackgroundTasks, value: Annotated[int, Depends(constant)]
    ) -> dict[str, str]:
        background.add_task(bench_noop.__wrapped__, value)
        return {"task_id": "-"}
