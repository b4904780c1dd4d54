"""Sharded sampling on 8 fake CPU devices (fsdp=4 x tensor=2) equals the single-device sampler."""
import jax
import numpy as np
import pytest

from searche1_jax import sharding
from searche1_jax.models import qwen2
from searche1_jax.sampling import SamplerOptions, Session, generate
from searche1_jax.sampling import session as session_lib
from test_sampling_util import tiny_cfg

OPTS = SamplerOptions(decode_chunk=6, min_cache=32, min_length=8)


def _assert_same_outputs(got, ref):
  """Sharded decode outputs equal the single-device ones: tokens and stop reasons exactly, log-probs to 1e-5."""
  assert len(got) == len(ref)
  for o1, o2 in zip(got, ref):
    assert o1.tokens == o2.tokens and o1.stop_reason == o2.stop_reason
    for a, b in zip(o1.logprobs, o2.logprobs):
      np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.fixture(scope="module")
def setup():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (tests/conftest.py sets XLA_FLAGS before jax is imported)")
  cfg = tiny_cfg()
  params = jax.jit(qwen2.init_params, static_argnums=0)(cfg.replace(initializer_range=0.2), jax.random.key(8))
  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  sharded = qwen2.shard_params(params, cfg, mesh)
  rng = np.random.default_rng(4)
  prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (5, 12, 3, 8, 1, 9)]
  return cfg, params, sharded, mesh, prompts


def test_params_really_are_sharded(setup):
  cfg, _, sharded, mesh, _ = setup
  q = sharded["layers"]["attn"]["q"]["kernel"]  # [L, D, H, hd]: embed over fsdp, heads over tensor
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sharded_generate_equals_single_device(setup, temperature):
  cfg, params, sharded, mesh, prompts = setup
  kw = dict(max_new_tokens=9, temperature=temperature, top_k=20 if temperature else 0, seed=2, options=OPTS,
            stop_sequences=[[7, 8]])
  one = generate(params, cfg, prompts, **kw)
  many = generate(sharded, cfg, prompts, mesh=mesh, **kw)
  assert many.tokens == one.tokens and many.stop_reason == one.stop_reason
  for a, b in zip(many.logprobs, one.logprobs):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_sharded_session_multi_turn_equals_single_device(setup):
  cfg, params, sharded, mesh, prompts = setup
  prompts = prompts + prompts[:2]  # 8 sequences -> batch bucket 8, compacts to 4

  def run(p, m):
    sess = Session(p, cfg, prompts, max_len=60, temperature=1.0, seed=5, mesh=m, options=OPTS)
    outs = [sess.decode(5)]
    sess.finish([0, 1, 2, 3])
    sess.extend({4: [1, 2, 3], 7: list(range(10, 30))})
    outs.append(sess.decode(7))
    sess.finish([5])
    outs.append(sess.decode(4))
    return sess, outs

  ref_sess, ref = run(params, None)
  sess, got = run(sharded, mesh)
  assert sess.batch_size == 4 and sess.batch_size == ref_sess.batch_size
  # The cache follows qwen2.cache_axes (heads-major): batch over (data, fsdp), kv heads over tensor.
  for arr in sess._cache.k + sess._cache.v:
    spec = tuple(arr.sharding.spec) + (None,) * 4
    batch_axes = {spec[0]} if isinstance(spec[0], str) else set(spec[0] or ())
    assert "fsdp" in batch_axes and batch_axes <= {"data", "fsdp"} and spec[1] == "tensor"
    assert spec[2] is None and spec[3] is None
  _assert_same_outputs(got, ref)


def test_compaction_keeps_rows_on_their_shard_and_equals_single_device(setup):
  """When every batch shard's live rows fit its share of the smaller batch, the compaction gathers shard-locally
  (no row changes device; engine.relayout_local); otherwise it falls back to the global gather. Either way the
  session decodes what the single-device one does."""
  cfg, params, sharded, mesh, prompts = setup
  prompts = prompts + prompts[:2]  # 8 rows, 2 per fsdp shard

  def run(p, m, finished):
    sess = Session(p, cfg, prompts, max_len=60, temperature=1.0, seed=7, mesh=m, options=OPTS)
    outs = [sess.decode(5)]
    sess.finish(finished)
    outs.append(sess.decode(6))
    return sess, outs

  for finished, local in (([0, 2, 4, 6], True), ([0, 1, 2, 3], False)):  # one live row per shard; two in shards 2, 3
    ref_sess, ref = run(params, None, finished)
    sess, got = run(sharded, mesh, finished)
    assert sess.batch_size == ref_sess.batch_size == 4
    assert sorted(sess._row[sess.live].tolist()) == [0, 1, 2, 3]
    assert sess.stats["shard_local_relayouts"] == int(local) and ref_sess.stats["shard_local_relayouts"] == 0
    _assert_same_outputs(got, ref)


