"""The generic sharded train step, the optimizer, and the GRPO / LM loss wiring.

References: the loss values are checked against plain numpy computed from full (unchunked) logits; gradients
against autodiff of a dense formula written independently of the chunked path; the optimizer against hand
computations of the schedule and of Adam in a regime where it is linear (large eps, b1 = 0).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.parts import grpo as grpo_part
from configs.parts import optim as optim_part
from searche1_jax import sharding as shd
from searche1_jax.models import qwen2
from searche1_jax.rl import grpo_loss
from searche1_jax.rl import logprobs
from searche1_jax.train import optim, steps

CFG = qwen2.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2)
B, T = 8, 16
KL_COEF = 0.1  # large enough that the KL term visibly moves the loss and the update


# ----------------------------------------------------------------------------------------------- helpers

_forward = jax.jit(qwen2.forward, static_argnums=1)


def np_aligned_logprobs(params, tokens, attention):
  """log p(tokens[:, t] | tokens[:, :t]) from full float64 log-softmax of the unchunked forward; [B, T], col 0 = 0."""
  logits = np.asarray(_forward(params, CFG, jnp.asarray(tokens), attention_mask=jnp.asarray(attention)),
                      np.float64)
  mx = logits.max(-1, keepdims=True)
  logsm = logits - mx - np.log(np.exp(logits - mx).sum(-1, keepdims=True))
  out = np.zeros(tokens.shape)
  out[:, 1:] = np.take_along_axis(logsm[:, :-1], tokens[:, 1:, None], -1)[..., 0]
  return out


def np_grpo_loss(logp, old, ref, adv, loss_mask, *, clip_lo, clip_hi, kl_coef, agg, weights=None):
  """Plain numpy GRPO loss on token-aligned [B, T] arrays (targets are columns 1..T-1)."""
  m = loss_mask[:, 1:].astype(bool)
  lp, o, r = logp[:, 1:], old[:, 1:], ref[:, 1:]
  a = np.broadcast_to(adv[:, None], lp.shape)
  ratio = np.exp(np.where(m, lp - o, 0.0))
  pg = np.maximum(-a * ratio, -a * np.clip(ratio, 1 - clip_lo, 1 + clip_hi))
  if weights is not None:
    pg = pg * weights[:, 1:]
  d = np.where(m, r - lp, 0.0)
  per = np.where(m, pg + kl_coef * (np.exp(d) - d - 1.0), 0.0)
  if agg == "token-mean":
    return per.sum() / m.sum()
  if agg == "seq-mean-token-mean":
    has = m.sum(1) > 0
    return (per.sum(1)[has] / m.sum(1)[has]).sum() / has.sum()
  return per.sum() / per.shape[0]


def make_batch(seed, params):
  """A GRPO batch: prompt, policy tokens, a retrieved passage (mask 0) inside the response, trailing glue,
  right padding; row 3 has no policy token at all. old_logprobs = exact log-probs + noise (ratios != 1)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, CFG.vocab_size, (B, T)).astype(np.int32)
  attention = np.zeros((B, T), np.int32)
  loss = np.zeros((B, T), np.int32)
  for b in range(B):
    length = int(rng.integers(11, T + 1))
    prompt = int(rng.integers(2, 4))
    attention[b, :length] = 1
    if b == 3:
      continue
    loss[b, prompt:length - 1] = 1  # the last real token is glue (mask 0)
    start = int(rng.integers(prompt + 1, length - 5))
    loss[b, start:start + 3] = 0  # a retrieved passage
  tokens = np.where(attention == 1, tokens, 0).astype(np.int32)
  exact = np_aligned_logprobs(params, tokens, attention)
  old = np.where(loss == 1, exact + 0.3 * rng.normal(size=(B, T)), 0.0).astype(np.float32)
  return dict(tokens=tokens, attention_mask=attention, loss_mask=loss, old_logprobs=old,
              advantages=rng.normal(size=B).astype(np.float32)), exact


def grpo_block(**kw):
  c = grpo_part.get()
  c.kl_coef = KL_COEF
  c.agg = "seq-mean-token-mean"
  c.old_logprobs = "sampler"
  c.logprob_chunk_size = 8  # several time chunks per sequence
  for k, v in kw.items():
    c[k] = v
  return c


def grpo_opts(**kw):
  return grpo_loss.GRPOOptions.from_config(grpo_block(**kw))


