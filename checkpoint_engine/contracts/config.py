"""The base of every component's configuration: a frozen pydantic model that checks itself.

Each component keeps its own section beside its code (`checkpoint_engine/config.py`,
`engine/config.py`, `sidecars/megatron/config.py`, ...), with its defaults written once, there.
pydantic checks types, ranges, literals and unknown keys; cross-field rules are `model_validator`s
that raise `ConfigError`. Every failure is reported as one line that names the full key, the bad
value and what is valid, with a "did you mean" for a misspelt key. A process receives its section
as one JSON document (`to_json_file` / `from_json_file`) and checks it again on arrival.
"""

from __future__ import annotations

import difflib
import json
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, Self, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError

# Values several sections share, each defined once here.
Dtype = Literal["float32", "bfloat16"]  # of the trainer's parameters and of vLLM (model.dtype)
Lifecycle = Literal["terminate", "keep_alive"]  # vLLM after each rollout: killed, or kept (rollout.lifecycle)
# Where a node's trainer writes each weight version for its vLLM (transfer.local): POSIX shared memory, or GPU
# memory shared by CUDA IPC; auto: cuda_ipc on a GPU where one vLLM worker and no other node read the export.
LocalRegion = Literal["auto", "shm", "cuda_ipc"]


class ConfigError(ValueError):
    """A configuration that cannot run as written; the message names the full key and what is allowed."""


class Section(BaseModel):
    """One component's section of the configuration; `KEY` is its dotted place in the run's tree."""

    KEY: ClassVar[str] = ""
    # strict: no silent conversions (8.0 is not an integer, 1 is not true, 123 is not a name); ints
    # still pass for floats. Lists from JSON or Hydra become tuples where a field is a tuple.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False, validate_default=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(describe(e, type(self))) from None

    @classmethod
    def from_dict(cls, data: object) -> Self:
        """Build from a plain mapping (composed config, JSON); missing keys take the defaults."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{cls.KEY or 'the configuration'} must be a mapping with keys {_names(cls)}")
        try:
            return cls.model_validate(dict(data))
        except ValidationError as e:
            raise ConfigError(describe(e, cls)) from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_json_file(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def from_json_file(cls, path: str | Path) -> Self:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _names(cls: type[BaseModel]) -> list[str]:
    return list(cls.model_fields)


def _join(prefix: str, name: object) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def _walk(root: type[BaseModel], loc: tuple[Any, ...]) -> tuple[type[BaseModel], str, Any]:
    """The model that owns the last key of `loc`, its dotted prefix, and that key's annotation (or None)."""
    cls, prefix = root, root.KEY if issubclass(root, Section) else ""
    for i, part in enumerate(loc):
        field = cls.model_fields.get(str(part))
        if field is None:
            return cls, prefix, None
        inner = _section_type(field.annotation)
        if i == len(loc) - 1 or inner is None:
            return cls, prefix, field.annotation
        cls, prefix = inner, _join(prefix, part)
    return cls, prefix, None


def _section_type(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _literal_args(annotation: Any) -> tuple[list[Any], bool]:
    """The allowed values of a Literal field, and whether it is nullable."""
    args = get_args(annotation)
    if get_origin(annotation) in (Union, types.UnionType):
        literal = next(a for a in args if get_origin(a) is Literal)
        return list(get_args(literal)), type(None) in args
    return list(args), False


def _unknown_key(key: str, owner: type[BaseModel], prefix: str, name: str) -> str:
    names = _names(owner)
    guesses = difflib.get_close_matches(name, names, n=1)
    did_you_mean = f" (did you mean {guesses}?)" if guesses else ""
    where = f"of {prefix}" if prefix else "at the top level"
    return f"unknown key(s) [{key!r}]{did_you_mean}; valid keys {where}: {names}"


def _not_a_string(key: str, value: Any) -> str:
    message = f"{key} must be a string, got {value!r} ({type(value).__name__})"
    if isinstance(value, int | float | bool):
        # Hydra reads `run.name=123` as an int; converting back could lose text such as "0123".
        message += f"; Hydra parsed it as {type(value).__name__}, quote it: '{key}=\"{value}\"'"
    return message


_MUST_BE = {
    **dict.fromkeys(("int_type", "int_parsing", "int_from_float"), "an integer"),
    **dict.fromkeys(("bool_type", "bool_parsing"), "true or false"),
    **dict.fromkeys(("float_type", "float_parsing"), "a number"),
    **dict.fromkeys(("tuple_type", "list_type"), "a list"),
    "finite_number": "a finite number",
}
_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def describe(error: ValidationError, root: type[BaseModel]) -> str:
    """The first problem of `error` as one line naming the full key, the value and what is valid."""
    err = error.errors()[0]
    loc = tuple(err["loc"])
    owner, prefix, annotation = _walk(root, tuple(p for p in loc if isinstance(p, str)))
    key = root.KEY if issubclass(root, Section) else ""
    for part in loc:
        key = _join(key, part) if isinstance(part, str) else f"{key}[{part}]"
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx", {})
    section = _section_type(annotation)
    if kind == "extra_forbidden":
        message = _unknown_key(key, owner, prefix, str(loc[-1]))
    elif kind == "value_error":
        message = str(ctx.get("error", err["msg"])).removeprefix("Value error, ")
    elif kind == "literal_error":
        allowed, nullable = _literal_args(annotation)
        message = f"{key} must be one of {allowed}{' or null' if nullable else ''}, got {value!r}"
    elif kind == "string_type":
        message = _not_a_string(key, value)
    elif kind in _MUST_BE:
        message = f"{key} must be {_MUST_BE[kind]}, got {value!r}"
    elif kind in _BOUNDS:
        message = f"{key} must be {_BOUNDS[kind]} {next(iter(ctx.values()))}, got {value!r}"
    elif kind in ("model_type", "model_attributes_type", "dict_type") and section is not None:
        message = f"{key} must be a mapping with keys {_names(section)}, got {value!r}"
    elif kind == "missing":
        message = f"{key} is required"
    else:
        message = f"{key}: {err['msg']}, got {value!r}"
    return message
