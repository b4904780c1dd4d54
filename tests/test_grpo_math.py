"""GRPO math against an independent plain-numpy implementation written here (float64), tolerance 1e-5."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from searche1_jax.rl import grpo

TOL = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- numpy reference ----------------------------

def np_group_advantages(r, g, estimator, eps=1e-6):
  out = np.zeros(len(r))
  for start in range(0, len(r), g):
    grp = np.asarray(r[start:start + g], np.float64)
    for j in range(g):
      if estimator == "grpo":
        out[start + j] = (grp[j] - grp.mean()) / (grp.std(ddof=1) + eps)
      elif estimator == "drgrpo":
        out[start + j] = grp[j] - grp.mean()
      else:  # rloo: baseline = mean of the others
        out[start + j] = grp[j] - np.delete(grp, j).mean()
  return out


def np_kl(logp, ref, est):
  if est == "k1":
    return logp - ref
  if est == "k2":
    return 0.5 * (logp - ref) ** 2
  d = np.clip(logp - ref, -20.0, 20.0)  # veRL's low_var_kl: ref - logp within +-20, the estimate <= 10
  return min(np.exp(-d) + d - 1, 10.0)


def np_policy_loss(logp, old, adv, mask, clip_eps=0.2, clip_eps_high=None, ref=None, kl_coef=0.0,
                   kl_estimator="k3", agg="token-mean", entropy=None, iw=None, dual_clip=0.0, log_ratio_clamp=0.0):
  logp, old = np.float64(logp), np.float64(old)
  b, t = logp.shape
  hi = clip_eps if clip_eps_high is None else clip_eps_high
  adv = np.broadcast_to(np.float64(adv).reshape(b, -1), (b, t))
  loss_sum, tok, seqs = 0.0, 0, 0
  per_seq_sum, per_seq_mean = [], []
  m = dict(clip_low=0, clip_high=0, dual=0, akl=0.0, kl=0.0, pg=0.0, adv=[], ent=0.0, ratios=[])
  for i in range(b):
    s, n = 0.0, 0
    for j in range(t):
      if not mask[i, j]:
        continue
      log_ratio = logp[i, j] - old[i, j]
      if log_ratio_clamp:
        log_ratio = min(max(log_ratio, -log_ratio_clamp), log_ratio_clamp)
      ratio = np.exp(log_ratio)
      a = adv[i, j]
      pg = max(-a * ratio, -a * min(max(ratio, 1 - clip_eps), 1 + hi))
      if dual_clip and a < 0 and pg > -a * dual_clip:
        pg = -a * dual_clip
        m["dual"] += 1
      if iw is not None:
        pg *= iw[i, j]
      kl = np_kl(logp[i, j], ref[i, j], kl_estimator) if ref is not None else 0.0
      s += pg + kl_coef * kl
      n += 1
      m["clip_low"] += int(a < 0 and ratio < 1 - clip_eps)
      m["clip_high"] += int(a > 0 and ratio > 1 + hi)
      m["akl"] += ratio - 1 - np.log(ratio)
      m["kl"] += kl
      m["pg"] += pg
      m["adv"].append(a)
      m["ratios"].append(ratio)
      m["ent"] += entropy[i, j] if entropy is not None else 0.0
    tok += n
    seqs += n > 0
    per_seq_sum.append(s)
    per_seq_mean.append(s / n if n else 0.0)
  if agg == "token-mean":
    loss_sum, denom = sum(per_seq_sum), tok
  elif agg == "seq-mean-token-mean":
    loss_sum, denom = sum(per_seq_mean), seqs
  else:
    loss_sum, denom = sum(per_seq_sum), b
  n = max(tok, 1)
  a = np.array(m["adv"]) if m["adv"] else np.zeros(1)
  metrics = {
      "tokens": tok, "sequences": seqs, "clip_low_count": m["clip_low"], "clip_high_count": m["clip_high"],
      "approx_kl_old_sum": m["akl"], "kl_ref_sum": m["kl"], "dual_clip_count": m["dual"], "pg_loss_sum": m["pg"],
      "adv_sum": a.sum() if tok else 0,
      "adv_sq_sum": (a**2).sum() if tok else 0, "entropy_sum": m["ent"],
      "ratio_min": min(m["ratios"], default=np.inf), "ratio_max": max(m["ratios"], default=-np.inf),
      "clip_frac_low": m["clip_low"] / n, "clip_frac_high": m["clip_high"] / n, "approx_kl_old": m["akl"] / n,
      "kl_ref": m["kl"] / n, "pg_loss": m["pg"] / n, "adv_mean": a.mean() if tok else 0.0,
      "adv_std": a.std() if tok else 0.0, "entropy_mean": m["ent"] / n,
  }
  return loss_sum, denom, metrics


# ---------------------------------------------------------------- fixtures -----------------------------------

def make_batch(seed=0, b=8, t=12, adv_per_token=False):
  rng = np.random.default_rng(seed)
  old = rng.normal(-2.0, 1.0, (b, t)).astype(np.float32)
  logp = (old + rng.normal(0.0, 0.35, (b, t))).astype(np.float32)  # ratios spread well past 1 +- 0.2
  ref = (old + rng.normal(0.0, 0.5, (b, t))).astype(np.float32)
  adv = rng.normal(0.0, 1.0, (b, t) if adv_per_token else (b,)).astype(np.float32)
  mask = rng.random((b, t)) < 0.7
  mask[1] = False                      # a row with no policy token
  mask[2] = False
  mask[2, 5] = True                    # a row with a single token
  ent = rng.uniform(0.0, 3.0, (b, t)).astype(np.float32)
  iw = rng.uniform(0.5, 2.0, (b, t)).astype(np.float32)
  return dict(logp=logp, old=old, ref=ref, adv=adv, mask=mask, ent=ent, iw=iw)


def run_loss(d, **kw):
  ref = d["ref"] if kw.pop("use_ref", False) else None
  ent = d["ent"] if kw.pop("use_ent", False) else None
  iw = d["iw"] if kw.pop("use_iw", False) else None
  return grpo.policy_loss(jnp.asarray(d["logp"]), jnp.asarray(d["old"]), jnp.asarray(d["adv"]),
                          jnp.asarray(d["mask"]), ref_logprobs=None if ref is None else jnp.asarray(ref),
                          entropy=None if ent is None else jnp.asarray(ent),
                          importance_weights=None if iw is None else jnp.asarray(iw), **kw)


# ---------------------------------------------------------------- advantages ---------------------------------

@pytest.mark.parametrize("estimator", grpo.ESTIMATORS)
@pytest.mark.parametrize("g", [2, 5])
def test_group_advantages_vs_numpy(estimator, g):
  rng = np.random.default_rng(g)
  r = rng.normal(size=4 * g).astype(np.float32)
  r[:g] = 1.0  # a zero-std group: grpo gives 0 / eps = 0, not NaN
  got = grpo.group_advantages(jnp.asarray(r), g, estimator)
  np.testing.assert_allclose(np.asarray(got), np_group_advantages(r, g, estimator), **TOL)
  np.testing.assert_array_equal(np.asarray(got[:g]), 0.0)
  jitted = jax.jit(grpo.group_advantages, static_argnums=(1, 2))(jnp.asarray(r), g, estimator)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(got), **TOL)


def test_group_advantages_binary_rewards_known_values():
  # G = 5, rewards 1,0,0,0,0: mean 0.2, sample std sqrt(0.2) -> (1 - 0.2) / sqrt(0.2) = 1.78885
  adv = np.asarray(grpo.group_advantages(jnp.array([1.0, 0, 0, 0, 0]), 5, "grpo"))
  np.testing.assert_allclose(adv, np.array([0.8, -0.2, -0.2, -0.2, -0.2]) / (np.sqrt(0.2) + 1e-6), **TOL)
  rloo = np.asarray(grpo.group_advantages(jnp.array([1.0, 0, 0, 0, 0]), 5, "rloo"))
  np.testing.assert_allclose(rloo, [1.0, -0.25, -0.25, -0.25, -0.25], **TOL)


def test_group_advantages_errors():
  r = jnp.arange(6.0)
  for est in ("grpo", "rloo"):
    with pytest.raises(ValueError, match="group_size >= 2"):
      grpo.group_advantages(r, 1, est)
  np.testing.assert_array_equal(np.asarray(grpo.group_advantages(r, 1, "drgrpo")), 0.0)
  with pytest.raises(ValueError, match="group_size=4"):
    grpo.group_advantages(r, 4)
  with pytest.raises(ValueError, match="estimator='ppo'"):
    grpo.group_advantages(r, 2, "ppo")
  with pytest.raises(ValueError, match="1-D"):
    grpo.group_advantages(r.reshape(2, 3), 3)


def test_zero_std_group_fraction():
  r = jnp.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 1, 1, 0], jnp.float32)
  assert float(grpo.zero_std_group_fraction(r, 3)) == pytest.approx(2 / 4)
  assert float(grpo.zero_std_group_fraction(r, 12)) == 0.0


# ---------------------------------------------------------------- policy loss --------------------------------

OPTION_GRID = [
    dict(agg=agg, kl_estimator=kl, clip_eps_high=hi, use_iw=iw, use_ent=ent, adv_per_token=apt)
    for (agg, kl, hi, iw, ent, apt) in [
        (a, k, None, False, False, False) for a, k in itertools.product(grpo.AGG_MODES, grpo.KL_ESTIMATORS)
    ] + [
        ("token-mean", "k3", 0.28, True, True, True),
        ("seq-mean-token-mean", "k1", 0.28, True, False, False),
        ("seq-mean-token-sum", "k2", None, False, True, True),
    ]
] + [  # the safety rails: dual clip and log-ratio clamp, each binding on some tokens of the batch
    dict(agg="token-mean", kl_estimator="k3", clip_eps_high=0.28, use_iw=True, use_ent=False, adv_per_token=True,
         dual_clip=1.5, log_ratio_clamp=0.0),
    dict(agg="seq-mean-token-mean", kl_estimator="k3", clip_eps_high=None, use_iw=False, use_ent=False,
         adv_per_token=False, dual_clip=1.3, log_ratio_clamp=0.4),
]


@pytest.mark.parametrize("opts", OPTION_GRID, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_policy_loss_vs_numpy(opts):
  opts = dict(opts)
  d = make_batch(seed=3, adv_per_token=opts.pop("adv_per_token"))
  use_iw, use_ent = opts.pop("use_iw"), opts.pop("use_ent")
  kw = dict(clip_eps=0.2, kl_coef=0.05, **opts)
  loss_sum, denom, metrics = run_loss(d, use_ref=True, use_ent=use_ent, use_iw=use_iw, **kw)
  ref_sum, ref_denom, ref_metrics = np_policy_loss(
      d["logp"], d["old"], d["adv"], d["mask"], ref=d["ref"], entropy=d["ent"] if use_ent else None,
      iw=d["iw"] if use_iw else None, **kw)
  np.testing.assert_allclose(float(loss_sum), ref_sum, **TOL)
  np.testing.assert_allclose(float(denom), ref_denom, **TOL)
  assert set(metrics) == set(ref_metrics)
  for k, v in ref_metrics.items():
    np.testing.assert_allclose(float(metrics[k]), v, err_msg=k, **TOL)
  # the grid exercises both clip sides, and the dual clip where it is on
  assert ref_metrics["clip_low_count"] > 0 and ref_metrics["clip_high_count"] > 0
  assert (ref_metrics["dual_clip_count"] > 0) == bool(kw.get("dual_clip"))


def test_policy_loss_without_reference_and_jit():
  d = make_batch(seed=4)
  f = jax.jit(functools.partial(grpo.policy_loss, agg="seq-mean-token-mean", clip_eps=0.1))
  loss_sum, denom, metrics = f(jnp.asarray(d["logp"]), jnp.asarray(d["old"]), jnp.asarray(d["adv"]),
                               jnp.asarray(d["mask"]))
  ref_sum, ref_denom, ref_metrics = np_policy_loss(d["logp"], d["old"], d["adv"], d["mask"], clip_eps=0.1,
                                                   agg="seq-mean-token-mean")
  np.testing.assert_allclose(float(loss_sum), ref_sum, **TOL)
  assert float(denom) == ref_denom
  assert float(metrics["kl_ref_sum"]) == 0.0 and float(metrics["entropy_sum"]) == 0.0


def test_policy_loss_errors():
  d = make_batch()
  with pytest.raises(ValueError, match="agg='mean'"):
    run_loss(d, agg="mean")
  with pytest.raises(ValueError, match="kl_estimator='k4'"):
    run_loss(d, use_ref=True, kl_estimator="k4")
  with pytest.raises(ValueError, match="ref_logprobs is None"):
    run_loss(d, kl_coef=0.1)
  with pytest.raises(ValueError, match="advantages has shape"):
    grpo.policy_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((3,)), jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="mask has shape"):
    grpo.policy_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2,)), jnp.ones((2, 4)))


@pytest.mark.parametrize("agg", grpo.AGG_MODES)
def test_gradient_zero_where_clipped_and_masked(agg):
  d = make_batch(seed=5)
  mask, adv = d["mask"], d["adv"][:, None]
  hi = 0.28

  def loss(logp):
    s, n, _ = grpo.policy_loss(logp, jnp.asarray(d["old"]), jnp.asarray(d["adv"]), jnp.asarray(mask),
                               clip_eps=0.2, clip_eps_high=hi, agg=agg)
    return s / n

  grad = np.asarray(jax.grad(loss)(jnp.asarray(d["logp"])))
  ratio = np.exp(np.float64(d["logp"]) - d["old"])
  clipped = ((adv > 0) & (ratio > 1 + hi)) | ((adv < 0) & (ratio < 0.8))
  assert (clipped & mask).sum() > 3 and (~clipped & mask).sum() > 3
  np.testing.assert_array_equal(grad[clipped | ~mask], 0.0)
  # Elsewhere d/dlogp (-A ratio) = -A ratio, scaled by the aggregation weight of the token.
  n_b = mask.sum(1, keepdims=True)
  if agg == "token-mean":
    w = np.full_like(ratio, 1.0 / mask.sum())
  elif agg == "seq-mean-token-mean":
    w = 1.0 / np.maximum(n_b, 1) / (n_b > 0).sum() * np.ones_like(ratio)
  else:
    w = np.full_like(ratio, 1.0 / mask.shape[0])
  free = ~clipped & mask
  np.testing.assert_allclose(grad[free], (-adv * ratio * w)[free], **TOL)


def test_k3_is_clamped_as_verl_does():
  """k3 = exp(-d) + d - 1 (d = logp - ref) is at most 10 nats, finite for any gap, and a clamped token gets no
  gradient; below the clamp it is the plain estimate."""
  logp = jnp.asarray([0.0, -40.0, -2.0, -1.0, -3.0])
  ref = jnp.asarray([-40.0, 0.0, 0.0, -1.5, 0.0])
  k3 = np.asarray(grpo.kl_penalty(logp, ref, "k3"))
  d = np.float64(logp - ref)
  plain = np.exp(-d) + d - 1
  assert np.isfinite(k3).all()
  np.testing.assert_allclose(k3, np.minimum(plain, 10.0), rtol=1e-5)
  assert (plain > 10).sum() == 3  # d = 40, -40, -3 bind; -2 (5.39 nats) and 0.5 do not
  grad = np.asarray(jax.grad(lambda lp: grpo.kl_penalty(lp, ref, "k3").sum())(logp))
  np.testing.assert_array_equal(grad[plain > 10], 0.0)
  np.testing.assert_allclose(grad[plain <= 10], (1 - np.exp(-d))[plain <= 10], rtol=1e-5)


def test_dual_clip_bounds_negative_advantage_losses_without_gradient():
  d = make_batch(seed=5)
  adv = jnp.asarray(d["adv"])

  def loss(logp, **kw):
    s, n, m = grpo.policy_loss(logp, jnp.asarray(d["old"]), adv, jnp.asarray(d["mask"]), clip_eps=0.2, **kw)
    return s / n, m

  logp = jnp.asarray(d["logp"])
  grad = np.asarray(jax.grad(lambda lp: loss(lp, dual_clip=1.5)[0])(logp))
  plain = np.asarray(jax.grad(lambda lp: loss(lp)[0])(logp))
  ratio = np.exp(np.float64(d["logp"]) - d["old"])
  bound = (d["adv"][:, None] < 0) & (ratio > 1.5) & d["mask"]
  assert bound.sum() >= 2 and int(loss(logp, dual_clip=1.5)[1]["dual_clip_count"]) == bound.sum()
  np.testing.assert_array_equal(grad[bound], 0.0)
  assert np.abs(plain[bound]).min() > 0
  np.testing.assert_allclose(grad[~bound], plain[~bound], rtol=1e-6)
  with pytest.raises(ValueError, match="dual_clip=0.5"):
    loss(logp, dual_clip=0.5)


def test_kl_gradient_and_masked_garbage():
  d = make_batch(seed=6)
  logp, ref, old = d["logp"].copy(), d["ref"].copy(), d["old"].copy()
  masked = ~d["mask"]
  # Garbage on masked tokens must not reach the loss, the metrics or the gradient.
  logp[masked] = 200.0
  ref[masked] = -np.inf
  old[masked] = np.nan
  adv = np.broadcast_to(d["adv"][:, None], logp.shape).copy()
  adv[masked] = np.inf

  def loss(lp):
    s, n, metrics = grpo.policy_loss(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(d["mask"]),
                                     ref_logprobs=jnp.asarray(ref), kl_coef=0.1, kl_estimator="k3",
                                     importance_weights=jnp.where(jnp.asarray(masked), jnp.nan, 1.0))
    return s / n, metrics

  (val, metrics), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(logp))
  grad = np.asarray(grad)
  assert np.isfinite(float(val)) and all(np.isfinite(float(v)) for v in metrics.values())
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad[masked], 0.0)
  clean_sum, clean_denom, _ = np_policy_loss(d["logp"], d["old"], d["adv"], d["mask"], ref=d["ref"], kl_coef=0.1)
  np.testing.assert_allclose(float(val), clean_sum / clean_denom, **TOL)
  # With A = 0 the only gradient is kl_coef * d k3 / d logp = kl_coef * (1 - exp(ref - logp)) / n.
  (_, _), g_kl = jax.value_and_grad(
      lambda lp: (lambda s, n, m: (s / n, m))(*grpo.policy_loss(
          lp, jnp.asarray(d["old"]), jnp.zeros(d["adv"].shape), jnp.asarray(d["mask"]),
          ref_logprobs=jnp.asarray(d["ref"]), kl_coef=0.1)), has_aux=True)(jnp.asarray(d["logp"]))
  expect = 0.1 * (1 - np.exp(np.float64(d["ref"]) - d["logp"])) / d["mask"].sum() * d["mask"]
  np.testing.assert_allclose(np.asarray(g_kl), expect, **TOL)


@pytest.mark.parametrize("agg", grpo.AGG_MODES)
def test_micro_batch_accumulation_is_exact(agg):
  d = make_batch(seed=7, b=8)
  kw = dict(agg=agg, clip_eps_high=0.3, kl_coef=0.02, use_ref=True, use_ent=True, use_iw=True)
  full_sum, full_denom, full_m = run_loss(d, **kw)
  sums, denoms, parts = [], [], []
  for idx in np.split(np.arange(8), 4):
    s, n, m = run_loss({k: v[idx] for k, v in d.items()}, **kw)
    sums.append(float(s))
    denoms.append(float(n))
    parts.append(m)
  np.testing.assert_allclose(sum(sums) / sum(denoms), float(full_sum) / float(full_denom), **TOL)
  np.testing.assert_allclose(sum(sums), float(full_sum), **TOL)
  assert sum(denoms) == float(full_denom)
  for k in ("tokens", "sequences", "clip_low_count", "clip_high_count", "approx_kl_old_sum", "kl_ref_sum",
            "pg_loss_sum", "adv_sum", "adv_sq_sum", "entropy_sum"):
    np.testing.assert_allclose(sum(float(p[k]) for p in parts), float(full_m[k]), err_msg=k, **TOL)
  assert min(float(p["ratio_min"]) for p in parts) == pytest.approx(float(full_m["ratio_min"]))
  assert max(float(p["ratio_max"]) for p in parts) == pytest.approx(float(full_m["ratio_max"]))
  # a micro-batch of only empty rows contributes a zero denominator for the per-sequence-mean mode
  empty = {k: v[1:2] for k, v in d.items()}
  s, n, m = run_loss(empty, **kw)
  assert float(s) == 0.0 and float(n) == (1.0 if agg == "seq-mean-token-sum" else 0.0)
  assert float(m["ratio_min"]) == np.inf and float(m["ratio_max"]) == -np.inf


def test_only_logprobs_receive_gradient():
  d = make_batch(seed=8)
  args = [jnp.asarray(d[k]) for k in ("logp", "old", "adv", "ref", "iw")]

  def loss(logp, old, adv, ref, iw):
    s, n, _ = grpo.policy_loss(logp, old, adv, jnp.asarray(d["mask"]), ref_logprobs=ref, kl_coef=0.1,
                               importance_weights=iw)
    return s / n

  grads = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*args)
  assert np.abs(np.asarray(grads[0])).max() > 1e-3
  for name, g in zip(("old_logprobs", "advantages", "ref_logprobs", "importance_weights"), grads[1:]):
    np.testing.assert_array_equal(np.asarray(g), 0.0, err_msg=name)
