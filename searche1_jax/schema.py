"""Config schema: each option's type, range and choices declared once, on the dataclass that holds it.

An option dataclass (GRPOOptions, DivergenceOptions, PhaseOptions, ContextOptions, SamplerOptions) declares its
fields with `option(...)`. From that one declaration:
  - `problems(cls, block, prefix)` checks a config block: one line per bad field, naming `prefix.field` and its
    value (config_utils.validate_config gathers these with the cross-block rules into ONE error at launch);
  - `build(cls, block, prefix)` turns the block into the typed, frozen object the code below launch receives;
  - `check(obj, prefix)` (called from `__post_init__`) applies the same rules to an object built directly.

A class may add `_normalize(cls, values) -> values` (e.g. None -> a derived default) and
`_cross_problems(cls, values) -> [(field, message)]` (rules between its own fields). Rules between blocks
(e.g. grpo.temperature == sampling.temperature) live in config_utils.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

MISSING = dataclasses.MISSING
KINDS = ("int", "float", "bool", "str", "ints")


class SchemaError(ValueError):
  """A config block that does not match its option class; the message lists every bad field."""


@dataclasses.dataclass(frozen=True)
class Spec:
  """What one option field accepts. kind: one of KINDS ('ints' = a sequence of ints, stored as a tuple).
  lo / hi: bounds (inclusive unless lo_open / hi_open; for 'ints' they bound each entry). choices: the allowed
  values. none_ok: None is accepted. optional: the field may be absent from a block (its default is used).
  key: the config field's name where it differs from the attribute's."""
  kind: str
  lo: float | None = None
  hi: float | None = None
  lo_open: bool = False
  hi_open: bool = False
  choices: tuple | None = None
  none_ok: bool = False
  optional: bool = False
  key: str | None = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Spec.kind={self.kind!r}, expected one of {KINDS}")


def option(kind: str, default: Any = MISSING, **spec: Any) -> Any:
  """A dataclass field declaring its Spec (see Spec for the keywords)."""
  return dataclasses.field(default=default, metadata={"spec": Spec(kind, **spec)})


def specs(cls) -> dict[str, Spec]:
  """{attribute name: Spec} of the declared fields of an option class (fields without a Spec are skipped)."""
  return {f.name: f.metadata["spec"] for f in dataclasses.fields(cls) if "spec" in f.metadata}


def field_problem(spec: Spec, value: Any) -> str | None:
  """Why `value` does not satisfy `spec` (a phrase like 'must be >= 1'), or None."""
  if value is None:
    return None if spec.none_ok else "must not be None"
  if spec.kind == "ints":
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
      return "must be a sequence of integers"
    for v in value:
      why = field_problem(dataclasses.replace(spec, kind="int", none_ok=False, choices=None), v)
      if why:
        return f"entries {why.replace('must', 'must each', 1)}"
    return None
  if spec.kind == "bool":
    return None if isinstance(value, bool) else "must be True or False"
  if spec.kind == "str":
    if not isinstance(value, str):
      return "must be a string"
  else:
    integer = spec.kind == "int"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
      return f"must be {'an integer' if integer else 'a number'}"
    if not math.isfinite(value):
      return "must be finite"
    if spec.lo is not None and (value <= spec.lo if spec.lo_open else value < spec.lo):
      return f"must be {'>' if spec.lo_open else '>='} {spec.lo}"
    if spec.hi is not None and (value >= spec.hi if spec.hi_open else value > spec.hi):
      return f"must be {'<' if spec.hi_open else '<='} {spec.hi}"
  if spec.choices is not None and value not in spec.choices:
    return f"must be one of {tuple(spec.choices)}"
  return None


def _values(cls, block: Mapping[str, Any], prefix: str, source: str) -> tuple[dict[str, Any], list[str]]:
  values, problems = {}, []
  for name, spec in specs(cls).items():
    key = spec.key or name
    if key in block:
      value = block[key]
      values[name] = tuple(value) if spec.kind == "ints" and isinstance(value, (list, tuple)) else value
    elif not spec.optional:
      problems.append(f"{prefix}: missing field {key!r}" + (f" (see {source})" if source else ""))
  return values, problems


def _problems(cls, values: Mapping[str, Any], prefix: str, cross: bool = True) -> list[str]:
  out = []
  for name, spec in specs(cls).items():
    if name in values:
      why = field_problem(spec, values[name])
      if why:
        out.append(f"{prefix}.{spec.key or name}={values[name]!r}: {why}")
  if cross and not out and hasattr(cls, "_cross_problems"):  # cross rules see complete, valid fields only
    keys = {name: spec.key or name for name, spec in specs(cls).items()}
    out += [f"{prefix}.{keys.get(f, f)}={values.get(f)!r}: {msg}" for f, msg in cls._cross_problems(values)]
  return out


def problems(cls, block: Mapping[str, Any], prefix: str, source: str = "") -> list[str]:
  """Every way `block` (a ConfigDict or dict) fails `cls`'s declared fields, one line each; [] when it fits.
  Keys of the block that `cls` does not declare are ignored (a config block may feed several option classes)."""
  values, missing = _values(cls, block, prefix, source)
  if missing:
    return missing + _problems(cls, values, prefix, cross=False)
  values = _normalized(cls, values)
  return _problems(cls, values, prefix)


def _normalized(cls, values: dict[str, Any]) -> dict[str, Any]:
  return cls._normalize(dict(values)) if hasattr(cls, "_normalize") else values


def build(cls, block: Mapping[str, Any], prefix: str, source: str = "", **extra: Any):
  """The typed option object for `block`; raises SchemaError listing every bad field. `extra`: values for
  fields that do not come from the block (e.g. ContextOptions.template)."""
  found = problems(cls, block, prefix, source)
  if found:
    raise SchemaError(f"invalid {prefix} config:\n  " + "\n  ".join(found))
  values, _ = _values(cls, block, prefix, source)
  return cls(**values, **extra)  # __post_init__ normalizes (schema.check)


def check(obj: Any, prefix: str) -> None:
  """For `__post_init__` of a frozen option class: applies the class's `_normalize` (and stores 'ints' fields as
  tuples) on the object, then raises SchemaError if it breaks the class's declared rules."""
  cls = type(obj)
  values = {name: getattr(obj, name) for name in specs(cls)}
  for name, spec in specs(cls).items():
    if spec.kind == "ints" and isinstance(values[name], list):
      values[name] = tuple(values[name])
  values = _normalized(cls, values)
  for name, value in values.items():
    if value is not getattr(obj, name):
      object.__setattr__(obj, name, value)
  found = _problems(cls, values, prefix)
  if found:
    raise SchemaError(f"invalid {prefix} options:\n  " + "\n  ".join(found))
