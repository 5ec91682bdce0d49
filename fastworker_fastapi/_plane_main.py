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
"""

from __future__ import annotations

import logging
import sys
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


def main() -> None:
    import fastworker.cli

    _quiet_logging()
    sys.argv = ["fastworker", "--log-level", "WARNING", *sys.argv[1:]]
    fastworker.cli.main()


if __name__ == "__main__":
    main()
