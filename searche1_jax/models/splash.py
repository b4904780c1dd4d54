"""Causal self-attention through Pallas' TPU splash-attention kernel (flash attention: no [T, T] scores in HBM).

The einsum path (qwen2.attention) materializes float32 scores [B, K, g, T, T]; at a few thousand tokens those
are the largest temporaries of a training micro-batch. The kernel streams key blocks through VMEM with an online
softmax instead, and its backward recomputes the probabilities block by block.

Masking: the kernel's static causal mask, and padding as segment ids (1 = real token, 0 = padding), so a real
query attends exactly the real keys at or before it -- the einsum path's mask. Padding queries attend the
padding keys before them (the einsum path gives them uniform weights instead); nothing reads those rows.

Sharding: the kernel sees one device's data, so under `sharding.activation_mesh` it runs inside a shard_map
over the batch axes (and the head axes when query and KV heads shard alike); elsewhere it is called directly.
On a platform other than TPU it runs in Pallas' interpreter (slow; for tests).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as sa

from searche1_jax import sharding as shd

LANES = 128  # the kernel's key blocks are multiples of the TPU lane width
_BLOCKS = (512, 256, 128)  # largest first: the block edge used for queries and keys


def supported(seq_len: int) -> bool:
  """Whether self-attention over seq_len tokens can run through the kernel (whole blocks of keys)."""
  return seq_len >= LANES and seq_len % LANES == 0


def _block(seq_len: int) -> int:
  return next(b for b in _BLOCKS if seq_len % b == 0)


@functools.lru_cache(maxsize=None)
def _kernel(seq_len: int, num_heads: int, interpret: bool):
  """The splash kernel for causal attention over seq_len tokens with num_heads query heads (one example)."""
  b = _block(seq_len)
  sizes = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                        block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  mask = sa.MultiHeadMask([sa.CausalMask((seq_len, seq_len)) for _ in range(num_heads)])
  with jax.ensure_compile_time_eval():
    return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _local_attention(q, k, v, segments, *, interpret: bool):
  """One shard: q [B, H, T, hd] (already scaled), k, v [B, K, T, hd], segments [B, T] int32 -> [B, H, T, hd]."""
  kernel = _kernel(q.shape[2], q.shape[1], interpret)
  return jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sa.SegmentIds(q=s1, kv=s1)))(
      q, k, v, segments)


def _specs(q_shape, kv_shape, mesh, rules):
  """PartitionSpecs (q/out, k/v, segments) for the shard_map: batch over its axes; heads over theirs when the
  query and KV heads split over the same mesh axes (each shard then keeps whole query groups)."""
  q_spec = shd.spec_for_shape(q_shape, ("batch", "heads", None, None), mesh, rules)
  kv_spec = shd.spec_for_shape(kv_shape, ("batch", "kv_heads", None, None), mesh, rules)
  if q_spec[1] != kv_spec[1]:
    q_spec = jax.sharding.PartitionSpec(q_spec[0], None, None, None)
    kv_spec = jax.sharding.PartitionSpec(q_spec[0], None, None, None)
  return q_spec, kv_spec, jax.sharding.PartitionSpec(q_spec[0], None)


def _sharded(q, k, v, segments, *, interpret: bool):
  fn = functools.partial(_local_attention, interpret=interpret)
  mesh, rules = jax.sharding.get_abstract_mesh(), shd.activation_rules()
  if mesh.empty or rules is None:
    return fn(q, k, v, segments)
  q_spec, kv_spec, seg_spec = _specs(q.shape, k.shape, mesh, rules)
  return jax.shard_map(fn, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec, check_vma=False)(
      q, k, v, segments)


def attention(q, k, v, token_mask, *, dtype, fallback=None):
  """Causal grouped-query self-attention. q [B, T, H, hd]; k, v [B, T, K, hd]; token_mask [B, T] bool
  (True = real token) -> [B, T, H, hd] in `dtype`. Requires supported(T).

  Lowered for TPU the kernel runs compiled (Mosaic). Lowered for another platform `fallback(q, k, v,
  token_mask)` runs instead, or, when it is None, the kernel in Pallas' interpreter.
  """
  t, hd = q.shape[1], q.shape[3]
  if not supported(t):
    raise ValueError(f"splash attention needs a sequence length that is a multiple of {LANES}, got {t}")
  scale = 1.0 / np.sqrt(hd)

  def kernel(interpret):
    def run(q, k, v, token_mask):
      qh = (q.astype(jnp.float32) * scale).astype(dtype).transpose(0, 2, 1, 3)
      kh, vh = (a.astype(dtype).transpose(0, 2, 1, 3) for a in (k, v))
      out = _sharded(qh, kh, vh, token_mask.astype(jnp.int32), interpret=interpret)
      return out.transpose(0, 2, 1, 3).astype(dtype)
    return run

  return jax.lax.platform_dependent(q, k, v, token_mask.astype(bool), tpu=kernel(False),
                                    default=fallback if fallback is not None else kernel(True))
