"""Experiment configs: big_vision-style argument strings, command-line overrides, semantic validation, resume checks.

  --config configs/search_e1.py:model=7b,mesh=v5e-16   ->  get_config("model=7b,mesh=v5e-16")
  --config.ofsd.kind=jsd                                ->  an override of one field (ml_collections config_flags)

Unknown field names and badly typed values are rejected while the flags are parsed (`check_override_paths`
turns ml_collections' bare AttributeError into a message naming the flag and the closest known fields).
`validate_config` then checks meaning: ranges, enumerations and cross-field rules (e.g. GRPO needs groups of >= 2,
the mesh must fit the devices, the OFSD divergence must be one of the implemented kinds). All problems are reported
together in ONE `ConfigError`, one line per field, each naming the field and its bad value.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
import os
from typing import Any, Callable, Iterable, Sequence

import ml_collections

from searche1_jax import distributed, schema, sharding
from searche1_jax.agent import actions
from searche1_jax.agent import rollout as rollout_lib
from searche1_jax.data import qa
from searche1_jax.models import hf, qwen2
from searche1_jax.retrieval import retriever
from searche1_jax.sampling import options as sampling_options
from searche1_jax.rl import grpo, grpo_loss, ofsd_loss, ofsd_phase, privileged


class ConfigError(ValueError):
  """A config that cannot be used as given; the message names each bad field and its value."""


# --------------------------------------------------------------------------------------------- argument strings

_TRUE = ("1", "true", "yes", "on", "t", "y")
_FALSE = ("0", "false", "no", "off", "f", "n")


def _convert(key: str, text: str, default: Any, where: str) -> Any:
  """Parse `text` as the type of `default` (bool/int/float/str; None -> a Python literal, else the string)."""
  if isinstance(default, bool):
    low = text.strip().lower()
    if low in _TRUE:
      return True
    if low in _FALSE:
      return False
    raise ConfigError(f"{where}: {key}={text!r} is not a boolean (use one of {_TRUE + _FALSE})")
  if isinstance(default, int):
    try:
      return int(text)
    except ValueError:
      raise ConfigError(f"{where}: {key}={text!r} is not an integer") from None
  if isinstance(default, float):
    try:
      return float(text)
    except ValueError:
      raise ConfigError(f"{where}: {key}={text!r} is not a number") from None
  if isinstance(default, str):
    return text
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_arg(arg: str | None, *, lazy: bool = False, **spec: Any) -> ml_collections.ConfigDict:
  """Parse a big_vision-style argument string "k=v,flag,k2=v2" into a ConfigDict with typed values.

  spec: the known keys and their defaults; a value is converted to its default's type (bool, int, float, str;
  a None default takes a Python literal if the text is one, else the string). A bare `flag` sets a bool key to
  True. Unknown keys are an error naming the key and the known ones, unless lazy=True (then they are kept, as
  Python literals where possible). Whitespace around items is ignored; an empty or None arg gives the defaults.
  """
  out = ml_collections.ConfigDict(dict(spec))
  if not arg:
    return out
  where = f"config argument {arg!r}"
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, eq, text = item.partition("=")
    key = key.strip()
    if not key.isidentifier():
      raise ConfigError(f"{where}: {key!r} is not a valid argument name")
    if key not in spec:
      if not lazy:
        raise ConfigError(f"{where}: unknown argument {key!r}; known: {sorted(spec)}")
      out[key] = _convert(key, text.strip(), None, where) if eq else True
      continue
    if not eq:
      if not isinstance(spec[key], bool):
        raise ConfigError(f"{where}: argument {key!r} needs a value ({key}=...); only booleans may be bare flags")
      out[key] = True
    else:
      out[key] = _convert(key, text.strip(), spec[key], where)
  return out


def split_config_string(config_string: str) -> tuple[str, str | None]:
  """'configs/demo.py:smoke,seed=3' -> ('configs/demo.py', 'smoke,seed=3'); no colon -> (path, None)."""
  path, colon, arg = config_string.partition(":")
  return path, (arg if colon else None)


def load_config(config_string: str) -> ml_collections.ConfigDict:
  """Load `path.py[:arg]` and return `get_config(arg)` (or `get_config()` when there is no arg)."""
  path, arg = split_config_string(config_string)
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist (from {config_string!r})")
  name = "config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except ModuleNotFoundError as e:
    if (e.name or "").split(".")[0] != "configs":
      raise
    raise ConfigError(f"{path}: cannot import {e.name!r}: run from the repository root (`python -m launch.<tool>`, "
                      "pytest, or a notebook opened in the checkout), where configs/ is importable") from None
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path}: defines no get_config(arg) function")
  try:
    config = module.get_config() if arg is None else module.get_config(arg)
  except ConfigError as e:
    raise ConfigError(f"{config_string}: {e}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config({arg!r}) returned {type(config).__name__}, not a ConfigDict")
  return config


# ------------------------------------------------------------------------------------------------- overrides

def flatten(config: ml_collections.ConfigDict | dict, prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}: every leaf field by its dotted path (ConfigDicts and dicts are recursed)."""
  out = {}
  items = config.items() if isinstance(config, (dict, ml_collections.ConfigDict)) else ()
  for k, v in items:
    path = f"{prefix}{k}"
    if isinstance(v, (dict, ml_collections.ConfigDict)) and len(v):
      out.update(flatten(v, path + "."))
    else:
      out[path] = v
  return out