def optim_block():
  c = optim_part.get()
  c.learning_rate = 1e-2
  c.warmup_steps = 0
  c.eps = 1.0  # Adam's update is then ~ lr * g / (|g| + 1): sensitive to the gradient's value, not only its sign
  return c


def build(mesh_shape=(1, 1, 1), **kw):
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  mesh = shd.make_mesh(*mesh_shape, devices=devices)
  return steps.make_grpo_step(CFG, grpo_opts(**kw), optim.make_optimizer(optim_block(), 10), mesh)


def rel_err(a, b):
  a, b = jax.tree.leaves(a), jax.tree.leaves(b)
  num = np.sqrt(sum(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2) for x, y in zip(a, b)))
  den = np.sqrt(sum(np.sum(np.asarray(y, np.float64) ** 2) for y in b))
  return num / den


def run_steps(gs, params, ref, batch, n=1):
  state = gs.init_state(params, ref)
  metrics = []
  for _ in range(n):
    state, m = gs(state, batch, ref)
    metrics.append(jax.tree.map(float, m))
  return jax.device_get(state.params), metrics


def delta(new, old):
  return jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), new, old)


@pytest.fixture(scope="module")
def model():
  params = jax.device_get(qwen2.init_params(CFG, jax.random.key(0)))
  ref = jax.device_get(qwen2.init_params(CFG, jax.random.key(1)))
  batch, exact = make_batch(0, params)
  return params, ref, batch, exact


@pytest.fixture(scope="module")
def base_step():
  """Single device, one micro-batch, in-step reference, sampler old log-probs."""
  return build()


@pytest.fixture(scope="module")
def tis_step():
  """Single device, recomputed old log-probs with truncated importance weights (cap 2)."""
  return build(old_logprobs="recompute", tis_cap=2.0)


@pytest.fixture(scope="module")
def base_result(model, base_step):
  params, ref, batch, _ = model
  return run_steps(base_step, params, ref, batch, n=2)


# ----------------------------------------------------------------------------------------------- optimizer

def test_schedule_warmup_ratio_then_constant():
  c = optim_part.get()
  c.learning_rate, c.warmup_ratio, c.warmup_steps, c.schedule = 0.1, 0.25, -1, "constant"
  sched = optim.make_schedule(c, 20)  # int(0.25 * 20) = 5 warmup steps
  want = [0.1 * k / 5 if k < 5 else 0.1 for k in range(25)]
  np.testing.assert_allclose([float(sched(k)) for k in range(25)], want, rtol=1e-6, atol=1e-9)
  c.warmup_ratio = 0.285  # Search-R1: int(0.285 * 1005) = 286
  assert optim.warmup_steps(c, 1005) == 286


def test_schedule_warmup_steps_then_cosine():
  c = optim_part.get()
  c.learning_rate, c.warmup_ratio, c.warmup_steps = 2.0, 0.5, 3  # absolute steps override the ratio
  c.schedule, c.min_lr_ratio = "cosine", 0.1
  total, w = 13, 3
  sched = optim.make_schedule(c, total)
  want = []
  for k in range(16):
    if k < w:
      want.append(2.0 * k / w)
    else:
      prog = min(k - w, total - w) / (total - w)
      want.append(2.0 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * prog))))
  np.testing.assert_allclose([float(sched(k)) for k in range(16)], want, rtol=1e-5, atol=1e-7)


def test_optimizer_follows_schedule_and_clips():
  # b1 = 0, constant gradients: Adam's bias-corrected moments are g and g^2, so update = -lr(k) g / (|g| + eps).
  c = optim_part.get()
  c.learning_rate, c.warmup_steps, c.b1, c.eps, c.weight_decay, c.grad_clip_norm = 0.5, 2, 0.0, 1e3, 0.0, 1.0
  tx = optim.make_optimizer(c, 10)
  sched = optim.make_schedule(c, 10)
  params = {"w": jnp.zeros((3,)), "b": jnp.zeros((2,))}
  for scale in (0.4, 25.0):  # global norm 0.4 * ||g0|| (not clipped) and 25 * ||g0|| (clipped to 1)
    g0 = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([0.3, 1.5])}
    norm0 = float(optax.global_norm(g0))
    g = jax.tree.map(lambda x: x * scale / norm0, g0)
    gc = jax.tree.map(lambda x: x * min(1.0, 1.0 / scale), g)  # what the clip should produce
    state = tx.init(params)
    for k in range(4):
      upd, state = tx.update(g, state, params)
      want = jax.tree.map(lambda x: -float(sched(k)) * x / (jnp.abs(x) + 1e3), gc)
      assert rel_err(upd, want) < 1e-5 if k > 0 else all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(upd))
      assert float(optax.global_norm(upd)) <= float(sched(k)) * 1.0 / 1e3 * (1 + 1e-6)


