"""The console's pages: server-rendered HTML over the API's own handlers.

Every page gets its data by calling the API handler that serves the same question
(``GET /tasks``, ``GET /runs``, ``GET /tasks/{id}``) on a clone of the browser's request, so the
identity, the groups and every authorization decision are the API's, made by the same code —
the console has no access rules of its own and cannot show more than ``curl`` would. A run the
caller may not see is the API's 404, rendered as a 404 page.

Submitting and cancelling are done by the page's JavaScript against the API itself (``POST
/tasks/{name}``, ``DELETE /tasks/{id}``), with the CSRF header (``security.py``).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import jinja2
import msgspec
from aiohttp import web
from yarl import URL

from aqsh import errors
from aqsh.api import handlers, runs
from aqsh.api.auth import may_run
from aqsh.api.errors import ApiError
from aqsh.api.runs import STATES
from aqsh.api.state import STATE_KEY
from aqsh.api.view import CANCELED
from aqsh.engine.inspect import QueueInfo
from aqsh.runner.inputs import InputSpec, InputType

PageHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: Public states after which nothing about a run changes any more.
FINAL_STATES = frozenset({"completed", "archived", CANCELED})
HISTORY_PAGE = 25

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("aqsh.api.ui", "templates"),
    # Every value from a task (inputs, results, errors, names) is escaped on output.
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
)

_STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}


def _load_static() -> dict[str, tuple[bytes, str]]:
    """Read once at import: a fixed set of files, so a request never names a path on disk."""
    out: dict[str, tuple[bytes, str]] = {}
    for entry in resources.files("aqsh.api.ui").joinpath("static").iterdir():
        suffix = entry.name[entry.name.rfind("."):]
        if suffix in _STATIC_TYPES:
            out[entry.name] = (entry.read_bytes(), _STATIC_TYPES[suffix])
    return out


_STATIC = _load_static()


class _Problem(Exception):
    """A page that cannot be shown: rendered as an error page with this status."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


def _render(request: web.Request, template: str, status: int = 200, **context: Any
            ) -> web.Response:
    caller = handlers._caller(request)
    body = _env.get_template(template).render(
        user=caller.user, groups=sorted(caller.groups), admin=caller.admin, **context)
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8")


def page(handler: PageHandler) -> PageHandler:
    """API refusals become HTML error pages; a caller not allowed to see something meets the
    API's 404, so the page tells no more than the API would."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except _Problem as exc:
            problem = exc
        except ApiError as exc:
            if exc.status == 401:  # no identity: no page can be rendered (JSON 401)
                raise
            problem = _Problem(exc.status, "Not found" if exc.status == 404 else "Refused",
                               exc.message)
        except errors.NotFound as exc:
            problem = _Problem(404, "Not found", exc.message)
        except errors.AqshError as exc:
            if exc.http_status >= 500:
                raise  # the error middleware logs it under an id
            problem = _Problem(exc.http_status, "Refused", exc.message)
        return _render(request, "error.html", status=problem.status, title=problem.title,
                       message=problem.message, nav="")

    return wrapped


async def _api(request: web.Request, handler: PageHandler, path: str,
               query: dict[str, str] | None = None) -> Any:
    """The API's answer to the same caller, as data. Refusals raise as they would there."""
    url = URL(path).with_query(query or {})
    clone = request.clone(rel_url=url)
    response = await handler(clone)
    if not isinstance(response, web.Response) or not isinstance(response.body, bytes):
        raise TypeError(f"{path}: the API handler did not answer with a body")
    return msgspec.json.decode(response.body)


# ---------------------------------------------------------------------------- pages
@page
async def tasks_page(request: web.Request) -> web.StreamResponse:
    catalogue = (await _api(request, handlers.list_task_types, "/tasks"))["tasks"]
    for task in catalogue:
        latest = await _api(request, runs.list_runs, "/runs",
                            {"task": task["name"], "limit": "1"})
        task["last_run"] = latest["runs"][0] if latest["runs"] else None
    return _render(request, "tasks.html", title="Tasks", nav="tasks", tasks=catalogue)


def _field(spec: InputSpec, given: str | None) -> dict[str, Any]:
    default = spec.default
    if spec.type is InputType.BOOL:
        checked = (given == "true") if given is not None else default in (True, "true")
        return {"spec": spec, "kind": "checkbox", "checked": checked}
    value = given if given is not None else ("" if default is None else str(default))
    field: dict[str, Any] = {"spec": spec, "value": value}
    if spec.enum is not None:
        field["kind"] = "select"
    elif spec.type in (InputType.INT, InputType.FLOAT):
        field["kind"] = "number"
        field["step"] = "1" if spec.type is InputType.INT else "any"
    else:
        field["kind"] = "text"
    return field


def _g(value: float | None) -> str | None:
    return None if value is None else f"{value:g}"


