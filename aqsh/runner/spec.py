"""tasks.yaml → TaskSpec: what operators declare, checked once at load time.

Every mistake in the file is reported at once, each naming the file, line, task and field, so an
operator fixes the whole file in one pass. Scripts are resolved and checked here: a request
never turns into a file path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import yaml

from aqsh.durations import parse_duration
from aqsh.engine import flow
from aqsh.errors import ConfigError
from aqsh.runner.inputs import InputSpec, InputType, Scalar
from aqsh.runner.validate import InvalidInput, check_value, validate_input

ENV_NAME_RE = re.compile(r"^[A-Z_][A-Z0-9_]*$")
INPUT_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
TASK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
#: Variables an input may never set: they change how the script or its loader behaves, or
#: belong to aqsh itself.
RESERVED_ENV = frozenset({
    "PATH", "HOME", "LANG", "LC_ALL", "TZ", "SHELL", "USER", "LOGNAME", "PWD", "OLDPWD", "IFS",
    "ENV", "BASH_ENV", "CDPATH", "PS4", "SHELLOPTS", "BASHOPTS", "GLOBIGNORE", "PYTHONPATH",
    "PYTHONSTARTUP", "PERL5LIB", "RUBYLIB", "NODE_OPTIONS", "TMPDIR", "HOSTNAME",
})
RESERVED_PREFIXES = ("AQSH_", "LD_", "DYLD_", "BASH_FUNC_")
#: Task headers aqsh writes on every shell task it submits (API or scheduler): who submitted it,
#: and when (Unix ns). asynq headers, so they travel with the task message.
HEADER_SUBMITTED_BY = "aqsh-submitted-by"
HEADER_SUBMITTED_AT = "aqsh-submitted-at"
#: The task's ``allowed_groups`` when it was submitted, as a JSON list (``[]``: open to anyone).
#: Reads and cancels check this record, so a later tasks.yaml change (a group removed, the task
#: renamed or deleted) never opens a stored task to more callers. A task without it (enqueued
#: by a Go service, or by an older aqsh) is for admins only.
HEADER_ALLOWED_GROUPS = "aqsh-allowed-groups"
#: ``submitted_by`` of the tasks the scheduler submits.
SCHEDULER_USER = "aqsh-scheduler"
#: A submission's ``callback_url``, checked against the operator's callback policy at submit.
#: It travels with the task, so the worker that ends the task knows whom to tell.
HEADER_CALLBACK_URL = "aqsh-callback-url"

#: Webhook events a ``notify`` entry may ask for; the first three when it names none.
WEBHOOK_EVENTS = ("task.completed", "task.failed", "task.canceled", "task.retrying",
                  "task.started")
DEFAULT_WEBHOOK_EVENTS = WEBHOOK_EVENTS[:3]


def access_headers(allowed_groups: tuple[str, ...]) -> dict[str, str]:
    """The access record a submission stores with its task (see HEADER_ALLOWED_GROUPS)."""
    return {HEADER_ALLOWED_GROUPS: msgspec.json.encode(sorted(set(allowed_groups))).decode()}


class ScheduleSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A periodic run: when (an asynq cron spec) and with which inputs (validated, defaults
    applied, as a submission would be)."""

    cron: str
    input: dict[str, Scalar] = msgspec.field(default_factory=dict)


class AggregateSpec(msgspec.Struct, frozen=True, kw_only=True):
    """``aggregate:`` — runs submitted with the same group wait and the script runs once for
    the whole group (asynq group aggregation): when no run joined for ``grace_s``, when the
    oldest waited ``max_delay_s``, or when ``max_size`` are waiting (0 = no limit)."""

    grace_s: float = 60.0
    max_size: int = 0
    max_delay_s: float = 0.0


#: ``{name}`` in a flow key template: the value of input ``name``.
KEY_FIELD_RE = re.compile(r"\{([^{}]*)\}")


