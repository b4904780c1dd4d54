"""The Qwen2 / Qwen2.5 decoder in Flax, exposed as pure functions over a params pytree.

Each decoder layer is a Flax linen module; the stack is a `lax.scan` over layer parameters stacked on a
leading `layers` axis (one compiled layer body however deep the model), optionally rematerialized.

Param tree (shapes; logical axis names in brackets, mapped to mesh axes by `searche1_jax.sharding`):
  embed/embedding                 [V, D]          (vocab, embed)
  layers/input_norm/scale         [L, D]          (layers, norm)
  layers/attn/{q,k,v}/kernel      [L, D, H|K, hd] (layers, embed, heads|kv_heads, head_dim), bias [L, H|K, hd]
  layers/attn/o/kernel            [L, H, hd, D]   (layers, heads, head_dim, embed)
  layers/post_norm/scale          [L, D]
  layers/mlp/{gate,up}/kernel     [L, D, F]       (layers, embed, mlp);  mlp/down/kernel [L, F, D]
  final_norm/scale                [D]
  lm_head/kernel                  [D, V]          (embed, vocab)   -- absent when embeddings are tied

The KV cache stores keys/values at slot == position: sequences are right-padded and every slot below a
query's position holds a real token, so the causal rule `slot <= position` is the whole attention mask.
It is one array pair per layer (decoding unrolls the layers), keys stored transposed ([B, K, hd, S]: the
score matmul reads slots on the minor axis) and values [B, K, S, hd]; a decode step writes each row's new
slot with a per-row dynamic_update_slice, not a scatter. On a CPU this took benchmarks/sample.py from 0.44x to
1.75x transformers' decode speed at batch 64 (vs a stacked [L, B, S, K, hd] cache scanned over layers).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from searche1_jax import sharding as shd
from searche1_jax.models import splash

Params = dict[str, Any]

# Large negative instead of -inf so fully masked rows (left padding) give uniform weights, never NaN.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


REMAT_MODES = ("none", "full", "dots")  # rematerialization of each decoder layer in the backward pass
# Causal self-attention (training, teacher scoring, prefill): 'xla' = einsums; 'splash' = the Pallas splash
# kernel wherever the sequence length allows (models/splash.py; interpreted off TPU: for tests); 'auto' = the
# kernel when lowered for TPU, einsums elsewhere. Attention over a KV cache (decode, extend) is always einsums.
ATTENTION_MODES = ("auto", "xla", "splash")
# The KV cache's layout: 'heads_major' keys [B, K, hd, S] and values [B, K, S, hd] (the CPU's score matmul reads
# slots contiguously), or 'slots_major' keys and values [B, S, K, hd] (TPU: a decode step's one-slot write of all KV
# heads is one contiguous row; in the other layout XLA copied every layer's whole cache into this one in every
# decode step; docs/tpu.md).
KV_CACHE_LAYOUTS = ("heads_major", "slots_major")


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
  """Shapes and numerics of a Qwen2-architecture decoder. Hashable: pass it as a static jit argument."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int = 0  # 0 -> hidden_size // num_heads
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  attention_bias: bool = True  # Qwen2 has q/k/v biases (no o bias)
  max_position_embeddings: int = 32768
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype of matmuls; norms, softmax and logits are float32
  remat: str = "none"  # 'none' | 'full' (save nothing per layer) | 'dots' (save matmul outputs)
  initializer_range: float = 0.02
  # Query rows per block of full-sequence causal attention (each block skips the keys after it; 0 = no blocks).
  # Performance only: results equal the unblocked computation up to float rounding.
  attention_block: int = 128
  attention: str = "auto"  # see ATTENTION_MODES
  kv_cache_layout: str = "heads_major"  # see KV_CACHE_LAYOUTS; speed only, results agree to float rounding

  def __post_init__(self):
    if self.head_dim == 0:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.attention_block < 0:
      raise ValueError(f"attention_block must be >= 0, got {self.attention_block}")
    if self.attention not in ATTENTION_MODES:
      raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
    if self.kv_cache_layout not in KV_CACHE_LAYOUTS:
      raise ValueError(f"kv_cache_layout must be one of {KV_CACHE_LAYOUTS}, got {self.kv_cache_layout!r}")
    if self.remat not in REMAT_MODES:
      raise ValueError(f"remat must be 'none', 'full' or 'dots', got {self.remat!r}")
    for f in ("param_dtype", "dtype"):
      if getattr(self, f) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{f} must be float32, bfloat16 or float16, got {getattr(self, f)!r}")

  def replace(self, **kw) -> "Qwen2Config":
    return dataclasses.replace(self, **kw)

  @property
  def num_params(self) -> int:
    d, f, l, v = self.hidden_size, self.intermediate_size, self.num_layers, self.vocab_size
    hd, h, k = self.head_dim, self.num_heads, self.num_kv_heads
    attn = d * hd * (h + 2 * k) + h * hd * d + (hd * (h + 2 * k) if self.attention_bias else 0)
    layer = attn + 3 * d * f + 2 * d
    return v * d * (1 if self.tie_word_embeddings else 2) + l * layer + d

  def flops_per_token(self, seq_len: int) -> float:
    """Forward FLOPs per token: 2 * matmul params (embedding lookup excluded) + attention scores/values."""
    matmul_params = self.num_params - self.vocab_size * self.hidden_size * (0 if self.tie_word_embeddings else 1)
    attn = 2 * 2 * self.num_layers * self.num_heads * self.head_dim * seq_len / 2  # causal: half the keys on average
    return 2.0 * matmul_params + attn


