"""Hugging Face Qwen2 checkpoints in and out: config.json + safetensors <-> (Qwen2Config, params).

No torch: tensors are read with safetensors' numpy backend (bfloat16 via ml_dtypes). With a mesh, every parameter
is assembled with `jax.make_array_from_callback`; each device's callback reads only its own slice of the HF
tensors (`safe_open(...).get_slice`, memory-mapped), so no device and no host ever holds a full replicated copy
unless the rules replicate that parameter.

Name map (HF tensor -> param leaf; L = layer index):
  model.embed_tokens.weight [V, D]                        -> embed/embedding [V, D]
  model.layers.L.input_layernorm.weight [D]               -> layers/input_norm/scale [L, D]
  model.layers.L.self_attn.q_proj.weight [H*hd, D]        -> layers/attn/q/kernel [L, D, H, hd]  (bias [L, H, hd])
  model.layers.L.self_attn.{k,v}_proj.weight [K*hd, D]    -> layers/attn/{k,v}/kernel [L, D, K, hd]
  model.layers.L.self_attn.o_proj.weight [D, H*hd]        -> layers/attn/o/kernel [L, H, hd, D]
  model.layers.L.post_attention_layernorm.weight [D]      -> layers/post_norm/scale [L, D]
  model.layers.L.mlp.{gate,up}_proj.weight [F, D]         -> layers/mlp/{gate,up}/kernel [L, D, F]
  model.layers.L.mlp.down_proj.weight [D, F]              -> layers/mlp/down/kernel [L, F, D]
  model.norm.weight [D]                                   -> final_norm/scale [D]
  lm_head.weight [V, D]                                   -> lm_head/kernel [D, V]  (absent when tied)
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from searche1_jax import sharding as sharding_lib
from searche1_jax.models import qwen2

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ARCHITECTURES = ("Qwen2ForCausalLM",)
MODEL_TYPES = ("qwen2",)
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
# Tensors some exporters add that carry no learned state.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
DTYPES = ("float32", "bfloat16", "float16")


class HFCheckpointError(ValueError):
  """A Hugging Face checkpoint that cannot be read as a Qwen2 model; the message names the file and tensor."""


# ------------------------------------------------------------------------------------------------ config

def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise HFCheckpointError(f"{path}: file not found")
  try:
    with open(path) as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise HFCheckpointError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
  if not isinstance(data, dict):
    raise HFCheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
  return data


def _rope_theta(d: Mapping[str, Any], where: str) -> float:
  """The RoPE base from either the transformers-5 `rope_parameters` or the older `rope_theta`/`rope_scaling`.

  Priority: rope_parameters.rope_theta, then top-level rope_theta, then rope_scaling.rope_theta, then 10000
  (transformers' default). Any scaled RoPE type is rejected.
  """
  candidates = []
  for key in ("rope_parameters", "rope_scaling"):
    block = d.get(key)
    if block is None:
      continue
    if not isinstance(block, Mapping):
      raise HFCheckpointError(f"{where}: field {key!r} must be an object or null, got {block!r}")
    if any(isinstance(v, Mapping) for v in block.values()):
      raise HFCheckpointError(f"{where}: per-layer-type {key!r} is not supported (got keys {sorted(block)})")
    rope_type = block.get("rope_type", block.get("type", "default"))
    if rope_type != "default":
      raise HFCheckpointError(f"{where}: {key}.rope_type={rope_type!r} is not supported (only 'default' RoPE; "
                              f"yarn/linear/dynamic/llama3/longrope scaling are not implemented)")
    if block.get("partial_rotary_factor") not in (None, 1, 1.0):
      raise HFCheckpointError(f"{where}: {key}.partial_rotary_factor={block['partial_rotary_factor']} is not "
                              f"supported (only 1.0)")
    candidates.append(block.get("rope_theta"))
  if d.get("partial_rotary_factor") not in (None, 1, 1.0):
    raise HFCheckpointError(f"{where}: partial_rotary_factor={d['partial_rotary_factor']} is not supported")
  params_theta = candidates[0] if d.get("rope_parameters") is not None else None
  scaling_theta = candidates[-1] if d.get("rope_scaling") is not None else None
  for theta in (params_theta, d.get("rope_theta"), scaling_theta):
    if theta is not None:
      return float(theta)
  return 10_000.0


def config_from_hf(config_dict_or_path: Mapping[str, Any] | str | os.PathLike, *,
                   param_dtype: str = "float32", dtype: str | None = None) -> qwen2.Qwen2Config:
  """A Qwen2Config from an HF config: a dict, a checkpoint directory, or a path to its config.json.

  param_dtype / dtype (compute dtype, default = param_dtype) are ours: the checkpoint's `torch_dtype` only says
  how its tensors are stored. Raises HFCheckpointError naming the file and field for anything unsupported.
  """
  if isinstance(config_dict_or_path, Mapping):
    d, where = dict(config_dict_or_path), "config"
  else:
    where = os.fspath(config_dict_or_path)
    if os.path.isdir(where):
      where = os.path.join(where, CONFIG_FILE)
    d = _read_json(where)
  model_type = d.get("model_type")
  if model_type not in MODEL_TYPES:
    raise HFCheckpointError(f"{where}: model_type={model_type!r} is not supported (expected one of {MODEL_TYPES})")
  archs = d.get("architectures")
  if archs is not None and not any(a in ARCHITECTURES for a in archs):
    raise HFCheckpointError(f"{where}: architectures={archs!r} has none of {ARCHITECTURES}")
  if d.get("use_sliding_window"):
    raise HFCheckpointError(f"{where}: use_sliding_window=true is not supported (full causal attention only)")
  if any(t != "full_attention" for t in d.get("layer_types") or ()):
    raise HFCheckpointError(f"{where}: layer_types other than 'full_attention' are not supported")
  act = d.get("hidden_act", "silu")
  if act != "silu":
    raise HFCheckpointError(f"{where}: hidden_act={act!r} is not supported (only 'silu')")
  required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
  missing = [k for k in required if d.get(k) is None]
  if missing:
    raise HFCheckpointError(f"{where}: missing required field(s) {missing}")
  heads = int(d["num_attention_heads"])
  try:
    return qwen2.Qwen2Config(
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]),
        num_layers=int(d["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(d.get("head_dim") or 0),
        rope_theta=_rope_theta(d, where),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=True,  # HF Qwen2 always has q/k/v biases
        max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
        initializer_range=float(d.get("initializer_range", 0.02)),
        param_dtype=param_dtype,
        dtype=dtype or param_dtype,
    )
  except ValueError as e:
    raise HFCheckpointError(f"{where}: {e}") from None


def config_to_hf(cfg: qwen2.Qwen2Config, dtype: str | None = None) -> dict:
  """The config.json dict of a transformers `Qwen2ForCausalLM` equivalent to cfg.

  dtype: the storage dtype written as `torch_dtype`/`dtype` (default cfg.param_dtype). Both the transformers-5
  `rope_parameters` and the older top-level `rope_theta` are written so either generation can read it.
  """
  dtype = dtype or cfg.param_dtype
  return {
      "architectures": ["Qwen2ForCausalLM"],
      "model_type": "qwen2",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position_embeddings,
      "initializer_range": cfg.initializer_range,
      "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": None,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "use_sliding_window": False,
      "sliding_window": None,
      "max_window_layers": cfg.num_layers,
      "attention_dropout": 0.0,
      "use_cache": True,
      "torch_dtype": dtype,
      "dtype": dtype,
  }


# ------------------------------------------------------------------------------------------------ name map

@dataclasses.dataclass(frozen=True)
class _Entry:
  """How one param leaf is built from HF tensors.

  hf: tensor name (with '{i}' for the layer when `stacked`). The HF tensor of shape hf_shape is viewed as
  `split` (one or two factors per HF dim) and transposed by `perm` into the param's per-layer shape.
  """
  path: tuple[str, ...]
  hf: str
  stacked: bool
  split: tuple[tuple[int, ...], ...]
  perm: tuple[int, ...]

  @property
  def hf_shape(self) -> tuple[int, ...]:
    return tuple(math.prod(s) for s in self.split)

  @property
  def layer_shape(self) -> tuple[int, ...]:
    flat = [n for s in self.split for n in s]
    return tuple(flat[p] for p in self.perm)

  def names(self, num_layers: int) -> list[str]:
    return [self.hf.format(i=i) for i in range(num_layers)] if self.stacked else [self.hf]


def _name_map(cfg: qwen2.Qwen2Config, with_bias: bool = True) -> list[_Entry]:
  d, f, v, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
  h, k = cfg.num_heads, cfg.num_kv_heads
  lay = "model.layers.{i}."
  e = [_Entry(("embed", "embedding"), "model.embed_tokens.weight", False, ((v,), (d,)), (0, 1)),
       _Entry(("layers", "input_norm", "scale"), lay + "input_layernorm.weight", True, ((d,),), (0,)),
       _Entry(("layers", "post_norm", "scale"), lay + "post_attention_layernorm.weight", True, ((d,),), (0,))]
  for name, n in (("q", h), ("k", k), ("v", k)):
    e.append(_Entry(("layers", "attn", name, "kernel"), lay + f"self_attn.{name}_proj.weight", True,
                    ((n, hd), (d,)), (2, 0, 1)))
    if with_bias:
      e.append(_Entry(("layers", "attn", name, "bias"), lay + f"self_attn.{name}_proj.bias", True,
                      ((n, hd),), (0, 1)))
  e.append(_Entry(("layers", "attn", "o", "kernel"), lay + "self_attn.o_proj.weight", True, ((d,), (h, hd)),
                  (1, 2, 0)))
  for name in ("gate", "up"):
    e.append(_Entry(("layers", "mlp", name, "kernel"), lay + f"mlp.{name}_proj.weight", True, ((f,), (d,)), (1, 0)))
  e.append(_Entry(("layers", "mlp", "down", "kernel"), lay + "mlp.down_proj.weight", True, ((d,), (f,)), (1, 0)))
  e.append(_Entry(("final_norm", "scale"), "model.norm.weight", False, ((d,),), (0,)))
  if not cfg.tie_word_embeddings:
    e.append(_Entry(("lm_head", "kernel"), "lm_head.weight", False, ((v,), (d,)), (1, 0)))
  return e


def _get_path(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set_path(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


# ------------------------------------------------------------------------------------------------ reading

class _Reader:
  """Open safetensors files of a checkpoint; tensor name -> file, shape, slice reads."""

  def __init__(self, hf_dir: str):
    self.hf_dir = hf_dir
    index_path = os.path.join(hf_dir, INDEX_FILE)
    single_path = os.path.join(hf_dir, SINGLE_FILE)
    if os.path.isfile(index_path):
      weight_map = _read_json(index_path).get("weight_map")
      if not isinstance(weight_map, dict) or not weight_map:
        raise HFCheckpointError(f"{index_path}: missing or empty 'weight_map'")
      self.source = index_path
      files = sorted(set(weight_map.values()))
    elif os.path.isfile(single_path):
      self.source = single_path
      files, weight_map = [SINGLE_FILE], None
    else:
      raise HFCheckpointError(f"{hf_dir}: no {SINGLE_FILE} and no {INDEX_FILE}")
    self.handles, self.file_of = {}, {}
    for fname in files:
      path = os.path.join(hf_dir, fname)
      if not os.path.isfile(path):
        raise HFCheckpointError(f"{self.source}: lists shard {fname!r}, but {path} does not exist")
      try:
        self.handles[fname] = safe_open(path, framework="numpy")
      except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise HFCheckpointError(f"{path}: not a readable safetensors file ({e})") from None
      for name in self.handles[fname].keys():
        self.file_of[name] = fname
    if weight_map is not None:
      for name, fname in weight_map.items():
        if self.file_of.get(name) != fname:
          raise HFCheckpointError(f"{self.source}: tensor {name!r} is mapped to {fname!r}, which does not hold it")

  def path_of(self, name: str) -> str:
    return os.path.join(self.hf_dir, self.file_of[name])

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.handles[self.file_of[name]].get_slice(name).get_shape())

  def dtype(self, name: str) -> str:
    return self.handles[self.file_of[name]].get_slice(name).get_dtype()

  def read(self, name: str, region: tuple[slice, ...]) -> np.ndarray:
    """A contiguous region (unit-step slices, one per dim) of an HF tensor."""
    return self.handles[self.file_of[name]].get_slice(name)[region]


def _check_tensors(reader: _Reader, entries: list[_Entry], cfg: qwen2.Qwen2Config, config_path: str):
  expected = {}
  for e in entries:
    for n in e.names(cfg.num_layers):
      expected[n] = e.hf_shape
  for name, shape in expected.items():
    if name not in reader.file_of:
      raise HFCheckpointError(f"{reader.source}: tensor {name!r} is missing (required by {config_path})")
    got = reader.shape(name)
    if got != shape:
      raise HFCheckpointError(f"{reader.path_of(name)}: tensor {name!r} has shape {list(got)}, but {config_path} "
                              f"implies {list(shape)}")
    if reader.dtype(name) not in ("F32", "BF16", "F16"):
      raise HFCheckpointError(f"{reader.path_of(name)}: tensor {name!r} has dtype {reader.dtype(name)}, "
                              f"expected F32, BF16 or F16")
  allowed = set(expected)
  if cfg.tie_word_embeddings:
    allowed.add("lm_head.weight")  # some exporters write the tied head too; it is the embedding
  extra = sorted(n for n in reader.file_of if n not in allowed and not n.endswith(_IGNORED_SUFFIXES))
  if extra:
    raise HFCheckpointError(f"{reader.path_of(extra[0])}: unexpected tensor {extra[0]!r} ({len(extra)} unexpected "
                            f"in all) for the model described by {config_path}")


def _norm_slices(index: Sequence[slice], shape: Sequence[int]) -> list[tuple[int, int]]:
  out = []
  for s, n in zip(index, shape):
    start, stop, step = s.indices(n)
    if step != 1:
      raise ValueError(f"unexpected strided shard index {s}")
    out.append((start, stop))
  return out


def _read_layer_block(reader: _Reader, name: str, e: _Entry, bounds: list[tuple[int, int]]) -> np.ndarray:
  """Read the region `bounds` (per dim of e.layer_shape) of one HF tensor, in param layout."""
  flat = [n for s in e.split for n in s]
  inv = [0] * len(e.perm)
  for i, p in enumerate(e.perm):
    inv[p] = i
  flat_bounds = [bounds[inv[j]] for j in range(len(flat))]
  # Per HF dim: read the range covered by its leading factor, full along trailing factors; trim after.
  region, pos = [], 0
  for s in e.split:
    lead = flat_bounds[pos]
    inner = math.prod(s[1:])
    region.append(slice(lead[0] * inner, lead[1] * inner))
    pos += len(s)
  block = reader.read(name, tuple(region))
  split_shape = []
  pos = 0
  for s in e.split:
    split_shape.append(flat_bounds[pos][1] - flat_bounds[pos][0])
    split_shape.extend(s[1:])
    pos += len(s)
  block = block.reshape(split_shape)
  trim = []
  pos = 0
  for s in e.split:
    trim.append(slice(None))
    for j in range(1, len(s)):
      trim.append(slice(*flat_bounds[pos + j]))
    pos += len(s)
  return block[tuple(trim)].transpose(e.perm)


def _leaf_reader(reader: _Reader, e: _Entry, cfg: qwen2.Qwen2Config, dtype) -> tuple[tuple[int, ...], Callable]:
  """(global param shape, fn(index) -> numpy array of that region in `dtype`)."""
  layer_shape = e.layer_shape
  if not e.stacked:
    def fn(index):
      return np.ascontiguousarray(_read_layer_block(reader, e.hf, e, _norm_slices(index, layer_shape)), dtype)
    return layer_shape, fn
  shape = (cfg.num_layers,) + layer_shape

  def fn(index):
    bounds = _norm_slices(index, shape)
    (l0, l1), rest = bounds[0], bounds[1:]
    out = np.empty([b - a for a, b in bounds], dtype)
    for j, i in enumerate(range(l0, l1)):
      out[j] = _read_layer_block(reader, e.hf.format(i=i), e, rest)
    return out
  return shape, fn


def load_hf(hf_dir: str | os.PathLike, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None,
            rules=sharding_lib.DEFAULT_RULES, *, compute_dtype=None) -> tuple[qwen2.Qwen2Config, dict]:
  """Load an HF Qwen2 checkpoint directory (config.json + model.safetensors or sharded safetensors + index).

  Args:
    hf_dir: the checkpoint directory.
    dtype: parameter dtype (tensors are cast on the host while reading).
    mesh: if given, each parameter is created directly in the layout `rules` give it on this mesh; every device
      reads only its own slice. Otherwise parameters land on the default device.
    rules: logical-axis rules (see searche1_jax.sharding).
    compute_dtype: Qwen2Config.dtype (matmul dtype); default = dtype.
  Returns:
    (cfg, params) with params in the layout of qwen2.init_params.
  Raises:
    HFCheckpointError naming the file (and tensor) for a missing config.json, an unsupported architecture, a
    missing or unexpected tensor, or a shape that does not match config.json.
  """
  hf_dir = os.fspath(hf_dir)
  if not os.path.isdir(hf_dir):
    raise HFCheckpointError(f"{hf_dir}: not a directory")
  config_path = os.path.join(hf_dir, CONFIG_FILE)
  np_dtype = jnp.dtype(dtype)
  if np_dtype.name not in DTYPES:
    raise HFCheckpointError(f"load_hf: dtype must be one of {DTYPES}, got {np_dtype.name}")
  cfg = config_from_hf(config_path, param_dtype=np_dtype.name,
                       dtype=jnp.dtype(compute_dtype).name if compute_dtype is not None else None)
  reader = _Reader(hf_dir)
  entries = _name_map(cfg)
  _check_tensors(reader, entries, cfg, config_path)

  shardings = qwen2.param_shardings(cfg, mesh, rules) if mesh is not None else None
  params: dict = {}
  for e in entries:
    shape, fn = _leaf_reader(reader, e, cfg, np_dtype)
    if shardings is None:
      arr = jnp.asarray(fn(tuple(slice(None) for _ in shape)))
    else:
      arr = jax.make_array_from_callback(shape, _get_path(shardings, e.path), fn)
    _set_path(params, e.path, arr)
  return cfg, params


# ------------------------------------------------------------------------------------------------ writing

def _to_host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def _hf_tensor(arr: np.ndarray, e: _Entry) -> np.ndarray:
  """One layer's param array (e.layer_shape) -> the HF tensor (e.hf_shape)."""
  inv = np.argsort(e.perm)
  return np.ascontiguousarray(arr.transpose(inv).reshape(e.hf_shape))


def save_hf(params, cfg: qwen2.Qwen2Config, out_dir: str | os.PathLike, *, dtype: str | None = None,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, extra_config: Mapping[str, Any] | None = None) -> str:
  """Write params as an HF checkpoint that `transformers.AutoModelForCausalLM.from_pretrained` loads.

  Writes config.json and model.safetensors, or model-0000i-of-0000n.safetensors files of at most
  ~max_shard_bytes each plus model.safetensors.index.json. dtype: storage dtype (default cfg.param_dtype).
  extra_config: fields merged into config.json (e.g. bos/eos token ids). A tied head is not written (as HF does);
  without attention biases, zero biases are written (HF Qwen2 always has them). On multi-host runs every process
  gathers the params and only process 0 writes. Returns out_dir.
  """
  out_dir = os.fspath(out_dir)
  dtype = jnp.dtype(dtype or cfg.param_dtype).name
  if dtype not in DTYPES:
    raise ValueError(f"save_hf: dtype must be one of {DTYPES}, got {dtype}")
  np_dtype = jnp.dtype(dtype)
  entries = _name_map(cfg, with_bias=True)
  itemsize = np_dtype.itemsize
  # Plan shards from shapes alone, so tensors are materialized one shard at a time.
  plan: list[list[tuple[_Entry, int | None, str]]] = [[]]
  size = 0
  for e in entries:
    nbytes = math.prod(e.hf_shape) * itemsize
    for i, name in enumerate(e.names(cfg.num_layers)):
      if plan[-1] and size + nbytes > max_shard_bytes:
        plan.append([])
        size = 0
      plan[-1].append((e, i if e.stacked else None, name))
      size += nbytes
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(out_dir, exist_ok=True)
  host_cache: dict[tuple[str, ...], np.ndarray] = {}

  def leaf(e: _Entry) -> np.ndarray:
    if e.path not in host_cache:
      if e.path[-1] == "bias" and not cfg.attention_bias:
        shape = ((cfg.num_layers,) if e.stacked else ()) + e.layer_shape
        host_cache[e.path] = np.zeros(shape, np_dtype)
      else:
        try:
          host_cache[e.path] = _to_host(_get_path(params, e.path))
        except (KeyError, TypeError):
          raise ValueError(f"save_hf: params has no leaf {'/'.join(e.path)} (for HF tensor {e.hf!r})") from None
      expected = ((cfg.num_layers,) if e.stacked else ()) + e.layer_shape
      if host_cache[e.path].shape != expected:
        raise ValueError(f"save_hf: param {'/'.join(e.path)} has shape {host_cache[e.path].shape}, cfg implies "
                         f"{expected}")
    return host_cache[e.path]

  n = len(plan)
  weight_map, total = {}, 0
  for s, shard in enumerate(plan):
    fname = SINGLE_FILE if n == 1 else f"model-{s + 1:05d}-of-{n:05d}.safetensors"
    tensors = {}
    for e, i, name in shard:
      arr = leaf(e)
      tensors[name] = _hf_tensor((arr[i] if i is not None else arr).astype(np_dtype), e)
      weight_map[name] = fname
      total += tensors[name].nbytes
    if writer:
      save_file(tensors, os.path.join(out_dir, fname), metadata={"format": "pt"})
    # Drop host copies no later shard needs.
    later = {e.path for sh in plan[s + 1:] for e, _, _ in sh}
    for p in [p for p in host_cache if p not in later]:
      del host_cache[p]
  if writer:
    if n > 1:
      with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    config = config_to_hf(cfg, dtype)
    config.update(dict(extra_config or {}))
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
  return out_dir


def model_from_config(block, mesh: jax.sharding.Mesh | None = None, rules=sharding_lib.DEFAULT_RULES,
                      rng: jax.Array | None = None) -> tuple[qwen2.Qwen2Config, dict]:
  """(cfg, params) from a `model` config block (configs/parts/model.py).

  hf_dir set: load that checkpoint (its numerics from the block: qwen2.numerics_from_block); shape fields that are set must
  agree with its config.json. Otherwise: random init of the preset (+ shape overrides) with seed `block.seed` (or
  `rng`). With a mesh the params are created directly in their sharded layout.
  """
  if block.hf_dir:
    cfg, params = load_hf(block.hf_dir, dtype=block.param_dtype, mesh=mesh, rules=rules, compute_dtype=block.dtype)
    for f in qwen2.SHAPE_FIELDS:
      want = block[f] if f in block else None
      if want is not None and want != getattr(cfg, f):
        raise ValueError(f"config model.{f}={want!r} disagrees with {block.hf_dir}/{CONFIG_FILE} "
                         f"({f}={getattr(cfg, f)!r}); unset it or fix the checkpoint")
    return cfg.replace(**qwen2.numerics_from_block(block)), params
  cfg = qwen2.config_from_block(block)
  rng = jax.random.key(block.seed) if rng is None else rng
  if mesh is None:
    return cfg, qwen2.init_params(cfg, rng)
  return cfg, qwen2.init_sharded_params(cfg, rng, mesh, rules)


def is_hf_checkpoint(path: str) -> bool:
  """A directory with config.json and safetensors weights (what `models.load_hf` reads)."""
  return os.path.isfile(os.path.join(path, "config.json")) and bool(glob.glob(os.path.join(path, "*.safetensors")))


def eos_ids_for(tokenizer, model_dir: str) -> list[int]:
  """The tokenizer's EOS id plus the checkpoint's generation_config.json eos_token_id(s), if any."""
  ids = set()
  if tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  gen_path = os.path.join(model_dir, "generation_config.json") if model_dir else ""
  if gen_path and os.path.isfile(gen_path):
    with open(gen_path) as f:
      eos = json.load(f).get("eos_token_id")
    if eos is not None:
      ids.update(int(e) for e in (eos if isinstance(eos, list) else [eos]))
  return sorted(ids)
