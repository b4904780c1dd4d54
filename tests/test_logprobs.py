"""Chunked log-probs (searche1_jax.rl.logprobs) against the naive full-vocabulary log-softmax gather."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from searche1_jax.models import qwen2
from searche1_jax.rl import logprobs as lp
from model_testlib import random_params as _params

CFG = qwen2.Qwen2Config(vocab_size=80, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                        num_kv_heads=2, rope_theta=10000.0, initializer_range=0.2)


def naive(hidden, head, targets, mask=None, temperature=1.0):
  """Plain numpy float64: log_softmax(hidden @ head / T)[targets] and the entropy, zero where mask is 0."""
  logits = np.einsum("btd,dv->btv", np.asarray(hidden, np.float64), np.asarray(head, np.float64)) / temperature
  m = logits.max(-1, keepdims=True)
  logz = m[..., 0] + np.log(np.exp(logits - m).sum(-1))
  logp_all = logits - logz[..., None]
  logp = np.take_along_axis(logp_all, np.asarray(targets)[..., None], -1)[..., 0]
  ent = -(np.exp(logp_all) * logp_all).sum(-1)
  if mask is not None:
    logp, ent = logp * mask, ent * mask
  return logp, ent


@pytest.mark.parametrize("t,chunk", [(16, 4), (13, 5), (7, 128)])  # exact chunks, ragged last chunk, one chunk
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_from_hidden_matches_naive(t, chunk, temperature):
  rng = np.random.RandomState(t)
  hidden = rng.randn(3, t, 24).astype(np.float32)
  head = rng.randn(24, 50).astype(np.float32)
  targets = rng.randint(0, 50, (3, t))
  mask = (rng.rand(3, t) > 0.3).astype(np.float32)
  got_lp, got_ent = lp.logprobs_from_hidden(jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(targets),
                                            jnp.asarray(mask), chunk_size=chunk, temperature=temperature,
                                            return_entropy=True)
  ref_lp, ref_ent = naive(hidden, head, targets, mask, temperature)
  assert got_lp.shape == got_ent.shape == (3, t) and got_lp.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got_lp), ref_lp, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got_ent), ref_ent, atol=2e-5, rtol=1e-5)
  assert np.all(np.asarray(got_lp)[mask == 0] == 0)
  only = lp.logprobs_from_hidden(jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(targets), None,
                                 chunk_size=chunk, temperature=temperature)
  np.testing.assert_allclose(np.asarray(only), naive(hidden, head, targets, None, temperature)[0], atol=2e-5,
                             rtol=1e-5)


def test_logprobs_from_hidden_gradients_match_naive():
  rng = np.random.RandomState(0)
  hidden = jnp.asarray(rng.randn(2, 11, 16).astype(np.float32))
  head = jnp.asarray(rng.randn(16, 40).astype(np.float32))
  targets = jnp.asarray(rng.randint(0, 40, (2, 11)))
  mask = jnp.asarray((rng.rand(2, 11) > 0.2).astype(np.float32))
  w = jnp.asarray(rng.randn(2, 11).astype(np.float32))

  def chunked(h, k):
    logp, ent = lp.logprobs_from_hidden(h, k, targets, mask, chunk_size=4, temperature=0.9, return_entropy=True)
    return jnp.sum(w * logp) + 0.3 * jnp.sum(ent)

  def full(h, k):
    logits = jnp.einsum("btd,dv->btv", h, k) / 0.9
    logp_all = jax.nn.log_softmax(logits)
    logp = jnp.take_along_axis(logp_all, targets[..., None], -1)[..., 0]
    ent = -jnp.sum(jnp.exp(logp_all) * logp_all, -1)
    return jnp.sum(w * logp * mask) + 0.3 * jnp.sum(ent * mask)

  got = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, head)
  ref = jax.jit(jax.grad(full, argnums=(0, 1)))(hidden, head)
  for g, r in zip(got, ref):
    assert float(jnp.abs(r).max()) > 1e-2
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tie", [False, True])
def test_token_logprobs_matches_forward_log_softmax(tie):
  cfg = CFG.replace(tie_word_embeddings=tie)
  params = _params(cfg)
  rng = np.random.RandomState(1)
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (2, 12)))
  targets = jnp.roll(tokens, -1, axis=1)
  mask = jnp.asarray(np.r_[[[0] * 3 + [1] * 9], [[1] * 12]])
  logp, ent = lp.token_logprobs(params, cfg, tokens, targets, mask, chunk_size=5, return_entropy=True)
  ref_lp, ref_ent = naive(qwen2.hidden_states(params, cfg, tokens), qwen2.head_kernel(params, cfg), targets,
                          np.asarray(mask))
  np.testing.assert_allclose(np.asarray(logp), ref_lp, atol=3e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(ent), ref_ent, atol=3e-5, rtol=1e-5)
  logits = qwen2.forward(params, cfg, tokens)
  direct = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0] * mask
  np.testing.assert_allclose(np.asarray(logp), np.asarray(direct), atol=3e-5, rtol=1e-5)


def test_token_logprobs_param_gradients_match_naive():
  params = _params(CFG, seed=2)
  rng = np.random.RandomState(2)
  tokens = jnp.asarray(rng.randint(0, CFG.vocab_size, (2, 10)))
  targets = jnp.roll(tokens, -1, axis=1)
  mask = jnp.ones((2, 10)).at[:, -1].set(0)
  adv = jnp.asarray(rng.randn(2, 10).astype(np.float32))

  def chunked(p):
    return jnp.sum(adv * lp.token_logprobs(p, CFG, tokens, targets, mask, chunk_size=3))

  def full(p):
    logp = jax.nn.log_softmax(qwen2.forward(p, CFG, tokens))
    return jnp.sum(adv * mask * jnp.take_along_axis(logp, targets[..., None], -1)[..., 0])

  got, ref = jax.jit(jax.grad(chunked))(params), jax.jit(jax.grad(full))(params)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-5, rtol=1e-4)


def test_packed_targets_give_the_same_logprobs_entropy_and_gradients():
  """Projecting only the packed scored positions (agent.trajectory.packed_targets) equals the full projection:
  values, entropies and parameter gradients (float32, atol 1e-5); rows with no scored target are all zeros."""
  from searche1_jax.agent import trajectory
  params = _params(CFG, seed=4)
  rng = np.random.RandomState(4)
  tokens = jnp.asarray(rng.randint(0, CFG.vocab_size, (3, 20)))
  loss_mask = (rng.rand(3, 20) > 0.6).astype(np.int32)
  loss_mask[2] = 0  # a row with nothing to score
  packed = trajectory.packed_targets(loss_mask, minimum=4)
  k, most = packed["target_index"].shape[1], loss_mask[:, 1:].sum(1).max()
  assert k & (k - 1) == 0 and most <= k < 2 * most  # the next power of two
  np.testing.assert_array_equal(packed["target_valid"].sum(1), loss_mask[:, 1:].sum(1))
  inputs, targets, mask = tokens[:, :-1], tokens[:, 1:], jnp.asarray(loss_mask[:, 1:])
  adv = jnp.asarray(rng.randn(3, 19).astype(np.float32))

  def score(p, **kw):
    return lp.token_logprobs(p, CFG, inputs, targets, mask, chunk_size=3, return_entropy=True, **kw)

  full = score(params)
  got = score(params, target_index=jnp.asarray(packed["target_index"]),
              target_valid=jnp.asarray(packed["target_valid"]))
  for g, f in zip(got, full):
    np.testing.assert_allclose(np.asarray(g), np.asarray(f), atol=1e-5, rtol=0)
  assert np.all(np.asarray(got[0])[2] == 0) and np.any(np.asarray(got[0])[:2] != 0)
  loss = lambda p, **kw: jnp.sum(adv * score(p, **kw)[0])
  g_full = jax.grad(loss)(params)
  g_packed = jax.grad(functools.partial(loss, target_index=jnp.asarray(packed["target_index"]),
                                        target_valid=jnp.asarray(packed["target_valid"])))(params)
  for a, b in zip(jax.tree.leaves(g_packed), jax.tree.leaves(g_full)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_chunked_memory_stays_below_full_logits():
  """Compiled temp memory of value+grad with V=32768: chunked < size of one [B, T, V] f32 logits <= naive."""
  b, t, d, v, chunk = 2, 256, 64, 32768, 32
  full_bytes = b * t * v * 4  # 64 MiB
  hidden = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
  head = jax.ShapeDtypeStruct((d, v), jnp.float32)
  targets = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def chunked(h, k, tg):
    return jnp.sum(lp.logprobs_from_hidden(h, k, tg, chunk_size=chunk))

  def naive_fn(h, k, tg):
    logp = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h, k))
    return jnp.sum(jnp.take_along_axis(logp, tg[..., None], -1))

  def temp(fn):
    grad = jax.value_and_grad(fn, argnums=(0, 1))
    return jax.jit(grad).lower(hidden, head, targets).compile().memory_analysis().temp_size_in_bytes

  chunked_temp, naive_temp = temp(chunked), temp(naive_fn)
  assert naive_temp >= full_bytes  # the measurement does see a [B, T, V] array when there is one
  assert chunked_temp < full_bytes / 2, (chunked_temp, full_bytes)


def test_chunked_time_map_pads_and_unpads():
  x = jnp.arange(2 * 7 * 3, dtype=jnp.float32).reshape(2, 7, 3)
  (out,) = lp.chunked_time_map(lambda c: (jnp.sum(c, -1),), [x], chunk_size=3)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x).sum(-1))
