"""An app with two spawned control planes, run in a child process by `test_orphans`.

It starts the extension, prints one JSON line with the planes' pids and ports, then waits
to be killed.
"""

from __future__ import annotations

import json

import _rm_tasks  # noqa: F401 - registers the rm_ tasks for the planes
import anyio
from fastapi import FastAPI

from fastworker_fastapi import FastWorker, RemoteWorkers


async def main() -> None:
    fw = FastWorker(FastAPI(), workers=RemoteWorkers(spawn=2), store="memory")
    async with fw.run():
        processes = fw.client._scheduler.executor._processes  # type: ignore[union-attr, attr-defined]
        planes = [{"pid": p.pid, "ports": p.ports.all_ports()} for p in processes]
        print(json.dumps(planes), flush=True)
        await anyio.sleep_forever()  # until the test kills us


if __name__ == "__main__":
    anyio.run(main)
