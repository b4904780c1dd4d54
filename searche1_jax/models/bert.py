"""BERT encoder in Flax linen, loading Hugging Face BERT safetensors.

Used as the dense retrieval encoder (intfloat/e5-base-v2 for paper runs, all-MiniLM-L6-v2 offline).
Inference only: no dropout, no pooler head (retrieval uses mean pooling over the last hidden state).

The parameter tree mirrors the HF tensor names, so loading is a name mapping:
  embeddings.word_embeddings.weight            -> ('embeddings', 'word_embeddings', 'embedding')
  encoder.layer.3.attention.self.query.weight  -> ('encoder', 'layer_3', 'attention', 'self', 'query', 'kernel') (transposed)
  *.LayerNorm.weight / .bias (or gamma / beta) -> (..., 'LayerNorm', 'scale' / 'bias')
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Architecture of a BERT encoder (the fields of HF `config.json` that matter for inference)."""
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any], source: str = "config.json") -> "BertConfig":
    """Builds a config from a parsed HF config.json; errors name `source` and the field."""
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [k for k in required if k not in d]
    if missing:
      raise ValueError(f"{source}: missing BERT config field(s) {missing}")
    model_type = d.get("model_type", "bert")
    if model_type not in ("bert",):
      raise ValueError(f"{source}: model_type={model_type!r} is not a BERT encoder")
    pos_type = d.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
      raise ValueError(f"{source}: position_embedding_type={pos_type!r} is not supported (only 'absolute')")
    act = d.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
      raise ValueError(f"{source}: hidden_act={act!r} is not supported; known: {sorted(_ACTIVATIONS)}")
    if d["hidden_size"] % d["num_attention_heads"]:
      raise ValueError(f"{source}: hidden_size={d['hidden_size']} is not a multiple of "
                       f"num_attention_heads={d['num_attention_heads']}")
    kwargs = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
    return cls(**kwargs)


class _Dense(nn.Module):
  features: int
  dtype: Any
  precision: Any

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.features, dtype=self.dtype, precision=self.precision, name="dense")(x)


class _SelfAttention(nn.Module):
  config: BertConfig
  dtype: Any
  precision: Any

  @nn.compact
  def __call__(self, x, bias):
    """x: [B, T, H]; bias: [B, 1, 1, T] additive float32 mask (0 keep, very negative drop)."""
    cfg = self.config
    heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads
    dense = lambda name: nn.Dense(cfg.hidden_size, dtype=self.dtype, precision=self.precision, name=name)
    split = lambda t: t.reshape(t.shape[:-1] + (heads, head_dim))
    q, k, v = (split(dense(n)(x)) for n in ("query", "key", "value"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision).astype(jnp.float32)
    scores = scores * (head_dim ** -0.5) + bias
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=self.precision)
    return ctx.reshape(ctx.shape[:-2] + (cfg.hidden_size,))


class _Output(nn.Module):
  """HF `output` block (attention.output and layer output): dense to hidden, residual, LayerNorm."""
  config: BertConfig
  dtype: Any
  precision: Any

  @nn.compact
  def __call__(self, h, residual):
    h = nn.Dense(self.config.hidden_size, dtype=self.dtype, precision=self.precision, name="dense")(h)
    return nn.LayerNorm(epsilon=self.config.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(h + residual)


class _Attention(nn.Module):
  config: BertConfig
  dtype: Any
  precision: Any

  @nn.compact
  def __call__(self, x, bias):
    ctx = _SelfAttention(self.config, self.dtype, self.precision, name="self")(x, bias)
    return _Output(self.config, self.dtype, self.precision, name="output")(ctx, x)


class _Layer(nn.Module):
  config: BertConfig
  dtype: Any
  precision: Any

  @nn.compact
  def __call__(self, x, bias):
    cfg = self.config
    a = _Attention(cfg, self.dtype, self.precision, name="attention")(x, bias)
    h = _Dense(cfg.intermediate_size, self.dtype, self.precision, name="intermediate")(a)
    h = _ACTIVATIONS[cfg.hidden_act](h)
    return _Output(cfg, self.dtype, self.precision, name="output")(h, a)


class _Embeddings(nn.Module):
  config: BertConfig
  dtype: Any

  @nn.compact
  def __call__(self, input_ids, token_type_ids):
    cfg = self.config
    positions = jnp.arange(input_ids.shape[1])[None, :]
    emb = lambda n, name: nn.Embed(n, cfg.hidden_size, dtype=self.dtype, name=name)
    x = (emb(cfg.vocab_size, "word_embeddings")(input_ids)
         + emb(cfg.max_position_embeddings, "position_embeddings")(positions)
         + emb(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids))
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(x)


class _Encoder(nn.Module):
  config: BertConfig
  dtype: Any
  precision: Any

  @nn.compact
  def __call__(self, x, bias):
    for i in range(self.config.num_hidden_layers):
      x = _Layer(self.config, self.dtype, self.precision, name=f"layer_{i}")(x, bias)
    return x


class BertModel(nn.Module):
  """BERT encoder. `dtype` is the activation dtype; softmax and the mask run in float32."""
  config: BertConfig
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None):
    """input_ids, attention_mask (1 = token, 0 = padding): int [B, T] -> last hidden state [B, T, H]."""
    if input_ids.shape[1] > self.config.max_position_embeddings:
      raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings="
                       f"{self.config.max_position_embeddings}")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = _Embeddings(self.config, self.dtype, name="embeddings")(input_ids, token_type_ids)
    bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
    return _Encoder(self.config, self.dtype, self.precision, name="encoder")(x, bias.astype(jnp.float32))


