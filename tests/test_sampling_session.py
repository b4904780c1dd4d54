"""The multi-turn Session: extend + decode equals decoding the concatenation from scratch, compaction and cache
growth change nothing, trajectories line up, cache-full and bad input, and a bounded number of compilations."""
import jax
import numpy as np
import pytest

from searche1_jax.models import qwen2
from searche1_jax.sampling import SamplerOptions, Session, TRACE_COUNTS, generate
from test_sampling_util import teacher_forced_logprobs, tiny_cfg

SMALL = SamplerOptions(decode_chunk=5, min_cache=16, min_length=8)


def init_params(cfg, seed):
  return jax.jit(qwen2.init_params, static_argnums=0)(cfg.replace(initializer_range=0.2), jax.random.key(seed))


@pytest.fixture(scope="module")
def model():
  cfg = tiny_cfg()
  params = init_params(cfg, 3)
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (4, 11, 2, 7)]
  return cfg, params, prompts


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_extend_then_decode_equals_decoding_the_concatenation(model, temperature):
  cfg, params, prompts = model
  rng = np.random.default_rng(2)
  sess = Session(params, cfg, prompts, max_len=64, temperature=temperature, seed=4, options=SMALL)
  first = sess.decode(6)
  ext = {0: rng.integers(0, cfg.vocab_size, 9).tolist(), 2: rng.integers(0, cfg.vocab_size, 20).tolist(),
         3: rng.integers(0, cfg.vocab_size, 1).tolist()}  # sequence 1 is not extended
  sess.extend(ext)
  second = sess.decode(8)
  concat = [p + first.tokens[i] + ext.get(i, []) for i, p in enumerate(prompts)]
  for i in range(len(prompts)):
    assert sess.tokens(i) == concat[i] + second.tokens[i]
  # From scratch: same seed and sequence index, so sampled draws are keyed identically.
  scratch = generate(params, cfg, concat, max_new_tokens=8, temperature=temperature, seed=4, options=SMALL)
  assert second.tokens == scratch.tokens
  for a, b, c, toks in zip(second.logprobs, scratch.logprobs, concat, second.tokens):
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(a, teacher_forced_logprobs(params, cfg, c, toks), atol=1e-4)


def test_extending_a_few_rows_of_a_large_batch_computes_only_theirs(model):
  """Two of eight sequences extended: the sub-batch program (extend_rows) runs, and the next decode equals decoding
  the concatenations from scratch."""
  cfg, params, prompts = model
  prompts = prompts * 2
  rng = np.random.default_rng(6)
  sess = Session(params, cfg, prompts, max_len=64, temperature=1.0, seed=9, options=SMALL)
  first = sess.decode(3)
  ext = {1: rng.integers(0, cfg.vocab_size, 5).tolist(), 6: rng.integers(0, cfg.vocab_size, 12).tolist()}
  calls, sub = sess.stats["extend_calls"], sess.stats["sub_batch_extends"]
  sess.extend(ext)
  assert sess.stats["extend_calls"] == calls + 1 and sess.stats["sub_batch_extends"] == sub + 1
  assert sess.batch_size == 8
  second = sess.decode(6)
  concat = [p + first.tokens[i] + ext.get(i, []) for i, p in enumerate(prompts)]
  scratch = generate(params, cfg, concat, max_new_tokens=6, temperature=1.0, seed=9, options=SMALL)
  assert second.tokens == scratch.tokens
  for a, b in zip(second.logprobs, scratch.logprobs):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_trajectory_accessors_line_up(model):
  cfg, params, prompts = model
  sess = Session(params, cfg, prompts, max_len=64, options=SMALL)
  out1 = sess.decode(4)
  sess.extend({1: [5, 6, 7]})
  out2 = sess.decode(3)
  i = 1
  want = prompts[i] + out1.tokens[i] + [5, 6, 7] + out2.tokens[i]
  assert sess.tokens(i) == want and sess.lengths[i] == len(want)
  mask = sess.policy_mask(i)
  np.testing.assert_array_equal(mask, [0] * len(prompts[i]) + [1] * 4 + [0] * 3 + [1] * 3)
  lps = sess.logprobs(i)
  np.testing.assert_array_equal(lps[mask == 1], np.concatenate([out1.logprobs[i], out2.logprobs[i]]))
  assert np.all(lps[mask == 0] == 0)


