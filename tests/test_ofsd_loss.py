"""OFSD student losses (searche1_jax/rl/ofsd_loss.py) against direct full-logit computations.

The reference side scores each pair on its own, unpadded, with `qwen2.forward` (full [L, V] logits) and
`ofsd.token_divergence` at hand-aligned rows; batches are assembled here by hand (not by ofsd_phase)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.parts import grpo as grpo_part
from configs.parts import ofsd as ofsd_part
from searche1_jax import sharding as shd
from searche1_jax.agent import trajectory
from searche1_jax.models import qwen2
from searche1_jax.rl import ofsd
from searche1_jax.rl import grpo
from searche1_jax.rl import grpo_loss
from searche1_jax.rl import ofsd_loss
from searche1_jax.rl import ofsd_phase
from searche1_jax.train import steps

CFG = qwen2.Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8)
T, TT, K = 64, 64, 8


def block(**kw):
  b = ofsd_part.get()
  b.chunk_size = 8
  for k, v in kw.items():
    b[k] = v
  return b


def div(**kw):
  return ofsd_loss.DivergenceOptions.from_config(block(**kw))


def make_pairs(seed=0, n=4):
  """Random pairs: student = prompt_s + response, teacher = prompt_t (longer or shorter) + the same response;
  distill mask = a random subset of the response."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    p_s, p_t = int(rng.integers(5, 12)), int(rng.integers(3, 20))
    r = int(rng.integers(15, TT - max(p_s, p_t)))
    resp = rng.integers(2, CFG.vocab_size, r)
    s_ids = np.concatenate([rng.integers(2, CFG.vocab_size, p_s), resp]).astype(np.int32)
    t_ids = np.concatenate([rng.integers(2, CFG.vocab_size, p_t), resp]).astype(np.int32)
    mask = np.zeros(p_s + r, np.int8)
    mask[p_s:] = rng.random(r) < 0.7
    mask[p_s] = 1  # the first response token (predicted from the last prompt token) is always checked
    if i == n - 1:
      mask[:] = 0  # a row without distilled tokens
    out.append(dict(s=s_ids, t=t_ids, p_s=p_s, p_t=p_t, mask=mask))
  return out


@jax.jit
def _forward_padded(params, ids):
  return qwen2.forward(params, CFG, ids)


def _pad(ids):
  out = np.zeros((1, TT), np.int32)
  out[0, :len(ids)] = ids
  return out


def logits(params, ids):
  """[len(ids), V] logits of one unpadded sequence (right padding to TT leaves causal logits unchanged)."""
  return _forward_padded(params, _pad(ids))[0, :len(ids)]


def aligned_rows(pair):
  """(student rows, teacher rows, token positions) predicting each distilled token."""
  pos = np.nonzero(pair["mask"])[0]
  return pos - 1, pos - 1 + pair["p_t"] - pair["p_s"], pos


def direct_divergence(teacher, params, pairs, **kw):
  """Per pair: sum over its distilled tokens of token_divergence on directly computed, aligned logits."""
  out = []
  for pr in pairs:
    s_rows, t_rows, pos = aligned_rows(pr)
    if not pos.size:
      out.append(0.0)
      continue
    tl = logits(teacher, pr["t"])[t_rows][None]
    sl = logits(params, pr["s"])[s_rows][None]
    out.append(float(ofsd.token_divergence(tl, sl, jnp.ones((1, pos.size)), **kw).sum()))
  return np.asarray(out)


def base_batch(pairs):
  b = len(pairs)
  tokens = np.zeros((b, T), np.int32)
  att = np.zeros((b, T), np.int32)
  dm = np.zeros((b, T), np.int32)
  t_tok = np.zeros((b, TT), np.int32)
  t_att = np.zeros((b, TT), np.int32)
  t_pos = np.zeros((b, T), np.int32)
  for i, pr in enumerate(pairs):
    n, nt = pr["s"].shape[0], pr["t"].shape[0]
    tokens[i, :n], att[i, :n], dm[i, :n] = pr["s"], 1, pr["mask"]
    t_tok[i, :nt], t_att[i, :nt] = pr["t"], 1
    t_pos[i, pr["p_s"] - 1:n] = np.arange(pr["p_s"] - 1, n) + pr["p_t"] - pr["p_s"]
  return {"tokens": tokens, "attention_mask": att, "distill_mask": dm, "teacher_tokens": t_tok,
          "teacher_attention_mask": t_att, "teacher_pos": t_pos}


