"""The splash-attention path (models/splash.py, Pallas interpreter on CPU) against the einsum path.

Forward and gradients, causal with left and right padding, float32, <= 1e-5 absolute on the rows a real token
owns (padding rows are unspecified in both paths); the whole model and its sharded form; 'auto' lowers to the
einsum path off TPU.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from searche1_jax import sharding
from searche1_jax.models import qwen2, splash
from searche1_jax.rl import logprobs
from model_testlib import random_params

TOL = dict(atol=1e-5, rtol=0)



def _inputs(seed, b=2, t=256, h=4, k=2, hd=16):
  rng = np.random.RandomState(seed)
  q = rng.randn(b, t, h, hd).astype(np.float32)
  kk, v = rng.randn(2, b, t, k, hd).astype(np.float32)
  real = np.ones((b, t), bool)
  real[0, :37] = False  # left padding
  real[1, t - 90:] = False  # right padding
  w = rng.randn(b, t, h, hd).astype(np.float32) * real[:, :, None, None]  # loss weights on real rows only
  return q, kk, v, real, w


@pytest.mark.parametrize("t", [256, 384])  # one 256-block; three 128-blocks
def test_splash_matches_einsum_forward_and_gradients(t):
  q, k, v, real, w = _inputs(t, t=t)

  def loss(kernel):
    return lambda q, k, v: jnp.sum(w * qwen2.attention(q, k, v, jnp.asarray(real), dtype=jnp.float32,
                                                       causal_block=128, kernel=kernel))

  out_s = qwen2.attention(q, k, v, jnp.asarray(real), dtype=jnp.float32, kernel="splash")
  out_x = qwen2.attention(q, k, v, jnp.asarray(real), dtype=jnp.float32, kernel="xla")
  np.testing.assert_allclose(np.asarray(out_s)[real], np.asarray(out_x)[real], **TOL)
  assert np.all(np.isfinite(np.asarray(out_s)))
  g_s = jax.grad(loss("splash"), argnums=(0, 1, 2))(q, k, v)
  g_x = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_s, g_x):
    assert np.abs(np.asarray(b)).max() > 1e-2  # the comparison is not between zeros
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)


def test_unsupported_length_uses_einsums_and_kernel_call_refuses_it():
  q, k, v, real, _ = _inputs(1, t=100)
  out = qwen2.attention(q, k, v, jnp.asarray(real), dtype=jnp.float32, kernel="splash")  # einsum path
  ref = qwen2.attention(q, k, v, jnp.asarray(real), dtype=jnp.float32, kernel="xla")
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  with pytest.raises(ValueError, match="multiple of 128"):
    splash.attention(q, k, v, jnp.asarray(real), dtype=jnp.float32)


def test_auto_lowers_to_the_einsum_path_off_tpu():
  q, k, v, real, _ = _inputs(2)
  f = lambda kernel: jax.jit(lambda q, k, v: qwen2.attention(q, k, v, jnp.asarray(real), dtype=jnp.float32,
                                                             causal_block=128, kernel=kernel))
  hlo = f("auto").lower(q, k, v).as_text()
  assert "tpu_custom_call" not in hlo and "pallas" not in hlo.lower()
  np.testing.assert_array_equal(np.asarray(f("auto")(q, k, v)), np.asarray(f("xla")(q, k, v)))


CFG = qwen2.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                        num_kv_heads=2, rope_theta=10000.0, initializer_range=0.2)


def _model_case(seed):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(0, CFG.vocab_size, (4, 129)).astype(np.int32)  # inputs tokens[:, :-1]: 128 long
  mask = np.ones((4, 129), np.int32)
  mask[1, :50] = 0  # left-padded prompt
  mask[2, 100:] = 0  # right-padded response
  return random_params(CFG, seed), tokens, mask


def _token_logprob_loss(cfg, tokens, mask):
  scored = mask[:, 1:] * mask[:, :-1]  # targets predicted from a real token (as a response's are)

  def loss(params):
    lp = logprobs.token_logprobs(params, cfg, tokens[:, :-1], tokens[:, 1:], scored, chunk_size=64,
                                 attention_mask=mask[:, :-1])
    return jnp.sum(lp * scored) / scored.sum(), lp
  return loss


def test_model_log_probs_and_gradients_match_with_splash():
  params, tokens, mask = _model_case(3)
  jaxpr = str(jax.make_jaxpr(_token_logprob_loss(CFG.replace(attention="splash"), tokens, mask))(params))
  assert "pallas_call" in jaxpr  # the kernel is in the program (and not the einsum path under its name)
  (l_s, lp_s), g_s = jax.value_and_grad(_token_logprob_loss(CFG.replace(attention="splash"), tokens, mask),
                                        has_aux=True)(params)
  (l_x, lp_x), g_x = jax.value_and_grad(_token_logprob_loss(CFG.replace(attention="xla"), tokens, mask),
                                        has_aux=True)(params)
  np.testing.assert_allclose(np.asarray(lp_s), np.asarray(lp_x), **TOL)
  np.testing.assert_allclose(float(l_s), float(l_x), **TOL)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_s), jax.tree.leaves(g_x)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path), **TOL)


@pytest.mark.parametrize("data,fsdp,tensor", [(1, 4, 1), (2, 2, 2)])
def test_sharded_splash_matches_unsharded(data, fsdp, tensor):
  """Under activation_mesh the kernel runs in a shard_map over the batch (and head) axes."""
  mesh = sharding.make_mesh(data, fsdp, tensor, devices=jax.devices()[:data * fsdp * tensor])
  params, tokens, mask = _model_case(4)
  cfg = CFG.replace(attention="splash")
  loss = _token_logprob_loss(cfg, tokens, mask)

  def step(params):
    with sharding.activation_mesh(mesh):
      return jax.value_and_grad(loss, has_aux=True)(params)

  sharded = qwen2.shard_params(params, cfg, mesh)
  (l_m, lp_m), g_m = jax.jit(step)(sharded)
  hlo = jax.jit(step).lower(sharded).as_text()
  assert "sdy.manual_computation" in hlo
  (l_1, lp_1), g_1 = jax.value_and_grad(loss, has_aux=True)(params)
  np.testing.assert_allclose(np.asarray(lp_m), np.asarray(lp_1), **TOL)
  for a, b in zip(jax.tree.leaves(g_m), jax.tree.leaves(g_1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)


def test_config_rejects_unknown_attention():
  with pytest.raises(ValueError, match="attention must be one of"):
    CFG.replace(attention="flash")