class FlowLimitSpec(msgspec.Struct, frozen=True, kw_only=True):
    """``concurrency: {limit, key}`` or ``rate_limit: {limit, per, key}``: at most ``limit``
    runs of this task with the same key run at once (or start per ``per_s`` window). ``key``
    is a template over the inputs (``"{environment}"``); without one the limit is the whole
    task type's. Runs over the limit wait (aqsh.engine.flow), they are never refused."""

    limit: int
    key: str | None = None
    per_s: int = 0


def render_flow_key(task: str, template: str | None, values: dict[str, Any]) -> str:
    """The engine's key for a run: the task name, then the rendered template. A missing
    optional input renders empty; booleans as JSON does (``true``), as the script sees them."""
    if template is None:
        return task

    def field(match: re.Match[str]) -> str:
        value = values.get(match.group(1))
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)

    return f"{task}:{KEY_FIELD_RE.sub(field, template)}"


def flow_headers(spec: TaskSpec, values: dict[str, Any]) -> dict[str, str]:
    """The headers that make a submission of ``spec`` wait its turn (none without limits)."""
    concurrency = rate = None
    if spec.concurrency is not None:
        concurrency = flow.Concurrency(
            render_flow_key(spec.name, spec.concurrency.key, values), spec.concurrency.limit)
    if spec.rate_limit is not None:
        rate = flow.Rate(render_flow_key(spec.name, spec.rate_limit.key, values),
                         spec.rate_limit.limit, spec.rate_limit.per_s)
    return flow.headers(concurrency=concurrency, rate=rate)


class NotifySpec(msgspec.Struct, frozen=True, kw_only=True):
    """A webhook the operator configured for every task of a type (trusted: no SSRF checks).
    The secret is named, never written here: read from the worker's environment or a file
    at each delivery, so rotating it needs no reload."""

    url: str
    events: tuple[str, ...] = DEFAULT_WEBHOOK_EVENTS
    secret_env: str | None = None
    secret_file: str | None = None


class TaskSpec(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    script: str
    description: str = ""
    timeout_s: float = 300.0
    max_retry: int = 3
    retry_delay_s: float = 30.0
    queue: str = "default"
    log_retention_s: float = 86400.0
    allowed_groups: tuple[str, ...] = ()
    inputs: tuple[InputSpec, ...] = ()
    schedules: tuple[ScheduleSpec, ...] = ()
    aggregate: AggregateSpec | None = None
    notify: tuple[NotifySpec, ...] = ()
    concurrency: FlowLimitSpec | None = None
    rate_limit: FlowLimitSpec | None = None


class TasksConfig(msgspec.Struct, frozen=True):
    path: str
    tasks: dict[str, TaskSpec]


_TASK_KEYS = {"script", "description", "timeout", "max_retry", "retry_delay", "queue",
              "log_retention", "allowed_groups", "input", "schedules", "aggregate",
              "notify", "concurrency", "rate_limit"}
_DEFAULT_KEYS = {"timeout", "max_retry", "retry_delay", "queue", "log_retention"}
_INPUT_KEYS = {"name", "env", "required", "type", "pattern", "enum", "min", "max", "default",
               "description"}


class _Node:
    """A YAML value with the line it came from (1-based)."""

    def __init__(self, value: Any, line: int) -> None:
        self.value = value
        self.line = line


def _wrap(node: yaml.Node) -> _Node:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        mapping: dict[str, _Node] = {}
        keys_lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(yaml.safe_load(yaml.serialize(key_node)))
            mapping[key] = _wrap(value_node)
            keys_lines[key] = key_node.start_mark.line + 1
        wrapped = _Node(mapping, line)
        wrapped.key_lines = keys_lines  # type: ignore[attr-defined]
        return wrapped
    if isinstance(node, yaml.SequenceNode):
        return _Node([_wrap(item) for item in node.value], line)
    return _Node(yaml.safe_load(yaml.serialize(node)), line)


class _Errors:
    def __init__(self, path: str) -> None:
        self.path = path
        self.items: list[str] = []

    def add(self, line: int, where: str, message: str) -> None:
        self.items.append(f"{self.path}:{line}: {where}: {message}")


def _plain(node: _Node) -> Any:
    if isinstance(node.value, dict):
        return {k: _plain(v) for k, v in node.value.items()}
    if isinstance(node.value, list):
        return [_plain(v) for v in node.value]
    return node.value


def load_tasks(path: str | os.PathLike[str], tasks_dir: str | os.PathLike[str]) -> TasksConfig:
    """Load and check the whole file; raises ConfigError listing every problem."""
    path_str = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path_str}: cannot read tasks config: {exc.strerror}") from exc
    try:
        root_node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path_str}{line}: invalid YAML: {exc}") from exc
    errs = _Errors(path_str)
    if root_node is None or not isinstance(root_node, yaml.MappingNode):
        raise ConfigError(f"{path_str}:1: the file must be a mapping with a 'tasks' key")
    root = _wrap(root_node)
    tasks: dict[str, TaskSpec] = {}
    for key in root.value:
        if key not in ("defaults", "tasks"):
            errs.add(_line(root, key), "top level", f"unknown key {key!r}")
    defaults = _check_defaults(root.value.get("defaults"), errs)
    tasks_node = root.value.get("tasks")
    if tasks_node is None or not isinstance(tasks_node.value, dict) or not tasks_node.value:
        errs.add(tasks_node.line if tasks_node else 1, "tasks", "at least one task is required")
    else:
        for name, node in tasks_node.value.items():
            spec = _check_task(name, node, _line(tasks_node, name), defaults, Path(tasks_dir),
                               errs)
            if spec is not None:
                tasks[name] = spec
    if errs.items:
        raise ConfigError(
            f"{path_str}: {len(errs.items)} error(s) in tasks config:\n  "
            + "\n  ".join(errs.items),
            details=errs.items,
        )
    return TasksConfig(path=path_str, tasks=tasks)


