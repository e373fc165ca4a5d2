"""Typed, validated job settings: one declaration per option, read by the job, the command line
and the config runner alike.

A job is a dataclass whose fields are declared with :func:`option`: the default, the help text,
how a value is parsed (from a command-line string or a TOML/YAML value) and, for files, whether
the field names an input (refused as an output) or a path (made relative to a config file).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..errors import UserError


# the annotations of the fields that hold one number: a config file gives them as numbers, never as strings
NUMERIC_TYPES = ("int", "float", "int | None", "float | None")


class JobError(UserError, ValueError):
    """A job setting that is missing, of the wrong type or out of range."""


def option(default: Any = None, help: str = "", *, required: bool = False, parse: Callable[[Any], Any] | None = None,
           choices: Sequence[str] | None = None, many: bool = False, input: bool = False, output: bool = False,
           path: bool = False, group: str | None = None) -> Any:
    """A job field. ``parse`` turns a string (command line) or a config value into the field's value
    and raises ValueError with the reason; ``many``: a list of strings (``nargs='+'``); ``input``: a
    file or folder the job reads, ``output``: one it writes (each implies ``path``); ``group``: the heading
    it is listed under in ``--help``. Fields without a parser hold strings."""
    if choices is not None:
        parse = one_of(choices)
    meta = {"help": help, "required": required, "parse": parse, "choices": choices, "many": many, "input": input,
            "output": output, "path": path or input or output, "group": group}
    return field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def integer(low: int | None = None, high: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"expected an integer, got {value!r}")
        try:
            v = int(value)
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
        if low is not None and v < low:
            raise ValueError(f"must be >= {low}, got {v}")
        if high is not None and v > high:
            raise ValueError(f"must be <= {high}, got {v}")
        return v

    return parse


def integer_in(values: Sequence[int]) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        v = integer()(value)
        if v not in values:
            raise ValueError(f"expected one of {', '.join(map(str, values))}, got {v}")
        return v

    return parse


def number(value: Any) -> float:
    """A finite real (NaN or infinity is no setting's value)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        v = float(value)
    except (ValueError, OverflowError):
        raise ValueError(f"expected a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"expected a finite number, got {value!r}")
    return v


def positive_number(value: Any) -> float:
    v = number(value)
    if v <= 0:
        raise ValueError(f"must be > 0, got {v:g}")
    return v


def numbers(value: Any) -> tuple[float, ...]:
    """Comma-separated numbers ("1,1.5") or a list of them."""
    parts = value.split(",") if isinstance(value, str) else value
    if not isinstance(parts, (list, tuple)) or not parts:
        raise ValueError(f"expected comma-separated numbers such as 1,1.5, got {value!r}")
    return tuple(number(v.strip() if isinstance(v, str) else v) for v in parts)


def text(value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"expected a string, got {value!r}")
    return os.fspath(value)


def one_of(choices: Sequence[str]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(map(str, choices))}, got {value!r}")
        return value

    return parse


def integers(low: int | None = 1) -> Callable[[Any], tuple[int, ...]]:
    """Comma-separated integers ("6,3,2,1") or a list of them."""
    item = integer(low)

    def parse(value: Any) -> tuple[int, ...]:
        parts = value.split(",") if isinstance(value, str) else value
        if not isinstance(parts, (list, tuple)) or not parts:
            raise ValueError(f"expected comma-separated integers such as 6,3,2,1, got {value!r}")
        return tuple(item(v.strip() if isinstance(v, str) else v) for v in parts)

    return parse


def hidden_layers(value: Any) -> int | list[int] | None:
    """'default' (None: one hidden layer of C), 'none' or 0 (no hidden layer), 512, '512,512' or [512, 512]."""
    if isinstance(value, str) and value.strip().lower() in ("default", "none", "0", ""):
        return None if value.strip().lower() == "default" else 0
    dims = integers(0)(value if not isinstance(value, int) else [value])
    return dims[0] if len(dims) == 1 else list(dims)


def _strings(value: Any) -> tuple[str, ...]:
    parts = [value] if isinstance(value, str) else value
    if not isinstance(parts, (list, tuple)) or not all(isinstance(p, str) for p in parts):
        raise ValueError(f"expected a list of names, got {value!r}")
    return tuple(parts)


def _a_name(value: str, base: Path) -> bool:
    """A bare word such as a weight name (IMAGENET1K_V1), not a file beside the config."""
    return os.sep not in value and not Path(value).suffix and not (base / value).exists()


@dataclass
class Job:
    """Base of the stage jobs: checks and converts every field on construction."""

    stage: ClassVar[str]

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                if f.metadata.get("required"):
                    raise JobError(f"{f.name} ({flag_name(f.name)}) is required")
                continue
            if isinstance(f.default, bool):
                if not isinstance(value, bool):
                    raise JobError(f"{f.name} ({flag_name(f.name)}): expected true or false, got {value!r}")
                continue
            parse = _strings if f.metadata.get("many") else f.metadata.get("parse") or text
            try:
                object.__setattr__(self, f.name, parse(value))
            except ValueError as err:
                raise JobError(f"{f.name} ({flag_name(f.name)}): {err}") from None

    @classmethod
    def from_section(cls, section: dict, where: str, base: Path | None = None, fixed: dict | None = None) -> Job:
        """The job of a config section: keys are field names (dashes or underscores); unknown keys and the
        keys of ``fixed`` (set by the caller, who gives their values) are refused; relative paths are made
        relative to ``base``."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        fixed = fixed or {}
        kwargs = {}
        for key, value in section.items():
            name = str(key).replace("-", "_")
            if name in fixed:
                raise JobError(f"{where}: {key!r} is set by `fvvae run` (the files go in the run's `out` folder)")
            if name not in fields:
                known = ", ".join(sorted(n for n in fields if n not in fixed))
                raise JobError(f"{where}: unknown key {key!r} (known: {known})")
            if isinstance(value, str) and fields[name].type in NUMERIC_TYPES:  # "5" is for the command line
                raise JobError(f"{where}: {name} ({flag_name(name)}): expected a number, got the string {value!r}")
            if base is not None and fields[name].metadata.get("path") and isinstance(value, str) \
                    and not _a_name(value, base):
                value = str(base / value)
            kwargs[name] = value
        try:
            return cls(**kwargs, **fixed)
        except JobError as err:
            raise JobError(f"{where}: {err}") from None

    def settings(self) -> dict:
        """The fields as plain JSON values (the resolved configuration)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def inputs(self) -> list[tuple[str, str]]:
        """(field, path) of each file or folder the job reads (each path of a many-valued field)."""
        return self._paths("input")

    def outputs(self) -> list[tuple[str, str]]:
        """(field, path) of each file or folder the job writes."""
        return self._paths("output")

    def _paths(self, role: str) -> list[tuple[str, str]]:
        out = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get(role) and value is not None:
                out += [(f.name, path) for path in (value if f.metadata.get("many") else [value])]
        return out

    def refuse_outputs_in_inputs(self) -> None:
        """No job writes into what it reads: every output is checked against every input (before anything is
        written)."""
        for name, out in self.outputs():
            refuse_overlap(out, flag_name(name), [(flag_name(k), v) for k, v in self.inputs()])


def refuse_overlap(out: str | os.PathLike, out_name: str, inputs: Sequence[tuple[str, str | os.PathLike]]) -> None:
    """JobError naming both unless the output path ``out`` (after resolving symbolic links) is apart from each
    input path: not the same, not a folder that holds an input, not inside an input (a store is a folder: a file
    written into it destroys the store). ``inputs``: (name, path) pairs."""
    target = Path(out).resolve()
    for name, value in inputs:
        path = Path(value).resolve()
        relation = ("is" if target == path else "lies inside" if path in target.parents else
                    "holds" if target in path.parents else None)
        if relation is not None:
            raise JobError(f"{out_name} {out} {relation} the input {name} {value}: write to a path outside the "
                           f"inputs")
