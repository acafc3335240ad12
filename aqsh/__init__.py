"""aqsh: pre-configured shell scripts run asynchronously on asynq's Redis layout."""

__version__ = "0.1.0"
