"""tasks.yaml → TaskSpec: what operators declare, checked once at load time.

Every mistake in the file is reported at once, each naming the file, line, task and field, so an
operator fixes the whole file in one pass. Scripts are resolved and checked here: a request
never turns into a file path.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import yaml

from aqsh.durations import parse_duration
from aqsh.errors import ConfigError

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


def access_headers(allowed_groups: tuple[str, ...]) -> dict[str, str]:
    """The access record a submission stores with its task (see HEADER_ALLOWED_GROUPS)."""
    return {HEADER_ALLOWED_GROUPS: msgspec.json.encode(sorted(set(allowed_groups))).decode()}


class InputType(enum.StrEnum):
    STRING = "string"
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"


Scalar = str | int | float | bool


class InputSpec(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    env: str
    type: InputType = InputType.STRING
    required: bool = False
    default: Scalar | None = None
    pattern: str | None = None
    enum: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None
    description: str = ""


class ScheduleSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A periodic run: when (an asynq cron spec) and with which inputs (validated, defaults
    applied, as a submission would be)."""

    cron: str
    input: dict[str, Scalar] = msgspec.field(default_factory=dict)


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


class TasksConfig(msgspec.Struct, frozen=True):
    path: str
    tasks: dict[str, TaskSpec]


_TASK_KEYS = {"script", "description", "timeout", "max_retry", "retry_delay", "queue",
              "log_retention", "allowed_groups", "input", "schedules"}
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
        elif key not in ("script", "input", "schedules"):
            checked = _check_task_field(key, value, errs, where)
            if checked is not None:
                fields[key] = checked
    script = _check_script(node.value.get("script"), node.line, where, tasks_dir, errs)
    inputs = _check_inputs(node.value.get("input"), where, errs)
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
    )
    schedules = _check_schedules(node.value.get("schedules"), spec, where, errs)
    if len(errs.items) > before:
        return None
    return msgspec.structs.replace(spec, schedules=tuple(schedules))


def _check_schedules(
    node: _Node | None, task: TaskSpec, where: str, errs: _Errors
) -> list[ScheduleSpec]:
    """Each schedule's cron spec parses and its input passes the task's own validation now, so
    a bad schedule stops the config load instead of failing at 3 a.m."""
    from aqsh.engine.cron import CronSpec  # cron needs parse_duration from this module
    from aqsh.runner.validate import InvalidInput, validate_input

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
        from aqsh.runner.validate import check_value

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