def _all_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for k, v in config.items():
    out.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      out.extend(_all_paths(v, prefix + k + "."))
  return out


def unknown_field_message(config: ml_collections.ConfigDict, path: str, source: str) -> str | None:
  """None if `path` names a field of config, else a message naming it and the closest known fields."""
  node: Any = config
  parts = path.split(".")
  for i, key in enumerate(parts):
    if isinstance(node, ml_collections.ConfigDict) and key in node:
      node = node[key]
      continue
    if isinstance(node, ml_collections.ConfigDict):
      parent = ".".join(parts[:i])
      known = sorted(node.keys())
      close = difflib.get_close_matches(path, _all_paths(config), n=3, cutoff=0.6)
      hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
      return (f"{source}: unknown config field {path!r} ({key!r} is not a field of "
              f"{('config.' + parent) if parent else 'config'}; it has: {', '.join(known)}){hint}")
    return f"{source}: unknown config field {path!r} ({'.'.join(parts[:i])!r} is a value, not a block)"
  return None


def override_paths(argv: Sequence[str], flag_name: str = "config") -> list[tuple[str, str]]:
  """[(field_path, the_flag_as_written)] of every `--config.<path>[=value]` / `--noconfig.<path>` in argv."""
  out = []
  for arg in argv:
    if not arg.startswith("-"):
      continue
    body = arg.lstrip("-").split("=", 1)[0]
    for prefix in (flag_name + ".", "no" + flag_name + "."):
      if body.startswith(prefix):
        out.append((body[len(prefix):], arg))
        break
  return out


def config_string_from_argv(argv: Sequence[str], flag_name: str = "config") -> str | None:
  """The value of --config (as `--config=X` or `--config X`) in argv, or None."""
  for i, arg in enumerate(argv):
    for dashes in ("--", "-"):
      if arg == dashes + flag_name and i + 1 < len(argv):
        return argv[i + 1]
      if arg.startswith(dashes + flag_name + "="):
        return arg.split("=", 1)[1]
  return None


def check_override_paths(config: ml_collections.ConfigDict, argv: Sequence[str], flag_name: str = "config") -> None:
  """Raise ConfigError naming every `--config.<field>` override in argv whose field does not exist."""
  problems = [m for path, flag in override_paths(argv, flag_name)
              if (m := unknown_field_message(config, path, flag)) is not None]
  if problems:
    raise ConfigError("\n".join(problems))