def _line(parent: _Node, key: str) -> int:
    return int(getattr(parent, "key_lines", {}).get(key, parent.line))


def _check_defaults(node: _Node | None, errs: _Errors) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if node is None:
        return out
    if not isinstance(node.value, dict):
        errs.add(node.line, "defaults", "must be a mapping")
        return out
    for key, value in node.value.items():
        if key not in _DEFAULT_KEYS:
            errs.add(_line(node, key), "defaults", f"unknown key {key!r}")
            continue
        checked = _check_task_field(key, value, errs, "defaults")
        if checked is not None:
            out[key] = checked
    return out


def _check_task_field(key: str, node: _Node, errs: _Errors, where: str) -> Any:
    value = node.value
    if key in ("timeout", "retry_delay", "log_retention"):
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            errs.add(node.line, f"{where}: field {key!r}", f"expected {exc}")
            return None
        if key == "timeout" and seconds <= 0:
            errs.add(node.line, f"{where}: field 'timeout'", "must be positive")
            return None
        return seconds
    if key == "max_retry":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            errs.add(node.line, f"{where}: field 'max_retry'", "must be a non-negative integer")
            return None
        return value
    if key == "queue":
        if not isinstance(value, str) or not value.strip():
            errs.add(node.line, f"{where}: field 'queue'", "must be a non-blank string")
            return None
        if value.startswith("aqsh:"):
            errs.add(node.line, f"{where}: field 'queue'",
                     "queue names starting with 'aqsh:' are reserved (aqsh:webhooks carries "
                     "webhook deliveries)")
            return None
        return value
    return value