def rollout(params, cfg, prompts, options, temperature=1.0, turns=4, finish_prob=0.4, max_len=80):
  """A scripted multi-turn rollout: decode, finish some, extend the others with varied lengths, decode again."""
  rng = np.random.default_rng(7)
  sess = Session(params, cfg, prompts, max_len=max_len, temperature=temperature, seed=9, options=options)
  outs = []
  for turn in range(turns):
    stops = [[int(rng.integers(0, 96))], [1, 2, 3], [4, 5]][:turn % 3 + 1]
    out = sess.decode(int(rng.integers(3, 9)), stop_sequences=stops)
    outs.append(out)
    live = sess.live
    done = [i for i in live if rng.random() < finish_prob]
    sess.finish(done)
    sess.extend({i: rng.integers(0, cfg.vocab_size, int(rng.integers(1, 15))).tolist()
                 for i in live if i not in done})
  trajs = [(sess.tokens(i), sess.logprobs(i), sess.policy_mask(i)) for i in range(sess.num_sequences)]
  return sess, outs, trajs


@pytest.mark.slow  # ~20 s on 2 shared cores (two 4-turn rollouts over several batch buckets)
def test_shared_prompt_prefill_equals_prefilling_every_copy(model):
  """The G copies of a prompt prefill once and copy their cache rows: sampled turns, extends and log-probs equal a
  session that prefills every copy (draws are keyed by sequence index, so copies still sample independently)."""
  cfg, params, prompts = model
  group = [p for p in prompts for _ in range(3)]  # 4 questions x 3 samples, group-contiguous as in a rollout
  outs = {}
  for share in (True, False):
    sess = Session(params, cfg, group, max_len=64, temperature=1.0, seed=9,
                   options=SamplerOptions(decode_chunk=5, min_cache=16, min_length=8, share_prompts=share))
    first = sess.decode(6)
    sess.extend({i: [i % cfg.vocab_size, 3] for i in range(0, len(group), 2)})
    second = sess.decode(5)
    outs[share] = (sess, first, second)
  (shared, f1, s1), (plain, f2, s2) = outs[True], outs[False]
  assert shared.stats["shared_prefills"] == 8 and plain.stats["shared_prefills"] == 0
  assert f1.tokens == f2.tokens and s1.tokens == s2.tokens and f1.stop_reason == f2.stop_reason
  assert len({tuple(t) for t in f1.tokens[:3]}) > 1  # the copies of one prompt sampled different turns
  for i in range(len(group)):
    assert shared.tokens(i) == plain.tokens(i)
    np.testing.assert_array_equal(shared.policy_mask(i), plain.policy_mask(i))
    np.testing.assert_allclose(shared.logprobs(i), plain.logprobs(i), atol=1e-5)


def test_admitted_sequences_decode_as_if_they_had_been_there_from_the_start(model):
  """admit() puts new prompts into rows of finished sequences (and a larger batch when those run out) while the
  others keep their state: every sequence decodes what a session holding all prompts from the start decodes
  (draws are keyed by sequence index), and the live one goes on as if nothing was admitted."""
  cfg, params, prompts = model
  opts = SamplerOptions(decode_chunk=5, min_cache=16, min_length=8, share_prompts=False)
  sess = Session(params, cfg, prompts[:2], max_len=64, temperature=1.0, seed=5, options=opts)
  first = sess.decode(4)
  sess.finish([0])
  admitted = [prompts[2], prompts[3] + [1, 2, 3] * 7, prompts[0]]  # 3 new, one free row: the batch grows
  assert sess.admit(admitted) == [2, 3, 4] and sess.batch_size == 4 and sess.live == [1, 2, 3, 4]
  second = sess.decode(6)
  # The admitted sequences: as in a session holding them from the start (same indices), decoding 6 at once.
  fresh = Session(params, cfg, prompts[:2] + admitted, max_len=64, temperature=1.0, seed=5, options=opts)
  fresh.finish([0, 1])
  want = fresh.decode(6)
  # The live sequence: as if nothing had been admitted.
  ref = Session(params, cfg, prompts[:2], max_len=64, temperature=1.0, seed=5, options=opts)
  assert ref.decode(4).tokens == first.tokens
  ref.finish([0])
  want_1 = ref.decode(6)
  assert second.tokens[1] == want_1.tokens[1] and second.tokens[2:] == want.tokens[2:]
  np.testing.assert_allclose(second.logprobs[1], want_1.logprobs[1], atol=1e-5)
  for i in (2, 3, 4):
    np.testing.assert_allclose(second.logprobs[i], want.logprobs[i], atol=1e-5)
    assert sess.tokens(i) == fresh.tokens(i) and not sess.policy_mask(i)[:len(admitted[i - 2])].any()
  with pytest.raises(ValueError, match="admit: prompt #0"):
    sess.admit([[]])


