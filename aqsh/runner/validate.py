"""Input validation: the one function the API runs before enqueueing and the worker runs again
before executing (a task may come from a Go client or straight from Redis).

Every failing field is reported, each with a machine code: ``missing``, ``unknown_field``,
``type``, ``pattern``, ``enum``, ``min``, ``max``, ``too_long``, ``nul``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import msgspec

from aqsh.errors import AqshError
from aqsh.runner.inputs import HasInputs, InputSpec, InputType, Scalar

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
DEFAULT_MAX_STRING_LEN = 4096


class FieldError(msgspec.Struct, frozen=True):
    field: str
    code: str
    message: str


class InvalidInput(AqshError):
    code = "invalid_input"
    http_status = 422

    def __init__(self, task: str, field_errors: list[FieldError]) -> None:
        super().__init__(
            f"input for task {task!r} is invalid: "
            + "; ".join(f"{e.field or 'input'}: {e.message} [{e.code}]" for e in field_errors),
            details=[msgspec.structs.asdict(e) for e in field_errors],
        )
        self.field_errors = field_errors


@lru_cache(maxsize=512)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _bool_strings_allowed(spec: InputSpec) -> bool:
    """"true"/"false" strings are accepted only where the operator's default uses them."""
    return isinstance(spec.default, str) and spec.default in ("true", "false")


def check_value(
    spec: InputSpec, value: Any, *, allow_bool_strings: bool, max_string_len: int
) -> tuple[str, str] | None:
    """One value against one input's rules → (code, message), or None when it is fine."""
    kind = spec.type
    if kind is InputType.BOOL:
        if isinstance(value, bool):
            return None
        if allow_bool_strings and value in ("true", "false"):
            return None
        return "type", "must be a boolean"
    if kind is InputType.INT:
        if isinstance(value, bool) or not isinstance(value, int):
            return "type", "must be an integer"
        if not INT64_MIN <= value <= INT64_MAX:
            return "type", "must fit in a signed 64-bit integer"
        return _bounds(spec, value, "")
    if kind is InputType.FLOAT:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "type", "must be a number"
        if not math.isfinite(value):
            return "type", "must be finite"
        return _bounds(spec, value, "")
    if not isinstance(value, str):
        return "type", "must be a string"
    if len(value) > max_string_len:
        return "too_long", f"must be at most {max_string_len} characters"
    if "\x00" in value:
        return "nul", "must not contain NUL characters"
    if spec.enum is not None and value not in spec.enum:
        return "enum", "must be one of " + ", ".join(spec.enum)
    if spec.pattern is not None and _compiled(spec.pattern).fullmatch(value) is None:
        return "pattern", f"must match {spec.pattern}"
    return _bounds(spec, len(value), " characters")


def _bounds(spec: InputSpec, measure: float, unit: str) -> tuple[str, str] | None:
    if spec.min is not None and measure < spec.min:
        return "min", f"must be at least {spec.min:g}{unit}"
    if spec.max is not None and measure > spec.max:
        return "max", f"must be at most {spec.max:g}{unit}"
    return None


def _normalise(spec: InputSpec, value: Scalar) -> Scalar:
    if spec.type is InputType.BOOL and isinstance(value, str):
        return value == "true"
    if spec.type is InputType.FLOAT and isinstance(value, int):
        return float(value)
    return value


class _Plan(msgspec.Struct, frozen=True):
    """What validating against one task's inputs needs, worked out once per inputs list (not
    per request): the names, and for each input whether "true"/"false" strings pass and its
    pattern compiled."""

    inputs: Sequence[InputSpec]
    known: frozenset[str]
    checks: tuple[tuple[InputSpec, bool], ...]


#: Plans by ``id`` of the inputs list they were made for; the entry keeps that list alive and
#: is used only when it *is* the list passed (a reloaded tasks.yaml brings new lists).
_PLANS: dict[int, _Plan] = {}
_MAX_PLANS = 1024