def _parse_override_value(path: str, text: str, current: Any, field_type: type | None) -> Any:
  where = f"override {path}={text!r}"
  if field_type is bool or isinstance(current, bool):
    return _convert(path, text, False, where)
  if field_type in (int, float, str):
    return _convert(path, text, field_type(), where)
  if isinstance(current, (tuple, list)):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      raise ConfigError(f"{where}: not a Python tuple literal, e.g. \"(1, 2)\"") from None
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str] | dict[str, Any]) -> None:
  """Apply "a.b=value" strings (typed like the existing field, as on the command line) or a {path: value} dict.

  Unknown fields are a ConfigError naming them; a placeholder field (None with a declared type) takes its type.
  """
  items = overrides.items() if isinstance(overrides, dict) else [o.split("=", 1) for o in overrides]
  for item in items:
    if len(item) != 2:
      raise ConfigError(f"override {item[0]!r} is not of the form field.path=value")
    path, value = item
    message = unknown_field_message(config, path, f"override {path}")
    if message:
      raise ConfigError(message)
    parent_path, _, key = path.rpartition(".")
    parent = config
    for k in parent_path.split(".") if parent_path else ():
      parent = parent[k]
    if isinstance(value, str) and not isinstance(overrides, dict):
      ref = parent.get_ref(key) if hasattr(parent, "get_ref") else None
      field_type = ref.get_type() if ref is not None else None
      value = _parse_override_value(path, value, parent[key], field_type)
    try:
      parent[key] = value
    except TypeError as e:
      raise ConfigError(f"override {path}={value!r}: {e}") from None


# ------------------------------------------------------------------------------------------------ validation

class _Checker:
  """Collects problems: one line per bad field, naming the field and its value."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.problems: list[str] = []

  def has(self, path: str) -> bool:
    node: Any = self.config
    for key in path.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or key not in node:
        return False
      node = node[key]
    return True

  def get(self, path: str, default: Any = None) -> Any:
    if not self.has(path):
      return default
    node: Any = self.config
    for key in path.split("."):
      node = node[key]
    return node

  def fail(self, path: str, message: str) -> None:
    self.problems.append(f"{path}={self.get(path)!r}: {message}")

  def one_of(self, path: str, allowed: Sequence[Any]) -> None:
    if self.has(path) and self.get(path) not in allowed:
      self.fail(path, f"must be one of {tuple(allowed)}")

  def number(self, path: str, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
             hi_open: bool = False, integer: bool = False, allow_none: bool = False) -> None:
    if not self.has(path):
      return
    v = self.get(path)
    if v is None and allow_none:
      return
    kind = "an integer" if integer else "a number"
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
      self.fail(path, f"must be {kind}")
      return
    if not math.isfinite(v):
      self.fail(path, "must be finite")
      return
    if lo is not None and (v <= lo if lo_open else v < lo):
      self.fail(path, f"must be {'>' if lo_open else '>='} {lo}")
    elif hi is not None and (v >= hi if hi_open else v > hi):
      self.fail(path, f"must be {'<' if hi_open else '<='} {hi}")

  def options(self, cls, block: str, source: str) -> None:
    """The problems of `block` against an option class's declared fields (searche1_jax/schema.py)."""
    if self.has(block):  # blocks feeding several classes share fields: each problem is listed once
      self.problems += [p for p in schema.problems(cls, self.get(block), block, source) if p not in self.problems]

  def boolean(self, path: str) -> None:
    if self.has(path) and not isinstance(self.get(path), bool):
      self.fail(path, "must be True or False")


OFSD_MODES = ("offline", "on_policy")  # the only enum owned by the config: the loop branches on it


def _check_model(c: _Checker) -> None:
  if c.has("model.preset") and c.get("model.preset") and not c.get("model.hf_dir"):
    if str(c.get("model.preset")).lower() not in qwen2.PRESETS:
      c.fail("model.preset", f"unknown preset; known: {sorted(qwen2.PRESETS)}")
  for f in ("model.dtype", "model.param_dtype"):
    c.one_of(f, hf.DTYPES)
  c.one_of("model.remat", qwen2.REMAT_MODES)
  if c.has("model.attention"):
    c.one_of("model.attention", qwen2.ATTENTION_MODES)


def _check_mesh(c: _Checker, num_devices: int | None) -> None:
  sizes = {a: c.get(f"mesh.{a}") for a in sharding.MESH_AXES if c.has(f"mesh.{a}")}
  for a, v in sizes.items():
    if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
      c.fail(f"mesh.{a}", "must be a positive integer or -1 (all remaining devices)")
      return
  if list(sizes.values()).count(-1) > 1:
    c.problems.append(f"mesh.(data, fsdp, tensor)={tuple(sizes.values())}: at most one axis may be -1")
    return
  if c.has("mesh.rules"):
    try:
      sharding.rules_from_config(c.get("mesh.rules"))
    except (ValueError, TypeError) as e:
      c.fail("mesh.rules", str(e))
  if num_devices is None or not sizes:
    return
  known = math.prod(v for v in sizes.values() if v != -1)
  if -1 in sizes.values():
    if num_devices % known:
      c.problems.append(f"mesh.(data, fsdp, tensor)={tuple(sizes.values())}: the fixed axes ({known} devices) do not "
                      f"divide the {num_devices} devices")
  elif known != num_devices:
    c.problems.append(f"mesh.(data, fsdp, tensor)={tuple(sizes.values())} spans {known} devices but {num_devices} "
                      "are available; the mesh must use them all (set one axis to -1 to fill)")


