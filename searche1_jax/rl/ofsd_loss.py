"""OFSD student losses for the generic train step (`train.steps.make_train_step`), and the on-policy variant.

Every loss follows the step contract `loss_fn(params, batch, ref_params_or_None) -> (loss_sum, denominator,
metrics)`. Per-token arrays are aligned with the STUDENT tokens (entry t belongs to token t; token 0 is never a
target); the student is scored from inputs tokens[:, :-1] on targets tokens[:, 1:] with distill_mask[:, 1:].

Batch fields
  tokens, attention_mask, distill_mask   [B, T]       student ids (plain prompt + response), 1 on real tokens,
                                                       1 on tokens that carry the loss
  teacher_topk_ids, teacher_topk_logprobs [B, T, k]   offline: the teacher's top-k next-token ids / log-probs
                                                       for student token t (int32 / float, 0 where not distilled)
  teacher_tokens, teacher_attention_mask [B, Tt]      on the fly: the teacher's ids (privileged prompt + the same
                                                       response ids)
  teacher_pos                            [B, T]       on the fly: teacher index aligned with each student index
                                                       (clipped to >= 0; only positions that predict a distilled
                                                       token matter)
  sd_weight                              [B]          on-policy only: per-token weight of a row's SD term (0 = off)
  target_index, target_valid             [B, K]       offline, optional: packed_targets(distill_mask), the
                                                       distilled positions; the losses then project only those

The teacher is always under stop-gradient. No [B, T, V] array exists: the divergences run from hidden states in
rematerialized time chunks (`rl.ofsd.chunked_*`, `rl.logprobs.chunked_time_map`).

  ofsd_topk_loss_fn: OFFLINE from stored top-k targets: loss_sum = sum over distilled tokens of the per-token
    divergence (top-k + tail bucket), denominator = number of distilled tokens.
  ofsd_full_loss_fn: OFFLINE with the full vocabulary, recomputed on the fly from the frozen snapshot
    (TrainState.ref_params), same sum / count.
  grpo_sd_loss_fn: ON-POLICY, L = L_GRPO + alpha * L_SD every GRPO step, the teacher being the CURRENT params
    under stop-gradient with the best sibling of the group as context. The GRPO (sum, denominator) is kept and
    the SD sum enters as alpha * sum_b sd_weight[b] * sum_t div[b, t]; the host sets sd_weight = N_grpo / N_sd
    (the whole batch's GRPO denominator over its distilled-token count, `on_policy_sd_fields`), so the step's
    division gives exactly L_GRPO + alpha * mean_sd for any number of micro-batches. sd_weight = 0 before
    ofsd.warmup_steps and on rows without a reference.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from searche1_jax import schema
from searche1_jax.models import qwen2
from searche1_jax.rl import grpo, ofsd
from searche1_jax.rl.logprobs import chunked_time_map
from searche1_jax.rl import grpo_loss

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class DivergenceOptions:
  """The divergence part of the `ofsd` block (configs/parts/ofsd.py), declared once (searche1_jax/schema.py).
  top_k None (or 0 in a block) = full vocabulary."""
  kind: str = schema.option("str", "forward_kl", choices=ofsd.KINDS)
  beta: float = schema.option("float", 0.5, lo=0.0, hi=1.0)
  top_k: int | None = schema.option("int", None, lo=0, none_ok=True)
  temperature: float = schema.option("float", 1.0, lo=0.0, lo_open=True)
  chunk_size: int = schema.option("int", 128, lo=1)
  alpha: float = schema.option("float", 1e-3, lo=0.0)
  warmup_steps: int = schema.option("int", 0, lo=0)

  def __post_init__(self):
    schema.check(self, "ofsd")

  @classmethod
  def _normalize(cls, v: dict) -> dict:
    if "top_k" in v and not v["top_k"]:
      v["top_k"] = None
    return v

  @classmethod
  def from_config(cls, block) -> "DivergenceOptions":
    return schema.build(cls, block, "ofsd", "configs/parts/ofsd.py")


# ----------------------------------------------------------------------------------------------- pieces


def _require(batch: Mapping, fields: Mapping[str, int], where: str):
  """Clear errors for missing fields or wrong ranks (fields: name -> ndim)."""
  for name, ndim in fields.items():
    if name not in batch:
      raise ValueError(f"{where}: batch has no field {name!r} (have {sorted(batch)}); see searche1_jax/rl/ofsd_loss.py")
    if jnp.ndim(batch[name]) != ndim:
      raise ValueError(f"{where}: batch[{name!r}] must have {ndim} dims, got shape {jnp.shape(batch[name])}")
  b, t = jnp.shape(batch["tokens"])
  if t < 2:
    raise ValueError(f"{where}: batch['tokens'] needs T >= 2, got T={t}")
  for name in fields:
    if jnp.shape(batch[name])[0] != b:
      raise ValueError(f"{where}: batch[{name!r}] has {jnp.shape(batch[name])[0]} rows, tokens has {b}")


_STUDENT_FIELDS = {"tokens": 2, "attention_mask": 2, "distill_mask": 2}
_TEACHER_FIELDS = {"teacher_tokens": 2, "teacher_attention_mask": 2, "teacher_pos": 2}


def student_hidden(params, cfg: qwen2.Qwen2Config, batch) -> jax.Array:
  """[B, T-1, D] hidden states of the student inputs tokens[:, :-1] (position t predicts token t+1).

  The model runs over all T tokens and the last position is dropped (causal: the others are unchanged), so the
  attention length stays the batch's bucket, which the splash kernel needs (a multiple of 128)."""
  tokens = batch["tokens"].astype(jnp.int32)
  return qwen2.hidden_states(params, cfg, tokens, attention_mask=batch["attention_mask"])[:, :-1]


