"""The pure sampling math against plain numpy: top-k / top-p support and frequencies, log-probs, stop
matching, buckets, and the config block."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.parts import sampling as sampling_part
from searche1_jax.sampling import ops
from searche1_jax.sampling.options import SamplerOptions, bucket


def np_allowed_probs(logits, temperature, top_k, top_p):
  """HF-style warpers in numpy: temperature, then top-k, then top-p; returns the renormalized probs [V]."""
  x = np.asarray(logits, np.float64) / temperature
  order = np.argsort(-x, kind="stable")
  keep = np.zeros(x.shape, bool)
  cand = order[:top_k] if top_k else order
  p = np.exp(x[cand] - x[cand].max())
  p /= p.sum()
  mass_before = np.cumsum(p) - p
  keep[cand[mass_before < top_p]] = True
  out = np.where(keep, np.exp(x - x.max()), 0.0)
  return out / out.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.6),
                                                     (1.3, 8, 0.8)])
def test_sampling_frequencies_and_support(temperature, top_k, top_p):
  v, n = 24, 6000
  logits = np.random.default_rng(1).normal(0, 1.5, v).astype(np.float32)
  keys = ops.row_keys(jnp.int32(7), jnp.arange(n, dtype=jnp.int32), jnp.zeros(n, jnp.int32))
  toks = jax.jit(lambda lg, k: ops.sample_tokens(lg, k, temperature, greedy=False, top_k=top_k, top_p=top_p,
                                                 use_top_p=top_p < 1))(jnp.tile(logits, (n, 1)), keys)
  freq = np.bincount(np.asarray(toks), minlength=v) / n
  want = np_allowed_probs(logits, temperature, top_k, top_p)
  assert np.all(freq[want == 0] == 0), "mass outside the allowed set"
  # 6000 draws: the standard error of a frequency is <= 0.0065; allow ~4 sigma.
  np.testing.assert_allclose(freq, want, atol=0.026)
  if top_k:
    assert (want > 0).sum() <= top_k


def test_greedy_is_argmax_and_logprob_is_log_softmax():
  logits = np.random.default_rng(2).normal(0, 3, (5, 40)).astype(np.float32)
  toks = ops.sample_tokens(jnp.asarray(logits), None, 1.0, greedy=True)
  np.testing.assert_array_equal(np.asarray(toks), logits.argmax(-1))
  lp = np.asarray(ops.token_logprob(jnp.asarray(logits), toks))
  x = logits.astype(np.float64)
  ref = x[np.arange(5), logits.argmax(-1)] - np.log(np.exp(x).sum(-1))
  np.testing.assert_allclose(lp, ref, atol=1e-5)


def test_row_keys_depend_only_on_seed_sequence_and_position():
  k1 = ops.row_keys(jnp.int32(3), jnp.array([0, 1, 2]), jnp.array([5, 5, 9]))
  k2 = ops.row_keys(jnp.int32(3), jnp.array([2, 0]), jnp.array([9, 5]))
  d1, d2 = jax.random.key_data(k1), jax.random.key_data(k2)
  np.testing.assert_array_equal(d1[2], d2[0])
  np.testing.assert_array_equal(d1[0], d2[1])
  assert not np.array_equal(d1[0], d1[1])


def test_buckets():
  assert [bucket(n, (), 16, "x") for n in (0, 1, 16, 17, 100)] == [16, 16, 16, 32, 128]
  assert [bucket(n, (24, 8, 64), 1, "x") for n in (1, 8, 9, 64)] == [8, 8, 24, 64]
  with pytest.raises(ValueError, match="sampling.batch_buckets"):
    bucket(65, (8, 64), 1, "sampling.batch_buckets")


def test_options_from_config_block():
  block = sampling_part.get()
  opts = SamplerOptions.from_config(block)
  assert opts == SamplerOptions()  # the block documents the same defaults
  block.cache_buckets = [256, 512]
  block.decode_chunk = 16
  opts = SamplerOptions.from_config(block)
  assert opts.cache_buckets == (256, 512) and opts.decode_chunk == 16
  with pytest.raises(ValueError, match="decode_chunk"):
    SamplerOptions(decode_chunk=0)
  with pytest.raises(ValueError, match="unknown sampling config field.*decode_chnk"):
    SamplerOptions.from_config({"decode_chnk": 3})
  with pytest.raises(ValueError, match="max_extend"):
    SamplerOptions(length_buckets=(16, 32), max_extend=64)