def mean_pool_normalize(hidden: jax.Array, mask: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Masked mean over time, then L2 normalization.

  hidden: [B, T, H]; mask: [B, T] (1 = token). Returns float32 [B, H] with unit L2 norm
  (rows whose mask is all zero come out as zeros).
  """
  m = mask.astype(jnp.float32)[..., None]
  summed = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)
  mean = summed / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
  norm = jnp.linalg.norm(mean, axis=-1, keepdims=True)
  return mean / jnp.maximum(norm, eps)


# ----------------------------------------------------------------------------------- HF loading


def load_hf_config(model_dir: str) -> BertConfig:
  path = os.path.join(model_dir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: BERT config.json not found (expected an HF model directory)")
  with open(path) as f:
    try:
      d = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from None
  return BertConfig.from_hf_dict(d, source=path)


def _hf_name(flax_path: tuple[str, ...]) -> tuple[str, bool]:
  """Flax param path -> (HF tensor name without prefix, whether the array is transposed)."""
  parts = [p.replace("layer_", "layer.") if p.startswith("layer_") else p for p in flax_path[:-1]]
  leaf = flax_path[-1]
  hf_leaf = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}[leaf]
  return ".".join(parts + [hf_leaf]), leaf == "kernel"


_LEGACY_LEAF = {"LayerNorm.weight": "LayerNorm.gamma", "LayerNorm.bias": "LayerNorm.beta"}


def _find_tensor(name: str, keys: set[str]) -> str | None:
  candidates = [name]
  for new, old in _LEGACY_LEAF.items():
    if name.endswith(new):
      candidates.append(name[: -len(new)] + old)
  for c in candidates:
    for prefix in ("", "bert."):  # BertModel checkpoints have no prefix; BertFor* heads have "bert."
      if prefix + c in keys:
        return prefix + c
  return None


def load_hf_bert(model_dir: str, dtype: Any = jnp.float32, precision: Any = None):
  """Loads an HF BERT directory (config.json + model.safetensors).

  Returns (BertModel, params) with params a nested dict of float32 numpy arrays. A missing file or
  tensor, or a shape mismatch, raises with the file and tensor named.
  """
  config = load_hf_config(model_dir)
  st_path = os.path.join(model_dir, "model.safetensors")
  if not os.path.isfile(st_path):
    raise FileNotFoundError(f"{st_path}: weights not found (only safetensors checkpoints are supported; "
                            "convert pytorch_model.bin with transformers' save_pretrained)")
  model = BertModel(config, dtype=dtype, precision=precision)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32),
                          jnp.ones((1, 2), jnp.int32))["params"]
  flat = {tuple(k.key for k in path): leaf.shape for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}
  params: dict = {}
  with safe_open(st_path, framework="numpy") as f:
    keys = set(f.keys())
    for path, want in flat.items():
      name, transpose = _hf_name(path)
      key = _find_tensor(name, keys)
      if key is None:
        raise KeyError(f"{st_path}: tensor {name!r} not found (config {model_dir}/config.json says "
                       f"{config.num_hidden_layers} layers, hidden {config.hidden_size})")
      arr = f.get_tensor(key)
      if transpose:
        arr = arr.T
      if tuple(arr.shape) != tuple(want):
        raise ValueError(f"{st_path}: tensor {key!r} has shape {tuple(f.get_tensor(key).shape)}, expected "
                         f"{tuple(want[::-1]) if transpose else tuple(want)} from {model_dir}/config.json")
      node = params
      for p in path[:-1]:
        node = node.setdefault(p, {})
      node[path[-1]] = np.ascontiguousarray(arr, dtype=np.float32)
  return model, params