def test_admit_prefills_identical_prompts_once(model):
  cfg, params, prompts = model
  opts = dict(decode_chunk=5, min_cache=16, min_length=8)
  admitted = [prompts[1], prompts[2], prompts[1], prompts[1]]
  runs = []
  for share in (True, False):
    sess = Session(params, cfg, prompts[:1], max_len=64, temperature=1.0, seed=2,
                   options=SamplerOptions(share_prompts=share, **opts))
    sess.decode(3)
    assert sess.admit(admitted) == [1, 2, 3, 4]
    runs.append((sess, sess.decode(7)))
  (shared, out), (plain, want) = runs
  assert shared.stats["shared_prefills"] == 2 and plain.stats["shared_prefills"] == 0
  assert shared.stats["extend_calls"] == plain.stats["extend_calls"]
  assert out.tokens == want.tokens
  for i in range(5):
    assert shared.tokens(i) == plain.tokens(i)
    np.testing.assert_allclose(out.logprobs[i], want.logprobs[i], atol=1e-5)


def test_turns_begun_between_chunks_decode_what_one_decode_does(model):
  """begin/step: sequences that start their turns at different chunks, with different budgets, and one extended
  between its turns, produce what whole-batch `decode` calls produce (draws keyed by index and position)."""
  cfg, params, prompts = model
  ref = Session(params, cfg, prompts, max_len=64, temperature=1.0, seed=8, options=SMALL)
  want = ref.decode(12, stop_sequences=[[5]])
  sess = Session(params, cfg, prompts, max_len=64, temperature=1.0, seed=8, options=SMALL)
  sess.begin([0, 1], 12, [[5]])
  got = [[] for _ in prompts]
  reasons = [None] * 4
  for k in range(8):
    if k == 2:
      sess.begin([2, 3], 12, [[5]])
    out = sess.step()
    for i in range(4):
      got[i] += out.tokens[i]
      reasons[i] = out.stop_reason[i] or reasons[i]
  assert sess.in_turn == [] and got == want.tokens and reasons == want.stop_reason
  for i in range(4):
    assert sess.tokens(i) == ref.tokens(i)
    np.testing.assert_allclose(sess.logprobs(i), ref.logprobs(i), atol=1e-5)
  sess.begin([1], 0)
  with pytest.raises(ValueError, match="sequence 1 is in a turn"):
    sess.extend({1: [3]})
  with pytest.raises(ValueError, match="already in a turn"):
    sess.begin([1], 4)
  with pytest.raises(ValueError, match="other stop sequences"):
    sess.begin([2], 4, [[7]])
  assert sess.step().stop_reason == [None, "length", None, None] and sess.in_turn == []
  sess.finish([3])
  with pytest.raises(ValueError, match="begin: sequence 3 is finished"):
    sess.begin([3], 4)


def assert_same_rollout(outs, trajs, ref_outs, ref_trajs):
  """Two `rollout` results: the same decode outputs and trajectories (log-probs to float rounding, 1e-5)."""
  for o1, o2 in zip(outs, ref_outs, strict=True):
    assert o1.tokens == o2.tokens and o1.stop_reason == o2.stop_reason
  for (t1, l1, m1), (t2, l2, m2) in zip(trajs, ref_trajs, strict=True):
    assert t1 == t2
    np.testing.assert_array_equal(m1, m2)
    np.testing.assert_allclose(l1, l2, atol=1e-5)


def test_compaction_and_cache_growth_change_nothing(model):
  cfg, params, prompts = model
  prompts = prompts * 4  # 16 sequences: room to compact 16 -> 8 -> 4 ...
  ref_sess, ref_outs, ref = rollout(params, cfg, prompts, SamplerOptions(decode_chunk=5, compact=False,
                                                                          grow_cache=False, min_length=8))
  sess, outs, got = rollout(params, cfg, prompts, SamplerOptions(decode_chunk=5, min_cache=64, min_length=8))
  assert ref_sess.batch_size == 16 and ref_sess.cache_length == 128
  assert sess.batch_size < 16 and sess.stats["relayouts"] >= 2
  assert_same_rollout(outs, got, ref_outs, ref)


