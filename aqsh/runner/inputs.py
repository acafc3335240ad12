"""The declared inputs of a task type: the model that both the tasks.yaml loader (spec.py)
and the validator (validate.py) speak, kept apart so that neither imports the other's module
for it (the loader validates defaults and schedule inputs with the validator)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Protocol

import msgspec


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


class HasInputs(Protocol):
    """What validation needs of a task type (spec.TaskSpec is one)."""

    @property
    def name(self) -> str: ...

    @property
    def inputs(self) -> Sequence[InputSpec]: ...
