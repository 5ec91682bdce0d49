"""The shape of a submission's arguments: `args` a sequence, `kwargs` a mapping.

`submit_task("send_email", "a@b.c")` is a common slip: a string is a sequence of
characters, so without this check the task would be called with one argument per
character and fail later, far from the mistake. FastWorker's own `Client` refuses such
arguments at once (its `Task` model validates them); so do we, in every submission path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastworker_fastapi.errors import InvalidTaskArgumentsError

__all__ = ["check_arguments"]

_TEXT = (str, bytes, bytearray, memoryview)


def check_arguments(task_name: str, args: Any, kwargs: Any) -> None:
    """Raise `InvalidTaskArgumentsError` unless `args` is a list-like sequence (not text)
    and `kwargs` is a mapping (or None)."""
    kind = type(args)
    if (
        kind is not tuple
        and kind is not list
        and (isinstance(args, _TEXT) or not isinstance(args, Sequence))
    ):
        raise InvalidTaskArgumentsError(
            f"args of task {task_name!r} must be a list or tuple of positional arguments, "
            f"got {kind.__name__} {_short(args)}; to pass one value, write args=(value,)"
        )
    if kwargs is not None and type(kwargs) is not dict and not isinstance(kwargs, Mapping):
        raise InvalidTaskArgumentsError(
            f"kwargs of task {task_name!r} must be a dict of keyword arguments, "
            f"got {type(kwargs).__name__} {_short(kwargs)}"
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."