def topk_batch(teacher, pairs, k, temperature=1.0):
  batch = base_batch(pairs)
  ids = np.zeros((len(pairs), T, k), np.int32)
  lps = np.zeros((len(pairs), T, k), np.float32)
  for i, pr in enumerate(pairs):
    _, t_rows, pos = aligned_rows(pr)
    if pos.size:
      lt = jax.nn.log_softmax(logits(teacher, pr["t"])[t_rows] / temperature, axis=-1)
      v, j = jax.lax.top_k(lt, k)
      ids[i, pos], lps[i, pos] = np.asarray(j), np.asarray(v)
  batch.update(teacher_topk_ids=ids, teacher_topk_logprobs=lps)
  return batch


BASE_FIELDS = ("tokens", "attention_mask", "distill_mask", "teacher_tokens", "teacher_attention_mask", "teacher_pos")
_FULL_FN = ofsd_loss.ofsd_full_loss_fn(CFG, div(top_k=None))
# Shared by two tests (same shapes -> compiled once): d(loss_sum)/d(params, ref_params) of the full loss.
FULL_VG = jax.jit(jax.value_and_grad(lambda p, r, b: (lambda s, d, m: (s, (d, m)))(*_FULL_FN(p, b, r)),
                                     argnums=(0, 1), has_aux=True))


@pytest.fixture(scope="module")
def models():
  init = jax.jit(qwen2.init_params, static_argnums=0)
  params = init(CFG, jax.random.key(0))
  # A distinct teacher (as after student updates): scaled-up random weights give peaked, different distributions.
  teacher = jax.tree.map(lambda x: x * 4.0, init(CFG, jax.random.key(1)))
  return params, teacher


@pytest.mark.parametrize("kind,beta,temperature", [("forward_kl", 0.5, 1.0), ("jsd", 0.3, 0.7)])
def test_topk_loss_equals_direct_topk_divergence(models, kind, beta, temperature):
  params, teacher = models
  pairs = make_pairs(0)
  batch = topk_batch(teacher, pairs, K, temperature)
  fn = ofsd_loss.ofsd_topk_loss_fn(CFG, div(top_k=K, kind=kind, beta=beta, temperature=temperature))
  loss_sum, denom, metrics = jax.jit(fn)(params, batch, None)
  want = direct_divergence(teacher, params, pairs, kind=kind, beta=beta, top_k=K, temperature=temperature)
  n = sum(int(p["mask"].sum()) for p in pairs)
  np.testing.assert_allclose(float(loss_sum), want.sum(), rtol=2e-5, atol=1e-6)
  assert float(denom) == n == float(metrics["distill_tokens"])
  np.testing.assert_allclose(float(metrics["divergence"][0]) / n, want.sum() / n, rtol=2e-5)
  assert float(metrics["distill_sequences"]) == len(pairs) - 1
  assert want.sum() > 0.1  # the teacher really differs


def test_full_loss_equals_direct_full_divergence_and_gradient(models):
  params, teacher = models
  pairs = make_pairs(1)
  batch = base_batch(pairs)
  (loss_sum, (denom, _)), (g_student, g_teacher) = FULL_VG(params, teacher, batch)
  want = direct_divergence(teacher, params, pairs)
  np.testing.assert_allclose(float(loss_sum), want.sum(), rtol=2e-5)
  assert float(denom) == sum(int(p["mask"].sum()) for p in pairs)
  # The teacher gets no gradient at all.
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_teacher))

  # The student's gradient equals the gradient of the direct full-logit formula.
  def direct(p):
    total = 0.0
    for pr in pairs:
      s_rows, t_rows, pos = aligned_rows(pr)
      if pos.size:
        tl = qwen2.forward(teacher, CFG, _pad(pr["t"]))[0][t_rows][None]
        sl = qwen2.forward(p, CFG, _pad(pr["s"]))[0][s_rows][None]
        total = total + ofsd.token_divergence(tl, sl, jnp.ones((1, pos.size))).sum()
    return total

  g_direct = jax.jit(jax.grad(direct))(params)
  for a, b in zip(jax.tree.leaves(g_student), jax.tree.leaves(g_direct)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)


