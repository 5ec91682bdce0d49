"""An app for tests that run it in real uvicorn processes sharing one task store.

The store comes from `$FASTWORKER_STORE` (the extension's default), so each test picks it.
Tasks append a line to `$RUNS_LOG` each time they start, so a test can count how often each
ran; `hold` waits for a file to appear, a gate that works across processes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI

from fastworker_fastapi import FastWorker, InProcessWorkers, TaskCallback, background_task

RUNS_LOG = Path(os.environ.get("RUNS_LOG", "runs.log"))
GATES = Path(os.environ.get("GATES_DIR", "gates"))


def _ran(task_id: str) -> None:
    with RUNS_LOG.open("a") as log:  # one short write: atomic with O_APPEND
        log.write(f"{task_id} {os.getpid()}\n")


@background_task(name="sp_echo")
async def sp_echo(value: Any) -> Any:
    return value


@background_task(name="sp_work")
def sp_work(task_id: str, seconds: float) -> int:
    _ran(task_id)
    time.sleep(seconds)
    return os.getpid()


@background_task(name="sp_hold")
def sp_hold(gate: str) -> str:
    """Hold until the test creates the gate file (a poll: files have no wake-up)."""
    while not (GATES / gate).exists():
        time.sleep(0.02)
    return gate


app = FastAPI()
fw = FastWorker(
    app,
    workers=InProcessWorkers(concurrency=int(os.environ.get("CONCURRENCY", "4"))),
    shutdown_timeout=float(os.environ.get("SHUTDOWN_TIMEOUT", "5")),
)
RECEIVED = Path(os.environ.get("RECEIVED_LOG", "received.log"))


@app.post("/work")
async def work(count: int = 1, seconds: float = 0.0) -> dict[str, Any]:
    """Submit `count` sp_work tasks; each gets its own id as its first argument."""
    ids = []
    for _ in range(count):
        # The id is only known after submission: pass a placeholder, the log uses the id
        # the task reports through its first argument (a tag made here).
        tag = os.urandom(8).hex()
        ids.append((await fw.client.delay("sp_work", tag, seconds), tag))
    return {"pid": os.getpid(), "tasks": [{"id": i, "tag": t} for i, t in ids]}


@app.post("/echo")
async def echo(value: str) -> dict[str, Any]:
    return {"pid": os.getpid(), "id": await fw.client.delay("sp_echo", value)}


@app.post("/hold/{gate}")
async def hold(gate: str, callback: str | None = None) -> dict[str, Any]:
    if callback is None:
        task_id = await fw.client.delay("sp_hold", gate)
    else:
        task_id = await fw.client.delay_with_callback("sp_hold", callback, gate)
    return {"pid": os.getpid(), "id": task_id}


@fw.callback_route("/hooks/done")
async def done(callback: TaskCallback) -> None:
    if (GATES / "refuse-callbacks").exists():
        raise RuntimeError("receiver not ready")  # a 500: the delivery is retried
    await anyio.Path(RECEIVED).write_text(f"{callback.task_id} {callback.status.value}\n")


@app.get("/pid")
async def pid() -> dict[str, int]:
    return {"pid": os.getpid()}
