"""The API benchmark's framework floor: the least an aiohttp app can do for the same requests —
parse the JSON body and answer 202 with a small JSON document (POST), or answer a small JSON
document (GET) — on the same event loop as the API process (uvloop). Whatever aqsh's
``POST /tasks/{name}`` costs above this is aqsh's own: routing, validation, auth, metrics, the
access log and the enqueue.

    _floor.py PORT
"""

from __future__ import annotations

import itertools
import sys

import uvloop
from aiohttp import web

_ids = itertools.count()


async def submit(request: web.Request) -> web.Response:
    body = await request.json()
    if not isinstance(body, dict):
        return web.json_response({"error": {"code": "invalid_json", "message": "object"}},
                                 status=400)
    return web.json_response({"id": f"floor-{next(_ids)}", "task": request.match_info["id"]},
                             status=202)


async def lookup(request: web.Request) -> web.Response:
    return web.json_response({"id": request.match_info["id"], "state": "pending"})


def main() -> None:
    app = web.Application()
    resource = app.router.add_resource("/tasks/{id}")
    resource.add_route("POST", submit)
    resource.add_route("GET", lookup)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None,
                print=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
