"""GRPO math: group advantages and the PPO-clipped policy loss with a KL-to-reference penalty.

Pure jnp functions (jit-able; string options and group sizes are static). Per-token arrays are [B, T] with a
policy mask (nonzero = a token the policy produced and is trained on). Masked tokens contribute nothing to the
loss, the KL or any metric, and get exactly zero gradient.

The loss is returned as (sum, denominator) so gradient accumulation over micro-batches is exact:
loss = sum_i loss_sum_i / sum_i denominator_i over the whole batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

ESTIMATORS = ("grpo", "drgrpo", "rloo")
KL_ESTIMATORS = ("k1", "k2", "k3")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
K3_MAX = 10.0  # nats: the k3 estimate's clamp (veRL's low_var_kl)
LOG_RATIO_LIMIT = 20.0  # |log ratio| above which k3 is computed at this value (exp(20) is finite in float32)


def _groups(rewards: jax.Array, group_size: int, fn: str) -> jax.Array:
  if rewards.ndim != 1:
    raise ValueError(f"{fn}: rewards must be 1-D [N], got shape {rewards.shape}")
  if group_size < 1 or rewards.shape[0] % group_size:
    raise ValueError(f"{fn}: N={rewards.shape[0]} rewards are not a whole number of groups of "
                     f"group_size={group_size}")
  return rewards.astype(jnp.float32).reshape(-1, group_size)


def group_advantages(rewards: jax.Array, group_size: int, estimator: str = "grpo", eps: float = 1e-6) -> jax.Array:
  """Per-trajectory advantages from scalar rewards laid out group-contiguously.

  Args:
    rewards: [N] float, N = num_groups * group_size; rows [g*G, (g+1)*G) are the G samples of question g.
    group_size: G (static).
    estimator: 'grpo': (r - mean) / (std + eps), std with ddof=1 (torch.std, as veRL / Search-R1);
      'drgrpo': r - mean (Dr. GRPO, no std division);
      'rloo': r - mean of the other G-1 members = G / (G-1) * (r - mean).
    eps: added to the std for 'grpo'.
  Returns:
    [N] float32 advantages (reward units for drgrpo / rloo, unitless for grpo).
  """
  if estimator not in ESTIMATORS:
    raise ValueError(f"group_advantages: estimator={estimator!r}, expected one of {ESTIMATORS}")
  if group_size == 1 and estimator in ("grpo", "rloo"):
    raise ValueError(f"group_advantages: estimator={estimator!r} needs group_size >= 2 (a std / leave-one-out "
                     "baseline of a single sample is undefined); use group_size >= 2")
  r = _groups(rewards, group_size, "group_advantages")
  centered = r - r.mean(axis=1, keepdims=True)
  if estimator == "drgrpo":
    adv = centered
  elif estimator == "rloo":
    adv = centered * (group_size / (group_size - 1))
  else:
    std = jnp.sqrt(jnp.sum(centered**2, axis=1, keepdims=True) / (group_size - 1))
    adv = centered / (std + eps)
  return adv.reshape(-1)


def zero_std_group_fraction(rewards: jax.Array, group_size: int) -> jax.Array:
  """Fraction of groups whose G rewards are all equal (zero std, hence zero GRPO advantage). Scalar float32."""
  r = _groups(rewards, group_size, "zero_std_group_fraction")
  return jnp.mean((r.max(axis=1) == r.min(axis=1)).astype(jnp.float32))


def kl_penalty(logprobs: jax.Array, ref_logprobs: jax.Array, estimator: str = "k3") -> jax.Array:
  """Per-token estimate of KL(policy || reference) from tokens sampled by the policy (nats).

  k1 = logp - ref; k2 = (logp - ref)^2 / 2; k3 = exp(ref - logp) - (ref - logp) - 1 (low variance, >= 0),
  clamped to <= K3_MAX as veRL's low_var_kl does (Search-R1's numbers include it; a clamped token has no
  gradient), with ref - logp clamped to +-LOG_RATIO_LIMIT first so exp cannot overflow.
  """
  if estimator not in KL_ESTIMATORS:
    raise ValueError(f"kl_penalty: kl_estimator={estimator!r}, expected one of {KL_ESTIMATORS}")
  d = logprobs - ref_logprobs
  if estimator == "k1":
    return d
  if estimator == "k2":
    return 0.5 * d**2
  d = jnp.clip(d, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
  return jnp.minimum(jnp.exp(-d) + d - 1.0, K3_MAX)


def row_denominators(mask: jax.Array, agg: str) -> jax.Array:
  """Each row's share of policy_loss's denominator, [B, T] mask -> [B] float32: its masked-token count
  ('token-mean'), 1 if it has a masked token ('seq-mean-token-mean'), 1 ('seq-mean-token-sum')."""
  if agg not in AGG_MODES:
    raise ValueError(f"row_denominators: agg={agg!r}, expected one of {AGG_MODES}")
  counts = jnp.sum(jnp.asarray(mask) != 0, axis=1).astype(jnp.float32)
  if agg == "token-mean":
    return counts
  if agg == "seq-mean-token-mean":
    return (counts > 0).astype(jnp.float32)
  return jnp.ones_like(counts)


def policy_loss(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array, mask: jax.Array, *,
                clip_eps: float = 0.2, clip_eps_high: float | None = None, ref_logprobs: jax.Array | None = None,
                kl_coef: float = 0.0, kl_estimator: str = "k3", agg: str = "token-mean",
                entropy: jax.Array | None = None, importance_weights: jax.Array | None = None,
                dual_clip: float = 0.0, log_ratio_clamp: float = 0.0):
  """PPO clipped surrogate (veRL form) plus a KL-to-reference penalty, aggregated as (sum, denominator).

  Per masked token t of sequence b, with ratio = exp(logprobs - old_logprobs) and A = advantage:
    pg   = max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps_high)) * importance_weight
           (dual_clip c > 1, for A < 0 only: min(that max, -A * c), so a huge ratio cannot give a huge loss)
    loss = pg + kl_coef * KL_est(logprobs, ref_logprobs)                 (KL term only if ref_logprobs given)

  Args:
    logprobs: [B, T] log-probs of the sampled tokens under the current policy (the differentiated input).
    old_logprobs: [B, T] log-probs under the sampling policy (stop-gradient).
    advantages: [B] (broadcast over T) or [B, T] (stop-gradient).
    mask: [B, T]; nonzero = policy token that is trained on.
    clip_eps, clip_eps_high: clip range [1 - clip_eps, 1 + clip_eps_high]; clip_eps_high None = clip_eps.
    ref_logprobs: [B, T] reference-policy log-probs (stop-gradient), or None for no KL term.
    kl_coef: weight of the per-token KL estimate in the loss.
    kl_estimator: 'k1' | 'k2' | 'k3' (see kl_penalty).
    agg: 'token-mean': denominator = number of masked tokens;
      'seq-mean-token-mean': each sequence's loss is averaged over its masked tokens; denominator = number of
        sequences with >= 1 masked token;
      'seq-mean-token-sum': each sequence's loss is summed over its masked tokens; denominator = B (every row,
        including rows without masked tokens).
    entropy: optional [B, T] per-token policy entropy (nats), only reported as a metric.
    importance_weights: optional [B, T] truncated-IS weights for sampler/trainer mismatch; multiply the per-token
      pg term under stop-gradient (they do not scale the KL term).
    dual_clip: c > 1 bounds the loss of a negative-advantage token at -A * c (dual-clip PPO, veRL's
      clip_ratio_c); 0 = off (Search-R1's veRL has no dual clip).
    log_ratio_clamp: > 0 clamps logprobs - old_logprobs to +-this before exp (veRL: 20); 0 = off.

  Returns:
    (loss_sum, denominator, metrics): float32 scalars with loss = loss_sum / denominator; summing loss_sum and
    denominator over micro-batches gives the full-batch loss exactly. metrics (float32 scalars, over masked
    tokens only):
      accumulate by SUM: 'tokens' (masked-token count), 'sequences' (rows with >= 1 masked token),
        'clip_low_count' (tokens with A < 0 and ratio < 1 - clip_eps: the clipped branch binds, zero gradient),
        'clip_high_count' (A > 0 and ratio > 1 + clip_eps_high), 'approx_kl_old_sum' (k3 estimate of
        KL(old || current) with old's samples: ratio - 1 - log ratio), 'kl_ref_sum' (the chosen kl_estimator;
        0 without ref_logprobs), 'dual_clip_count' (A < 0 tokens whose loss the dual clip bounds), 'pg_loss_sum',
        'adv_sum', 'adv_sq_sum' (advantage per masked token),
        'entropy_sum' (0 without entropy);
      accumulate by MIN / MAX: 'ratio_min' (+inf if no token), 'ratio_max' (-inf if no token);
      per micro-batch convenience means (NOT additive; recompute from the sums): 'clip_frac_low',
        'clip_frac_high', 'approx_kl_old', 'kl_ref', 'pg_loss', 'adv_mean', 'adv_std' (population std over
        masked tokens), 'entropy_mean'.
  """
  if agg not in AGG_MODES:
    raise ValueError(f"policy_loss: agg={agg!r}, expected one of {AGG_MODES}")
  if kl_estimator not in KL_ESTIMATORS:
    raise ValueError(f"policy_loss: kl_estimator={kl_estimator!r}, expected one of {KL_ESTIMATORS}")
  if logprobs.ndim != 2:
    raise ValueError(f"policy_loss: logprobs must be [B, T], got shape {logprobs.shape}")
  shape = logprobs.shape
  for name, arr in (("old_logprobs", old_logprobs), ("mask", mask), ("ref_logprobs", ref_logprobs),
                    ("entropy", entropy), ("importance_weights", importance_weights)):
    if arr is not None and arr.shape != shape:
      raise ValueError(f"policy_loss: {name} has shape {arr.shape}, expected {shape} like logprobs")
  if advantages.shape not in ((shape[0],), shape):
    raise ValueError(f"policy_loss: advantages has shape {advantages.shape}, expected ({shape[0]},) or {shape}")
  if dual_clip != 0 and not dual_clip > 1:
    raise ValueError(f"policy_loss: dual_clip={dual_clip} must be 0 (off) or > 1")
  if log_ratio_clamp < 0:
    raise ValueError(f"policy_loss: log_ratio_clamp={log_ratio_clamp} must be 0 (off) or > 0")
  if ref_logprobs is None and isinstance(kl_coef, (int, float)) and kl_coef != 0:
    raise ValueError(f"policy_loss: kl_coef={kl_coef} but ref_logprobs is None; pass reference log-probs")
  hi = clip_eps if clip_eps_high is None else clip_eps_high

  f32 = jnp.float32
  valid = mask.astype(bool)
  m = valid.astype(f32)
  logp = logprobs.astype(f32)
  old = jax.lax.stop_gradient(old_logprobs.astype(f32))
  adv = jax.lax.stop_gradient(advantages.astype(f32))
  if adv.ndim == 1:
    adv = jnp.broadcast_to(adv[:, None], shape)
  # Inputs at masked positions are replaced by neutral values *before* any arithmetic: multiplying a non-finite
  # value by mask 0 would give NaN in the loss or in its gradient.
  adv = jnp.where(valid, adv, 0.0)

  log_ratio = jnp.where(valid, logp - old, 0.0)
  if log_ratio_clamp:
    log_ratio = jnp.clip(log_ratio, -log_ratio_clamp, log_ratio_clamp)
  ratio = jnp.exp(log_ratio)
  clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + hi)
  pg = jnp.maximum(-adv * ratio, -adv * clipped)
  dual = jnp.zeros(shape, bool)
  if dual_clip:
    dual = (adv < 0) & (pg > -adv * dual_clip)
    pg = jnp.where(dual, -adv * dual_clip, pg)
  if importance_weights is not None:
    pg = pg * jnp.where(valid, jax.lax.stop_gradient(importance_weights.astype(f32)), 0.0)
  per_token = pg
  kl_ref = jnp.zeros(shape, f32)
  if ref_logprobs is not None:
    ref = jax.lax.stop_gradient(ref_logprobs.astype(f32))
    kl_ref = kl_penalty(jnp.where(valid, logp, 0.0), jnp.where(valid, ref, 0.0), kl_estimator)
    per_token = per_token + kl_coef * kl_ref
  per_token = per_token * m

  tokens_per_seq = m.sum(axis=1)
  seq_has_tokens = (tokens_per_seq > 0).astype(f32)
  denom = row_denominators(m, agg).sum()
  if agg == "seq-mean-token-mean":
    loss_sum = jnp.sum(per_token.sum(axis=1) / jnp.maximum(tokens_per_seq, 1.0))
  else:
    loss_sum = per_token.sum()

  # Metrics never carry gradient.
  sg = jax.lax.stop_gradient
  ratio_sg, log_ratio_sg = sg(ratio), sg(log_ratio)
  n_tok = m.sum()
  safe_n = jnp.maximum(n_tok, 1.0)
  clip_low = jnp.sum(m * ((adv < 0) & (ratio_sg < 1.0 - clip_eps)))
  clip_high = jnp.sum(m * ((adv > 0) & (ratio_sg > 1.0 + hi)))
  approx_kl_old = jnp.sum(m * (ratio_sg - 1.0 - log_ratio_sg))
  kl_ref_sum = jnp.sum(m * sg(kl_ref))
  pg_sum = jnp.sum(m * sg(pg))
  adv_sum = jnp.sum(m * adv)
  adv_sq_sum = jnp.sum(m * adv**2)
  adv_mean = adv_sum / safe_n
  ent_sum = jnp.asarray(0.0, f32) if entropy is None else jnp.sum(jnp.where(valid, sg(entropy.astype(f32)), 0.0))
  metrics = {
      "tokens": n_tok,
      "sequences": seq_has_tokens.sum(),
      "clip_low_count": clip_low,
      "clip_high_count": clip_high,
      "approx_kl_old_sum": approx_kl_old,
      "kl_ref_sum": kl_ref_sum,
      "dual_clip_count": jnp.sum(m * dual),
      "pg_loss_sum": pg_sum,
      "adv_sum": adv_sum,
      "adv_sq_sum": adv_sq_sum,
      "entropy_sum": ent_sum,
      "ratio_min": jnp.min(jnp.where(valid, ratio_sg, jnp.inf)),
      "ratio_max": jnp.max(jnp.where(valid, ratio_sg, -jnp.inf)),
      "clip_frac_low": clip_low / safe_n,
      "clip_frac_high": clip_high / safe_n,
      "approx_kl_old": approx_kl_old / safe_n,
      "kl_ref": kl_ref_sum / safe_n,
      "pg_loss": pg_sum / safe_n,
      "adv_mean": adv_mean,
      "adv_std": jnp.sqrt(jnp.maximum(adv_sq_sum / safe_n - adv_mean**2, 0.0)),
      "entropy_mean": ent_sum / safe_n,
  }
  return loss_sum, denom, metrics
