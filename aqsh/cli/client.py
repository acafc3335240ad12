"""Client commands over the HTTP API: run, get, logs, cancel, tasks, runs.

What a person or a CI job types. ``aqsh run deploy version=1.2.3 --follow`` streams the
script's output and exits with the script's exit code, so a CI step fails when the script does.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.parse
from typing import Any

import click
from rich.text import Text

from aqsh.cli.http import Api, ApiError, Endpoint, follow
from aqsh.cli.output import (
    CliError,
    err,
    fields,
    json_option,
    out,
    print_json,
    spinner,
    state_text,
    table,
)

DEFAULT_URL = "http://127.0.0.1:8080"
FINISHED = {"completed", "archived", "canceled"}


def api_options(command: Any) -> Any:
    """Where the API is and who is asking; each falls back to its environment variable."""
    options = [
        click.option("--url", envvar="AQSH_URL", default=DEFAULT_URL, show_default=True,
                     show_envvar=True, help="Base URL of the aqsh API."),
        click.option("--token", envvar="AQSH_TOKEN", show_envvar=True,
                     help="Bearer token, sent as Authorization for the proxy in front of aqsh."),
        click.option("--user", envvar="AQSH_USER", show_envvar=True,
                     help="Identity to send in the identity header (believed only from a "
                          "trusted proxy address)."),
        click.option("--groups", envvar="AQSH_GROUPS", show_envvar=True,
                     help="Comma-separated groups to send in the groups header."),
        click.option("-H", "--header", "extra_headers", multiple=True, metavar="NAME:VALUE",
                     help="Any other header, e.g. a proxy's cookie; repeatable."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def make_api(url: str, token: str | None, user: str | None, groups: str | None,
             extra_headers: tuple[str, ...]) -> Api:
    headers: dict[str, str] = {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if user:
        headers[os.environ.get("AQSH_IDENTITY_HEADER", "X-Forwarded-User")] = user
    if groups:
        headers[os.environ.get("AQSH_GROUPS_HEADER", "X-Forwarded-Groups")] = groups
    for raw in extra_headers:
        name, sep, value = raw.partition(":")
        if not sep or not name.strip():
            raise click.BadParameter(f"{raw!r} is not NAME:VALUE", param_hint="--header")
        headers[name.strip()] = value.strip()
    return Api(Endpoint(url=url, headers=headers))


def _api(ctx_kwargs: dict[str, Any]) -> Api:
    return make_api(ctx_kwargs.pop("url"), ctx_kwargs.pop("token"), ctx_kwargs.pop("user"),
                    ctx_kwargs.pop("groups"), ctx_kwargs.pop("extra_headers"))


def task_path(task_id: str) -> str:
    return f"/tasks/{urllib.parse.quote(task_id, safe='')}"


# ---------------------------------------------------------------------------- inputs
def _schema_type(prop: dict[str, Any]) -> str:
    kind = prop.get("type", "string")
    if isinstance(kind, list):  # a bool that also takes "true"/"false" strings
        return "boolean" if "boolean" in kind else str(kind[0])
    return str(kind)


def typed_inputs(task: dict[str, Any], pairs: tuple[str, ...]) -> dict[str, Any]:
    """``key=value`` arguments as the JSON types GET /tasks declares for the task's inputs,
    so ``times=3`` is sent as 3, not "3". The server validates the rest (ranges, patterns)."""
    schema = task.get("input_schema")
    properties: dict[str, Any] = (schema or {}).get("properties", {})
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise CliError(f"input {pair!r} is not key=value", exit_code=2)
        if schema is None:  # a type we could not see: the server decides
            values[key] = raw
            continue
        prop = properties.get(key)
        if prop is None:
            known = ", ".join(sorted(properties)) or "none"
            raise CliError(f"task {task['name']!r} has no input {key!r} (inputs: {known})",
                           exit_code=2)
        values[key] = _convert(key, raw, _schema_type(prop))
    return values


def _convert(key: str, raw: str, kind: str) -> Any:
    try:
        if kind == "integer":
            return int(raw)
        if kind == "number":
            return float(raw)
    except ValueError:
        expected = "an integer" if kind == "integer" else "a number"
        raise CliError(f"input {key}={raw!r}: expected {expected}", exit_code=2) from None
    if kind == "boolean":
        lowered = raw.strip().lower()
        if lowered in ("true", "yes", "1", "on"):
            return True
        if lowered in ("false", "no", "0", "off"):
            return False
        raise CliError(f"input {key}={raw!r}: expected true or false", exit_code=2)
    return raw


def _find_type(api: Api, name: str) -> dict[str, Any]:
    """The task type as GET /tasks describes it; one the caller may not see there (unknown,
    or restricted to other groups) gets no types, and the submission gets the server's own
    answer (404 or 403, which names the groups)."""
    catalogue = api.call("GET", "/tasks")
    for task in catalogue.get("tasks", []):
        if task["name"] == name:
            return dict(task)
    return {"name": name, "input_schema": None}


# ---------------------------------------------------------------------------- exit codes
def exit_code_of(task: dict[str, Any], eof_data: str | None = None) -> int:
    """The process exit code that stands for a finished task: 0 when it completed, else the
    script's own exit code, 128+N for a script killed by signal N (as a shell reports it),
    and 1 when there is no code (canceled before it ran, or the worker gave up on it)."""
    if task.get("state") == "completed":
        return 0
    result = task.get("result") or {}
    code = result.get("exit_code") if isinstance(result, dict) else None
    if code is None and eof_data:
        try:
            code = int(eof_data)
        except ValueError:
            code = None
    if not isinstance(code, int) or code == 0:
        return 1
    if code < 0:
        return 128 + min(-code, 127) if code != -1 else 1
    return min(code, 255)


def _wait_finished(api: Api, task_id: str, *, stream: bool, as_json: bool) -> int:
    """Follow (printing) or quietly wait for the task's end; print it; return its exit code.

    Waiting rides the same log stream as following (it ends when the last attempt ends), so a
    task scheduled far ahead costs one idle connection, not a poll loop."""
    def on_line(line: str) -> None:
        if as_json:
            # stdout carries the final JSON document; the log goes to stderr.
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        else:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def on_notice(message: str) -> None:
        err.print(Text.assemble(("aqsh:", "yellow"), " ", message))

    if stream:
        eof = follow(api, task_id, on_line, on_notice)
    else:
        with spinner(f"waiting for {task_id}"):
            eof = follow(api, task_id, lambda _line: None, on_notice)
    task = _final_task(api, task_id)
    code = exit_code_of(task, eof)
    if as_json:
        print_json(task)
    else:
        summary = f"{task['name']} {task['id']}: "
        err.print(summary, end="", markup=False, highlight=False)
        err.print(state_text(task["state"]), end="")
        err.print(f" (exit code {code})" if code else "", markup=False, highlight=False)
    return code


def _final_task(api: Api, task_id: str) -> dict[str, Any]:
    """The task once its state says finished: the eof marker is written just before the
    worker's ack, so the state may trail it by a moment."""
    deadline = time.monotonic() + 30
    while True:
        task = dict(api.call("GET", task_path(task_id)))
        if task["state"] in FINISHED or time.monotonic() > deadline:
            return task
        time.sleep(0.1)


