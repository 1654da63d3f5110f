"""Typed access to `params.yaml`: each stage reads only its own section into its own dataclass.

Stages declare their parameters as (nested) dataclasses next to their code; this module turns a
section of `params.yaml` into one, rejecting unknown keys, wrong types and out-of-range numbers
(fields typed with the bounds below, e.g. `epochs: PositiveInt`) with a message that names the key,
so a typo in `params.yaml` fails loudly instead of silently using a default or crashing mid-run.
The dataclass defaults equal `params.yaml`'s values (tests/test_params.py proves it), so deleting a
key from `params.yaml` never changes a recipe.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml

from psyface.errors import PsyfaceError, not_utf8

PARAMS_FILE = Path("params.yaml")

T = TypeVar("T")


@dataclass(frozen=True)
class Bound:
    """A number's allowed range in params.yaml (`low`/`high` included unless `open_low`/`open_high`)."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def allows(self, value: float) -> bool:
        too_low = self.low is not None and (value <= self.low if self.open_low else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.open_high else value > self.high)
        return not (too_low or too_high)

    def describe(self) -> str:
        low = "" if self.low is None else f"{'>' if self.open_low else '>='} {self.low:g}"
        high = "" if self.high is None else f"{'<' if self.open_high else '<='} {self.high:g}"
        return f"must be {' and '.join(filter(None, (low, high)))}"

    def check(self, value: float, where: str) -> None:
        if not self.allows(value):
            raise PsyfaceError(f"{where}: {value!r} is out of range ({self.describe()})")


PositiveInt = Annotated[int, Bound(1)]
NonNegativeInt = Annotated[int, Bound(0)]
PositiveFloat = Annotated[float, Bound(0, open_low=True)]
NonNegativeFloat = Annotated[float, Bound(0)]
UnitFloat = Annotated[float, Bound(0, 1)]  # a share or threshold in [0, 1]
OpenUnitFloat = Annotated[float, Bound(0, 1, open_low=True, open_high=True)]  # a fraction or level in (0, 1)


def yaml_error_line(path: Path, error: yaml.YAMLError) -> str:
    """PyYAML's error (several lines, with a caret drawing) as one line `PATH:LINE:COLUMN: ...`."""
    mark = getattr(error, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    problem = getattr(error, "problem", None) or " ".join(str(error).split())
    context = getattr(error, "context", None)
    return f"{where}: not valid YAML: {problem}" + (f" ({context})" if context else "")


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error when the file is missing or not a mapping."""
    if not path.is_file():
        raise PsyfaceError(f"{path} not found")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise not_utf8(path, error) from None
    except yaml.YAMLError as error:
        raise PsyfaceError(yaml_error_line(path, error)) from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise PsyfaceError(f"{path} must contain a mapping at the top level")
    return content


def load_section(section: str, cls: type[T], path: Path = PARAMS_FILE) -> T:
    """Build the dataclass `cls` from `params.yaml`'s `section` (missing section: all defaults)."""
    params = read_yaml(path) if path.exists() else {}
    return from_dict(cls, params.get(section) or {}, where=f"{path}:{section}")


def from_dict(cls: type[T], data: dict[str, Any], where: str, base: T | None = None) -> T:
    """Recursively build a dataclass from a mapping; unknown keys and bad types raise PsyfaceError.

    Keys the mapping leaves out keep `base`'s values (default: the class's defaults). A nested section
    starts from its parent field's default, not from its own class's, so that leaving out a nested key
    (`explain.options.gradcam_layer`) keeps the stage's default, as leaving out a top-level key does."""
    if not isinstance(data, dict):
        raise PsyfaceError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {field.name: field for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise PsyfaceError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(fields)}")
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            default = getattr(base, name) if base is not None else field_default(fields[name])
            values[name] = from_dict(hint, value, f"{where}.{name}", default)  # type: ignore[arg-type]
        else:
            values[name] = _coerce(hint, value, f"{where}.{name}")
    return dataclasses.replace(base, **values) if base is not None else cls(**values)  # type: ignore[type-var]


def field_default(field: dataclasses.Field) -> Any:
    """A dataclass field's default value (None when it has none)."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Annotated:
        value = _coerce(args[0], value, where)
        for bound in (meta for meta in hint.__metadata__ if isinstance(meta, Bound)):
            bound.check(value, where)
        return value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, where)
            except PsyfaceError as error:
                errors.append(str(error))
        raise PsyfaceError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {args}")
    if origin is typing.Literal:
        if value not in args:
            raise PsyfaceError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise PsyfaceError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise PsyfaceError(f"{where}: expected a mapping, got {value!r}")
        value_hint = args[1] if args else Any
        return {k: _coerce(value_hint, v, f"{where}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (
        not isinstance(value, hint) or (hint is int and isinstance(value, bool))
    ):
        raise PsyfaceError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value