def aligned_teacher_hidden(teacher_params, cfg: qwen2.Qwen2Config, batch, index: jax.Array | None = None) -> jax.Array:
  """[B, T-1, D] teacher hidden states at the positions aligned with student inputs 0..T-2, stop-gradient.

  The teacher hidden at teacher_pos[t] predicts the teacher token aligned with student token t+1. With `index`
  [B, K] (student input positions, see distilled_positions) only those K positions: [B, K, D].
  """
  teacher_params = jax.lax.stop_gradient(teacher_params)
  h = qwen2.hidden_states(teacher_params, cfg, batch["teacher_tokens"].astype(jnp.int32),
                          attention_mask=batch["teacher_attention_mask"])
  pos = batch["teacher_pos"][:, :-1].astype(jnp.int32)
  if index is not None:
    pos = jnp.take_along_axis(pos, index, axis=1)
  idx = jnp.clip(pos, 0, h.shape[1] - 1)
  return jax.lax.stop_gradient(jnp.take_along_axis(h, idx[..., None], axis=1))


def distilled_positions(batch) -> tuple[jax.Array | None, jax.Array]:
  """(index, mask) of the student input positions that carry the loss.

  Without batch['target_index'] (agent.trajectory.packed_targets(distill_mask)): index None and mask =
  distill_mask[:, 1:] [B, T-1]. With it: index = target_index [B, K] and mask [B, K], so the losses gather K
  hidden states per row and project only those onto the vocabulary (same sums).
  """
  mask = batch["distill_mask"][:, 1:].astype(bool)
  if "target_index" not in batch:
    return None, mask
  index = batch["target_index"].astype(jnp.int32)
  return index, batch["target_valid"].astype(bool) & jnp.take_along_axis(mask, index, axis=1)


def _gather(x: jax.Array, index: jax.Array | None) -> jax.Array:
  """x [B, T, ...] at index [B, K] along time -> [B, K, ...] (x itself when index is None)."""
  if index is None:
    return x
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _chunk_logits(hidden: jax.Array, head: jax.Array) -> jax.Array:
  dtype = jnp.result_type(hidden.dtype, head.dtype)
  return jnp.einsum("bcd,dv->bcv", hidden.astype(dtype), head.astype(dtype), preferred_element_type=f32)


