"""Shell-task execution: tasks.yaml, input validation, processes, logs and results.

It knows nothing of asynq's keys; it is plugged into the engine as a handler.
"""