@page
async def run_form(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    name = request.match_info["name"]
    spec = state.config().tasks.get(name)
    # A task the caller may not run is one GET /tasks does not list: it does not exist here.
    if spec is None or not may_run(handlers._caller(request), spec):
        raise _Problem(404, "Not found", f"no task named {name!r}")
    fields = [_field(i, request.query.get(i.name)) for i in spec.inputs]
    return _render(request, "form.html", title=f"Run {name}", nav="tasks", task=spec,
                   fields=fields, fmt=_g, aggregate=spec.aggregate is not None)


def _pretty(data: str) -> tuple[str, bool]:
    try:
        return json.dumps(json.loads(data), indent=2, ensure_ascii=False), True
    except ValueError:
        return data, False


@page
async def run_page(request: web.Request) -> web.StreamResponse:
    task_id = request.match_info["id"]
    doc = await _api(request, handlers.get_task, f"/tasks/{task_id}")
    result = doc.get("result")
    data, is_json = (None, False)
    if isinstance(result, dict) and isinstance(result.get("data"), str):
        data, is_json = _pretty(result["data"])
    state = request.app[STATE_KEY]
    spec = state.config().tasks.get(doc["name"])
    again = None
    if spec is not None and may_run(handlers._caller(request), spec):
        inputs = doc["input"] if isinstance(doc["input"], dict) else {}
        again = str(URL(f"/ui/tasks/{doc['name']}").with_query(
            {k: json.dumps(v) if isinstance(v, bool) else str(v) for k, v in inputs.items()}))
    inputs_text = {k: json.dumps(v) if not isinstance(v, str) else v
                   for k, v in (doc["input"] or {}).items()} if isinstance(doc["input"], dict) \
        else {}
    return _render(request, "run.html", title=f"Run {task_id}", nav="history", run=doc,
                   inputs=inputs_text, data=data, data_is_json=is_json, again=again,
                   final=doc["state"] in FINAL_STATES)


_LOCAL_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d)?")


def _as_utc(value: str) -> str:
    """``<input type=datetime-local>`` sends no zone; the form says its times are UTC."""
    if _LOCAL_TIME.fullmatch(value):
        return value + (":00" if len(value) == 16 else "") + "Z"
    return value


@page
async def history_page(request: web.Request) -> web.StreamResponse:
    filters = {k: request.query[k] for k in ("task", "state", "submitted_by", "since", "until")
               if request.query.get(k)}
    query = {k: _as_utc(v) if k in ("since", "until") else v for k, v in filters.items()}
    query["limit"] = request.query.get("limit", str(HISTORY_PAGE))
    if request.query.get("cursor"):
        query["cursor"] = request.query["cursor"]
    listing = await _api(request, runs.list_runs, "/runs", query)
    running: list[Any] = []
    if "state" not in filters and "cursor" not in query:
        running = (await _api(request, runs.list_runs, "/runs",
                              {"state": "active", "limit": "50"}))["runs"]
    next_url = None
    if listing["next"]:
        next_url = str(URL("/ui/runs").with_query(
            {**filters, "limit": query["limit"], "cursor": listing["next"]}))
    catalogue = (await _api(request, handlers.list_task_types, "/tasks"))["tasks"]
    return _render(request, "history.html", title="History", nav="history",
                   runs=listing["runs"], running=running, filters=filters, next_url=next_url,
                   paged="cursor" in query, states=STATES, limit=query["limit"],
                   task_names=[t["name"] for t in catalogue])


@page
async def queues_page(request: web.Request) -> web.StreamResponse:
    caller = handlers._caller(request)
    if not caller.admin:
        raise _Problem(403, "For admins only",
                       "the Queues page is for members of AQSH_ADMIN_GROUPS")
    inspector = request.app[STATE_KEY].inspector
    infos: list[QueueInfo] = []
    for qname in await inspector.queues():
        try:
            infos.append(await inspector.queue_info(qname))
        except errors.QueueNotFound:
            continue
    servers = await inspector.servers()
    return _render(request, "queues.html", title="Queues", nav="queues", queues=infos,
                   servers=servers)


async def static_file(request: web.Request) -> web.StreamResponse:
    found = _STATIC.get(request.match_info["file"])
    if found is None:
        raise web.HTTPNotFound()
    body, content_type = found
    return web.Response(body=body, headers={"Content-Type": content_type,
                                            "Cache-Control": "no-cache"})


async def to_tasks(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/ui/")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/ui", to_tasks)
    app.router.add_get("/ui/", tasks_page)
    app.router.add_get("/ui/tasks/{name}", run_form)
    app.router.add_get("/ui/runs", history_page)
    app.router.add_get("/ui/runs/{id}", run_page)
    app.router.add_get("/ui/queues", queues_page)
    app.router.add_get("/ui/static/{file}", static_file)
