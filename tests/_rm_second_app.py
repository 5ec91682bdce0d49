"""A second app process for the remote tests: submits through its own FastWorker, prints JSON.

Usage: python _rm_second_app.py <control-plane address> <ledger path> <tag prefix> <count>
Prints `{"correct": n, "wrong": [...]}`; a result is correct only if it is this call's own.
"""

from __future__ import annotations

import asyncio
import json
import sys

import _rm_tasks  # noqa: F401 - registers the tasks this app submits

from fastworker_fastapi import FastWorker, RemoteWorkers, TaskStatus


async def main(address: str, ledger: str, prefix: str, count: int) -> None:
    fw = FastWorker(workers=RemoteWorkers(addresses=[address], concurrency=16))
    async with fw.run() as client:
        print("READY", flush=True)  # the parent starts its own submissions now
        ids = [await client.delay("rm_record", ledger, f"{prefix}-{n}", n) for n in range(count)]
        results = [await client.wait(task_id, timeout=60) for task_id in ids]
    wrong = [
        [n, r.status.value, r.result, r.error]
        for n, r in enumerate(results)
        if r.status is not TaskStatus.SUCCESS or r.result != [f"{prefix}-{n}", n * n]
    ]
    print(json.dumps({"correct": count - len(wrong), "wrong": wrong[:5]}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