def test_weight_decay_and_no_decay_mask():
  c = optim_part.get()
  c.learning_rate, c.warmup_steps, c.weight_decay, c.no_decay = 0.5, 0, 0.1, ("bias",)
  tx = optim.make_optimizer(c, 10)
  params = {"attn": {"kernel": jnp.full((2, 2), 3.0), "bias": jnp.full((2,), 3.0)}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  upd, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(upd["attn"]["kernel"], -0.5 * 0.1 * 3.0, rtol=1e-6)
  np.testing.assert_array_equal(upd["attn"]["bias"], 0.0)


def test_config_errors_name_the_field(model):
  c = optim_part.get()
  c.schedule = "linear"
  with pytest.raises(ValueError, match="schedule='linear'"):
    optim.make_schedule(c, 10)
  with pytest.raises(ValueError, match="tis_cap"):
    grpo_loss.GRPOOptions.from_config(grpo_block(tis_cap=2.0, old_logprobs="sampler"))
  with pytest.raises(ValueError, match="ref_on_host"):
    grpo_loss.GRPOOptions.from_config(grpo_block(ref_on_host=True, ref_logprobs="in_step"))
  with pytest.raises(ValueError, match="agg='mean'"):
    grpo_loss.GRPOOptions.from_config(grpo_block(agg="mean"))
  params, ref, batch, _ = model
  loss_fn = grpo_loss.grpo_loss_fn(CFG, grpo_opts())
  bad = {k: v for k, v in batch.items() if k != "advantages"}
  with pytest.raises(ValueError, match="'advantages'"):
    loss_fn(params, bad, ref)
  bad = dict(batch, old_logprobs=batch["old_logprobs"][:, :-1])
  with pytest.raises(ValueError, match=r"batch\['old_logprobs'\] has shape"):
    loss_fn(params, bad, ref)
  with pytest.raises(ValueError, match="multiple of num_microbatches"):
    steps.check_batch_size(6, 4, None)


# ----------------------------------------------------------------------------------------------- losses

@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_grpo_loss_matches_numpy(model, agg):
  params, ref, batch, exact = model
  ref_logp = np_aligned_logprobs(ref, batch["tokens"], batch["attention_mask"])
  loss_fn = jax.jit(grpo_loss.grpo_loss_fn(CFG, grpo_opts(agg=agg, clip_eps=0.1, clip_eps_high=0.25)))
  loss_sum, denom, metrics = loss_fn(params, batch, ref)
  want = np_grpo_loss(exact, batch["old_logprobs"], ref_logp, batch["advantages"], batch["loss_mask"],
                      clip_lo=0.1, clip_hi=0.25, kl_coef=KL_COEF, agg=agg)
  np.testing.assert_allclose(float(loss_sum) / float(denom), want, rtol=2e-5)
  n_tok = batch["loss_mask"][:, 1:].sum()
  assert float(metrics["tokens"]) == n_tok
  d = np.where(batch["loss_mask"][:, 1:] == 1, ref_logp[:, 1:] - exact[:, 1:], 0.0)
  kl_num, kl_cnt = metrics["kl_ref"]
  np.testing.assert_allclose(float(kl_num) / float(kl_cnt), (np.exp(d) - d - 1).sum() / n_tok, rtol=2e-5)


def test_grpo_gradient_matches_dense_formula(model):
  """Gradient of the chunked GRPO loss_fn == autodiff of a dense, full-logits formulation written here."""
  params, ref, batch, _ = model
  loss_fn = grpo_loss.grpo_loss_fn(CFG, grpo_opts(agg="token-mean"))
  ref_logp = jnp.asarray(np_aligned_logprobs(ref, batch["tokens"], batch["attention_mask"]), jnp.float32)

  def dense(p):
    logits = qwen2.forward(p, CFG, jnp.asarray(batch["tokens"]), attention_mask=jnp.asarray(batch["attention_mask"]))
    logsm = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    lp = jnp.take_along_axis(logsm, jnp.asarray(batch["tokens"])[:, 1:, None], -1)[..., 0]
    m = jnp.asarray(batch["loss_mask"][:, 1:]) == 1
    lr = jnp.where(m, lp - batch["old_logprobs"][:, 1:], 0.0)
    a = batch["advantages"][:, None]
    ratio = jnp.exp(lr)
    pg = jnp.maximum(-a * ratio, -a * jnp.clip(ratio, 0.8, 1.2))
    d = jnp.where(m, ref_logp[:, 1:] - lp, 0.0)
    return jnp.sum(jnp.where(m, pg + KL_COEF * (jnp.exp(d) - d - 1), 0.0))

  g_step = jax.jit(jax.grad(lambda p: loss_fn(p, batch, ref)[0]))(params)
  g_dense = jax.jit(jax.grad(dense))(params)
  assert rel_err(g_step, g_dense) < 1e-4


def test_lm_loss_matches_numpy(model):
  params, _, batch, exact = model
  loss_sum, denom, metrics = jax.jit(logprobs.lm_loss_fn(CFG, chunk_size=8))(params, batch, None)
  m = batch["loss_mask"][:, 1:] == 1
  assert float(denom) == m.sum()
  np.testing.assert_allclose(float(loss_sum), -exact[:, 1:][m].sum(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["nll"][0]) / float(metrics["nll"][1]), -exact[:, 1:][m].mean(), rtol=1e-5)


# ----------------------------------------------------------------------------------------------- the step

def test_microbatch_accumulation_is_exact(model, base_step, base_result):
  params, ref, batch, _ = model
  p1, m1 = base_result
  p4, m4 = run_steps(build(num_microbatches=4), params, ref, batch, n=1)
  # base_result ran 2 steps: compare the first step's metrics, and redo one step for the params.
  np.testing.assert_allclose(m4[0]["loss"], m1[0]["loss"], rtol=1e-5)
  for k in ("denominator", "tokens", "sequences", "clip_frac_low", "clip_frac_high", "kl_ref", "pg_loss"):
    np.testing.assert_allclose(m4[0][k], m1[0][k], rtol=1e-5, atol=1e-7, err_msg=k)
  np.testing.assert_allclose(m4[0]["ratio_max"], m1[0]["ratio_max"], rtol=1e-6)
  np.testing.assert_allclose(m4[0]["grad_norm"], m1[0]["grad_norm"], rtol=1e-5)
  one, _ = run_steps(base_step, params, ref, batch, n=1)
  assert rel_err(delta(p4, params), delta(one, params)) < 1e-5


def test_learner_rows_buckets_and_left_out_denominators():
  adv = np.zeros(80, np.float32)
  adv[np.arange(0, 75, 3)] = 1.0  # 25 rows with a nonzero advantage
  mask = np.zeros((80, 12), np.int32)
  for r in range(80):  # row r has r % 7 policy tokens from position 2 on
    mask[r, 2:2 + r % 7] = 1
  rows, extra = grpo_loss.learner_rows(adv, mask, "token-mean")
  assert len(rows) == 40 and np.all(np.diff(rows) > 0)  # 25 rounded up to 2 x (80 / 4)
  assert set(np.flatnonzero(adv)) <= set(rows)
  left_out = np.setdiff1d(np.arange(80), rows)
  assert extra[0] == mask[left_out, 1:].sum() and not extra[1:].any()
  rows, extra = grpo_loss.learner_rows(adv, mask, "seq-mean-token-sum")
  assert extra[0] == 40
  rows, _ = grpo_loss.learner_rows(np.zeros(80), mask, "token-mean", multiple=8)  # 80 / 4 = 20 -> 24 (multiple of 8)
  assert len(rows) == 24
  rows, extra = grpo_loss.learner_rows(np.ones(80), mask, "token-mean")
  assert len(rows) == 80 and not extra.any()


# seq-mean-token-mean: its row shares are checked against policy_loss in test_ofsd_loss (grpo_denominator).
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
def test_left_out_zero_advantage_rows_give_the_same_update(model, agg):
  params, _, batch, _ = model
  batch = dict(batch, advantages=batch["advantages"] * np.array([0, 1, 0, 1, 0, 0, 1, 0], np.float32))
  gs = build(kl_coef=0.0, agg=agg)
  want_p, want_m = run_steps(gs, params, None, batch)
  rows, extra = grpo_loss.learner_rows(batch["advantages"], batch["loss_mask"], agg, buckets=B, min_rows=1)
  assert len(grpo_loss.learner_rows(batch["advantages"], batch["loss_mask"], agg)[0]) == B  # small: kept whole
  assert len(rows) == 3
  sub = dict({k: v[rows] for k, v in batch.items()}, denominator_extra=extra)
  got_p, got_m = run_steps(gs, params, None, sub)
  for k in ("loss", "denominator", "grad_norm"):
    np.testing.assert_allclose(got_m[0][k], want_m[0][k], rtol=1e-5, err_msg=k)
  assert rel_err(delta(got_p, params), delta(want_p, params)) < 1e-5
  if agg == "token-mean":  # the left-out rows' denominator matters
    _, without_m = run_steps(gs, params, None, dict(sub, denominator_extra=np.zeros_like(extra)))
    assert abs(without_m[0]["grad_norm"] / want_m[0]["grad_norm"] - 1) > 0.1


def test_sharded_step_equals_single_device(model, base_result):
  params, ref, batch, _ = model
  p_single, m_single = base_result
  p_shard, m_shard = run_steps(build((1, 4, 2), num_microbatches=2), params, ref, batch, n=2)
  for k in ("loss", "grad_norm", "kl_ref"):
    np.testing.assert_allclose([m[k] for m in m_shard], [m[k] for m in m_single], rtol=1e-5, err_msg=k)
  assert rel_err(delta(p_shard, params), delta(p_single, params)) < 1e-5
  assert rel_err(p_shard, p_single) < 1e-6


def test_masked_positions_do_not_change_the_update(model, base_step):
  params, ref, batch, _ = model
  lm, am = batch["loss_mask"], batch["attention_mask"]
  altered = dict(batch)
  rng = np.random.default_rng(7)
  # Old log-probs off the loss mask: garbage, including NaN and huge values.
  altered["old_logprobs"] = np.where(lm == 1, batch["old_logprobs"],
                                     rng.choice([np.nan, 1e6, -1e6, 3.0], size=lm.shape)).astype(np.float32)
  # Padding tokens and the trailing glue token after the last policy token of each row.
  last_real = am.sum(1) - 1
  tokens = np.where(am == 0, rng.integers(0, CFG.vocab_size, lm.shape), batch["tokens"])
  tokens[np.arange(B), last_real] = (tokens[np.arange(B), last_real] + 5) % CFG.vocab_size
  altered["tokens"] = tokens.astype(np.int32)
  # The advantage of a row without any policy token.
  altered["advantages"] = batch["advantages"].copy()
  altered["advantages"][3] = 1e4
  p_a, m_a = run_steps(base_step, params, ref, batch)
  p_b, m_b = run_steps(base_step, params, ref, altered)
  assert np.isfinite(m_b[0]["loss"])
  assert m_a[0]["loss"] == m_b[0]["loss"]
  assert rel_err(delta(p_b, params), delta(p_a, params)) < 1e-6


def test_state_is_donated_and_the_step_compiles_once(model, base_step):
  params, ref, batch, _ = model
  state = base_step.init_state(params, ref)
  assert not any(isinstance(x, np.ndarray) for x in jax.tree.leaves(state))
  new, _ = base_step(state, batch)
  assert all(x.is_deleted() for x in jax.tree.leaves(state.params))
  new, _ = base_step(new, make_batch(1, params)[0])
  assert base_step.train.step._cache_size() == 1
  assert int(new.step) == 2
  specs = jax.tree.map(lambda x: x.sharding, new.params)
  assert specs == base_step.train.param_shardings


def test_recompute_equals_sampler_when_sampler_is_exact(model, base_step, tis_step):
  params, ref, batch, exact = model
  lm = batch["loss_mask"]
  exact_batch = dict(batch, old_logprobs=np.where(lm == 1, exact, 0.0).astype(np.float32))
  p_s, m_s = run_steps(base_step, params, ref, exact_batch)
  p_r, m_r = run_steps(tis_step, params, ref, exact_batch)
  assert m_r[0]["sampler_abs_diff"] < 1e-5 and abs(m_r[0]["sampler_k3"]) < 1e-6
  np.testing.assert_allclose(m_r[0]["tis_weight"], 1.0, atol=1e-5)
  np.testing.assert_allclose(m_r[0]["loss"], m_s[0]["loss"], rtol=1e-5)
  assert rel_err(delta(p_r, params), delta(p_s, params)) < 1e-4


def test_truncated_importance_weights(model, tis_step):
  params, ref, batch, exact = model
  lm = batch["loss_mask"]
  rng = np.random.default_rng(3)
  shift = rng.uniform(-1.5, 1.5, size=lm.shape)
  sampler = np.where(lm == 1, exact + shift, 0.0).astype(np.float32)
  gs = tis_step
  state = gs.init_state(params, ref)
  prepared = gs.prepare_batch(state, dict(batch, old_logprobs=sampler))
  np.testing.assert_allclose(np.asarray(prepared["old_logprobs"]), np.where(lm == 1, exact, 0.0), atol=2e-5)
  np.testing.assert_array_equal(np.asarray(prepared["sampler_logprobs"]), sampler)
  _, m = gs.train(state, prepared)
  m = jax.tree.map(float, m)
  mask = lm[:, 1:] == 1
  d = (exact - sampler)[:, 1:][mask]  # log(p_recomputed / p_sampler)
  np.testing.assert_allclose(m["sampler_abs_diff"], np.abs(d).mean(), rtol=1e-4)
  np.testing.assert_allclose(m["sampler_k3"], (np.exp(d) - 1 - d).mean(), rtol=1e-4)
  np.testing.assert_allclose(m["tis_weight"], np.minimum(np.exp(d), 2.0).mean(), rtol=1e-4)
  np.testing.assert_allclose(m["tis_capped_frac"], (np.exp(d) > 2.0).mean(), rtol=1e-6)
  weights = np.where(lm == 1, np.minimum(np.exp(exact - sampler), 2.0), 0.0)
  ref_logp = np_aligned_logprobs(ref, batch["tokens"], batch["attention_mask"])
  want = np_grpo_loss(exact, exact, ref_logp, batch["advantages"], lm, clip_lo=0.2, clip_hi=0.2,
                      kl_coef=KL_COEF, agg="seq-mean-token-mean", weights=weights)
  unweighted = np_grpo_loss(exact, exact, ref_logp, batch["advantages"], lm, clip_lo=0.2, clip_hi=0.2,
                            kl_coef=KL_COEF, agg="seq-mean-token-mean")
  assert abs(want - unweighted) > 1e-2  # the weights matter for this batch
  np.testing.assert_allclose(m["loss"], want, rtol=1e-4)


@pytest.mark.parametrize("num_microbatches", [1, 2])
def test_current_old_logprobs_equal_a_recompute_pass(model, tis_step, num_microbatches):
  # One update per rollout batch: detaching the policy's own log-probs gives the recompute pass's update and
  # metrics (sampler mismatch, truncated importance weights) from the same noisy sampler log-probs.
  params, ref, batch, exact = model
  assert np.abs(batch["old_logprobs"] - np.where(batch["loss_mask"] == 1, exact, 0.0)).max() > 0.1
  cur = build(old_logprobs="current", tis_cap=2.0, num_microbatches=num_microbatches)
  state = cur.init_state(params, ref)
  prepared = cur.prepare_batch(state, batch)
  assert "sampler_logprobs" not in prepared  # no pass: the batch goes to the step as it came
  p_c, m_c = run_steps(cur, params, ref, batch)
  rec = tis_step if num_microbatches == 1 else build(old_logprobs="recompute", tis_cap=2.0,
                                                     num_microbatches=num_microbatches)
  p_r, m_r = run_steps(rec, params, ref, batch)
  for k in ("loss", "pg_loss", "kl_ref", "sampler_abs_diff", "sampler_k3", "tis_weight", "tis_capped_frac",
            "clip_frac_low", "clip_frac_high", "approx_kl_old"):
    np.testing.assert_allclose(m_c[0][k], m_r[0][k], rtol=1e-4, atol=1e-6, err_msg=k)
  assert m_c[0]["sampler_abs_diff"] > 0.1 and m_c[0]["tis_capped_frac"] > 0  # the weights are exercised
  assert rel_err(delta(p_c, params), delta(p_r, params)) < 1e-4


def test_precomputed_reference_on_host_equals_in_step(model, base_result):
  params, ref, batch, _ = model
  p_in, m_in = base_result
  gs = build(ref_logprobs="precompute", ref_on_host=True)
  placed = gs.place_ref_params(ref)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(placed))
  state = gs.init_state(params)
  assert state.ref_params is None
  out = []
  for _ in range(2):
    state, m = gs(state, batch, placed)
    out.append(jax.tree.map(float, m))
  for k in ("loss", "kl_ref", "grad_norm"):
    np.testing.assert_allclose([m[k] for m in out], [m[k] for m in m_in], rtol=1e-5, err_msg=k)
  assert rel_err(delta(jax.device_get(state.params), params), delta(p_in, params)) < 1e-5


def test_clip_eps_high_none_means_symmetric():
  c = grpo_block(clip_eps=0.15)
  c.clip_eps_high = None
  assert grpo_loss.GRPOOptions.from_config(c).clip_eps_high == 0.15
