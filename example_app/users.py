"""The example's users: a small SQLite table every worker process of the app shares.

The example runs under `uvicorn --workers 3` too, so its data cannot live in one process's
memory (a user created by one worker must be found by the others, and the welcome-email
callback may be delivered by any of them). A real app has its own database; this stands in
for it. Reads and writes are short and run in a worker thread, off the event loop.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

import anyio.to_thread

PATH = os.environ.get("EXAMPLE_USERS_DB", "example_users.db")
MAX_USERS = 1000  # a demo: keep the newest only


def _connect() -> sqlite3.Connection:
    conn = sqlite3.connect(PATH, timeout=5, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " name TEXT NOT NULL, email TEXT NOT NULL, task_id TEXT,"
        " welcome_email_sent INTEGER NOT NULL DEFAULT 0)"
    )
    return conn


def _create(name: str, email: str) -> int:
    with _connect() as conn:
        cursor = conn.execute("INSERT INTO users (name, email) VALUES (?, ?)", (name, email))
        user_id = cursor.lastrowid
        conn.execute("DELETE FROM users WHERE id <= ?", ((user_id or 0) - MAX_USERS,))
    conn.close()
    assert user_id is not None
    return user_id


def _update(user_id: int, column: str, value: Any) -> None:
    assert column in ("task_id", "welcome_email_sent")
    with _connect() as conn:
        conn.execute(f"UPDATE users SET {column} = ? WHERE id = ?", (value, user_id))
    conn.close()


def _get(user_id: int) -> dict[str, Any] | None:
    with _connect() as conn:
        row = conn.execute(
            "SELECT id, name, email, task_id, welcome_email_sent FROM users WHERE id = ?",
            (user_id,),
        ).fetchone()
    conn.close()
    if row is None:
        return None
    keys = ("id", "name", "email", "welcome_email_task_id", "welcome_email_sent")
    return dict(zip(keys, (*row[:4], bool(row[4])), strict=True))


async def create(name: str, email: str) -> int:
    """A new user's id."""
    return await anyio.to_thread.run_sync(_create, name, email)


async def set_task(user_id: int, task_id: str) -> None:
    await anyio.to_thread.run_sync(_update, user_id, "task_id", task_id)


async def mark_sent(user_id: int) -> None:
    await anyio.to_thread.run_sync(_update, user_id, "welcome_email_sent", 1)


async def get(user_id: int) -> dict[str, Any] | None:
    return await anyio.to_thread.run_sync(_get, user_id)
