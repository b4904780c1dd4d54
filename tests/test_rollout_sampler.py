"""The rollout loop on the real sampler (searche1_jax.sampling.Session) with tiny Qwen2 models.

- A bigram-chain model decodes '<search> A </search>', gets the passages spliced in, then '<answer> B </answer>':
  the trajectory equals what the session holds, token for token and mask for mask.
- A random model sampled at temperature 1 (invalid actions, so the invalid-action message is spliced in): the
  sampler log-probs stored in the trajectory, turned into a train batch by to_batch, equal a teacher-forced
  recomputation over the whole trajectory (alignment of old_logprobs / loss_mask with tokens).
- A branching chain model sampled at temperature 1 (searches of random length and number, then answers): the
  'continuous' schedule yields the 'sync' schedule's trajectories, whatever the retriever's latency.
"""
import random
import time

import numpy as np
import pytest

from searche1_jax.agent import protocol
from searche1_jax.agent import rollout
from searche1_jax.agent import trajectory as trajectory_lib
from searche1_jax.models import qwen2
from searche1_jax.sampling import engine
from rollout_testlib import (FakePassage, ScriptedRetriever, chain_params, configs, enc, make_tokenizer,
                             random_params, search_answer_chain)

CFG = qwen2.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                        num_kv_heads=2)
QUESTIONS = [{"id": "q1", "question": "Where is Velora", "golden_answers": ["x"]},
             {"id": "q2", "question": "Who founded Quen Labs?", "golden_answers": ["y"]}]


@pytest.fixture(scope="module")
def tok():
  return make_tokenizer()


def _recording_factory(params, made, options=None, **kw):
  # By default one cache length and no batch re-layout: fewer compiled programs in a test this small.
  options = options or {"grow_cache": False, "compact": False}
  inner = rollout.sampler_session_factory(params, CFG, options=options, **kw)

  def make(prompts, max_len):
    sess = inner(prompts, max_len)
    made.append(sess)
    return sess

  return make


def test_chain_model_search_then_answer(tok):
  chain, a, b = search_answer_chain(tok)
  chain[tok.convert_tokens_to_ids(protocol.ANSWER_CLOSE)] = tok.eos_token_id  # the answer turn ends with EOS
  params = chain_params(CFG, chain)
  passages = [FakePassage("p1", "Velora", "Velora is a city."), FakePassage("p2", "Marisk", "A country.")]
  retriever = ScriptedRetriever({tok.decode([a]): passages})
  p_cfg, r_cfg = configs(max_turns=2, max_response_length=12, max_prompt_length=512)
  made = []
  res = rollout.run_rollouts(_recording_factory(params, made, temperature=0.0, eos_ids=[tok.eos_token_id]), tok,
                             retriever, QUESTIONS, p_cfg, r_cfg, group_size=2)
  (sess,) = made
  ids = {t: tok.convert_tokens_to_ids(t) for t in protocol.TAGS}
  obs = "\n\n<information>" + 'Doc 1(Title: "Velora") Velora is a city.\nDoc 2(Title: "Marisk") A country.' + \
      "</information>\n\n"
  assert retriever.calls == [([tok.decode([a])] * 4, 3)]  # one batched call for the 4 trajectories
  for i, t in enumerate(res.trajectories):
    p = len(t.prompt_ids)
    want = [ids["<search>"], a, ids["</search>"]] + enc(tok, obs) + [ids["<answer>"], b, ids["</answer>"]]
    assert t.response_ids.tolist() == want
    assert t.policy_mask[p:].tolist() == [1, 1, 1] + [0] * len(enc(tok, obs)) + [1, 1, 1]
    assert t.answer == tok.decode([b]) and t.stop_reason == "answer" and t.num_searches == 1
    # The trajectory is what the sampler holds, up to the answer's closing tag: protocol.parse='search_r1' decodes
    # a final turn past '</answer>' (Search-R1 stops only at '</search>') and cuts the turn there.
    held = sess.tokens(i)
    assert held[:len(t.ids)] == t.ids.tolist() and len(held) > len(t.ids)
    np.testing.assert_array_equal(sess.policy_mask(i)[:len(t.ids)], t.policy_mask)
    np.testing.assert_array_equal(sess.logprobs(i)[:len(t.ids)], t.logprobs)
    assert held[len(t.ids):] == [tok.eos_token_id]
  assert sess.finished.all()
  assert res.stats.decode_s > 0 and res.stats.retrieval_calls == 1