# Shapes of the public Qwen2.5 base checkpoints (from their config.json files).
PRESETS: dict[str, Qwen2Config] = {
    "qwen2.5-0.5b": Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                                num_heads=14, num_kv_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                                num_heads=12, num_kv_heads=2, tie_word_embeddings=True),
    "qwen2.5-3b": Qwen2Config(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36,
                              num_heads=16, num_kv_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                              num_heads=28, num_kv_heads=4, tie_word_embeddings=False),
}


def preset(name: str, **overrides) -> Qwen2Config:
  """A named preset (see PRESETS) with field overrides, e.g. preset('qwen2.5-3b', dtype='bfloat16')."""
  key = name.lower()
  if key not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[key].replace(**overrides)


SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "rope_theta", "tie_word_embeddings")


# Numerics a `model` config block sets on top of a preset or a checkpoint's shapes (dtype, param_dtype and remat
# always; the others where the block has them).
NUMERICS_FIELDS = ("dtype", "param_dtype", "remat", "attention_block", "attention", "kv_cache_layout")


def numerics_from_block(block) -> dict[str, Any]:
  """The NUMERICS_FIELDS a `model` config block sets, as Qwen2Config overrides."""
  return {f: block[f] for f in NUMERICS_FIELDS if f in block and block[f] is not None}


def config_from_block(block) -> Qwen2Config:
  """Qwen2Config from a `model` config block (configs/parts/model.py) that names a preset.

  Shape fields left None keep the preset's value; the numerics come from the block (numerics_from_block).
  (A block with hf_dir set is read by searche1_jax.models.hf.model_from_config.)
  """
  overrides = {f: block[f] for f in SHAPE_FIELDS if f in block and block[f] is not None}
  if "head_dim" not in overrides and ("hidden_size" in overrides or "num_heads" in overrides):
    overrides["head_dim"] = 0  # re-derive hidden_size // num_heads instead of keeping the preset's
  try:
    return preset(block.preset, **overrides, **numerics_from_block(block))
  except ValueError as e:
    raise ValueError(f"config model: {e}") from None


class KVCache(NamedTuple):
  """Keys and values, one array per layer, in the compute dtype; slot s holds position s.

  cfg.kv_cache_layout 'heads_major': k L arrays [B, K, hd, S], v L arrays [B, K, S, hd]; 'slots_major': both
  [B, S, K, hd]. `cache_axes(cfg)` names the axes; `cache_length(cfg, cache)` is S.
  """
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]


