"""aqsh: pre-configured shell scripts run asynchronously behind an HTTP API, on asynq's Redis layout."""

__version__ = "0.1.0"
