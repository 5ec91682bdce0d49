"""Which owners' processes are alive, as both durable stores judge it.

An owner row records its host key, pid and the process's start time. A process on the same
host (same hostname, pid namespace and boot) whose pid is gone, is a zombie, or now belongs
to a process started at another time is dead at once; any other owner only by its lease.
"""

from __future__ import annotations

import os
import socket

__all__ = ["host_key", "proc_start", "process_gone"]


def host_key() -> str | None:
    """Hostname, pid namespace and boot id: two owners with equal keys see the same pids.

    None when the pid namespace cannot be read: then only leases judge other owners, so
    two containers with one hostname never kill each other's tasks by a pid test.
    """
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            boot = file.read().strip()
    except OSError:
        boot = "?"
    return f"{socket.gethostname()}|{namespace}|{boot}"


def _proc_stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as file:
            text = file.read()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()  # fields from the 3rd (state) on


def proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot: tells a reused pid apart."""
    stat = _proc_stat(pid)
    return None if stat is None or len(stat) < 20 else stat[19]


def process_gone(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    stat = _proc_stat(pid)
    if stat is None:
        return False
    if stat[0] in ("Z", "X"):  # killed, not yet reaped
        return True
    return started is not None and len(stat) >= 20 and stat[19] != started