def chunked_pair_divergence(teacher_hidden: jax.Array, teacher_head: jax.Array, student_hidden: jax.Array,
                            student_head: jax.Array, mask: jax.Array, *, chunk_size: int = 128,
                            kind: str = "forward_kl", beta: float = 0.5, top_k: int | None = None,
                            temperature: float = 1.0) -> jax.Array:
  """ofsd.token_divergence(teacher_hidden @ teacher_head, student_hidden @ student_head, mask, ...) per token.

  Like ofsd.chunked_token_divergence, but the teacher keeps its own head (the frozen snapshot's head differs from
  the student's once the student has been updated). Rematerialized time chunks: no [B, T, V] array.

  Args:
    teacher_hidden, student_hidden: [B, T, D]; teacher_head, student_head: [D, V]; mask: [B, T].
  Returns:
    [B, T] float32 nats, 0 where mask is 0.
  """
  if teacher_hidden.shape != student_hidden.shape or teacher_hidden.shape[:2] != mask.shape:
    raise ValueError(f"chunked_pair_divergence: teacher_hidden {teacher_hidden.shape}, student_hidden "
                     f"{student_hidden.shape} must be [B, T, D] with [B, T] = mask {mask.shape}")
  teacher_head = jax.lax.stop_gradient(teacher_head)

  def chunk(th, sh, m):
    return (ofsd.token_divergence(_chunk_logits(th, teacher_head), _chunk_logits(sh, student_head), m, kind=kind,
                                  beta=beta, top_k=top_k, temperature=temperature),)

  (out,) = chunked_time_map(chunk, [jax.lax.stop_gradient(teacher_hidden), student_hidden, mask.astype(bool)],
                            chunk_size)
  return out


def _metrics(div: jax.Array, mask: jax.Array, prefix: str = "") -> dict:
  n = mask.astype(f32).sum()
  s = jax.lax.stop_gradient(div.sum())
  rows = (mask.astype(f32).sum(axis=1) > 0).astype(f32).sum()
  return {f"{prefix}distill_tokens": n, f"{prefix}distill_sequences": rows, f"{prefix}divergence": (s, n),
          f"{prefix}divergence_max": jax.lax.stop_gradient(jnp.max(jnp.where(mask, div, -jnp.inf)))}


# ----------------------------------------------------------------------------------------------- offline losses


def ofsd_topk_loss_fn(cfg: qwen2.Qwen2Config, o: DivergenceOptions):
  """OFFLINE loss from stored teacher top-k targets (batch: student fields + teacher_topk_ids/_logprobs).

  loss_sum = sum of the per-token divergence (top-k + tail bucket) over distilled tokens; denominator = their
  count. ref_params are not used. Metrics: distill_tokens, distill_sequences, divergence (mean per distilled
  token, nats), divergence_max.
  """
  fields = dict(_STUDENT_FIELDS, teacher_topk_ids=3, teacher_topk_logprobs=3)

  def loss_fn(params, batch, ref_params):
    del ref_params
    _require(batch, fields, "ofsd top-k loss")
    index, mask = distilled_positions(batch)
    h = _gather(student_hidden(params, cfg, batch), index)
    div = ofsd.chunked_topk_divergence(_gather(batch["teacher_topk_ids"][:, 1:], index),
                                       _gather(batch["teacher_topk_logprobs"][:, 1:], index),
                                       h, qwen2.head_kernel(params, cfg), mask, o.chunk_size, o.kind, o.beta,
                                       temperature=o.temperature)
    return div.sum(), mask.astype(f32).sum(), _metrics(div, mask)

  return loss_fn


def ofsd_full_loss_fn(cfg: qwen2.Qwen2Config, o: DivergenceOptions):
  """OFFLINE loss over the full vocabulary, the teacher recomputed on the fly from ref_params (the round's frozen
  snapshot in TrainState.ref_params; build the step with with_ref_params=True). Batch: student + teacher fields.
  Same (sum, count) and metrics as ofsd_topk_loss_fn."""
  fields = dict(_STUDENT_FIELDS, **_TEACHER_FIELDS)

  def loss_fn(params, batch, ref_params):
    if ref_params is None:
      raise ValueError("ofsd full loss: the teacher snapshot must be the state's ref_params (build the train step "
                       "with with_ref_params=True and init_state(params, teacher_params))")
    _require(batch, fields, "ofsd full loss")
    index, mask = distilled_positions(batch)
    th = aligned_teacher_hidden(ref_params, cfg, batch, index)
    sh = _gather(student_hidden(params, cfg, batch), index)
    div = chunked_pair_divergence(th, qwen2.head_kernel(ref_params, cfg), sh, qwen2.head_kernel(params, cfg), mask,
                                  chunk_size=o.chunk_size, kind=o.kind, beta=o.beta, top_k=None,
                                  temperature=o.temperature)
    return div.sum(), mask.astype(f32).sum(), _metrics(div, mask)

  return loss_fn


