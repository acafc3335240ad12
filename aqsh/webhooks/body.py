"""A webhook's body: the task as ``GET /tasks/{id}`` shows it, plus ``event`` and links."""

from __future__ import annotations

import msgspec

from aqsh.api.view import task_document
from aqsh.engine.models import TaskInfo


def webhook_body(info: TaskInfo | None, *, task_id: str, event: str, started_ms: int | None,
                 finished_ms: int | None, max_bytes: int, base_url: str = "") -> bytes:
    """Over ``max_bytes``, ``result.data`` is dropped and ``result.data_omitted`` says so. A
    task no longer stored (its retention ended before the first attempt) is described by what
    the delivery knows: its id, the event, and ``state: null``."""
    links = {"self": f"{base_url}/tasks/{task_id}",
             "deliveries": f"{base_url}/tasks/{task_id}/deliveries"}
    if info is None:
        return msgspec.json.encode({"id": task_id, "state": None, "event": event,
                                    "links": links})
    doc = task_document(info, started_ms, finished_ms, base_url=base_url)
    doc["event"] = event
    doc["links"]["deliveries"] = links["deliveries"]
    body = msgspec.json.encode(doc)
    result = doc.get("result")
    if len(body) > max_bytes and isinstance(result, dict) and "data" in result:
        size = len(msgspec.json.encode(result.pop("data")))
        result["data_omitted"] = (
            f"result.data ({size} bytes) is over the webhook body limit of {max_bytes} bytes; "
            f"read it from {doc['links']['self']}")
        body = msgspec.json.encode(doc)
    return body