def _check_task(
    name: str, node: _Node, line: int, defaults: dict[str, Any], tasks_dir: Path, errs: _Errors
) -> TaskSpec | None:
    where = f"task {name!r}"
    if not TASK_NAME_RE.match(name):
        errs.add(line, where, "task names are letters, digits and _ . : - (starting alphanumeric)")
    if not isinstance(node.value, dict):
        errs.add(node.line, where, "must be a mapping")
        return None
    fields: dict[str, Any] = dict(defaults)
    before = len(errs.items)
    for key, value in node.value.items():
        if key not in _TASK_KEYS:
            errs.add(_line(node, key), f"{where}: field {key!r}", "unknown key")
            continue
        if key in ("description",):
            if not isinstance(value.value, str):
                errs.add(value.line, f"{where}: field 'description'", "must be a string")
            fields[key] = str(value.value)
        elif key == "allowed_groups":
            groups = _plain(value)
            if not isinstance(groups, list) or not all(
                isinstance(g, str) and g.strip() for g in groups
            ):
                errs.add(value.line, f"{where}: field 'allowed_groups'",
                         "must be a list of group names")
            else:
                fields[key] = tuple(groups)
        elif key not in ("script", "input", "schedules", "aggregate", "notify",
                         "concurrency", "rate_limit"):
            checked = _check_task_field(key, value, errs, where)
            if checked is not None:
                fields[key] = checked
    script = _check_script(node.value.get("script"), node.line, where, tasks_dir, errs)
    inputs = _check_inputs(node.value.get("input"), where, errs)
    notify = _check_notify(node.value.get("notify"), where, errs)
    if len(errs.items) > before or script is None:
        return None
    spec = TaskSpec(
        name=name,
        script=script,
        description=fields.get("description", ""),
        timeout_s=fields.get("timeout", 300.0),
        max_retry=fields.get("max_retry", 3),
        retry_delay_s=fields.get("retry_delay", 30.0),
        queue=fields.get("queue", "default"),
        log_retention_s=fields.get("log_retention", 86400.0),
        allowed_groups=fields.get("allowed_groups", ()),
        inputs=tuple(inputs),
        notify=tuple(notify),
    )
    schedules = _check_schedules(node.value.get("schedules"), spec, where, errs)
    aggregate = _check_aggregate(node.value.get("aggregate"), where, errs)
    input_names = {i.name for i in inputs}
    concurrency = _check_flow_limit(node.value.get("concurrency"), "concurrency", where,
                                    input_names, errs)
    rate_limit = _check_flow_limit(node.value.get("rate_limit"), "rate_limit", where,
                                   input_names, errs)
    if len(errs.items) > before:
        return None
    return msgspec.structs.replace(spec, schedules=tuple(schedules), aggregate=aggregate,
                                   concurrency=concurrency, rate_limit=rate_limit)


def _check_flow_limit(node: _Node | None, field: str, where: str, input_names: set[str],
                      errs: _Errors) -> FlowLimitSpec | None:
    """``concurrency: {limit: 1, key: "{environment}"}``, ``rate_limit: {limit: 10, per: 1m,
    key: "{target}"}``: ``limit`` (and for a rate, ``per``) required, ``key`` optional."""
    if node is None:
        return None
    here = f"{where}: field '{field}"
    allowed = {"limit", "key"} | ({"per"} if field == "rate_limit" else set())
    shape = "limit, per, key" if field == "rate_limit" else "limit, key"
    if not isinstance(node.value, dict):
        errs.add(node.line, here + "'", f"must be a mapping of {shape}")
        return None
    ok = True
    for key in node.value:
        if key not in allowed:
            errs.add(_line(node, key), f"{here}.{key}'", "unknown key")
            ok = False
    limit_node = node.value.get("limit")
    raw_limit = limit_node.value if limit_node is not None else None
    limit = raw_limit if isinstance(raw_limit, int) and not isinstance(raw_limit, bool) else 0
    if limit < 1:
        errs.add(limit_node.line if limit_node else node.line, f"{here}.limit'",
                 "must be an integer of at least 1")
        ok = False
    per_s = 0
    if field == "rate_limit":
        per_node = node.value.get("per")
        if per_node is None:
            errs.add(node.line, f"{here}.per'", "is required (a duration such as 1m)")
            ok = False
        else:
            try:
                seconds = parse_duration(per_node.value)
            except ValueError as exc:
                errs.add(per_node.line, f"{here}.per'", f"expected {exc}")
                ok = False
            else:
                # Windows are whole seconds on Redis's side (the counters' names and expiry).
                if seconds < 1 or seconds != int(seconds):
                    errs.add(per_node.line, f"{here}.per'", "must be a whole number of "
                             "seconds, at least 1s")
                    ok = False
                per_s = int(seconds)
    template: str | None = None
    key_node = node.value.get("key")
    if key_node is not None:
        if not isinstance(key_node.value, str) or not key_node.value.strip():
            errs.add(key_node.line, f"{here}.key'", "must be a non-blank string such as "
                     "\"{environment}\"")
            ok = False
        else:
            template = key_node.value
            unknown = sorted({m for m in KEY_FIELD_RE.findall(template)} - input_names)
            if unknown:
                errs.add(key_node.line, f"{here}.key'", "names unknown inputs: "
                         + ", ".join(repr(u) for u in unknown))
                ok = False
            if "{" in KEY_FIELD_RE.sub("", template) or "}" in KEY_FIELD_RE.sub("", template):
                errs.add(key_node.line, f"{here}.key'", "has an unbalanced '{' or '}'")
                ok = False
    if not ok:
        return None
    return FlowLimitSpec(limit=limit, key=template, per_s=per_s)


