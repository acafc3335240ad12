"""The asynq-compatible queue engine. It knows nothing of shell scripts."""