def _check_optim(c: _Checker, block: str) -> None:
  c.number(f"{block}.learning_rate", lo=0.0, lo_open=True)
  c.number(f"{block}.warmup_ratio", lo=0.0, hi=1.0)
  c.number(f"{block}.b1", lo=0.0, hi=1.0, hi_open=True)
  c.number(f"{block}.b2", lo=0.0, hi=1.0, hi_open=True)
  c.number(f"{block}.eps", lo=0.0)
  c.number(f"{block}.weight_decay", lo=0.0)
  c.number(f"{block}.min_lr_ratio", lo=0.0, hi=1.0)
  c.one_of(f"{block}.schedule", ("constant", "cosine"))
  c.one_of(f"{block}.mu_dtype", ("",) + hf.DTYPES)


def _check_grpo(c: _Checker) -> None:
  c.options(grpo_loss.GRPOOptions, "grpo", "configs/parts/grpo.py")
  c.one_of("grpo.estimator", grpo.ESTIMATORS)
  c.number("grpo.adv_eps", lo=0.0)
  c.boolean("grpo.skip_zero_advantage_rows")
  c.number("grpo.group_size", lo=1, integer=True)
  g = c.get("grpo.group_size")
  if isinstance(g, int) and not isinstance(g, bool) and g < 2:
    c.fail("grpo.group_size", "GRPO needs groups of >= 2 samples per question (a group baseline of one sample is "
           "undefined)")


def _check_train(c: _Checker) -> None:
  c.number("train.num_rounds", lo=1, integer=True)
  c.number("train.grpo_steps_per_round", lo=0, integer=True)
  c.number("train.prompts_per_step", lo=1, integer=True)
  c.number("train.mini_batch_prompts", lo=1, integer=True)
  c.number("train.ppo_epochs", lo=1, integer=True)
  c.number("train.eval_every_rounds", lo=0, integer=True)
  p, m = c.get("train.prompts_per_step"), c.get("train.mini_batch_prompts")
  if isinstance(p, int) and isinstance(m, int) and m >= 1 and p % m:
    c.problems.append(f"train.mini_batch_prompts={m!r} must divide train.prompts_per_step={p!r}")
  buckets, total = c.get("train.length_buckets", ()), c.get("protocol.max_prompt_length")
  why = schema.field_problem(schema.Spec("ints", lo=1), buckets)
  if why is None and list(buckets) != sorted(set(buckets)):
    why = "must be increasing"
  if why:
    c.fail("train.length_buckets", why)
  elif buckets and isinstance(total, int) and max(buckets) < total:
    c.fail("train.length_buckets", f"the largest must hold a trajectory of protocol.max_prompt_length={total} "
                                   "tokens")
  e = c.get("train.ppo_epochs")
  if c.get("grpo.old_logprobs") == "current" and (p != m or e != 1):
    c.problems.append(f"grpo.old_logprobs='current' takes the learner's own log-probs as the old policy's, which "
                      f"holds for one update per rollout batch only: needs train.mini_batch_prompts == "
                      f"train.prompts_per_step and train.ppo_epochs == 1 (got {m!r}, {p!r}, {e!r}); use 'recompute'")
  g, n = c.get("grpo.group_size"), c.get("grpo.num_microbatches")
  if isinstance(m, int) and isinstance(g, int) and isinstance(n, int) and n >= 1 and (m * g) % n:
    c.problems.append(f"grpo.num_microbatches={n!r} must divide the trajectories per update "
                      f"(train.mini_batch_prompts * group_size = {m} * {g} = {m * g})")
  c.number("checkpoint.keep", lo=1, integer=True)
  c.number("checkpoint.every_steps", lo=0, integer=True)
  c.number("logging.every_steps", lo=1, integer=True)


