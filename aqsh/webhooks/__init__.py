"""Completion webhooks: signed (Standard Webhooks), durable deliveries on the engine itself.

A delivery is a task of its own on the reserved queue ``aqsh:webhooks`` (so it survives
restarts, is retried with back-off, and shows in Asynqmon). The engine knows nothing of this:
it tells an observer (``on_transition``) after each finishing write, and this package turns
those into delivery tasks.
"""

#: The reserved queue of delivery tasks, and their task type. asynq allows any non-blank queue
#: name; the colon keeps it apart from anything an operator would name a queue.
WEBHOOK_QUEUE = "aqsh:webhooks"
WEBHOOK_TASK_TYPE = "aqsh:webhook"