def _check_aggregate(node: _Node | None, where: str, errs: _Errors) -> AggregateSpec | None:
    """``aggregate: {grace: 30s, max_size: 100, max_delay: 5m}``; every key is optional
    (``aggregate: {}`` batches with asynq's defaults: a 1 min grace period, no limits)."""
    if node is None:
        return None
    here = f"{where}: field 'aggregate"
    if not isinstance(node.value, dict):
        errs.add(node.line, here + "'", "must be a mapping of grace, max_size, max_delay")
        return None
    fields: dict[str, Any] = {}
    ok = True
    for key, value in node.value.items():
        if key in ("grace", "max_delay"):
            try:
                seconds = parse_duration(value.value)
            except ValueError as exc:
                errs.add(value.line, f"{here}.{key}'", f"expected {exc}")
                ok = False
                continue
            if key == "grace" and seconds < 1:
                errs.add(value.line, f"{here}.grace'", "must be at least 1s (as asynq's)")
                ok = False
            elif seconds < 0:
                errs.add(value.line, f"{here}.{key}'", "must not be negative")
                ok = False
            fields[f"{key}_s"] = seconds
        elif key == "max_size":
            size = value.value
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                errs.add(value.line, f"{here}.max_size'", "must be a non-negative integer")
                ok = False
            fields["max_size"] = size
        else:
            errs.add(_line(node, key), f"{here}.{key}'", "unknown key")
            ok = False
    return AggregateSpec(**fields) if ok else None


def _check_schedules(
    node: _Node | None, task: TaskSpec, where: str, errs: _Errors
) -> list[ScheduleSpec]:
    """Each schedule's cron spec parses and its input passes the task's own validation now, so
    a bad schedule stops the config load instead of failing at 3 a.m."""
    from aqsh.engine.cron import CronSpec  # cron needs parse_duration from this module

    if node is None:
        return []
    if not isinstance(node.value, list):
        errs.add(node.line, f"{where}: field 'schedules'", "must be a list")
        return []
    out: list[ScheduleSpec] = []
    for index, item in enumerate(node.value):
        here = f"{where}: field 'schedules[{index}]"
        if not isinstance(item.value, dict):
            errs.add(item.line, here + "'", "must be a mapping with 'cron' and 'input'")
            continue
        for key in item.value:
            if key not in ("cron", "input"):
                errs.add(_line(item, key), f"{here}.{key}'", "unknown key")
        cron_node = item.value.get("cron")
        if cron_node is None:
            errs.add(item.line, f"{here}.cron'", "is required")
            continue
        try:
            CronSpec(cron_node.value)
        except ValueError as exc:
            errs.add(cron_node.line, f"{here}.cron'", str(exc))
            continue
        input_node = item.value.get("input")
        raw_input = _plain(input_node) if input_node is not None else {}
        try:
            values = validate_input(task, raw_input)
        except InvalidInput as exc:
            line = input_node.line if input_node is not None else item.line
            for problem in exc.field_errors:
                field = f".{problem.field}" if problem.field else ""
                errs.add(line, f"{here}.input{field}'", problem.message)
            continue
        out.append(ScheduleSpec(cron=cron_node.value.strip(), input=values))
    return out


