"""Per-token log-probs from hidden states, chunked over time (no [B, T, V] logits array ever exists), the batch
fields every loss reads, the loss contract, and the plain language-modelling loss.

Qwen2.5's vocabulary has 151,936 entries; a full [B, T, V] float32 logits array for 8 x 4096 tokens would be
~20 GB. We project one time chunk at a time inside a rematerialized scan, so forward and backward hold
[B, chunk, V] at most.

Only the scored positions need the vocabulary projection: with `agent.trajectory.packed_targets` a batch names
them, and `token_logprobs` projects just those hidden states ([B, K] with K ~ the most policy tokens in a
row, instead of [B, T] -- prompts and retrieved passages are most of a search trajectory's tokens).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from searche1_jax.models import qwen2

# The contract of every loss with the generic train step (train/steps.py):
#   loss_fn(params, micro_batch, ref_params_or_None) -> (loss_sum, denominator, metrics), loss = sum / denominator.
LossFn = Callable[[Any, Mapping[str, jax.Array], Any], tuple[jax.Array, jax.Array, dict]]


def _pad_time(x, multiple, value=0):
  t = x.shape[1]
  pad = (-t) % multiple
  if pad == 0:
    return x
  widths = [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
  return jnp.pad(x, widths, constant_values=value)


def chunked_time_map(fn, arrays, chunk_size: int):
  """Apply fn(*chunks) -> tuple of [B, c] arrays over time chunks of [B, T, ...] arrays; returns [B, T] outputs.

  fn is rematerialized per chunk, so its [B, c, V] intermediates are recomputed in the backward pass.
  """
  t = arrays[0].shape[1]
  chunk_size = min(chunk_size, t)
  n = -(-t // chunk_size)
  padded = [_pad_time(a, chunk_size) for a in arrays]
  # [B, n*c, ...] -> [n, B, c, ...] for the scan.
  stacked = [jnp.moveaxis(a.reshape((a.shape[0], n, chunk_size) + a.shape[2:]), 1, 0) for a in padded]
  step = jax.checkpoint(lambda carry, xs: (carry, fn(*xs)))
  _, outs = jax.lax.scan(step, None, stacked)
  return tuple(jnp.moveaxis(o, 0, 1).reshape((o.shape[1], n * chunk_size) + o.shape[3:])[:, :t] for o in outs)


def logprobs_from_hidden(hidden: jax.Array, head: jax.Array, targets: jax.Array, mask: jax.Array | None = None,
                         *, chunk_size: int = 128, temperature: float = 1.0, compute_dtype=None,
                         return_entropy: bool = False):
  """log p(targets) per position from hidden states.

  Args:
    hidden: [B, T, D] final-norm hidden states; position t predicts targets[:, t].
    head: [D, V] output projection.
    targets: [B, T] int token ids.
    mask: [B, T]; positions with mask 0 return 0 (and entropy 0).
    chunk_size: time steps projected at once.
    temperature: logits are divided by it (1.0 = the model's own distribution).
  Returns:
    logp [B, T] float32 (and entropy [B, T] float32 in nats if return_entropy).
  """
  dtype = compute_dtype or hidden.dtype

  def chunk(h, tgt):
    logits = jnp.einsum("bcd,dv->bcv", h.astype(dtype), head.astype(dtype), preferred_element_type=jnp.float32)
    logits = logits / temperature
    lse = jax.nn.logsumexp(logits, axis=-1)
    logp = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0] - lse
    if not return_entropy:
      return (logp,)
    # -sum p log p on the normalized log-probs: no cancellation between two large numbers (lse, E[logit]).
    logp_all = logits - lse[..., None]
    return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)

  outs = chunked_time_map(chunk, [hidden, targets.astype(jnp.int32)], chunk_size)
  if mask is not None:
    outs = tuple(jnp.where(mask.astype(bool), o, 0.0) for o in outs)
  return outs if return_entropy else outs[0]


@functools.partial(jax.jit, static_argnames=("cfg", "chunk_size", "return_entropy"))
def token_logprobs(params, cfg: qwen2.Qwen2Config, tokens: jax.Array, targets: jax.Array,
                   mask: jax.Array | None = None, chunk_size: int = 128, *, positions=None, attention_mask=None,
                   temperature: float = 1.0, return_entropy: bool = False, target_index=None, target_valid=None):
  """log p(targets[b, t] | tokens[b, :t+1]) for a causal LM, without [B, T, V] logits.

  tokens, targets, mask: [B, T] (targets are usually tokens shifted left by one). Returns float32 [B, T]
  (and entropy [B, T] when return_entropy). Equal to log_softmax(forward(...))[targets] up to float error.
  target_index / target_valid [B, K] (see agent.trajectory.packed_targets): only those positions are scored,
  the others are 0 (they must cover every position where mask is 1).
  """
  hidden = qwen2.hidden_states(params, cfg, tokens, positions, attention_mask)
  return _score_hidden(params, cfg, hidden, targets, mask, chunk_size, temperature, return_entropy, target_index,
                       target_valid)


def _score_hidden(params, cfg: qwen2.Qwen2Config, hidden, targets, mask, chunk_size, temperature, return_entropy,
                  target_index, target_valid):
  """token_logprobs from the hidden states hidden [B, T, D] that predict targets [B, T]."""
  head = qwen2.head_kernel(params, cfg)
  kw = dict(chunk_size=chunk_size, temperature=temperature, compute_dtype=cfg.dtype, return_entropy=return_entropy)
  if target_index is None:
    return logprobs_from_hidden(hidden, head, targets, mask, **kw)
  # Project only the packed positions, then put the results back in place ([B, K] -> [B, T]).
  index = target_index.astype(jnp.int32)
  valid = target_valid.astype(bool)
  picked = jnp.take_along_axis(hidden, index[..., None], axis=1)
  outs = logprobs_from_hidden(picked, head, jnp.take_along_axis(targets, index, axis=1), valid, **kw)
  rows = jnp.arange(targets.shape[0])[:, None]
  unpack = lambda o: jnp.zeros(targets.shape, jnp.float32).at[rows, index].add(o)  # o is 0 where not valid
  outs = tuple(unpack(o) for o in (outs if return_entropy else (outs,)))
  if mask is not None:
    outs = tuple(jnp.where(mask.astype(bool), o, 0.0) for o in outs)
  return outs if return_entropy else outs[0]


# ----------------------------------------------------------------------------------------------- batches

BATCH_FIELDS = {"tokens": 2, "attention_mask": 2, "loss_mask": 2}
# Optional: the scored positions packed per row (agent.trajectory.packed_targets); only they are projected.
PACKED_FIELDS = ("target_index", "target_valid")


def check_fields(batch, fields: Mapping[str, int], where: str):
  """Clear errors for a batch missing `fields` (name -> ndim, [B, T] or [B]) or holding them in other shapes."""
  for name, ndim in fields.items():
    if name not in batch:
      raise ValueError(f"{where}: batch has no field {name!r} (have {sorted(batch)}); see the batch format in "
                       "searche1_jax/rl/grpo_loss.py")
  b, t = batch["tokens"].shape if jnp.ndim(batch["tokens"]) == 2 else (None, None)
  if b is None:
    raise ValueError(f"{where}: batch['tokens'] must be [B, T], got shape {jnp.shape(batch['tokens'])}")
  if t < 2:
    raise ValueError(f"{where}: batch['tokens'] needs T >= 2 (one input and one target), got T={t}")
  for name, ndim in fields.items():
    want = (b, t) if ndim == 2 else (b,)
    if tuple(jnp.shape(batch[name])) != want:
      raise ValueError(f"{where}: batch[{name!r}] has shape {tuple(jnp.shape(batch[name]))}, expected {want}")


def shifted_logprobs(params, cfg: qwen2.Qwen2Config, batch, *, chunk_size: int, temperature: float = 1.0,
                     return_entropy: bool = False):
  """log p(tokens[:, t+1] | tokens[:, :t+1]) for t < T-1 on policy tokens: [B, T-1] float32 (0 where
  loss_mask[:, 1:] is 0), and the entropy [B, T-1] in nats if return_entropy. Chunked: no [B, T, V] array.
  A batch with target_index / target_valid (agent.trajectory.packed_targets) projects only those positions.

  The model runs over all T tokens and the last hidden state (which predicts nothing) is dropped: causal
  attention leaves the others as over tokens[:, :-1], and the attention length stays the batch's bucket, which
  the splash kernel needs (a multiple of 128)."""
  tokens = batch["tokens"].astype(jnp.int32)
  hidden = qwen2.hidden_states(params, cfg, tokens, attention_mask=batch["attention_mask"])[:, :-1]
  return _score_hidden(params, cfg, hidden, tokens[:, 1:], batch["loss_mask"][:, 1:], chunk_size, temperature,
                       return_entropy, batch.get("target_index"), batch.get("target_valid"))


def align_to_tokens(x: jax.Array) -> jax.Array:
  """[B, T-1] per-target values -> [B, T] aligned with tokens (column 0, which is never a target, is 0)."""
  return jnp.pad(x, ((0, 0), (1, 0)))


def lm_loss_fn(cfg: qwen2.Qwen2Config, chunk_size: int = 128) -> LossFn:
  """Token-level language-modelling loss for warm start: loss_sum = -sum log p(token) over loss_mask[:, 1:],
  denominator = the number of those tokens. Batch: tokens, attention_mask, loss_mask (format above).
  Metrics: tokens, nll (mean negative log-likelihood per token, nats)."""

  def loss_fn(params, batch, ref_params):
    del ref_params
    check_fields(batch, BATCH_FIELDS, "lm loss")
    logp = shifted_logprobs(params, cfg, batch, chunk_size=chunk_size)
    n = batch["loss_mask"][:, 1:].astype(bool).sum().astype(jnp.float32)
    loss_sum = -jnp.sum(logp)  # logp is 0 off the mask
    return loss_sum, n, {"tokens": n, "nll": (jax.lax.stop_gradient(loss_sum), n)}

  return loss_fn
