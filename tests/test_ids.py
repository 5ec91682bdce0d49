"""Task ids are what `str(uuid.uuid4())` gives: random, version 4, RFC 4122, unique."""

from __future__ import annotations

import subprocess
import sys
import uuid

from fastworker_fastapi._ids import TaskIds


def test_ids_are_uuid4_strings_and_unique() -> None:
    ids = TaskIds(block=64)
    drawn = [ids.next() for _ in range(1000)]  # several refills
    assert len(set(drawn)) == 1000
    for task_id in drawn:
        parsed = uuid.UUID(task_id)
        assert str(parsed) == task_id
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_every_hex_digit_position_varies() -> None:
    """A layout mistake would pin a position to one character; random ids vary everywhere."""
    drawn = [TaskIds().next() for _ in range(200)]
    fixed = {i for i in range(36) if len({d[i] for d in drawn}) == 1}
    assert fixed == {8, 13, 14, 18, 23}  # the dashes and the version digit
    assert {d[19] for d in drawn} <= set("89ab")


CHILD = """
import os, sys
from fastworker_fastapi._ids import TaskIds
ids = TaskIds()
ids.next()  # the pool is full of ids when the process forks
pid = os.fork()
os.write(1, (ids.next() + "\\n").encode())  # one write each: the two lines never mix
if pid:
    os.waitpid(pid, 0)
"""


def test_a_forked_child_never_repeats_its_parents_ids() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, timeout=30
    )
    out = done.stdout.split()
    assert len(out) == 2 and out[0] != out[1], (done.stdout, done.stderr)