def test_packed_distilled_positions_give_the_same_losses_and_gradients(models):
  params, teacher = models
  pairs = make_pairs(1)
  batch = topk_batch(teacher, pairs, K)
  packed = dict(batch, **trajectory.packed_targets(batch["distill_mask"], minimum=1))
  assert packed["target_index"].shape[1] < T - 1  # really fewer positions than the sequence
  (want, (d_want, m_want)), (g_want, _) = FULL_VG(params, teacher, batch)
  (got, (d_got, m_got)), (g_got, _) = FULL_VG(params, teacher, packed)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  assert float(d_got) == float(d_want) and float(m_got["distill_sequences"]) == float(m_want["distill_sequences"])
  np.testing.assert_allclose(float(m_got["divergence_max"]), float(m_want["divergence_max"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  fn = jax.jit(ofsd_loss.ofsd_topk_loss_fn(CFG, div(top_k=K)))
  (s_want, n_want, _), (s_got, n_got, _) = fn(params, batch, None), fn(params, packed, None)
  np.testing.assert_allclose(float(s_got), float(s_want), rtol=1e-5)
  assert float(n_got) == float(n_want) > 0


def test_full_loss_needs_ref_params(models):
  params, _ = models
  fn = ofsd_loss.ofsd_full_loss_fn(CFG, div(top_k=None))
  with pytest.raises(ValueError, match="ref_params"):
    fn(params, base_batch(make_pairs(1)), None)
  fn = ofsd_loss.ofsd_topk_loss_fn(CFG, div(top_k=K))
  with pytest.raises(ValueError, match="teacher_topk_ids"):
    fn(params, base_batch(make_pairs(1)), None)


def _walk(jaxpr, sizes):
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      shape = getattr(getattr(v, "aval", None), "shape", ())
      sizes.append((math.prod(shape), eqn.primitive.name, shape))
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        if hasattr(sub, "eqns"):
          _walk(sub, sizes)
        elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          _walk(sub.jaxpr, sizes)
  return sizes


def test_no_batch_time_vocab_array():
  """No intermediate of value-and-grad (forward or backward) is as large as one [B, T-1, V] array. (V is large
  enough that the layers' stacked attention scores, [L, B, K, g, T, T], stay below the bound.)"""
  cfg = CFG.replace(vocab_size=4096)
  params = jax.eval_shape(lambda: qwen2.init_params(cfg, jax.random.key(0)))  # tracing needs shapes only
  b, v = 4, cfg.vocab_size
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(0, v, (b, T)).astype(np.int32), "attention_mask": np.ones((b, T), np.int32),
           "distill_mask": np.ones((b, T), np.int32), "teacher_tokens": rng.integers(0, v, (b, TT)).astype(np.int32),
           "teacher_attention_mask": np.ones((b, TT), np.int32), "teacher_pos": np.tile(np.arange(T), (b, 1)),
           "teacher_topk_ids": rng.integers(0, v, (b, T, K)).astype(np.int32),
           "teacher_topk_logprobs": np.full((b, T, K), -3.0, np.float32),
           "loss_mask": np.ones((b, T), np.int32), "old_logprobs": np.full((b, T), -2.0, np.float32),
           "advantages": np.ones((b,), np.float32), "sd_weight": np.ones((b,), np.float32)}
  g = grpo_part.get()
  g.kl_coef, g.old_logprobs, g.logprob_chunk_size = 0.0, "sampler", 8
  fns = {"topk": ofsd_loss.ofsd_topk_loss_fn(cfg, div(top_k=K)),
         "full": ofsd_loss.ofsd_full_loss_fn(cfg, div(top_k=None)),
         "grpo_sd": ofsd_loss.grpo_sd_loss_fn(cfg, grpo_loss.GRPOOptions.from_config(g), div(top_k=None))}
  limit = b * (T - 1) * v
  for name, fn in fns.items():
    jaxpr = jax.make_jaxpr(jax.value_and_grad(lambda p, r: fn(p, batch, r)[0]))(params, params)
    biggest = max(_walk(jaxpr.jaxpr, []))
    assert biggest[0] < limit // 4, (name, biggest)


# ----------------------------------------------------------------------------------------------- on-policy


def grpo_batch(pairs, seed=0):
  rng = np.random.default_rng(seed)
  batch = base_batch(pairs)
  lm = np.zeros((len(pairs), T), np.int32)
  for i, pr in enumerate(pairs):
    lm[i, pr["p_s"]:pr["s"].shape[0]] = 1
  batch.update(loss_mask=lm, old_logprobs=np.where(lm == 1, -rng.random((len(pairs), T)) * 3 - 3, 0.0)
               .astype(np.float32), advantages=rng.normal(size=len(pairs)).astype(np.float32))
  return batch


def grpo_opts(agg="token-mean"):
  g = grpo_part.get()
  g.kl_coef, g.old_logprobs, g.logprob_chunk_size, g.agg = 0.0, "sampler", 8, agg
  return grpo_loss.GRPOOptions.from_config(g)


def sd_case(seed=2, agg="token-mean"):
  pairs = make_pairs(seed)
  batch = grpo_batch(pairs)
  active = np.array([True, True, False, True])
  batch["sd_weight"] = ofsd_loss.sd_weights(batch["loss_mask"], batch["distill_mask"], active, agg)
  return pairs, batch, active


@pytest.fixture(scope="module")
def grpo_value(models):
  _, batch, _ = sd_case()
  s, d, _ = jax.jit(grpo_loss.grpo_loss_fn(CFG, grpo_opts()))(models[0], batch, None)
  return float(s), float(d)


@pytest.mark.parametrize("top_k", [None, K])
def test_grpo_sd_value_and_warmup(models, grpo_value, top_k):
  """L = L_GRPO + alpha * mean SD divergence over the active rows' distilled tokens (teacher = the same params
  with the privileged context); with sd_weight 0 (warm-up) exactly L_GRPO."""
  params, _ = models
  pairs, batch, active = sd_case()
  n_sd = sum(int(p["mask"].sum()) for p, a in zip(pairs, active) if a)
  w = batch["loss_mask"][:, 1:].sum() / n_sd
  np.testing.assert_allclose(batch["sd_weight"], np.where(active & (batch["distill_mask"].sum(1) > 0), w, 0.0),
                             rtol=1e-6)
  alpha = 0.3
  fn = jax.jit(ofsd_loss.grpo_sd_loss_fn(CFG, grpo_opts(), div(top_k=top_k, alpha=alpha)))
  g_sum, g_den = grpo_value
  s, d, metrics = fn(params, batch, None)
  want = direct_divergence(params, params, pairs, top_k=top_k)
  assert float(d) == g_den
  # float32 sums over ~100 tokens in a different order than numpy's float64: relative error up to ~1e-4.
  np.testing.assert_allclose(float(s) / float(d), g_sum / g_den + alpha * (want * active).sum() / n_sd, rtol=1e-4)
  assert float(metrics["sd_distill_tokens"]) == n_sd
  np.testing.assert_allclose(float(metrics["sd_divergence"][0]), (want * active).sum(), rtol=1e-4)
  assert (want * active).sum() > 0
  # Warm-up (or no reference anywhere): sd_weight 0 -> plain GRPO, no SD tokens.
  off = dict(batch, sd_weight=ofsd_loss.sd_weights(batch["loss_mask"], batch["distill_mask"], np.zeros(4, bool),
                                                   "token-mean"))
  assert not off["sd_weight"].any()
  s0, d0, m0 = fn(params, off, None)
  assert float(s0) == pytest.approx(g_sum, rel=1e-6) and float(d0) == g_den
  assert float(m0["sd_distill_tokens"]) == 0


@pytest.mark.slow
def test_grpo_sd_gradient_and_microbatches(models):
  """grad(L_GRPO + alpha * L_SD), the teacher being the params under stop-gradient, equals
  (grad(GRPO sum) + alpha * w * grad(SD sum with the teacher a separate frozen copy)) / d; and a train step with
  2 micro-batches applies exactly that whole-batch gradient (sd_weight carries the global SD normalization)."""
  params, _ = models
  agg = "seq-mean-token-mean"
  _, batch, active = sd_case(agg=agg)
  w = float(batch["sd_weight"].max())
  alpha = 0.3
  fn = ofsd_loss.grpo_sd_loss_fn(CFG, grpo_opts(agg), div(top_k=None, alpha=alpha))
  g_fn = grpo_loss.grpo_loss_fn(CFG, grpo_opts(agg))
  frozen = jax.tree.map(jnp.copy, params)
  sd_batch = {k: batch[k] for k in BASE_FIELDS}
  sd_batch["distill_mask"] = batch["distill_mask"] * active[:, None]
  d = float(g_fn(params, batch, None)[1])

  g_got = jax.jit(jax.grad(lambda p: (lambda s, d_, _: s / d_)(*fn(p, batch, None))))(params)
  g_grpo = jax.jit(jax.grad(lambda p: g_fn(p, batch, None)[0]))(params)
  g_sd = FULL_VG(params, frozen, sd_batch)[1][0]
  for a, b, c in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_grpo), jax.tree.leaves(g_sd)):
    np.testing.assert_allclose(np.asarray(a), (np.asarray(b) + alpha * w * np.asarray(c)) / d, rtol=1e-4,
                               atol=1e-7)
  assert max(float(jnp.abs(alpha * w * c / d).max()) for c in jax.tree.leaves(g_sd)) > 1e-4  # SD matters

  step = steps.model_train_step(CFG, fn, optax.sgd(1.0), shd.make_mesh(1, 1, 1), num_microbatches=2)
  state, metrics = step(step.init_state(params), batch)
  for new, old, g in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(params),
                         jax.tree.leaves(g_got)):
    np.testing.assert_allclose(new, np.asarray(old) - np.asarray(g), rtol=1e-4, atol=1e-7)
  assert float(metrics["sd_distill_tokens"]) == sum(batch["distill_mask"][i, 1:].sum() for i in range(4) if active[i])


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_each_of_several_updates_gets_alpha_exactly(models, agg):
  """A rollout batch split into two updates: each update's loss is L_GRPO of its rows + alpha * the mean SD
  divergence over its rows' distilled tokens, with ofsd_phase.minibatch_sd_weight; the whole batch's sd_weight
  sliced per update would scale alpha by the update's share of SD tokens over its share of GRPO tokens."""
  params, _ = models
  pairs, batch, active = sd_case(agg=agg)
  alpha = 0.3
  fn = jax.jit(ofsd_loss.grpo_sd_loss_fn(CFG, grpo_opts(agg), div(top_k=None, alpha=alpha)))
  g_fn = jax.jit(grpo_loss.grpo_loss_fn(CFG, grpo_opts(agg)))
  want = direct_divergence(params, params, pairs) * active
  n_sd = np.asarray([int(p["mask"].sum()) for p in pairs]) * active
  sliced_coefficients = []
  for rows in (np.array([0, 2]), np.array([1, 3])):  # each update holds one of the two rows with SD tokens
    mb = {k: v[rows] for k, v in batch.items()}
    g_sum, g_den, _ = g_fn(params, mb, None)
    mb["sd_weight"] = ofsd_phase.minibatch_sd_weight(batch, rows, agg)
    s, d, _ = fn(params, mb, None)
    np.testing.assert_allclose(float(s) / float(d), float(g_sum) / float(g_den)
                               + alpha * want[rows].sum() / n_sd[rows].sum(), rtol=1e-4)
    # The coefficient the whole batch's weights would give this update's mean SD divergence.
    sliced_coefficients.append(alpha * float(batch["sd_weight"][rows].max()) * n_sd[rows].sum() / float(g_den))
  assert not np.allclose(sliced_coefficients, alpha, rtol=0.05), sliced_coefficients


