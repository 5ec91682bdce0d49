"""One app process running a periodic schedule on a shared SQLite file (for
test_periodic_processes.py): prints `ready`, runs until its stdin closes, then drains."""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import timedelta

from fastworker_fastapi import FastWorker, background_task

LOG = os.environ["PERIODIC_LOG"]


@background_task(name="pp_tick")
def pp_tick() -> int:
    with open(LOG, "a") as file:  # one short appended line per run
        file.write(f"{os.getpid()}\n")
    return os.getpid()


async def main(path: str) -> None:
    fw = FastWorker(prefix=None, store=f"sqlite:///{path}")
    fw.schedule(pp_tick, every=timedelta(seconds=0.5), name="pp")
    async with fw.run():
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.read)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
