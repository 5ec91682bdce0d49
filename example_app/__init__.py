"""The example app: every pattern of FastWorker's async-patterns guide, on fastworker-fastapi."""
