"""Store kinds for the contract suite: each kind is one factory.

A factory gets pytest's `tmp_path` and the test's request (for session fixtures such as
the PostgreSQL server) and returns a `Backend`, whose `make(**options)` builds a
new store instance on the same backend (a shared backend: two instances stand for two
processes). To add a kind, write its factory, add it to `BACKENDS`, and to
`SHARED_KINDS` if several processes share it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fastworker_fastapi.stores.base import TaskStore
from fastworker_fastapi.stores.memory import MemoryStore
from fastworker_fastapi.stores.sqlite import SQLiteStore


@dataclass
class Backend:
    kind: str
    make: Callable[..., TaskStore]
    """A new store instance on this backend; options a kind does not know are ignored."""
    shared: bool = False


def memory_backend(tmp_path: Path) -> Backend:
    return Backend("memory", lambda **options: MemoryStore())


def sqlite_backend(tmp_path: Path) -> Backend:
    path = tmp_path / "tasks.db"

    def make(**options: Any) -> TaskStore:
        return SQLiteStore(path, **{"poll_interval": 0.05, **options})

    return Backend("sqlite", make, shared=True)


def postgres_backend(tmp_path: Path, request: pytest.FixtureRequest) -> Backend:
    """A fresh schema on the session's PostgreSQL server (skipped when there is none)."""
    from fastworker_fastapi.stores.postgres import PostgresStore

    server = request.getfixturevalue("postgres")
    schema = server.schema()

    def make(**options: Any) -> TaskStore:
        return PostgresStore(server.url, schema=schema, **{"poll_interval": 0.05, **options})

    return Backend("postgres", make, shared=True)


BACKENDS: dict[str, Callable[[Path, pytest.FixtureRequest], Backend]] = {
    "memory": lambda tmp_path, request: memory_backend(tmp_path),
    "sqlite": lambda tmp_path, request: sqlite_backend(tmp_path),
    "postgres": postgres_backend,
}
SHARED_KINDS = [kind for kind in BACKENDS if kind != "memory"]


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return BACKENDS[request.param](tmp_path, request)


@pytest.fixture(params=SHARED_KINDS)
def shared_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return BACKENDS[request.param](tmp_path, request)
