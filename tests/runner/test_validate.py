"""Input validation: every rule and code, defaults, env conversion and JSON Schema."""

from __future__ import annotations

from typing import Any

import pytest

from aqsh.runner.inputs import InputSpec, InputType
from aqsh.runner.spec import TaskSpec
from aqsh.runner.validate import InvalidInput, json_schema, to_env, validate_input

TASK = TaskSpec(
    name="deploy",
    script="/bin/true",
    inputs=(
        InputSpec(name="version", env="VERSION", required=True, pattern=r"^v?\d+\.\d+\.\d+$"),
        InputSpec(name="environment", env="ENVIRONMENT", required=True,
                  enum=("dev", "staging", "prod")),
        InputSpec(name="dry_run", env="DRY_RUN", type=InputType.BOOL, default="false"),
        InputSpec(name="force", env="FORCE", type=InputType.BOOL),
        InputSpec(name="days", env="DAYS", type=InputType.INT, min=1, max=365),
        InputSpec(name="ratio", env="RATIO", type=InputType.FLOAT, min=0, max=1),
        InputSpec(name="note", env="NOTE"),
    ),
)


def codes(payload: Any, **kw: Any) -> dict[str, str]:
    with pytest.raises(InvalidInput) as caught:
        validate_input(TASK, payload, **kw)
    return {e.field: e.code for e in caught.value.field_errors}


def test_valid_input_gets_defaults_and_env() -> None:
    values = validate_input(TASK, {"version": "v1.2.3", "environment": "prod", "days": 30,
                                   "ratio": 1, "force": True, "note": "x y; $(rm -rf /)"})
    assert values["dry_run"] is False  # "false" default normalised
    assert values["ratio"] == 1.0
    env = to_env(TASK, values)
    assert env == {"VERSION": "v1.2.3", "ENVIRONMENT": "prod", "DRY_RUN": "false",
                   "FORCE": "true", "DAYS": "30", "RATIO": "1.0", "NOTE": "x y; $(rm -rf /)"}


def test_every_failing_field_is_listed_with_its_code() -> None:
    got = codes({"environment": "qa", "days": 0, "ratio": 2.5, "bogus": 1, "note": "a\x00b"})
    assert got == {"version": "missing", "environment": "enum", "days": "min",
                   "ratio": "max", "bogus": "unknown_field", "note": "nul"}


@pytest.mark.parametrize(("payload", "field", "code"), [
    ({"version": "1.2.3x"}, "version", "pattern"),   # full match, not search
    ({"version": "x1.2.3"}, "version", "pattern"),
    ({"version": 123}, "version", "type"),
    ({"days": 1.0}, "days", "type"),                  # no floats for int
    ({"days": True}, "days", "type"),                 # no bools for int
    ({"days": 2**63}, "days", "type"),                # int64 bound
    ({"days": 366}, "days", "max"),
    ({"ratio": float("inf")}, "ratio", "type"),
    ({"ratio": "0.5"}, "ratio", "type"),
    ({"force": "true"}, "force", "type"),             # strings only where the default uses them
    ({"force": 1}, "force", "type"),
    ({"note": "x" * 4097}, "note", "too_long"),
])
def test_single_rule(payload: dict[str, Any], field: str, code: str) -> None:
    base = {"version": "1.0.0", "environment": "dev"}
    assert codes({**base, **payload}) == {field: code}


def test_bool_strings_allowed_where_default_is_a_string() -> None:
    values = validate_input(TASK, {"version": "1.0.0", "environment": "dev", "dry_run": "true"})
    assert values["dry_run"] is True


def test_payload_must_be_an_object_and_length_is_configurable() -> None:
    assert codes(["a"]) == {"": "type"}
    assert codes({"version": "1.0.0", "environment": "dev", "note": "abcdef"},
                 max_string_len=5) == {"note": "too_long"}


def test_json_schema_describes_inputs() -> None:
    schema = json_schema(TASK)
    assert schema["required"] == ["version", "environment"]
    assert schema["additionalProperties"] is False
    props = schema["properties"]
    assert props["version"]["pattern"] == r"^(?:^v?\d+\.\d+\.\d+$)$"
    assert props["environment"]["enum"] == ["dev", "staging", "prod"]
    assert props["days"] == {"type": "integer", "minimum": 1, "maximum": 365, "x-env": "DAYS"}
    assert props["force"]["type"] == "boolean"


def test_a_reloaded_task_is_checked_against_its_new_inputs() -> None:
    """What validation works out per inputs list is never reused for another list (a
    tasks.yaml reload brings new TaskSpecs, possibly at a recycled address)."""
    before = TaskSpec(name="t", script="/bin/true",
                      inputs=(InputSpec(name="a", env="A", required=True),))
    assert validate_input(before, {"a": "x"}) == {"a": "x"}
    for _ in range(3):  # new lists, each made after the last is gone
        after = TaskSpec(name="t", script="/bin/true",
                         inputs=(InputSpec(name="b", env="B", type=InputType.INT,
                                           required=True),))
        with pytest.raises(InvalidInput) as caught:
            validate_input(after, {"a": "x"})
        assert {e.field: e.code for e in caught.value.field_errors} == {
            "a": "unknown_field", "b": "missing"}
        assert validate_input(after, {"b": 2}) == {"b": 2}
        del after
    assert validate_input(before, {"a": "y"}) == {"a": "y"}