def ofsd_loss_fn(cfg: qwen2.Qwen2Config, o: DivergenceOptions):
  """The offline loss the options ask for: top-k targets when top_k >= 1, else the full on-the-fly loss."""
  return (ofsd_topk_loss_fn if o.top_k else ofsd_full_loss_fn)(cfg, o)


# ----------------------------------------------------------------------------------------------- on-policy


def grpo_sd_loss_fn(cfg: qwen2.Qwen2Config, grpo: grpo_loss.GRPOOptions, o: DivergenceOptions):
  """ON-POLICY loss L = L_GRPO + alpha * L_SD (batch: the GRPO batch + teacher fields, distill_mask, sd_weight).

  The GRPO part is `grpo_loss.grpo_loss_fn` unchanged (ref_params, if any, remain the KL reference). The SD teacher
  is the CURRENT params under stop-gradient, reading teacher_tokens (the group's best sibling as context); its
  support is the full vocabulary or, with ofsd.top_k, the teacher's top-k + tail computed on the fly. The SD
  branch is skipped (lax.cond) when no row is active (warm-up, no reference in the batch).
  Metrics: the GRPO ones plus sd_distill_tokens, sd_distill_sequences, sd_divergence, sd_divergence_max.

  Note: the student's forward pass runs twice (once inside grpo_loss_fn, once here).
  """
  grpo_fn = grpo_loss.grpo_loss_fn(cfg, grpo)
  fields = dict(_STUDENT_FIELDS, **_TEACHER_FIELDS, sd_weight=1)

  def loss_fn(params, batch, ref_params):
    g_sum, g_den, metrics = grpo_fn(params, batch, ref_params)
    _require(batch, fields, "grpo+sd loss")
    w = batch["sd_weight"].astype(f32)
    mask = batch["distill_mask"][:, 1:].astype(bool) & (w > 0)[:, None]

    def sd(p):
      th = aligned_teacher_hidden(p, cfg, batch)  # stop-gradient inside: the teacher is a constant copy
      sh = student_hidden(p, cfg, batch)
      div = chunked_pair_divergence(th, jax.lax.stop_gradient(qwen2.head_kernel(p, cfg)), sh,
                                    qwen2.head_kernel(p, cfg), mask, chunk_size=o.chunk_size, kind=o.kind,
                                    beta=o.beta, top_k=o.top_k, temperature=o.temperature)
      return jnp.sum(div.sum(axis=1) * w), div

    weighted, div = jax.lax.cond(mask.any(), sd,
                                 lambda p: (jnp.zeros((), f32), jnp.zeros(mask.shape, f32)), params)
    metrics = dict(metrics)
    metrics.update(_metrics(div, mask, "sd_"))
    return g_sum + o.alpha * weighted, g_den, metrics

  return loss_fn


def grpo_denominator(loss_mask: np.ndarray, agg: str) -> float:
  """The GRPO denominator of a whole batch (host side; matches grpo.policy_loss over loss_mask[:, 1:])."""
  return float(np.asarray(grpo.row_denominators(np.asarray(loss_mask)[:, 1:], agg)).sum())


def sd_weights(loss_mask: np.ndarray, distill_mask: np.ndarray, active: np.ndarray, agg: str) -> np.ndarray:
  """[B] float32 sd_weight: N_grpo / N_sd on active rows with distilled tokens, else 0 (see module doc).

  loss_mask, distill_mask: [B, T] aligned with tokens; active: [B] bool (row has a teacher and SD is on).
  """
  active = np.asarray(active, bool)
  d = (np.asarray(distill_mask)[:, 1:] != 0) & active[:, None]
  n_sd = float(d.sum())
  if n_sd == 0:
    return np.zeros(active.shape[0], np.float32)
  return np.where(d.any(axis=1), grpo_denominator(loss_mask, agg) / n_sd, 0.0).astype(np.float32)