def test_grpo_denominator_matches_policy_loss():
  rng = np.random.default_rng(0)
  lm = (rng.random((5, 12)) < 0.4).astype(np.int32)
  lm[2] = 0
  m = lm[:, 1:] != 0
  want = {"token-mean": m.sum(), "seq-mean-token-mean": m.any(axis=1).sum(), "seq-mean-token-sum": 5}
  for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
    _, d, _ = grpo.policy_loss(jnp.zeros((5, 11)), jnp.zeros((5, 11)), jnp.zeros(5), lm[:, 1:], agg=agg)
    assert ofsd_loss.grpo_denominator(lm, agg) == float(d) == float(want[agg])
  with pytest.raises(ValueError, match="agg"):
    ofsd_loss.grpo_denominator(lm, "mean")


def test_options_from_config():
  o = ofsd_loss.DivergenceOptions.from_config(block(top_k=0))
  assert o.top_k is None and o.kind == "forward_kl"
  assert ofsd_loss.DivergenceOptions.from_config(block(top_k=50)).top_k == 50
  with pytest.raises(ValueError, match="kind"):
    ofsd_loss.DivergenceOptions.from_config(block(kind="kl"))
  b = block()
  del b["chunk_size"]
  with pytest.raises(ValueError, match="chunk_size"):
    ofsd_loss.DivergenceOptions.from_config(b)