# Logical axes of each layer's (key, value) cache arrays per layout (see KVCache).
_CACHE_AXES = {
    "heads_major": (("batch", "kv_heads", "head_dim", "length"), ("batch", "kv_heads", "length", "head_dim")),
    "slots_major": (("batch", "length", "kv_heads", "head_dim"),) * 2,
}
# Einsum letters of the cache's logical axes.
_AXIS_LETTERS = {"batch": "b", "kv_heads": "k", "head_dim": "d", "length": "s"}


def cache_axes(cfg: Qwen2Config) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """Logical axes of the (key, value) arrays of cfg's cache."""
  return _CACHE_AXES[cfg.kv_cache_layout]


def cache_length(cfg: Qwen2Config, cache: KVCache) -> int:
  """Physical slots S of a cache."""
  return cache.v[0].shape[cache_axes(cfg)[1].index("length")]


def init_cache(cfg: Qwen2Config, batch: int, max_len: int) -> KVCache:
  sizes = {"batch": batch, "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "length": max_len}
  k_axes, v_axes = cache_axes(cfg)
  return KVCache(tuple(jnp.zeros([sizes[a] for a in k_axes], cfg.dtype) for _ in range(cfg.num_layers)),
                 tuple(jnp.zeros([sizes[a] for a in v_axes], cfg.dtype) for _ in range(cfg.num_layers)))


# ----------------------------------------------------------------------------------------------- layers

def _dense_init(cfg: Qwen2Config, names: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), names)


