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

from searche1_jax import schema
from searche1_jax.models import qwen2
from searche1_jax.rl import grpo
from searche1_jax.rl.logprobs import BATCH_FIELDS, LossFn, check_fields, shifted_logprobs


OLD_LOGPROBS_MODES = ("sampler", "recompute", "current")
REF_MODES = ("in_step", "precompute")


@dataclasses.dataclass(frozen=True)
class GRPOOptions:
  """The `grpo` config block's learner fields (configs/parts/grpo.py), declared once (searche1_jax/schema.py).

  clip_eps_high None in a block means a symmetric clip (= clip_eps). tis_cap 0 = no truncated importance weight.
  dual_clip 0 / log_ratio_clamp 0 = off (grpo.policy_loss).
  """
  clip_eps: float = schema.option("float", lo=0.0, hi=1.0, lo_open=True, hi_open=True)
  clip_eps_high: float = schema.option("float", lo=0.0, lo_open=True, none_ok=True)
  kl_coef: float = schema.option("float", lo=0.0)
  kl_estimator: str = schema.option("str", choices=grpo.KL_ESTIMATORS)
  agg: str = schema.option("str", choices=grpo.AGG_MODES)
  temperature: float = schema.option("float", lo=0.0, lo_open=True)
  logprob_chunk_size: int = schema.option("int", lo=1)
  log_entropy: bool = schema.option("bool")
  old_logprobs: str = schema.option("str", choices=OLD_LOGPROBS_MODES)
  tis_cap: float = schema.option("float", lo=0.0)
  dual_clip: float = schema.option("float", lo=0.0)
  log_ratio_clamp: float = schema.option("float", lo=0.0)
  ref_logprobs: str = schema.option("str", choices=REF_MODES)
  ref_on_host: bool = schema.option("bool")
  num_microbatches: int = schema.option("int", lo=1)

  def __post_init__(self):
    schema.check(self, "grpo")

  @property
  def uses_ref(self) -> bool:
    return self.kl_coef != 0

  @classmethod
  def _normalize(cls, v: dict) -> dict:
    if v.get("clip_eps_high") is None and "clip_eps" in v:
      v["clip_eps_high"] = v["clip_eps"]
    return v

  @classmethod
  def _cross_problems(cls, v: dict) -> list[tuple[str, str]]:
    out = []
    if 0 < v["dual_clip"] <= 1:
      out.append(("dual_clip", "must be 0 (off) or > 1 (veRL's clip_ratio_c: 3)"))
    if 0 < v["tis_cap"] < 1:
      out.append(("tis_cap", "must be 0 (off) or >= 1"))
    if v["tis_cap"] > 0 and v["old_logprobs"] == "sampler":
      out.append(("tis_cap", f"needs grpo.old_logprobs='recompute' or 'current' (the importance weight compares "
                             f"the learner's and the sampler's log-probs), got {v['old_logprobs']!r}"))
    # The sampler records log-probs at temperature 1 (the model's own distribution); the learner scores at
    # grpo.temperature. A ratio or importance weight between the two is biased unless both are at 1.
    for field, uses_sampler in (("old_logprobs", v["old_logprobs"] == "sampler"), ("tis_cap", v["tis_cap"] > 0)):
      if uses_sampler and v["temperature"] != 1.0:
        out.append((field, f"compares sampler log-probs (recorded at temperature 1) with the learner's at "
                           f"grpo.temperature={v['temperature']!r}: needs temperature 1 (or "
                           "old_logprobs='recompute' / 'current' and tis_cap=0)"))
    if v["ref_on_host"] and v["ref_logprobs"] != "precompute":
      out.append(("ref_on_host", "needs grpo.ref_logprobs='precompute' (in-step reference params live on the "
                                 "device)"))
    return out

  @classmethod
  def from_config(cls, block) -> "GRPOOptions":
    return schema.build(cls, block, "grpo", "configs/parts/grpo.py")


def grpo_loss_fn(cfg: qwen2.Qwen2Config, o: GRPOOptions) -> LossFn:
  """The GRPO loss_fn for make_train_step (batch format in the module docstring).

  Policy log-probs come from the chunked path; old log-probs from batch['old_logprobs'] (the sampler's, or the
  recomputed ones after GRPOStep.prepare_batch) or, with old_logprobs='current', the policy log-probs themselves
  under stop_gradient (batch['old_logprobs'] then holds the sampler's); reference log-probs, when kl_coef > 0,
  from the in-step reference params (under stop_gradient) or from batch['ref_logprobs'] (precomputed). With
  sampler log-probs beside the learner's (old_logprobs 'recompute': batch['sampler_logprobs']; 'current'), the
  sampler/trainer mismatch is logged and, with tis_cap > 0, the policy-gradient term is weighted by
  min(exp(recomputed - sampler), tis_cap).
  Metrics: tokens, sequences, pg_loss, kl_ref, approx_kl_old, clip_frac_low/high, adv_mean (per policy token),
  ratio_min/max, entropy (if log_entropy), sampler_abs_diff = mean |sampler - recomputed|, sampler_k3 = mean of
  r - 1 - log r with r = p_recomputed / p_sampler (a k3 estimate of KL(sampler || trainer)), tis_weight and
  tis_capped_frac (with tis_cap).
  """
  fields = dict(BATCH_FIELDS, old_logprobs=2, advantages=1)

  def loss_fn(params, batch, ref_params):
    check_fields(batch, fields, "grpo loss")
    out = shifted_logprobs(params, cfg, batch, chunk_size=o.logprob_chunk_size, temperature=o.temperature,
                           return_entropy=o.log_entropy)
    logp, entropy = out if o.log_entropy else (out, None)
    mask = batch["loss_mask"][:, 1:].astype(bool)
    m = mask.astype(jnp.float32)
    if o.old_logprobs == "current":
      # One update per rollout batch: the old policy is the current one, so its log-probs are these, detached
      # (the same values a recompute pass would give, without the pass). The batch's are the sampler's.
      old = jax.lax.stop_gradient(logp)
      sampler_field = "old_logprobs"
    else:
      old = batch["old_logprobs"][:, 1:].astype(jnp.float32)
      sampler_field = "sampler_logprobs"

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
    if sampler_field in batch:
      sampler = batch[sampler_field][:, 1:].astype(jnp.float32)
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
        importance_weights=weights, dual_clip=o.dual_clip, log_ratio_clamp=o.log_ratio_clamp)
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
        "dual_clip_frac": (pm["dual_clip_count"], n),
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