def test_shard_local_positions():
  positions = session_lib._shard_local_positions
  # 8 rows in 4 shards of 2 -> 4 rows in 4 shards of 1: rows 1, 3, 5, 6 are one per shard.
  assert positions(np.array([6, 1, 3, 5]), 8, 4, 4).tolist() == [3, 0, 1, 2]
  assert positions(np.array([4, 5]), 8, 4, 4) is None  # both in shard 2
  assert positions(np.array([0, 5]), 8, 4, 1) is None  # one shard: the plain gather
  assert positions(np.array([5, 2, 0]), 8, 4, 2).tolist() == [2, 1, 0]  # shards of 4 -> 2, old order within
  assert positions(np.array([0, 3, 2]), 8, 4, 2) is None  # three rows of shard 0 for its 2 new places


def test_shared_prompt_fanout_stays_on_each_shard_and_equals_single_device(setup):
  """With shared prompts on the sharded cache (4 batch shards of 2 rows), a prompt is prefilled once per shard its
  copies occupy, so the fan-out gathers inside each shard (engine.relayout_local); when a shard's prompts exceed its
  share of the prefill batch, once, and the fan-out gathers across shards. Either way the session decodes what the
  single-device one does."""
  cfg, params, sharded, mesh, prompts = setup
  for order, prefills, local in (
      ([0, 0, 1, 1, 2, 2, 3, 3], 4, True),  # one prompt per shard
      ([0, 0, 0, 1, 1, 1, 2, 2], 5, True),  # prompts 0 and 1 span two shards each: prefilled in both
      ([0, 1, 2, 3] + [3] * 12, 4, False)):  # 16 rows: shard 0's 4 prompts + 3 more take 8 rows, 2 per shard
    group = [prompts[q] for q in order]

    def run(p, m):
      sess = Session(p, cfg, group, max_len=60, temperature=1.0, seed=3, mesh=m, options=OPTS)
      start = dict(sess.stats)
      return sess, start, [sess.decode(6), sess.decode(4)]

    _, ref_start, ref = run(params, None)
    _, start, got = run(sharded, mesh)
    assert ref_start["shared_prefills"] == len(order) - len(set(order))
    assert start["shared_prefills"] == len(order) - prefills and start["relayouts"] == 1
    assert start["shard_local_relayouts"] == int(local)
    _assert_same_outputs(got, ref)


def test_shard_local_sources():
  sources = session_lib.shard_local_sources
  pow2 = lambda k: 1 << max(k - 1, 0).bit_length()
  source = np.repeat(np.arange(4) * 5, 5)  # 4 prompts x 5 copies in 4 blocks of 8 rows
  # Prompt 5 spans blocks 0 and 1, prompt 15 blocks 1 and 2: each prefilled in both (6 prefills).
  local, rows = sources(source, 32, lambda k: 16, 4)  # a prefill batch of 16: 4 rows per block
  assert local.tolist() == [0] * 5 + [5] * 3 + [8] * 2 + [10] * 5 + [15] + [16] * 4
  assert rows.tolist() == [0, 1, 4, 5, 6, 8]
  assert sources(source, 32, pow2, 4) is None  # 6 prefills -> 8 rows, 2 per block; block 1 has 3 prompts
  assert sources(source, 30, lambda k: 16, 4) is None  # blocks that do not split evenly
  local, rows = sources(np.array([0, 1, 2, 3, 4, 5, 5, 5]), 8, pow2, 4)  # the copies of 5 in blocks 2 and 3
  assert local.tolist() == [0, 1, 2, 3, 4, 5, 6, 6] and rows.tolist() == [0, 1, 2, 3, 4, 5, 6]
  local, rows = sources(np.array([0, 0, 0, 1, 1, 1, 2, 2]), 8, pow2, 4)
  assert local.tolist() == [0, 0, 2, 3, 4, 4, 6, 6] and rows.tolist() == [0, 2, 3, 4, 6]


def test_session_decodes_from_its_gathered_compute_dtype_weights(setup):
  """sampling.gather_weights (default): the session runs on a copy of the float32 params in the bfloat16 compute
  dtype, gathered over fsdp (still split over tensor), and samples bit for bit what the training layout samples."""
  cfg, params, sharded, mesh, prompts = setup
  cfg = cfg.replace(dtype="bfloat16")

  def run(gather):
    opts = SamplerOptions(decode_chunk=6, min_cache=32, min_length=8, gather_weights=gather)
    sess = Session(sharded, cfg, prompts, max_len=40, temperature=1.0, seed=1, mesh=mesh, options=opts)
    outs = [sess.decode(6)]
    sess.extend({0: [3, 4, 5], 3: [9]})
    outs.append(sess.decode(5))
    return sess, outs

  sess, got = run(True)
  q = sess._params["layers"]["attn"]["q"]["kernel"]
  assert q.dtype == jax.numpy.bfloat16 and q.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")
  assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(sess._params))
  ref_sess, ref = run(False)
  assert ref_sess._params is sharded
  for o1, o2 in zip(got, ref):
    assert o1.tokens == o2.tokens and o1.stop_reason == o2.stop_reason
    for a, b in zip(o1.logprobs, o2.logprobs):
      np.testing.assert_array_equal(a, b)