_NOTIFY_KEYS = {"url", "events", "secret_env", "secret_file"}


def _check_notify(node: _Node | None, where: str, errs: _Errors) -> list[NotifySpec]:
    """Each entry: an absolute http(s) URL, known events, and exactly one secret source (every
    delivery is signed). Whether the secret exists is checked at delivery, in the worker's
    environment: ``check-config`` runs where the secrets are not."""
    from urllib.parse import urlsplit

    if node is None:
        return []
    if not isinstance(node.value, list):
        errs.add(node.line, f"{where}: field 'notify'", "must be a list")
        return []
    out: list[NotifySpec] = []
    for index, item in enumerate(node.value):
        here = f"{where}: field 'notify[{index}]"
        if not isinstance(item.value, dict):
            errs.add(item.line, here + "'", "must be a mapping with 'url' and a secret")
            continue
        before = len(errs.items)
        for key in item.value:
            if key not in _NOTIFY_KEYS:
                errs.add(_line(item, key), f"{here}.{key}'", "unknown key")
        url_node = item.value.get("url")
        url = url_node.value if url_node is not None else None
        if not isinstance(url, str):
            errs.add(url_node.line if url_node else item.line, f"{here}.url'", "is required")
        else:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                errs.add(url_node.line if url_node else item.line, f"{here}.url'",
                         "must be an absolute http:// or https:// URL")
        events: tuple[str, ...] = DEFAULT_WEBHOOK_EVENTS
        events_node = item.value.get("events")
        if events_node is not None:
            raw = _plain(events_node)
            if not isinstance(raw, list) or not raw or not all(
                isinstance(e, str) for e in raw
            ):
                errs.add(events_node.line, f"{here}.events'", "must be a non-empty list")
            else:
                unknown = [e for e in raw if e not in WEBHOOK_EVENTS]
                if unknown:
                    errs.add(events_node.line, f"{here}.events'",
                             f"unknown event(s) {', '.join(unknown)}; known: "
                             + ", ".join(WEBHOOK_EVENTS))
                events = tuple(dict.fromkeys(raw))
        sources = {k: item.value[k] for k in ("secret_env", "secret_file") if k in item.value}
        if len(sources) != 1:
            errs.add(item.line, f"{here}'", "needs exactly one of secret_env, secret_file")
        for key, value in sources.items():
            if not isinstance(value.value, str) or not value.value.strip():
                errs.add(value.line, f"{here}.{key}'", "must be a non-blank string")
            elif key == "secret_env" and not ENV_NAME_RE.match(value.value):
                errs.add(value.line, f"{here}.secret_env'", "must match [A-Z_][A-Z0-9_]*")
        if len(errs.items) > before:
            continue
        out.append(NotifySpec(
            url=str(url), events=events,
            secret_env=sources["secret_env"].value if "secret_env" in sources else None,
            secret_file=sources["secret_file"].value if "secret_file" in sources else None,
        ))
    return out


def _check_script(
    node: _Node | None, line: int, where: str, tasks_dir: Path, errs: _Errors
) -> str | None:
    if node is None:
        errs.add(line, f"{where}: field 'script'", "is required")
        return None
    if not isinstance(node.value, str) or not node.value.strip():
        errs.add(node.line, f"{where}: field 'script'", "must be a path")
        return None
    path = Path(node.value)
    if not path.is_absolute():
        path = tasks_dir / path
    path = path.resolve()
    if not path.is_file():
        errs.add(node.line, f"{where}: field 'script'", f"{path} does not exist")
        return None
    if not os.access(path, os.X_OK):
        errs.add(node.line, f"{where}: field 'script'", f"{path} is not executable")
        return None
    return str(path)


