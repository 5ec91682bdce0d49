"""The app the PostgreSQL end-to-end tests run in real uvicorn processes (two "hosts").

Configured by the environment: `FW_PG_URL`, `FW_PG_SCHEMA`, `FW_PG_LEASE` (seconds),
`FW_PG_DIR` (a folder for gate files and the execution log), `FW_PG_CONCURRENCY`.
"""

from __future__ import annotations

import asyncio
import os

from fastapi import FastAPI

from fastworker_fastapi import FastWorker, InProcessWorkers, background_task
from fastworker_fastapi.stores.postgres import PostgresStore

FOLDER = os.environ.get("FW_PG_DIR", ".")


def _log(line: str) -> None:
    """One line per execution, appended atomically: the tests count runs with it."""
    fd = os.open(os.path.join(FOLDER, "runs.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


@background_task
async def pg_add(a: int, b: int) -> int:
    return a + b


@background_task
async def pg_hold(tag: str, gate: str) -> str:
    """Runs until the file `gate` exists in FW_PG_DIR, then returns `tag`."""
    _log(f"start {tag} {os.getpid()}")
    path = os.path.join(FOLDER, gate)
    # A test's gate is a file another process creates: polled, as nothing can signal it.
    while not os.path.exists(path):  # noqa: ASYNC110, ASYNC240
        await asyncio.sleep(0.02)
    _log(f"done {tag} {os.getpid()}")
    return tag


app = FastAPI()
store = PostgresStore(
    os.environ["FW_PG_URL"],
    schema=os.environ["FW_PG_SCHEMA"],
    lease=float(os.environ.get("FW_PG_LEASE", "30")),
    poll_interval=0.2,
)
fw = FastWorker(
    app,
    store=store,
    workers=InProcessWorkers(concurrency=int(os.environ.get("FW_PG_CONCURRENCY", "4"))),
    shutdown_timeout=2,
)


@app.post("/add")
async def add(a: int, b: int) -> dict[str, str]:
    return {"task_id": await pg_add.delay(a, b)}


@app.post("/hold")
async def hold(tag: str, gate: str) -> dict[str, str]:
    return {"task_id": await pg_hold.delay(tag, gate)}


@app.get("/pid")
async def pid() -> dict[str, int]:
    return {"pid": os.getpid()}
