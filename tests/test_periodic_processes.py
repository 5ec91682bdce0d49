"""Two real app processes on one SQLite file: each due time of a schedule runs once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastworker_fastapi.periodic import schedule_task_id
from tests.conftest import eventually

SCRIPT = Path(__file__).with_name("_periodic_app.py")
STEP = timedelta(seconds=0.5)


def runs(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


async def test_two_processes_run_each_due_time_once(tmp_path: Path) -> None:
    db, log = tmp_path / "tasks.db", tmp_path / "runs.log"
    env = {**os.environ, "PERIODIC_LOG": str(log)}
    env.pop("FASTWORKER_STORE", None)
    began = datetime.now(UTC)
    processes: list[asyncio.subprocess.Process] = []
    try:
        for _ in range(2):
            processes.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    str(SCRIPT),
                    str(db),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    env=env,
                    start_new_session=True,
                )
            )
        for process in processes:
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), 60)
            assert line.strip() == b"ready", line
        both_up = len(runs(log))
        await eventually(
            lambda: len(runs(log)) >= both_up + 8, timeout=60, message="8 runs with both up"
        )
        for process in processes:
            assert process.stdin is not None
            process.stdin.close()  # a graceful stop
        for process in processes:
            assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        for process in processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
    ended = datetime.now(UTC)

    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT id, status FROM tasks WHERE name = 'pp_tick'").fetchall()
    done = [task_id for task_id, status in rows if status == "success"]
    assert len(runs(log)) == len(done) >= 8  # each task ran once: one line per success
    # The tasks are those of consecutive due times: none missed, none made twice.
    first = datetime.fromtimestamp(began.timestamp() // 1, UTC) - STEP
    due_ids = []
    while first <= ended + STEP:
        due_ids.append(schedule_task_id("pp", first))
        first += STEP
    positions = sorted(due_ids.index(task_id) for task_id, _ in rows)
    assert positions == list(range(positions[0], positions[0] + len(rows)))
