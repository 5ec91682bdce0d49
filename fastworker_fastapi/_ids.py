"""Task ids: random version-4 UUID strings, as `str(uuid.uuid4())`, at a tenth of its cost.

An id is the handle on a task's result, so it must be unguessable: the bits come from the
OS's CSPRNG (`os.urandom`), like `uuid.uuid4()`. Formatting 36-character strings one by one
in Python costs more than drawing the bits; here a block of ids is laid out with a few
C-level slice assignments (one per character position), so one id costs a list pop.
"""

from __future__ import annotations

import os
import weakref

__all__ = ["TaskIds"]

_HEX = b"0123456789abcdef"
_HIGH = bytes(_HEX[b >> 4] for b in range(256))  # byte -> its first hex digit
_LOW = bytes(_HEX[b & 15] for b in range(256))  # byte -> its second hex digit
_VERSION_4 = bytes((b & 0x0F) | 0x40 for b in range(256))  # byte 6: version 4
_RFC_4122 = bytes((b & 0x3F) | 0x80 for b in range(256))  # byte 8: the RFC 4122 variant
_DASHES = (8, 13, 18, 23)
_DIGITS = [p for p in range(36) if p not in _DASHES]  # where the 32 hex digits go
_STRIDE = 37  # 36 characters and a space to split on


class TaskIds:
    """A pool of fresh ids, refilled `block` at a time. Not shared: one per client."""

    def __init__(self, block: int = 256) -> None:
        self._block = block
        self.pool: list[str] = []
        """Fresh ids, never replaced: a hot path may pop one itself while it is not empty
        (`pool.pop() if pool else ids.next()`), a call less than `next()`."""
        _pools.add(self)

    def next(self) -> str:
        pool = self.pool
        if not pool:
            pool.extend(_make(self._block))
        return pool.pop()


def _make(count: int) -> list[str]:
    raw = bytearray(os.urandom(16 * count))
    raw[6::16] = raw[6::16].translate(_VERSION_4)
    raw[8::16] = raw[8::16].translate(_RFC_4122)
    digits = (raw.translate(_HIGH), raw.translate(_LOW))
    out = bytearray(b" " * (_STRIDE * count))
    dashes = b"-" * count
    for position in _DASHES:
        out[position::_STRIDE] = dashes
    for k, position in enumerate(_DIGITS):  # digit k is nibble k % 2 of byte k // 2
        out[position::_STRIDE] = digits[k & 1][k >> 1 :: 16]
    return out.decode("ascii").split()


# A forked child (gunicorn --preload, multiprocessing) starts with a copy of its parent's
# pools: both would hand out the same ids. The child empties its copies at once.
_pools: weakref.WeakSet[TaskIds] = weakref.WeakSet()


def _forget_pools() -> None:
    for ids in tuple(_pools):
        ids.pool.clear()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_pools)
