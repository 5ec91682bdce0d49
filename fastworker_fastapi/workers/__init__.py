"""Where tasks run: in this process (the default) or on FastWorker control planes."""

from fastworker_fastapi.workers.base import Executor, WorkerSettings
from fastworker_fastapi.workers.inprocess import InProcessWorkers
from fastworker_fastapi.workers.remote import RemoteWorkers

__all__ = ["Executor", "InProcessWorkers", "RemoteWorkers", "WorkerSettings"]