class RMSNorm(nn.Module):
  eps: float
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # As in HF: normalize in float32, cast back to the input dtype, then scale.
    return scale.astype(x.dtype) * x32.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, HF 'rotate_half' layout. x: [B, T, N, hd]; positions: [B, T] int."""
  hd = x.shape[-1]
  inv_freq = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
  cos = jnp.cos(freqs)[:, :, None, :]
  sin = jnp.sin(freqs)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _heads_major_queries(q, num_kv_heads, dtype):
  """[B, T, H, hd] -> [B, K, g, T, hd] (query heads grouped under their KV head)."""
  b, t, h, hd = q.shape
  return q.reshape(b, t, num_kv_heads, h // num_kv_heads, hd).transpose(0, 2, 3, 1, 4).astype(dtype)


def _attend(q, k, v, mask, k_spec: str, dtype, v_spec: str = "bksd"):
  """q [B, K, g, T, hd]; k per k_spec ('bksd', 'bkds' or 'bskd'); v per v_spec; mask [B, T, S] -> [B, K, g, T, hd]."""
  scale = 1.0 / np.sqrt(q.shape[-1])
  scores = jnp.einsum(f"bkgtd,{k_spec}->bkgts", q, k, preferred_element_type=jnp.float32) * scale
  scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
  return jnp.einsum(f"bkgts,{v_spec}->bkgtd", probs, v)


def _heads_last(out):
  """[B, K, g, T, hd] -> [B, T, H, hd]."""
  b, kv, g, t, hd = out.shape
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, hd)


def attention(q, k, v, token_mask, *, dtype, causal_block: int = 0, kernel: str = "xla"):
  """Causal grouped-query self-attention over this call's tokens. q [B, T, H, hd]; k, v [B, T, K, hd];
  token_mask [B, T] bool (True = real token; None = all real) -> [B, T, H, hd].

  A query attends the real keys at or before it. kernel: one of ATTENTION_MODES; 'splash' and 'auto' use
  the Pallas kernel where models/splash.py supports the length, the einsum path otherwise.
  """
  if token_mask is None:
    token_mask = jnp.ones(q.shape[:2], bool)
  einsum = functools.partial(_einsum_self_attention, dtype=dtype, causal_block=causal_block)
  if kernel == "xla" or not splash.supported(q.shape[1]):
    return einsum(q, k, v, token_mask)
  return splash.attention(q, k, v, token_mask, dtype=dtype, fallback=einsum if kernel == "auto" else None)


def _einsum_self_attention(q, k, v, token_mask, *, dtype, causal_block: int):
  """attention() with einsums. Scores and softmax are float32; the two matmuls run in `dtype`. With
  causal_block > 0 queries are processed in blocks of that many rows and each block only scores the keys up
  to its last row (the rest are masked anyway), which skips about half the attention work; results equal the
  unblocked computation."""
  t = q.shape[1]
  key_mask = jnp.tril(jnp.ones((t, t), bool))[None] & token_mask.astype(bool)[:, None, :]
  # Heads-major layouts ([B, K, g, T, hd], [B, K, S, hd]) make both matmuls plain batched matmuls whose outputs
  # need no transpose, with S on the minor axis for the softmax.
  q = _heads_major_queries(q, k.shape[2], dtype)
  k = k.astype(dtype).transpose(0, 2, 1, 3)
  v = v.astype(dtype).transpose(0, 2, 1, 3)
  if causal_block <= 0 or causal_block >= t:
    out = _attend(q, k, v, key_mask, "bksd", dtype)
  else:
    outs = []
    for start in range(0, t, causal_block):
      end = min(start + causal_block, t)
      outs.append(_attend(q[:, :, :, start:end], k[:, :, :end], v[:, :, :end], key_mask[:, start:end, :end],
                          "bksd", dtype))
    out = jnp.concatenate(outs, axis=3)
  return _heads_last(out)


def _write_cache(c, x, starts, slot_axis: int):
  """Write x (one row's T new slots on `slot_axis`, per row b) into c at slots starts[b] .. starts[b] + T - 1.

  c: [B, ...] one layer's cache; x: like c with T slots. Slots past the cache end are dropped (rows that
  take nothing pass starts = S). One slot per row (decoding) is a per-row dynamic_update_slice -- much
  cheaper than a scatter -- that writes the old value back where the slot is out of range (dynamic slices
  clamp their start, they never drop); several slots (prefill, extend) use a dropping scatter.
  """
  s = c.shape[slot_axis]
  if x.shape[slot_axis] == 1:
    def one_row(c_row, x_row, start):
      idx = [0] * c_row.ndim
      idx[slot_axis - 1] = jnp.minimum(start, s - 1)
      old = jax.lax.dynamic_slice(c_row, idx, x_row.shape)
      return jax.lax.dynamic_update_slice(c_row, jnp.where(start < s, x_row, old), idx)
    return jax.vmap(one_row)(c, x.astype(c.dtype), starts)
  t = x.shape[slot_axis]
  rows = jnp.arange(c.shape[0])[:, None]
  slots = starts[:, None] + jnp.arange(t)[None, :]
  c_m = jnp.moveaxis(c, slot_axis, 1)  # [B, S, ...]
  c_m = c_m.at[rows, slots].set(jnp.moveaxis(x, slot_axis, 1).astype(c.dtype), mode="drop")
  return jnp.moveaxis(c_m, 1, slot_axis)


class Attention(nn.Module):
  cfg: Qwen2Config

  def _proj(self, name, heads, axes):
    cfg = self.cfg
    return nn.DenseGeneral(
        features=(heads, cfg.head_dim), use_bias=cfg.attention_bias, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype, name=name, kernel_init=_dense_init(cfg, ("embed", axes, "head_dim")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes, "head_dim")))

  @nn.compact
  def __call__(self, x, positions, mask, cache_kv=None, write_index=None):
    """x: [B, T, D]; positions: [B, T]; mask: [B, T] bool (True = real token) for causal self-attention over
    this call's tokens, or [B, T, S] bool (True = may attend) for attention over all S cache slots.

    With `cache_kv` = (k [B, K, hd, S], v [B, K, S, hd]) the new keys/values are written at slots
    write_index[b] + t; a [B, T] mask then means a prefill from slot 0 (the cache holds nothing else to attend).
    Returns (out [B, T, D], updated (k, v) or None).
    """
    cfg = self.cfg
    q = rope(self._proj("q", cfg.num_heads, "heads")(x), positions, cfg.rope_theta)
    k = rope(self._proj("k", cfg.num_kv_heads, "kv_heads")(x), positions, cfg.rope_theta)
    v = self._proj("v", cfg.num_kv_heads, "kv_heads")(x)
    new_kv = None
    if cache_kv is not None:
      if cfg.kv_cache_layout == "heads_major":
        ck = _write_cache(cache_kv[0], k.transpose(0, 2, 3, 1), write_index, 3)  # [B, K, hd, S]
        cv = _write_cache(cache_kv[1], v.transpose(0, 2, 1, 3), write_index, 2)  # [B, K, S, hd]
      else:  # k, v: [B, T, K, hd] already
        ck = _write_cache(cache_kv[0], k, write_index, 1)
        cv = _write_cache(cache_kv[1], v, write_index, 1)
      new_kv = (ck, cv)
    if mask.ndim == 2:
      out = attention(q, k, v, mask, dtype=cfg.dtype, causal_block=cfg.attention_block, kernel=cfg.attention)
    else:
      q = _heads_major_queries(q, cfg.num_kv_heads, cfg.dtype)
      ck, cv = new_kv
      k_spec, v_spec = ("".join(_AXIS_LETTERS[n] for n in axes) for axes in cache_axes(cfg))
      out = _heads_last(_attend(q, ck.astype(cfg.dtype), cv.astype(cfg.dtype), mask, k_spec, cfg.dtype, v_spec))
    out = nn.DenseGeneral(features=cfg.hidden_size, axis=(-2, -1), use_bias=False, dtype=cfg.dtype,
                          param_dtype=cfg.param_dtype, name="o",
                          kernel_init=_dense_init(cfg, ("heads", "head_dim", "embed")))(out)
    return out, new_kv


class MLP(nn.Module):
  cfg: Qwen2Config

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dense = functools.partial(nn.Dense, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    gate = dense(cfg.intermediate_size, name="gate", kernel_init=_dense_init(cfg, ("embed", "mlp")))(x)
    up = dense(cfg.intermediate_size, name="up", kernel_init=_dense_init(cfg, ("embed", "mlp")))(x)
    return dense(cfg.hidden_size, name="down", kernel_init=_dense_init(cfg, ("mlp", "embed")))(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
  cfg: Qwen2Config

  @nn.compact
  def __call__(self, x, positions, mask, cache_kv=None, write_index=None):
    cfg = self.cfg
    h, new_kv = Attention(cfg, name="attn")(
        RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="input_norm")(x), positions, mask, cache_kv,
        write_index)
    x = x + h
    x = x + MLP(cfg, name="mlp")(RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="post_norm")(x))
    return x, new_kv


# ----------------------------------------------------------------------------------------------- params

def _embed_module(cfg):
  return nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  embedding_init=_dense_init(cfg, ("vocab", "embed")))


def _boxed_init(cfg: Qwen2Config, rng: jax.Array) -> Params:
  """Params with nn.LogicallyPartitioned boxes (logical axis names attached)."""
  k_embed, k_layers, k_head = jax.random.split(rng, 3)
  x = jnp.zeros((1, 1, cfg.hidden_size), cfg.dtype)
  pos = jnp.zeros((1, 1), jnp.int32)
  mask = jnp.ones((1, 1), bool)
  layer_init = lambda k: DecoderLayer(cfg).init(k, x, pos, mask)["params"]
  layers = jax.vmap(layer_init)(jax.random.split(k_layers, cfg.num_layers))
  # jax.vmap stacks the boxed values but not their names: prepend the 'layers' axis.
  layers = jax.tree.map(
      lambda b: nn.LogicallyPartitioned(b.value, ("layers",) + tuple(b.names), mesh=b.mesh, rules=b.rules),
      layers, is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned))
  params = {
      "embed": _embed_module(cfg).init(k_embed, jnp.zeros((1, 1), jnp.int32))["params"],
      "layers": layers,
      "final_norm": RMSNorm(cfg.rms_norm_eps, cfg.param_dtype).init(k_head, x)["params"],
  }
  if not cfg.tie_word_embeddings:
    params["lm_head"] = nn.Dense(cfg.vocab_size, use_bias=False, param_dtype=cfg.param_dtype,
                                 kernel_init=_dense_init(cfg, ("embed", "vocab"))).init(k_head, x)["params"]
  return params


@functools.partial(jax.jit, static_argnames=("cfg",))
def init_params(cfg: Qwen2Config, rng: jax.Array) -> Params:
  """Random parameters (normal(initializer_range) kernels, zero biases, unit norms)."""
  return nn.unbox(_boxed_init(cfg, rng))


def param_logical_axes(cfg: Qwen2Config) -> Params:
  """A pytree like the params whose leaves are tuples of logical axis names (one per array dim)."""
  boxed = jax.eval_shape(functools.partial(_boxed_init, cfg), jax.random.key(0))
  return jax.tree.map(lambda b: tuple(b.names), boxed, is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned))


def head_kernel(params: Params, cfg: Qwen2Config) -> jax.Array:
  """The output projection [D, V] (the transposed embedding when tied)."""
  if cfg.tie_word_embeddings:
    return params["embed"]["embedding"].T
  return params["lm_head"]["kernel"]


# ----------------------------------------------------------------------------------------------- forward

def _run_layers(params: Params, cfg: Qwen2Config, x, positions, mask, cache: KVCache | None,
                write_index=None):
  """mask: as Attention's ([B, T] token mask or [B, T, S] key mask over the cache)."""
  layer = DecoderLayer(cfg)

  if cache is None:
    def body(h, layer_params):
      h = shd.constrain(h, ("batch", "length", None))
      h, _ = layer.apply({"params": layer_params}, h, positions, mask)
      return shd.constrain(h, ("batch", "length", None)), None
    if cfg.remat != "none":
      policy = (jax.checkpoint_policies.nothing_saveable if cfg.remat == "full"
                else jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
      body = jax.checkpoint(body, policy=policy)
    x, _ = jax.lax.scan(body, x, params["layers"])
    return x, None

  # With a cache the layers are unrolled: each updates its own cache arrays in place (inside a scan the
  # per-layer slices of a stacked cache are copied in and out of the carry on every step).
  # Activations are pinned batch-sharded (as in the scan above), so XLA gathers each layer's fsdp-sharded weights
  # rather than all-reducing partial matmul sums over the sharded embed axis.
  ks, vs = [], []
  for i in range(cfg.num_layers):
    layer_params = jax.tree.map(lambda a: a[i], params["layers"])
    x, (lk, lv) = layer.apply({"params": layer_params}, shd.constrain(x, ("batch", "length", None)), positions,
                              mask, (cache.k[i], cache.v[i]), write_index)
    x = shd.constrain(x, ("batch", "length", None))
    ks.append(lk)
    vs.append(lv)
  return x, KVCache(tuple(ks), tuple(vs))


def _positions_and_mask(tokens, positions, attention_mask):
  b, t = tokens.shape
  if attention_mask is None:
    attention_mask = jnp.ones((b, t), bool)
  attention_mask = attention_mask.astype(bool)
  if positions is None:
    # Left padding: real tokens count positions from 0.
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
  return positions.astype(jnp.int32), attention_mask


@functools.partial(jax.jit, static_argnames=("cfg",))
def hidden_states(params: Params, cfg: Qwen2Config, tokens: jax.Array, positions: jax.Array | None = None,
                  attention_mask: jax.Array | None = None) -> jax.Array:
  """Final-norm hidden states [B, T, D] (compute dtype) for tokens [B, T] int.

  attention_mask [B, T] (1 = real token) masks padded keys; positions default to the count of real tokens
  before each one, so left padding is handled.
  """
  positions, token_mask = _positions_and_mask(tokens, positions, attention_mask)
  x = _embed_module(cfg).apply({"params": params["embed"]}, tokens)
  x, _ = _run_layers(params, cfg, x, positions, token_mask, None)
  return RMSNorm(cfg.rms_norm_eps, cfg.param_dtype).apply({"params": params["final_norm"]}, x)


def logits_from_hidden(params: Params, cfg: Qwen2Config, hidden: jax.Array) -> jax.Array:
  """[..., D] -> float32 logits [..., V]."""
  head = head_kernel(params, cfg)
  return jnp.einsum("...d,dv->...v", hidden.astype(cfg.dtype), head.astype(cfg.dtype),
                    preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("cfg",))
def forward(params: Params, cfg: Qwen2Config, tokens: jax.Array, positions: jax.Array | None = None,
            attention_mask: jax.Array | None = None) -> jax.Array:
  """Float32 logits [B, T, V]. For training use the chunked log-prob path instead (no [B, T, V] array)."""
  return logits_from_hidden(params, cfg, hidden_states(params, cfg, tokens, positions, attention_mask))


def forward_with_cache(params: Params, cfg: Qwen2Config, tokens: jax.Array, cache: KVCache,
                       write_index: jax.Array, fresh: bool = False) -> tuple[jax.Array, KVCache]:
  """Run T new tokens per sequence against the KV cache; the building block of prefill, extend and decode.

  tokens [B, T] are placed at positions write_index[b] + t (slot == position). Padding tokens past a
  sequence's real length may be written too: they sit above that sequence's length and are overwritten by
  the next real token before any query can attend to them.
  fresh (static): every row that takes tokens starts at slot 0 (a prefill; rows passing write_index = S take
  nothing), so attention is causal self-attention over the T new tokens (the splash kernel where configured)
  instead of scores over all S slots.
  Returns (hidden [B, T, D] after the final norm, updated cache).
  """
  b, t = tokens.shape
  positions = (write_index[:, None] + jnp.arange(t)[None, :]).astype(jnp.int32)
  if fresh:
    mask = jnp.ones((b, t), bool)
  else:
    mask = jnp.arange(cache_length(cfg, cache))[None, None, :] <= positions[:, :, None]  # [B, T, S]
  x = _embed_module(cfg).apply({"params": params["embed"]}, tokens)
  x, cache = _run_layers(params, cfg, x, positions, mask, cache, write_index.astype(jnp.int32))
  x = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype).apply({"params": params["final_norm"]}, x)
  return x, cache


# ----------------------------------------------------------------------------------------------- sharding

def param_shardings(cfg, mesh: jax.sharding.Mesh, rules=shd.DEFAULT_RULES, params=None):
  """NamedSharding per parameter of a Qwen2 model (a pytree like the params)."""
  logical = param_logical_axes(cfg)
  shapes = params if params is not None else jax.eval_shape(functools.partial(init_params, cfg),
                                                             jax.random.key(0))
  return jax.tree.map(lambda names, x: shd.named_sharding(mesh, x.shape, names, rules), logical, shapes,
                      is_leaf=lambda n: isinstance(n, tuple))


def shard_params(params, cfg, mesh: jax.sharding.Mesh, rules=shd.DEFAULT_RULES):
  """Place each parameter in the layout the rules give it."""
  return jax.device_put(params, param_shardings(cfg, mesh, rules, params))


def init_sharded_params(cfg, rng: jax.Array, mesh: jax.sharding.Mesh, rules=shd.DEFAULT_RULES):
  """init_params created directly in its sharded layout (no device ever holds the full model)."""
  init = jax.jit(functools.partial(init_params, cfg), out_shardings=param_shardings(cfg, mesh, rules))
  return init(rng)
