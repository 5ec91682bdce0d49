"""What may be stored: values that survive JSON, any store and any reader unchanged.

Results, progress messages and errors cross processes and end in HTTP answers, so a value
that JSON cannot carry, that no UTF-8 reader can decode (a lone surrogate), that is nested
deeper than any sane result or that is larger than `max_bytes` is refused when the task
finishes, with a message that says which, instead of breaking every later reader.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["MAX_DEPTH", "StoredValueError", "clean_text", "json_value"]

MAX_DEPTH = 64
"""Deepest nesting of lists and objects a stored value may have."""


class StoredValueError(ValueError):
    """The value cannot be stored; the message says why."""


def json_value(value: Any, max_bytes: int) -> Any:
    """`value` as JSON delivers it, or `StoredValueError`. Plain scalars cost a type check."""
    kind = type(value)
    if value is None or kind is int or kind is bool:
        return value
    if kind is str:
        if value.isascii() and len(value) <= max_bytes:
            return value
        try:
            size = len(value.encode("utf-8")) + 2
        except UnicodeEncodeError:
            raise StoredValueError(
                "it holds a lone surrogate, which is not valid Unicode"
            ) from None
        if size > max_bytes:
            raise StoredValueError(
                f"it is {size} bytes as JSON, over the {max_bytes}-byte limit (max_result_bytes)"
            )
        return value
    if kind is float and math.isfinite(value):
        return value
    _check_depth(value)
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise StoredValueError("it holds a lone surrogate, which is not valid Unicode") from None
    except (TypeError, ValueError, RecursionError) as exc:
        raise StoredValueError(f"it is not JSON-serialisable: {exc}") from None
    if size > max_bytes:
        raise StoredValueError(
            f"it is {size} bytes as JSON, over the {max_bytes}-byte limit (max_result_bytes)"
        )
    return json.loads(text)


def _check_depth(value: Any) -> None:
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth >= MAX_DEPTH:
            raise StoredValueError(f"it is nested deeper than {MAX_DEPTH} levels")
        stack.extend((child, depth + 1) for child in children)


def clean_text(text: str, limit: int) -> str:
    """`text` made storable: lone surrogates replaced, cut to `limit` characters."""
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text
