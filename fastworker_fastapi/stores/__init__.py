"""Task stores: `memory` (one process), `sqlite` (one host, the default), `postgresql` (many).

`FastWorker(app, store=...)` takes a store object or a URL; `resolve_store` turns the URL
(or, when none is given, `$FASTWORKER_STORE`, else `sqlite:///fastworker.db`) into a store.
Stores that need an optional dependency are imported only when asked for.
"""

from __future__ import annotations

import os

from fastworker_fastapi.errors import ConfigurationError
from fastworker_fastapi.stores.base import TaskStore
from fastworker_fastapi.stores.memory import MemoryStore
from fastworker_fastapi.stores.sqlite import SQLiteStore

__all__ = ["DEFAULT_STORE", "ENV_VAR", "MemoryStore", "SQLiteStore", "TaskStore", "resolve_store"]

ENV_VAR = "FASTWORKER_STORE"
DEFAULT_STORE = "sqlite:///fastworker.db"


def resolve_store(store: TaskStore | str | None) -> TaskStore:
    """A store object as it is; a URL made into its store; None: the environment's, or
    the default SQLite file in the working directory."""
    if store is None:
        store = os.environ.get(ENV_VAR) or DEFAULT_STORE
    if not isinstance(store, str):
        return store
    url = store.strip()
    if url == "memory" or url == "memory://":
        return MemoryStore()
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if not path:
            raise ConfigurationError(f"store URL {url!r} names no file: use sqlite:///tasks.db")
        return SQLiteStore(path)
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from fastworker_fastapi.stores.postgres import PostgresStore  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:  # pragma: no cover - depends on what is installed
            raise ConfigurationError(
                "the PostgreSQL store needs psycopg: pip install 'fastworker-fastapi[postgres]'"
                f" ({exc})"
            ) from None
        store_object: TaskStore = PostgresStore(url)
        return store_object
    raise ConfigurationError(
        f"unknown store {_safe(url)!r}: use 'memory', 'sqlite:///path/to/tasks.db' or "
        "'postgresql://user:password@host:port/db' (also settable as $FASTWORKER_STORE)"
    )


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        credentials, _, host = rest.rpartition("@")
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url