def _check_inputs(node: _Node | None, where: str, errs: _Errors) -> list[InputSpec]:
    if node is None:
        return []
    if not isinstance(node.value, list):
        errs.add(node.line, f"{where}: field 'input'", "must be a list")
        return []
    out: list[InputSpec] = []
    seen_names: set[str] = set()
    seen_env: set[str] = set()
    for index, item in enumerate(node.value):
        spec = _check_input(item, f"{where}: field 'input[{index}]", errs, seen_names, seen_env)
        if spec is not None:
            out.append(spec)
    return out


def _check_input(
    node: _Node, where: str, errs: _Errors, seen_names: set[str], seen_env: set[str]
) -> InputSpec | None:
    if not isinstance(node.value, dict):
        errs.add(node.line, where + "'", "must be a mapping")
        return None
    raw = {k: _plain(v) for k, v in node.value.items()}
    before = len(errs.items)

    def bad(key: str, message: str) -> None:
        target = node.value.get(key)
        errs.add(target.line if target else node.line, f"{where}.{key}'", message)

    for key in raw:
        if key not in _INPUT_KEYS:
            bad(key, "unknown key")
    name = raw.get("name")
    if not isinstance(name, str) or not INPUT_NAME_RE.match(name):
        bad("name", "is required: letters, digits, _ and - (starting with a letter or _)")
    elif name in seen_names:
        bad("name", f"duplicate input name {name!r}")
    else:
        seen_names.add(name)
    env = raw.get("env")
    if not isinstance(env, str) or not ENV_NAME_RE.match(env):
        bad("env", "is required and must match [A-Z_][A-Z0-9_]*")
    elif env in RESERVED_ENV or env.startswith(RESERVED_PREFIXES):
        bad("env", f"{env} is reserved and cannot be set by an input")
    elif env in seen_env:
        bad("env", f"duplicate env name {env}")
    else:
        seen_env.add(env)
    try:
        kind = InputType(raw.get("type", "string"))
    except ValueError:
        bad("type", "must be one of string, int, float, bool")
        kind = InputType.STRING
    required = raw.get("required", False)
    if not isinstance(required, bool):
        bad("required", "must be true or false")
    pattern = raw.get("pattern")
    if pattern is not None:
        if kind is not InputType.STRING:
            bad("pattern", "applies to string inputs only")
        elif not isinstance(pattern, str):
            bad("pattern", "must be a string")
        else:
            try:
                re.compile(pattern)
            except re.error as exc:
                bad("pattern", f"does not compile: {exc}")
    enum_values = raw.get("enum")
    if enum_values is not None:
        if kind is not InputType.STRING:
            bad("enum", "applies to string inputs only")
        elif not isinstance(enum_values, list) or not enum_values or not all(
            isinstance(v, str) for v in enum_values
        ):
            bad("enum", "must be a non-empty list of strings")
    bounds: dict[str, float] = {}
    for key in ("min", "max"):
        value = raw.get(key)
        if value is None:
            continue
        if kind not in (InputType.INT, InputType.FLOAT, InputType.STRING):
            bad(key, "applies to int, float and string (length) inputs only")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            bad(key, "must be a number")
        else:
            bounds[key] = float(value)
    if "min" in bounds and "max" in bounds and bounds["min"] > bounds["max"]:
        bad("min", f"min ({bounds['min']:g}) is greater than max ({bounds['max']:g})")
    if len(errs.items) > before:
        return None
    spec = InputSpec(
        name=str(name), env=str(env), type=kind, required=bool(required),
        default=None, pattern=pattern,
        enum=tuple(enum_values) if enum_values is not None else None,
        min=bounds.get("min"), max=bounds.get("max"),
        description=str(raw.get("description", "")),
    )
    if "default" in raw and raw["default"] is not None:

        problems = list(_default_problems(spec, raw["default"], check_value))
        for message in problems:
            bad("default", message)
        if problems:
            return None
        spec = msgspec.structs.replace(spec, default=raw["default"])
    return spec


def _default_problems(spec: InputSpec, value: Any, check: Any) -> Iterator[str]:
    error = check(spec, value, allow_bool_strings=True, max_string_len=1 << 20)
    if error is not None:
        yield f"default {value!r} fails its own rules: {error[1]}"
