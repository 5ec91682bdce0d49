"""Shared test helpers: apps run through their real lifespan, driven over ASGI."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
from asgi_lifespan import LifespanManager
from starlette.types import ASGIApp


@asynccontextmanager
async def serve(app: ASGIApp, *, shutdown_timeout: float = 30) -> AsyncIterator[httpx.AsyncClient]:
    """Run `app`'s lifespan and give an HTTP client talking to it in-process."""
    async with LifespanManager(app, shutdown_timeout=shutdown_timeout) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            yield http


async def eventually(
    check: Callable[[], Any] | Callable[[], Awaitable[Any]],
    *,
    timeout: float = 10.0,
    interval: float = 0.005,
    message: str = "condition not met",
) -> Any:
    """Poll `check` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} within {timeout}s (last value: {value!r})")
        await anyio.sleep(interval)
