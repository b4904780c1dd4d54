"""The GRPO loss for the generic train step, its options, and the host-side row selection of a GRPO batch.

GRPO batch format (the rollout produces it from trajectories; B sequences of T tokens)
-------------------------------------------------------------------------------------
  tokens          [B, T] int32   prompt + response, right-padded
  attention_mask  [B, T] int/bool 1 on real tokens (prompt, policy tokens, retrieved passages, glue), 0 on padding
  loss_mask       [B, T] int/bool 1 on tokens the POLICY produced; 0 on prompt, retrieved passages, glue, padding
  old_logprobs    [B, T] float32  sampler log-prob of token t (0 where loss_mask is 0)
  advantages      [B]    float32  one advantage per sequence
  ref_logprobs    [B, T] float32  optional: reference log-probs (added by `GRPOStep.prepare_batch` in the
                                  'precompute' reference mode)
  sampler_logprobs [B, T] float32 optional: the sampler's log-probs, kept when old_logprobs are recomputed
  target_index, target_valid [B, K] int32 optional (agent.trajectory.packed_targets(loss_mask)): the scored
                                  target positions packed per row; with them only K positions per row get the
                                  vocabulary projection (same results)
  denominator_extra [B] float32   optional: added to the loss denominator (summed over rows); carries the
                                  shares of zero-advantage rows left out by `learner_rows` (same update)
All per-token arrays are aligned with `tokens`: entry t belongs to token t. The step scores
targets = tokens[:, 1:] from inputs = tokens[:, :-1] and uses loss_mask[:, 1:] (token 0 is never a target).
The retrieved-passage mask of a trajectory IS the loss mask: no loss, KL or metric on tokens the policy did not
write. B must be a multiple of num_microbatches * (data x fsdp mesh size).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from searche1_jax.models import qwen2
from searche1_jax.rl import grpo
from searche1_jax.rl.logprobs import BATCH_FIELDS, LossFn, check_fields, shifted_logprobs


OLD_LOGPROBS_MODES = ("sampler", "recompute")
REF_MODES = ("in_step", "precompute")


@dataclasses.dataclass(frozen=True)
class GRPOOptions:
  """The validated `grpo` config block (configs/parts/grpo.py) as plain values."""
  clip_eps: float
  clip_eps_high: float
  kl_coef: float
  kl_estimator: str
  agg: str
  temperature: float
  logprob_chunk_size: int
  log_entropy: bool
  old_logprobs: str
  tis_cap: float
  ref_logprobs: str
  ref_on_host: bool
  num_microbatches: int

  @property
  def uses_ref(self) -> bool:
    return self.kl_coef != 0

  @classmethod
  def from_config(cls, block) -> "GRPOOptions":
    kw = {}
    for f in dataclasses.fields(cls):
      if f.name not in block:
        raise ValueError(f"grpo config: missing field {f.name!r} (see configs/parts/grpo.py)")
      kw[f.name] = block[f.name]
    if kw["clip_eps_high"] is None:  # None = symmetric clip
      kw["clip_eps_high"] = kw["clip_eps"]
    o = cls(**kw)
    checks = [
        (o.kl_estimator in grpo.KL_ESTIMATORS, f"kl_estimator={o.kl_estimator!r}, expected one of {grpo.KL_ESTIMATORS}"),
        (o.agg in grpo.AGG_MODES, f"agg={o.agg!r}, expected one of {grpo.AGG_MODES}"),
        (o.old_logprobs in OLD_LOGPROBS_MODES, f"old_logprobs={o.old_logprobs!r}, expected one of {OLD_LOGPROBS_MODES}"),
        (o.ref_logprobs in REF_MODES, f"ref_logprobs={o.ref_logprobs!r}, expected one of {REF_MODES}"),
        (o.clip_eps > 0 and o.clip_eps_high > 0, f"clip_eps={o.clip_eps} and clip_eps_high={o.clip_eps_high} must be > 0"),
        (o.kl_coef >= 0, f"kl_coef={o.kl_coef} must be >= 0"),
        (o.temperature > 0, f"temperature={o.temperature} must be > 0"),
        (o.logprob_chunk_size >= 1, f"logprob_chunk_size={o.logprob_chunk_size} must be >= 1"),
        (o.num_microbatches >= 1, f"num_microbatches={o.num_microbatches} must be >= 1"),
        (o.tis_cap == 0 or o.tis_cap >= 1, f"tis_cap={o.tis_cap} must be 0 (off) or >= 1"),
        (o.tis_cap == 0 or o.old_logprobs == "recompute",
         f"tis_cap={o.tis_cap} needs old_logprobs='recompute' (the weights compare recomputed and sampler "
         "log-probs)"),
        (not o.ref_on_host or o.ref_logprobs == "precompute",
         "ref_on_host=True needs ref_logprobs='precompute' (in-step reference params live on the device)"),
    ]
    for ok, msg in checks:
      if not ok:
        raise ValueError(f"grpo config: {msg}")
    return o


def grpo_loss_fn(cfg: qwen2.Qwen2Config, grpo_block) -> LossFn:
  """The GRPO loss_fn for make_train_step (batch format in the module docstring).

  Policy log-probs come from the chunked path; old log-probs from batch['old_logprobs'] (the sampler's, or the
  recomputed ones after GRPOStep.prepare_batch); reference log-probs, when kl_coef > 0, from the in-step
  reference params (under stop_gradient) or from batch['ref_logprobs'] (precomputed). With
  batch['sampler_logprobs'] present (old_logprobs='recompute'), the sampler/trainer mismatch is logged and,
  with tis_cap > 0, the policy-gradient term is weighted by min(exp(recomputed - sampler), tis_cap).
  Metrics: tokens, sequences, pg_loss, kl_ref, approx_kl_old, clip_frac_low/high, adv_mean (per policy token),
  ratio_min/max, entropy (if log_entropy), sampler_abs_diff = mean |sampler - recomputed|, sampler_k3 = mean of
  r - 1 - log r with r = p_recomputed / p_sampler (a k3 estimate of KL(sampler || trainer)), tis_weight and
  tis_capped_frac (with tis_cap).
  """
  o = GRPOOptions.from_config(grpo_block)
  fields = dict(BATCH_FIELDS, old_logprobs=2, advantages=1)

  def loss_fn(params, batch, ref_params):
    check_fields(batch, fields, "grpo loss")
    out = shifted_logprobs(params, cfg, batch, chunk_size=o.logprob_chunk_size, temperature=o.temperature,
                           return_entropy=o.log_entropy)
    logp, entropy = out if o.log_entropy else (out, None)
    mask = batch["loss_mask"][:, 1:].astype(bool)
    m = mask.astype(jnp.float32)
    old = batch["old_logprobs"][:, 1:].astype(jnp.float32)

    ref = None
    if o.uses_ref:
      if ref_params is not None:
        ref = jax.lax.stop_gradient(shifted_logprobs(ref_params, cfg, batch, chunk_size=o.logprob_chunk_size,
                                                     temperature=o.temperature))
      elif "ref_logprobs" in batch:
        ref = batch["ref_logprobs"][:, 1:].astype(jnp.float32)
      else:
        raise ValueError(f"grpo loss: kl_coef={o.kl_coef} needs reference params in the state "
                         "(ref_logprobs='in_step') or batch['ref_logprobs'] (ref_logprobs='precompute')")

    extra = {}
    weights = None
    if "sampler_logprobs" in batch:
      sampler = batch["sampler_logprobs"][:, 1:].astype(jnp.float32)
      d = jnp.where(mask, old - sampler, 0.0)  # log(p_recomputed / p_sampler) on policy tokens
      n = m.sum()
      extra["sampler_abs_diff"] = (jnp.sum(jnp.abs(d)), n)
      extra["sampler_k3"] = (jnp.sum(m * (jnp.exp(d) - 1.0 - d)), n)
      if o.tis_cap > 0:
        weights = jnp.minimum(jnp.exp(d), o.tis_cap)
        extra["tis_weight"] = (jnp.sum(m * weights), n)
        extra["tis_capped_frac"] = (jnp.sum(m * (jnp.exp(d) > o.tis_cap)), n)
    elif o.tis_cap > 0:
      raise ValueError("grpo loss: tis_cap > 0 needs batch['sampler_logprobs'] (run GRPOStep.prepare_batch with "
                       "old_logprobs='recompute')")

    loss_sum, denom, pm = grpo.policy_loss(
        logp, old, batch["advantages"], mask, clip_eps=o.clip_eps, clip_eps_high=o.clip_eps_high,
        ref_logprobs=ref, kl_coef=o.kl_coef, kl_estimator=o.kl_estimator, agg=o.agg, entropy=entropy,
        importance_weights=weights)
    if "denominator_extra" in batch:  # the denominator shares of rows left out of the batch (learner_rows)
      denom = denom + jnp.sum(batch["denominator_extra"].astype(jnp.float32))
    n = pm["tokens"]
    metrics = {
        "tokens": n,
        "sequences": pm["sequences"],
        "pg_loss": (pm["pg_loss_sum"], n),
        "kl_ref": (pm["kl_ref_sum"], n),
        "approx_kl_old": (pm["approx_kl_old_sum"], n),
        "clip_frac_low": (pm["clip_low_count"], n),
        "clip_frac_high": (pm["clip_high_count"], n),
        "adv_mean": (pm["adv_sum"], n),
        "ratio_min": pm["ratio_min"],
        "ratio_max": pm["ratio_max"],
        **extra,
    }
    if o.log_entropy:
      metrics["entropy"] = (pm["entropy_sum"], n)
    return loss_sum, denom, metrics

  return loss_fn


def learner_rows(advantages: np.ndarray, loss_mask: np.ndarray, agg: str, multiple: int = 1,
                 buckets: int = 4, min_rows: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """Host side: the rows of a GRPO batch the learner must see, and the denominator they must carry.

  Without a KL term, a row whose advantage is 0 adds exactly 0 to the clipped loss and to its gradient; it only
  counts in the denominator. So the step may run on the other rows plus `denominator_extra` = the left-out rows'
  shares (grpo.row_denominators) and give the same update. The row count is rounded up, with zero-advantage
  rows, to one of `buckets` sizes (B/buckets, 2B/buckets, ..., B, each a multiple of `multiple`: the data-parallel
  size x micro-batches), so the step compiles for few shapes. A size is at least `min_rows`: a small batch is not
  worth a compilation per row count and is kept whole.

  advantages: [B]; loss_mask: [B, T] (the batch's, aligned with tokens). Returns (rows [R] int, sorted,
  denominator_extra [R] float32: the left-out rows' total on the first row, 0 elsewhere).
  """
  adv = np.asarray(advantages).reshape(-1)
  b = adv.shape[0]
  quantum = -(-max(b // buckets, min_rows, 1) // multiple) * multiple
  nonzero = np.flatnonzero(adv != 0)
  size = min(max(-(-len(nonzero) // quantum), 1) * quantum, b)
  zero = np.flatnonzero(adv == 0)
  rows = np.sort(np.concatenate([nonzero, zero[:size - len(nonzero)]]))
  if size == b:
    return np.arange(b), np.zeros(b, np.float32)
  left_out = np.setdiff1d(np.arange(b), rows)
  extra = np.zeros(len(rows), np.float32)
  extra[0] = float(np.asarray(grpo.row_denominators(np.asarray(loss_mask)[left_out, 1:], agg)).sum())
  return rows, extra
