"""Entry point of a spawned control plane: fastworker's own CLI, with its per-task logging quiet.

Run as a script (``python .../_plane_main.py control-plane ...``, never imported by the app) so
that the child does not import this package and FastAPI. It runs ``fastworker.cli.main()``
unchanged, after three changes to logging only:

- the root level is WARNING (fastworker logs several INFO lines per task);
- the plane's failed reply for every task of a ``batch_submit`` (``Incorrect state``: the batch
  was already acknowledged, see ``_control_plane``) is dropped *before* its traceback is
  formatted; it is an artefact of the submission path, not an error of the task;
- every other WARNING or ERROR still goes out, at most ``_BURST`` per logger and level per
  second, then one line saying how many were suppressed.

Lines go to stdout as ``LEVEL name: message``, which `ControlPlaneProcess` forwards to the
``fastworker_fastapi.plane`` logger.

It also dies with the app, however the app dies (SIGKILL included), so that no plane outlives
it holding its ports:

- on Linux, ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills the plane when its parent
  exits;
- everywhere, a watchdog thread blocked on a pipe whose write end only the app holds
  (``FASTWORKER_PARENT_FD``): end of file means the app is gone, and the thread kills the
  plane's whole process group (the plane runs in a session of its own, so anything it
  started goes too);
- the app's pid is checked after both are armed, so an app that died during the spawn is
  noticed as well.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time

_BURST = 10
_ARTEFACT = "Incorrect state"


class _QuietFilter(logging.Filter):
    """Drops the batch-reply artefact and rate-limits the rest, per logger and level."""

    def __init__(self) -> None:
        super().__init__()
        self._windows: dict[tuple[str, int], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if _ARTEFACT in str(record.msg):
            return False
        key = (record.name, record.levelno)
        now = time.monotonic()
        window = self._windows.setdefault(key, [now, 0.0, 0.0])  # start, sent, suppressed
        if now - window[0] >= 1.0:
            if window[2]:
                record.msg = f"{record.msg} ({int(window[2])} similar messages suppressed)"
            window[:] = [now, 0.0, 0.0]
        if window[1] >= _BURST:
            window[2] += 1
            return False
        window[1] += 1
        return True


def _quiet_logging() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_QuietFilter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    # Logger-level filters run before the record reaches any handler, so the traceback of a
    # dropped record is never formatted.
    quiet = _QuietFilter()
    for name in ("fastworker.workers.control_plane", "fastworker.workers.worker"):
        logging.getLogger(name).addFilter(quiet)
    # "OpenTelemetry not available" at every start: fastworker's optional extra, not a fault.
    logging.getLogger("fastworker.telemetry").setLevel(logging.ERROR)


_PR_SET_PDEATHSIG = 1
PARENT_FD_ENV = "FASTWORKER_PARENT_FD"
PARENT_PID_ENV = "FASTWORKER_PARENT_PID"


def _kill_group() -> None:
    """SIGKILL this process's group: the plane and whatever it started."""
    try:
        os.killpg(os.getpgrp(), signal.SIGKILL)
    finally:  # not a group leader after all (run by hand): at least this process
        os.kill(os.getpid(), signal.SIGKILL)


def _set_parent_death_signal() -> bool:
    """Linux: have the kernel SIGKILL this process when its parent exits."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return bool(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _watch_parent(fd: int) -> None:
    """Block until the app's end of the pipe closes (the app exited), then kill the group."""
    while True:
        try:
            data = os.read(fd, 1)
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for safety
            continue
        except OSError:
            break
        if not data:
            break
    _kill_group()


def die_with_parent() -> None:
    """Arm both mechanisms (see the module's docstring); a no-op when not spawned by the app."""
    _set_parent_death_signal()
    fd_text = os.environ.pop(PARENT_FD_ENV, None)
    if fd_text is not None:
        threading.Thread(
            target=_watch_parent, args=(int(fd_text),), name="parent-watch", daemon=True
        ).start()
    expected = os.environ.pop(PARENT_PID_ENV, None)
    if expected is not None and os.getppid() != int(expected):
        _kill_group()  # the app died before the watch was armed


def main() -> None:
    die_with_parent()
    import fastworker.cli

    args = sys.argv[1:]
    if args[:1] == ["--verbose"]:  # ControlPlaneProcess(quiet=False): fastworker's own logging
        sys.argv = ["fastworker", *args[1:]]
    else:
        _quiet_logging()
        sys.argv = ["fastworker", "--log-level", "WARNING", *args]
    fastworker.cli.main()


if __name__ == "__main__":
    main()