def _check_ofsd(c: _Checker) -> None:
  if not c.has("ofsd"):
    return
  c.boolean("ofsd.enabled")
  c.one_of("ofsd.mode", OFSD_MODES)
  for cls in (ofsd_loss.DivergenceOptions, ofsd_phase.PhaseOptions, privileged.ContextOptions):
    c.options(cls, "ofsd", "configs/parts/ofsd.py")
  c.number("ofsd.group_size", lo=2, integer=True)
  c.number("ofsd.rollout_temperature", lo=0.0)
  c.number("ofsd.questions_per_phase", lo=1, integer=True)
  if c.has("ofsd.optim"):
    _check_optim(c, "ofsd.optim")
  if not c.get("ofsd.enabled"):
    return
  if c.get("ofsd.mode") == "on_policy":
    if isinstance(c.get("ofsd.alpha"), (int, float)) and c.get("ofsd.alpha") <= 0:
      c.fail("ofsd.alpha", "on-policy OFSD adds alpha * L_SD to the GRPO loss; alpha must be > 0")
    g = c.get("grpo.group_size")
    if g is not None and c.has("ofsd.group_size") and c.get("ofsd.group_size") != g:
      c.problems.append(f"ofsd.group_size={c.get('ofsd.group_size')!r}: in on_policy mode the pairs come from the "
                        f"GRPO groups, so it must equal the GRPO group size {g!r}")
  if c.get("ofsd.context_format") == "actions" and c.get("ofsd.context_passages"):
    c.problems.append("ofsd.context_passages=True: the 'actions' context format shows only the reference's "
                      "searches and answer, never passages; use context_format='full' or context_passages=False")


def _check_protocol(c: _Checker) -> None:
  c.number("protocol.max_turns", lo=0, integer=True)
  c.number("protocol.topk", lo=1, integer=True)
  c.one_of("protocol.parse", actions.PARSE_MODES)
  for f in ("max_obs_length", "max_response_length", "max_start_length", "max_prompt_length"):
    c.number(f"protocol.{f}", lo=1, integer=True)
  if c.has("protocol.template") and "{question}" not in str(c.get("protocol.template")):
    c.problems.append("protocol.template has no '{question}' placeholder")
  if c.has("protocol.topk") and c.has("retrieval.topk") and c.get("protocol.topk") != c.get("retrieval.topk"):
    c.problems.append(f"retrieval.topk={c.get('retrieval.topk')!r} and protocol.topk={c.get('protocol.topk')!r} "
                      "must be equal (passages per search)")


def _check_sampling(c: _Checker) -> None:
  c.options(sampling_options.SamplerOptions, "sampling", "configs/parts/sampling.py")
  c.number("rollout.decode_slots", lo=0, integer=True)
  c.one_of("rollout.schedule", rollout_lib.SCHEDULES)
  c.number("rollout.refill_fraction", lo=0.0, hi=1.0, lo_open=True)
  slots = c.get("rollout.decode_slots")
  for block in ("grpo", "ofsd"):
    g = c.get(f"{block}.group_size")
    if isinstance(slots, int) and isinstance(g, int) and 0 < slots < g:
      c.problems.append(f"rollout.decode_slots={slots!r}: must be 0 or >= {block}.group_size={g!r} (a question's "
                        "samples decode together)")
  for block in ("sampling", "rollout.eval"):
    c.number(f"{block}.temperature", lo=0.0)
    c.number(f"{block}.top_p", lo=0.0, hi=1.0, lo_open=True)
    c.number(f"{block}.top_k", lo=0, integer=True)
  ts, tg = c.get("sampling.temperature"), c.get("grpo.temperature")
  if isinstance(ts, (int, float)) and isinstance(tg, (int, float)) and ts != tg:
    c.problems.append(f"grpo.temperature={tg!r} and sampling.temperature={ts!r} must be equal (the learner scores "
                      "tokens at the temperature they were sampled at)")


