"""A clock the test moves by hand, for periodic tasks (`fw.periodic.clock = ManualClock(...)`)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta


class ManualClock:
    """`now()` stands still until `advance()`; sleepers wake when their time has come."""

    def __init__(self, now: datetime) -> None:
        self._now = now
        self._sleepers: list[tuple[datetime, asyncio.Future[None]]] = []

    def now(self) -> datetime:
        return self._now

    async def sleep_until(self, when: datetime) -> None:
        if when <= self._now:
            return
        entry = (when, asyncio.get_running_loop().create_future())
        self._sleepers.append(entry)
        try:
            await entry[1]
        finally:
            self._sleepers.remove(entry)

    def advance(self, delta: timedelta) -> None:
        self._now += delta
        for when, future in self._sleepers:
            if when <= self._now and not future.done():
                future.set_result(None)

    def parked(self) -> bool:
        """True while someone sleeps until a time still to come: the runner is idle."""
        return any(when > self._now and not f.done() for when, f in self._sleepers)