def test_kv_cache_layouts_sample_the_same(model):
  """The cache slots-major, keys and values [B, S, K, hd] ('slots_major', the TPU presets'): the same
  multi-turn rollout (extends, compaction and cache growth) gives the same tokens and log-probs
  (float rounding)."""
  cfg, params, prompts = model
  opts = SamplerOptions(decode_chunk=5, min_cache=64, min_length=8)
  ref_sess, ref_outs, ref = rollout(params, cfg, prompts * 4, opts)
  sess, outs, got = rollout(params, cfg.replace(kv_cache_layout="slots_major"), prompts * 4, opts)
  assert sess._cache.k[0].shape == sess._cache.v[0].shape == (sess.batch_size, sess.cache_length, cfg.num_kv_heads,
                                                              cfg.head_dim)
  assert sess.stats["relayouts"] >= 2
  assert_same_rollout(outs, got, ref_outs, ref)


def test_finished_sequences_get_nothing_and_cache_full_stops(model):
  cfg, params, prompts = model
  sess = Session(params, cfg, prompts, max_len=prompts[1].__len__() + 5, options=SMALL)
  sess.finish([0])
  out = sess.decode(8)
  assert out.tokens[0] == [] and out.stop_reason[0] is None
  assert out.stop_reason[1] == "cache_full" and len(out.tokens[1]) == 5 and sess.room[1] == 0
  assert out.stop_reason[2] == "length" and len(out.tokens[2]) == 8
  again = sess.decode(2)
  assert again.stop_reason[1] == "cache_full" and again.tokens[1] == []
  assert sess.decode(0).stop_reason == [None, "length", "length", "length"]
  with pytest.raises(ValueError, match="sequence 1 holds 16 tokens; appending 1 would exceed max_len=16"):
    sess.extend({1: [3]})
  with pytest.raises(ValueError, match="sequence 0 is finished"):
    sess.extend({0: [3]})
  with pytest.raises(ValueError, match=r"tokens for sequence 2: token #0 is -1"):
    sess.extend({2: [-1]})
  with pytest.raises(ValueError, match="sequence index 7 out of range"):
    sess.finish([7])
  with pytest.raises(ValueError, match="max_len 3"):
    Session(params, cfg, prompts, max_len=3)
  with pytest.raises(ValueError, match="sampling.cache_buckets"):
    Session(params, cfg, prompts, max_len=300, options=SamplerOptions(cache_buckets=(64, 128)))


def test_long_extend_is_split_into_bounded_programs(model):
  cfg, params, prompts = model
  opts = SamplerOptions(decode_chunk=5, min_cache=16, min_length=8, max_extend=16)
  long = np.random.default_rng(5).integers(0, cfg.vocab_size, 40).tolist()
  sess = Session(params, cfg, [prompts[0], long], max_len=80, options=opts)  # the 40-token prompt: 3 calls
  assert sess.stats["extend_calls"] == 3
  out = sess.decode(6)
  ref = generate(params, cfg, [prompts[0], long], max_new_tokens=6, options=SMALL)
  assert out.tokens == ref.tokens


@pytest.mark.slow  # ~23 s on 2 shared cores (compiles a fresh config's programs on purpose)
def test_compilations_are_bounded_over_a_multi_turn_rollout(model):
  _, _, prompts = model
  cfg = tiny_cfg(rope_theta=20000.0)  # a config no other test uses: its programs are traced here first
  params = init_params(cfg, 4)
  compiles = []
  listener = lambda event, secs, **kw: compiles.append(kw.get("fun_name")) if event.endswith(
      "backend_compile_duration") else None
  kw = dict(turns=10, finish_prob=0.0, max_len=260)
  opts = SamplerOptions(decode_chunk=5, min_cache=64, min_length=8)
  before = TRACE_COUNTS.copy()
  sess, _, _ = rollout(params, cfg, prompts, opts, **kw)
  first = TRACE_COUNTS - before
  calls = sess.stats["decode_chunks"] + sess.stats["extend_calls"] + sess.stats["relayouts"] + 1
  # 10 turns with varied budgets, extend lengths (1..14) and stop-sequence sets (1..3 sequences of 1..3 ids):
  # at most one decode program per cache bucket visited (64, 128, 256), one extend program per (length bucket
  # 8 | 16, cache bucket), one growth program per growth (no sequence finishes: no compaction, no relayout);
  # budgets and stop-sequence sets never retrace.
  assert sess.cache_length == 256
  assert first["decode"] <= 3 and first["extend"] <= 6 and first["new_state"] == 1
  assert 1 <= first["grow"] <= 2 and first["relayout"] == 0
  assert sum(first.values()) < calls
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    mid = TRACE_COUNTS.copy()
    rollout(params, cfg, prompts, opts, **kw)  # the same shapes again: nothing is traced or compiled
    assert TRACE_COUNTS == mid
    assert compiles == []
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