def _check_retrieval(c: _Checker) -> None:
  c.one_of("retrieval.backend", retriever.BACKENDS)
  c.number("retrieval.miss_rate", lo=0.0, hi=1.0, hi_open=True)
  c.number("retrieval.miss_seed", lo=0, integer=True)
  c.number("retrieval.cache_size", lo=0, integer=True)
  for field in ("miss_rate", "miss_seed"):  # the warm-start transcripts script the misses the rollouts meet
    scripted, real = f"world.transcripts.{field}", f"retrieval.{field}"
    if c.has(scripted) and c.has(real) and c.get(scripted) != c.get(real):
      c.problems.append(f"{scripted}={c.get(scripted)!r} and {real}={c.get(real)!r} must be equal (the "
                        "transcripts script the retriever's misses)")


def _check_data(c: _Checker) -> None:
  if not c.has("data"):
    return
  c.one_of("data.train_dataset", qa.DATASETS)
  for i, name in enumerate(c.get("data.eval_datasets") or ()):
    if name not in qa.DATASETS:
      c.problems.append(f"data.eval_datasets[{i}]={name!r}: unknown dataset; known: {qa.DATASETS}")
  limits = c.get("data.eval_limit")
  if isinstance(limits, ml_collections.ConfigDict):
    for name in limits:
      c.number(f"data.eval_limit.{name}", lo=0, integer=True)


def _check_misc(c: _Checker) -> None:
  c.number("seed", lo=0, integer=True)
  c.one_of("distributed.mode", distributed.MODES)
  c.number("distributed.num_processes", lo=1, integer=True, allow_none=True)
  c.number("distributed.process_id", lo=0, integer=True, allow_none=True)
  n, i = c.get("distributed.num_processes"), c.get("distributed.process_id")
  if isinstance(n, int) and isinstance(i, int) and i >= n:
    c.problems.append(f"distributed.process_id={i!r} must be < distributed.num_processes={n!r}")


def _check_optim_block(c: _Checker) -> None:
  _check_optim(c, "optim")


VALIDATORS: tuple[Callable[[_Checker], None], ...] = (
    _check_model, _check_optim_block, _check_grpo, _check_train, _check_ofsd, _check_protocol, _check_sampling,
    _check_retrieval, _check_data, _check_misc)


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int | None = None) -> ml_collections.ConfigDict:
  """Check ranges, enumerations and cross-field rules; raise ONE ConfigError listing every bad field.

  Blocks that a config does not have are not checked. num_devices (e.g. jax.device_count(), known only after
  jax.distributed is initialized) enables the mesh-size check. Returns the config unchanged.
  """
  c = _Checker(config)
  for check in VALIDATORS:
    check(c)
  _check_mesh(c, num_devices)
  if c.problems:
    raise ConfigError("invalid config:\n  " + "\n  ".join(c.problems))
  return config


# --------------------------------------------------------------------------------------------- resume checks

def to_json_dict(config: ml_collections.ConfigDict) -> dict:
  """The resolved config as plain JSON data (tuples become lists; placeholders become null)."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def _may_change(path: str, prefixes: Sequence[str]) -> bool:
  return any(path == p or path.startswith(p + ".") for p in prefixes)


def config_diff(saved: dict, current: dict, ignore: Sequence[str] = ()) -> list[tuple[str, Any, Any]]:
  """[(field, saved value, current value)] of the fields that differ between two JSON configs, ignoring the fields
  (or whole blocks) named in `ignore`. A field present on one side only shows '<absent>' on the other."""
  a, b = flatten(saved), flatten(current)
  missing = "<absent>"
  out = []
  for path in sorted(set(a) | set(b)):
    if _may_change(path, ignore):
      continue
    va, vb = a.get(path, missing), b.get(path, missing)
    if va != vb:
      out.append((path, va, vb))
  return out


def format_diff(diff: Sequence[tuple[str, Any, Any]]) -> str:
  return "\n".join(f"  {path}: saved {va!r} -> now {vb!r}" for path, va, vb in diff)


def check_workdir(workdir: str) -> None:
  """Raise ConfigError for a URL workdir. The round loop appends to metrics.jsonl and writes its results with plain
  file I/O, so gs://bucket/run would silently become a local folder named 'gs:'."""
  if "://" in str(workdir):
    raise ConfigError(f"--workdir={workdir}: a URL is not supported; mount the bucket (e.g. with gcsfuse, see the "
                      "docs/tpu.md) and pass the mounted path")