# ---------------------------------------------------------------------------- commands
@click.command(epilog="""\b
Examples:
  aqsh run report environment=staging
  aqsh run deploy version=1.2.3 environment=staging --follow   # CI: fails when the script fails
  aqsh run cleanup --in 10m
  aqsh run backup --at 2026-01-01T03:00:00Z --idempotency-key nightly-2026-01-01
  aqsh run deploy environment=prod --after 2f1c…   # once that task completed
""")
@click.argument("name")
@click.argument("inputs", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("-f", "--follow", "follow_", is_flag=True,
              help="Stream the log and exit with the script's exit code.")
@click.option("-w", "--wait", is_flag=True,
              help="Wait until the task finishes (no log) and exit with its exit code.")
@click.option("--in", "process_in", metavar="DURATION",
              help="Run after a delay, e.g. 10m or 1h30m.")
@click.option("--at", "process_at", metavar="TIME",
              help="Run at an RFC 3339 time, e.g. 2026-01-01T03:00:00Z.")
@click.option("--idempotency-key", metavar="KEY",
              help="Submitting twice with the same key runs the task once.")
@click.option("--after", metavar="ID[,ID]",
              help="Start only once these tasks completed (cancelled if one fails).")
@json_option
@api_options
def run(name: str, inputs: tuple[str, ...], follow_: bool, wait: bool, process_in: str | None,
        process_at: str | None, idempotency_key: str | None, after: str | None,
        as_json: bool, **conn: Any) -> int:
    """Submit task NAME with its inputs as KEY=VALUE pairs (typed from GET /tasks)."""
    if process_in and process_at:
        raise click.UsageError("give --in or --at, not both")
    api = _api(conn)
    task_type = _find_type(api, name)
    body = typed_inputs(task_type, inputs)
    query = {k: v for k, v in (("process_in", process_in), ("process_at", process_at),
                               ("after", after)) if v}
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
    accepted = api.call("POST", task_path(name), body=body, query=query or None,
                        headers=headers)
    if follow_ or wait:
        if not as_json:
            err.print(f"submitted {name} {accepted['id']}", markup=False, highlight=False)
        return _wait_finished(api, accepted["id"], stream=follow_, as_json=as_json)
    if as_json:
        print_json(accepted)
    else:
        fields([("id", accepted["id"]), ("name", accepted["name"]),
                ("queue", accepted["queue"]), ("state", state_text(accepted["state"])),
                ("submitted by", accepted.get("submitted_by"))])
    return 0


@click.command(epilog="\b\nExamples:\n  aqsh get 2f1c…\n  aqsh get 2f1c… --json | jq .result")
@click.argument("task_id", metavar="ID")
@json_option
@api_options
def get(task_id: str, as_json: bool, **conn: Any) -> int:
    """Show task ID: state, input, times, result."""
    task = _api(conn).call("GET", task_path(task_id))
    if as_json:
        print_json(task)
        return 0
    result = task.get("result") or {}
    fields([
        ("id", task["id"]), ("name", task["name"]), ("queue", task["queue"]),
        ("state", state_text(task["state"])), ("input", task.get("input")),
        ("submitted by", task.get("submitted_by")), ("enqueued at", task.get("enqueued_at")),
        ("started at", task.get("started_at")), ("finished at", task.get("finished_at")),
        ("next run at", task.get("next_process_at")),
        ("retries", f"{task.get('retries', 0)} of {task.get('max_retry', 0)}"),
        ("last error", task.get("last_error")),
        ("exit code", result.get("exit_code") if isinstance(result, dict) else None),
        ("result", result.get("data") if isinstance(result, dict) else result),
    ])
    return 0


@click.command(epilog="\b\nExamples:\n  aqsh logs 2f1c…\n  aqsh logs 2f1c… -f")
@click.argument("task_id", metavar="ID")
@click.option("-f", "--follow", "follow_", is_flag=True,
              help="Keep streaming until the task ends; exit with its exit code.")
@api_options
def logs(task_id: str, follow_: bool, **conn: Any) -> int:
    """Print the log of task ID."""
    api = _api(conn)
    if not follow_:
        sys.stdout.write(api.text(task_path(task_id) + "/logs", {"follow": "false"}))
        sys.stdout.flush()
        return 0
    return _wait_finished(api, task_id, stream=True, as_json=False)


@click.command(epilog="\b\nExample:\n  aqsh cancel 2f1c…")
@click.argument("task_id", metavar="ID")
@json_option
@api_options
def cancel(task_id: str, as_json: bool, **conn: Any) -> int:
    """Cancel task ID: a waiting task is archived as canceled, a running one is stopped."""
    try:
        answer = _api(conn).call("DELETE", task_path(task_id))
    except ApiError as exc:
        if exc.code == "task_finished":
            raise CliError(str(exc.message)) from None
        raise
    if as_json:
        print_json(answer)
    else:
        out.print(f"{answer['id']}: ", end="", markup=False, highlight=False)
        out.print(state_text(answer["state"]))
    return 0


def _input_summary(task: dict[str, Any]) -> str:
    schema = task.get("input_schema", {})
    required = set(schema.get("required", []))
    parts = []
    for name, prop in schema.get("properties", {}).items():
        text = f"{name}:{_schema_type(prop)}"
        if name in required:
            text += "*"
        if "default" in prop:
            text += f"={prop['default']}"
        parts.append(text)
    return " ".join(parts)


@click.command(epilog="\b\nInputs marked * are required; =X shows a default.\n\n\b\nExamples:\n"
                        "  aqsh tasks\n  aqsh tasks --json | jq '.tasks[].name'")
@json_option
@api_options
def tasks(as_json: bool, **conn: Any) -> int:
    """List the task types you may run, with their inputs and schedules."""
    catalogue = _api(conn).call("GET", "/tasks")
    if as_json:
        print_json(catalogue)
        return 0
    table(["NAME", "QUEUE", "INPUTS", "SCHEDULES", "DESCRIPTION"], (
        (t["name"], t["queue"], _input_summary(t),
         ", ".join(s["cron"] for s in t.get("schedules", [])), t.get("description"))
        for t in catalogue.get("tasks", [])))
    return 0


# ---------------------------------------------------------------------------- runs
RUN_STATES = ("pending", "scheduled", "active", "retry", "completed", "archived", "canceled",
              "aggregating")
#: GET /runs answers at most this many runs a page.
RUNS_PAGE_MAX = 200


def collect_runs(api: Api, query: dict[str, str], limit: int, cursor: str | None,
                 ) -> tuple[list[dict[str, Any]], str | None]:
    """Up to ``limit`` runs, newest first, following ``next`` across pages.

    A page examines a bounded slice of the history, so with a filter that rarely matches it
    can hold fewer runs than asked for (even none) and still carry ``next``: only a page
    without ``next`` means the history is exhausted. Returns the runs and the cursor to carry
    on from (None once nothing is left)."""
    runs: list[dict[str, Any]] = []
    while len(runs) < limit:
        page_query = {**query, "limit": str(min(RUNS_PAGE_MAX, limit - len(runs)))}
        if cursor is not None:
            page_query["cursor"] = cursor
        page = api.call("GET", "/runs", query=page_query)
        runs.extend(page.get("runs", []))
        cursor = page.get("next")
        if cursor is None:
            break
    return runs, cursor


@click.command(epilog="""\b
Examples:
  aqsh runs                                   # the 20 newest runs you may see
  aqsh runs --task deploy --state archived    # failed deploys
  aqsh runs --state active                    # what runs now, on every worker
  aqsh runs --mine --limit 100 --json | jq -r '.runs[].id'
  aqsh runs --since 2026-01-31T00:00:00Z --json --cursor <next from the last page>
""")
@click.option("--task", "task_name", metavar="NAME", help="Only runs of this task type.")
@click.option("--state", type=click.Choice(RUN_STATES), help="Only runs in this state "
              "(archived means failed; canceled is its own state).")
@click.option("--mine", is_flag=True,
              help="Only runs you submitted (your identity is --user / AQSH_USER).")
@click.option("--submitted-by", metavar="USER", help="Only runs this identity submitted.")
@click.option("--since", metavar="TIME", help="Enqueued at or after this RFC 3339 time.")
@click.option("--until", metavar="TIME", help="Enqueued at or before this RFC 3339 time.")
@click.option("-n", "--limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="How many runs to show (pages are followed until there are this many).")
@click.option("--cursor", metavar="NEXT", help="Carry on from an earlier --json answer's next.")
@json_option
@api_options
def runs(task_name: str | None, state: str | None, mine: bool, submitted_by: str | None,
         since: str | None, until: str | None, limit: int, cursor: str | None, as_json: bool,
         **conn: Any) -> int:
    """List the runs you may see, newest first (GET /runs)."""
    if mine:
        # Behind a bearer token only the proxy knows who you are; aqsh has no "who am I"
        # call, so the identity must be given to filter on it.
        me = conn.get("user")
        if not me:
            raise click.UsageError("--mine needs your identity: pass --user or set AQSH_USER")
        if submitted_by and submitted_by != me:
            raise click.UsageError("give --mine or --submitted-by, not both")
        submitted_by = me
    api = _api(conn)
    query = {k: v for k, v in (("task", task_name), ("state", state),
                               ("submitted_by", submitted_by), ("since", since),
                               ("until", until)) if v}
    found, next_cursor = collect_runs(api, query, limit, cursor)
    if as_json:
        print_json({"runs": found, "next": next_cursor})
        return 0
    table(["ID", "NAME", "STATE", "SUBMITTED BY", "ENQUEUED AT", "FINISHED AT", "EXIT"], (
        (r["id"], r["name"], state_text(r["state"]), r.get("submitted_by"),
         r.get("enqueued_at"), r.get("finished_at"), _exit_column(r))
        for r in found))
    if next_cursor is not None and len(found) >= limit:
        err.print(f"more runs: --limit {limit * 2}, or --json for a cursor", style="dim",
                  markup=False, highlight=False)
    return 0


def _exit_column(run_doc: dict[str, Any]) -> Any:
    result = run_doc.get("result")
    return result.get("exit_code") if isinstance(result, dict) else None


COMMANDS = [run, get, logs, cancel, tasks, runs]