def _plan_for(inputs: Sequence[InputSpec]) -> _Plan:
    plan = _PLANS.get(id(inputs))
    if plan is not None and plan.inputs is inputs:
        return plan
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    plan = _Plan(inputs, frozenset(spec.name for spec in inputs),
                 tuple((spec, _bool_strings_allowed(spec)) for spec in inputs))
    _PLANS[id(inputs)] = plan
    return plan


def validate_input(
    task: HasInputs, payload: Any, *, max_string_len: int = DEFAULT_MAX_STRING_LEN
) -> dict[str, Scalar]:
    """Check a JSON object against the task's inputs; return the values with defaults applied.

    Raises InvalidInput listing every failing field.
    """
    if not isinstance(payload, dict):
        raise InvalidInput(task.name, [FieldError("", "type", "input must be a JSON object")])
    plan = _plan_for(task.inputs)
    errors: list[FieldError] = []
    if not plan.known.issuperset(payload):
        errors.extend(FieldError(str(name), "unknown_field", "is not an input of this task")
                      for name in payload if name not in plan.known)
    values: dict[str, Scalar] = {}
    for spec, allow_bool_strings in plan.checks:
        value = payload.get(spec.name)
        if value is None:
            if spec.required:
                errors.append(FieldError(spec.name, "missing", "is required"))
            elif spec.default is not None:
                values[spec.name] = _normalise(spec, spec.default)
            continue
        problem = check_value(spec, value, allow_bool_strings=allow_bool_strings,
                              max_string_len=max_string_len)
        if problem is not None:
            errors.append(FieldError(spec.name, *problem))
        else:
            values[spec.name] = _normalise(spec, value)
    if errors:
        raise InvalidInput(task.name, errors)
    return values


def to_env(task: HasInputs, values: dict[str, Scalar]) -> dict[str, str]:
    """Validated values → environment variables (never shell text)."""
    env: dict[str, str] = {}
    for spec in task.inputs:
        if spec.name not in values:
            continue
        value = values[spec.name]
        if isinstance(value, bool):
            env[spec.env] = "true" if value else "false"
        elif isinstance(value, float):
            env[spec.env] = repr(value)
        else:
            env[spec.env] = str(value)
    return env


def json_schema(task: HasInputs, *, max_string_len: int = DEFAULT_MAX_STRING_LEN) -> dict[str, Any]:
    """The task's inputs as JSON Schema (draft 2020-12), for ``GET /tasks``."""
    properties: dict[str, Any] = {}
    for spec in task.inputs:
        prop: dict[str, Any] = {}
        if spec.description:
            prop["description"] = spec.description
        if spec.type is InputType.STRING:
            prop.update(type="string", maxLength=max_string_len)
            if spec.pattern is not None:
                # JSON Schema patterns search; aqsh matches the whole value. Anchored, a
                # client (a form, a fuzzer) checks what the server will check.
                prop["pattern"] = f"^(?:{spec.pattern})$"
            if spec.enum is not None:
                prop["enum"] = list(spec.enum)
            if spec.min is not None:
                prop["minLength"] = int(spec.min)
            if spec.max is not None:
                prop["maxLength"] = min(int(spec.max), max_string_len)
        elif spec.type is InputType.BOOL:
            prop["type"] = ["boolean", "string"] if _bool_strings_allowed(spec) else "boolean"
            if _bool_strings_allowed(spec):
                prop["enum"] = [True, False, "true", "false"]
        else:
            prop["type"] = "integer" if spec.type is InputType.INT else "number"
            if spec.min is not None:
                prop["minimum"] = spec.min
            if spec.max is not None:
                prop["maximum"] = spec.max
        if spec.default is not None:
            prop["default"] = spec.default
        prop["x-env"] = spec.env
        properties[spec.name] = prop
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": properties,
        "required": [s.name for s in task.inputs if s.required],
        "additionalProperties": False,
    }