def test_sampled_logprobs_align_with_teacher_forcing(tok):
  from searche1_jax.rl.logprobs import token_logprobs
  params = random_params(CFG, seed=1)
  p_cfg, r_cfg = configs(max_turns=1, max_response_length=6, max_prompt_length=512)
  made = []
  res = rollout.run_rollouts(_recording_factory(params, made, temperature=1.0, seed=3), tok, ScriptedRetriever(),
                             QUESTIONS, p_cfg, r_cfg, group_size=2)
  trajs = res.trajectories
  assert all(t.num_turns == 2 for t in trajs)  # one searching turn + the final turn
  assert any(k == "invalid" for t in trajs for k in t.obs_kinds)  # random text: the invalid message was spliced
  # G samples of one prompt differ (independent sampling per sequence index).
  assert trajs[0].response_ids.tolist() != trajs[1].response_ids.tolist()
  batch = trajectory_lib.to_batch(trajs, np.zeros(len(trajs)))
  tokens = batch["tokens"]
  recomputed = np.asarray(token_logprobs(params, CFG, tokens[:, :-1], tokens[:, 1:],
                                         attention_mask=batch["attention_mask"][:, :-1]))
  mask = batch["loss_mask"][:, 1:].astype(bool)
  assert mask.sum() == sum(t.num_policy_tokens for t in trajs)
  np.testing.assert_allclose(batch["old_logprobs"][:, 1:][mask], recomputed[mask], atol=2e-4)


class _SlowRetriever(ScriptedRetriever):
  """Sleeps a random 0-40 ms per call (its own RNG: the latency differs from run to run)."""

  def retrieve(self, queries, topk):
    time.sleep(random.uniform(0.0, 0.04))
    return super().retrieve(queries, topk)


def test_continuous_schedule_gives_the_sync_trajectories(tok):
  """Sampled at temperature 1, a model that searches a random number of times with queries of random length, then
  answers: 'continuous' with 3 decode slots (items admitted as others finish, retrieval on a thread that sleeps a
  random time) gives 'sync''s trajectories, token for token; programs are traced once per shape."""
  chain, a, b = search_answer_chain(tok)
  nl = enc(tok, "\n")[0]
  ids = {t: tok.convert_tokens_to_ids(t) for t in protocol.TAGS}
  obs_end = enc(tok, protocol.INFORMATION_CLOSE + "\n\n")[-1]
  # A query: A, then A again or '</search>'; after an observation: search again or answer.
  chain.update({a: (a, ids["</search>"]), obs_end: (ids["<search>"], ids["<answer>"]),
                nl: (ids["<search>"], ids["<answer>"])})
  params = chain_params(CFG, chain)
  p_cfg, r_cfg = configs(max_turns=3, max_response_length=10, max_prompt_length=512)
  questions = [dict(QUESTIONS[k % 2], id=f"q{k}") for k in range(4)]
  runs = {}
  before = engine.TRACE_COUNTS.copy()
  for schedule in ("sync", "continuous", "continuous"):
    r_cfg.schedule, r_cfg.decode_slots = schedule, 3
    made = []
    # 4-step chunks: turns span chunks and end mid-chunk; batch compaction and cache growth on.
    factory = _recording_factory(params, made, options={"decode_chunk": 4}, temperature=1.0, seed=11,
                                 eos_ids=[tok.eos_token_id])
    res = rollout.run_rollouts(factory, tok, _SlowRetriever(), questions, p_cfg, r_cfg, group_size=2)
    if schedule in runs:  # the second continuous run: the same shapes, nothing traced again
      assert engine.TRACE_COUNTS == traced
    traced = engine.TRACE_COUNTS.copy()
    runs[schedule] = res
  sync, cont = runs["sync"].trajectories, runs["continuous"].trajectories
  searches = [t.num_searches for t in sync]
  assert len(set(searches)) > 1 and sum(t.answer is not None for t in sync) >= 4  # varied work, mostly answered
  for x, y in zip(sync, cont):
    assert x.ids.tolist() == y.ids.tolist() and x.policy_mask.tolist() == y.policy_mask.tolist()
    # Float rounding may differ between the programs of different batch sizes: log-probs agree to 1e-5.
    np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)
    assert (x.stop_reason, x.queries) == (y.stop_reason, y.queries)
  stats = runs["continuous"].stats
  assert stats.decode_chunks < runs["sync"].stats.decode_chunks
  assert 0 < stats.occupancy <= 1
  traces = engine.TRACE_COUNTS - before
  # At most one decode program per (batch bucket 1 | 2 | 4, cache bucket 128 | 256) and one extend program per
  # (length bucket, batch bucket, cache bucket) met; the second continuous run traced none (above).
  assert traces["decode"] <= 6 and traces["extend"] <= 12 and traces["new_state"] <= 2, traces
