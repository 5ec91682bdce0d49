"""How the durable stores (SQLite, PostgreSQL) encode a record's fields and read schedule
rows: one definition, so both write what `TaskRecord.to_json` writes (the contract suite
checks that they agree)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any

from fastworker_fastapi.records import CallbackDelivery, TaskPolicy
from fastworker_fastapi.stores.base import ScheduleState

__all__ = ["encode_field", "epoch", "from_micros", "micros", "schedule_state"]


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def encode_field(key: str, value: Any) -> Any:
    """One field as `TaskRecord.to_json` writes it."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, TaskPolicy):
        return [
            value.timeout,
            value.max_retries,
            value.retry_delay,
            value.retry_backoff,
            value.retry_backoff_max,
        ]
    if isinstance(value, CallbackDelivery):
        return [
            value.state,
            value.attempts,
            value.last_error,
            _iso(value.delivered_at),
            value.delivery_id,
        ]
    if key == "callback":
        return [value.address, value.data]
    if key == "args":
        return list(value)
    return value


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def micros(value: datetime | None) -> int | None:
    """Microseconds since the epoch: exact, so due times compare exactly."""
    return None if value is None else (value - _EPOCH) // timedelta(microseconds=1)


def from_micros(value: int | None) -> datetime | None:
    return None if value is None else _EPOCH + timedelta(microseconds=value)


def schedule_state(row: Sequence[Any]) -> ScheduleState:
    name, paused, last_due, resumed_at = row
    return ScheduleState(name, bool(paused), from_micros(last_due), from_micros(resumed_at))
