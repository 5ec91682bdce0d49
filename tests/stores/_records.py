"""Records for the store tests."""

from __future__ import annotations

import itertools
import time
import uuid
from typing import Any

from fastworker.tasks.models import TaskPriority, TaskStatus

from fastworker_fastapi.records import TaskPolicy, TaskRecord, utcnow

_clock = itertools.count()


def make_record(**fields: Any) -> TaskRecord:
    """A queued task; `created` increases with every call so newest-first is well defined."""
    values: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "name": "add",
        "args": [1, 2],
        "kwargs": {},
        "priority": TaskPriority.NORMAL,
        "policy": TaskPolicy(),
        "status": TaskStatus.QUEUED,
        "created": time.time() + next(_clock) * 1e-3,
    }
    values.update(fields)
    return TaskRecord(**values)


def finished(**fields: Any) -> TaskRecord:
    return make_record(status=TaskStatus.SUCCESS, result=3, completed_at=utcnow(), **fields)


def same(a: TaskRecord | None, b: TaskRecord) -> bool:
    assert a is not None
    return a.to_json() == b.to_json()
