"""The multi-turn rollout loop driven by a scripted policy: exact token layout, masks, spliced passages, turns."""
import numpy as np
import pytest

from searche1_jax.agent import protocol
from searche1_jax.agent import rollout
from searche1_jax.agent import trajectory as trajectory_lib
from rollout_testlib import (FakePassage, ScriptedRetriever, configs, enc, fake_logprob, make_tokenizer,
                             scripted_factory)

QUESTION = {"id": "q1", "question": "What is the capital of France", "golden_answers": ["Paris", "paris city"]}


@pytest.fixture(scope="module")
def tok():
  return make_tokenizer()


def expected_obs(passages):
  # Written out by hand (independent of protocol.format_observation): Search-R1's code, titles keep their quotes,
  # the doc string is stripped.
  docs = "".join(f'Doc {i + 1}(Title: "{p.title}") {p.text}\n' for i, p in enumerate(passages)).strip()
  return "\n\n<information>" + docs + "</information>\n\n"


def test_two_search_trajectory_exact_layout(tok):
  p_cfg, r_cfg = configs()
  t1 = "<think> I need the capital. </think>\n<search> capital of France </search>"
  t2 = "<think> check again </think><search>  France capital city  </search>"
  t3 = "<think> It is Paris. </think>\n<answer> Paris </answer>"
  passages1 = [FakePassage("a", "Paris", "Paris is the capital of France."),
               FakePassage("b", "France", "France is a country."), FakePassage("c", "Lyon", "Lyon is a city.")]
  passages2 = [FakePassage("d", "Capital", "A capital city."), FakePassage("e", "Paris", "The city of light."),
               FakePassage("f", "Seine", "A river.")]
  retriever = ScriptedRetriever({"capital of France": passages1, "France capital city": passages2})
  holder = []
  res = rollout.run_rollouts(scripted_factory(tok, [[t1, t2, t3]], holder=holder), tok, retriever, [QUESTION],
                             p_cfg, r_cfg, policy_version=7)
  (traj,) = res.trajectories
  prompt = enc(tok, protocol.SEARCH_R1_TEMPLATE.replace("{question}", "What is the capital of France?"))
  parts = [(prompt, 0), (enc(tok, t1), 1), (enc(tok, expected_obs(passages1)), 0), (enc(tok, t2), 1),
           (enc(tok, expected_obs(passages2)), 0), (enc(tok, t3), 1)]
  ids = [t for p, _ in parts for t in p]
  mask = [m for p, m in parts for _ in p]
  np.testing.assert_array_equal(traj.prompt_ids, prompt)
  np.testing.assert_array_equal(traj.ids, ids)
  np.testing.assert_array_equal(traj.policy_mask, mask)
  want_lp = [fake_logprob(k) if m else 0.0 for k, m in enumerate(mask)]
  np.testing.assert_array_equal(traj.logprobs, np.asarray(want_lp, np.float32))
  bounds = np.cumsum([0] + [len(p) for p, _ in parts])
  assert traj.policy_spans == [(bounds[1], bounds[2]), (bounds[3], bounds[4]), (bounds[5], bounds[6])]
  assert traj.obs_spans == [(bounds[2], bounds[3]), (bounds[4], bounds[5])]
  assert traj.obs_kinds == ["information", "information"]
  assert traj.turn_actions == ["search", "search", "answer"]
  assert traj.queries == ["capital of France", "France capital city"]
  assert traj.num_searches == 2
  assert traj.answer == "Paris"
  assert traj.reward == 1.0
  assert traj.stop_reason == "answer"
  assert traj.policy_version == 7 and traj.question_id == "q1" and traj.golden_answers == ["Paris", "paris city"]
  # One batched retriever call per searching turn, with protocol.topk.
  assert retriever.calls == [(["capital of France"], 3), (["France capital city"], 3)]
  sess = holder[0]
  assert sess.seqs[0] == ids  # the session holds exactly the recorded trajectory
  assert sess.extend_calls == [{0: parts[2][0]}, {0: parts[4][0]}]
  assert sess.finish_calls == [[0]]
  assert [c[1] for c in sess.begin_calls] == [p_cfg.max_response_length] * 3
  s = res.stats
  assert (s.num_turns, s.retrieval_calls, s.num_queries, s.retrieval_failures) == (3, 2, 2, 0)
  assert s.decode_s >= 0 and s.retrieval_s >= 0 and s.total_s >= s.decode_s + s.retrieval_s


def test_invalid_action_path(tok):
  p_cfg, r_cfg = configs()
  t1 = "I think the answer is Paris."  # no tags
  t2 = "<answer> Lyon </answer>"
  holder = []
  res = rollout.run_rollouts(scripted_factory(tok, [[t1, t2]], holder=holder), tok, ScriptedRetriever(),
                             [QUESTION], p_cfg, r_cfg)
  (traj,) = res.trajectories
  p = len(traj.prompt_ids)
  inv = enc(tok, protocol.INVALID_ACTION_MESSAGE)
  a, b = enc(tok, t1), enc(tok, t2)
  np.testing.assert_array_equal(traj.response_ids, a + inv + b)
  np.testing.assert_array_equal(traj.policy_mask[p:], [1] * len(a) + [0] * len(inv) + [1] * len(b))
  assert traj.obs_kinds == ["invalid"] and traj.obs_spans == [(p + len(a), p + len(a) + len(inv))]
  assert traj.turn_actions == ["invalid", "answer"]
  assert traj.num_invalid == 1 and traj.num_searches == 0
  assert traj.answer == "Lyon" and traj.reward == 0.0 and traj.stop_reason == "answer"
  assert res.stats.num_invalid_turns == 1 and res.stats.retrieval_calls == 0


def test_max_turns_final_search_not_executed(tok):
  p_cfg, r_cfg = configs(max_turns=4)
  turns = [f"<search> query {k} </search>" for k in range(6)]
  holder = []
  retriever = ScriptedRetriever()
  res = rollout.run_rollouts(scripted_factory(tok, [turns], holder=holder), tok, retriever, [QUESTION], p_cfg, r_cfg)
  (traj,) = res.trajectories
  assert traj.num_searches == 4 and traj.queries == [f"query {k}" for k in range(4)]
  assert traj.turn_actions == ["search"] * 5  # the fifth (final) turn searched, but it was not executed
  assert len(traj.obs_spans) == 4 and len(traj.policy_spans) == 5
  assert traj.policy_spans[-1][1] == len(traj.ids)  # nothing appended after the final turn
  assert traj.stop_reason == "max_turns" and traj.answer is None and traj.reward == 0.0
  assert len(retriever.calls) == 4 and len(holder[0].begin_calls) == 5


def test_group_sampling_batches_queries_into_one_call(tok):
  p_cfg, r_cfg = configs()
  q2 = {"id": "q2", "question": "Who wrote Hamlet?", "golden_answers": ["Shakespeare"]}
  scripts = [
      ["<search> a </search>", "<answer> Paris </answer>"],
      ["<answer> paris city </answer>"],
      ["nothing", "<search> b </search>", "<answer> x </answer>"],
      ["<search> c </search>", "<answer> Shakespeare </answer>"],
      ["<search> d </search>", "<search> e </search>", "<answer> Marlowe </answer>"],
      ["<answer> the Shakespeare </answer>"],
  ]
  holder = []
  retriever = ScriptedRetriever()
  res = rollout.run_rollouts(scripted_factory(tok, scripts, holder=holder), tok, retriever, [QUESTION, q2],
                             p_cfg, r_cfg, group_size=3)
  trajs = res.trajectories
  assert [t.question_id for t in trajs] == ["q1"] * 3 + ["q2"] * 3
  assert [t.sample_index for t in trajs] == [0, 1, 2] * 2
  for t in trajs[1:3]:
    np.testing.assert_array_equal(t.prompt_ids, trajs[0].prompt_ids)
  assert [t.reward for t in trajs] == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
  # Turn 1: queries of sequences 0, 3, 4 in ONE call; turn 2: sequences 2 and 4.
  assert retriever.calls == [(["a", "c", "d"], 3), (["b", "e"], 3)]
  sess = holder[0]
  assert [c[0] for c in sess.begin_calls] == [[0, 1, 2, 3, 4, 5], [0, 2, 3, 4], [2, 4]]
  assert sess.finish_calls == [[1, 5], [0, 3], [2, 4]]
  for i, t in enumerate(trajs):
    assert sess.seqs[i] == t.ids.tolist()


def test_retriever_returns_fewer_or_more_than_topk(tok):
  p_cfg, r_cfg = configs()
  one = [FakePassage("x", "Only", "one passage.")]
  retriever = ScriptedRetriever({"few": one})  # "many" -> the default list of 4 passages
  scripts = [["<search> few </search>", "<answer> a </answer>"], ["<search> many </search>", "<answer> a </answer>"]]
  res = rollout.run_rollouts(scripted_factory(tok, scripts), tok, retriever,
                             [QUESTION, dict(QUESTION, id="q2")], p_cfg, r_cfg)
  few, many = res.trajectories
  s, e = few.obs_spans[0]
  assert few.ids[s:e].tolist() == enc(tok, expected_obs(one))
  s, e = many.obs_spans[0]
  assert many.ids[s:e].tolist() == enc(tok, expected_obs(retriever.default[:3]))


def test_observation_truncated_to_max_obs_length_tokens(tok):
  p_cfg, r_cfg = configs(max_obs_length=7)
  res = rollout.run_rollouts(scripted_factory(tok, [["<search> q </search>", "<answer> a </answer>"]]), tok,
                             ScriptedRetriever(), [QUESTION], p_cfg, r_cfg)
  (traj,) = res.trajectories
  s, e = traj.obs_spans[0]
  assert traj.ids[s:e].tolist() == enc(tok, expected_obs(ScriptedRetriever().default[:3]))[:7]


def test_retriever_fails_once_then_succeeds(tok):
  p_cfg, r_cfg = configs()
  r_cfg.retrieval_retries, r_cfg.retrieval_backoff_s = 2, 0.25
  sleeps = []
  retriever = ScriptedRetriever(fail_times=1)
  res = rollout.run_rollouts(scripted_factory(tok, [["<search> q </search>", "<answer> a </answer>"]]), tok,
                             retriever, [QUESTION], p_cfg, r_cfg, sleep=sleeps.append)
  (traj,) = res.trajectories
  assert sleeps == [0.25] and len(retriever.calls) == 2
  assert traj.obs_kinds == ["information"] and "retrieval_errors" not in traj.metadata
  s, e = traj.obs_spans[0]
  assert traj.ids[s:e].tolist() == enc(tok, expected_obs(retriever.default[:3]))
  assert (res.stats.retrieval_attempts, res.stats.retrieval_calls, res.stats.retrieval_failures) == (2, 1, 0)


@pytest.mark.parametrize("schedule", rollout.SCHEDULES)
def test_retriever_always_fails_gives_error_observation(tok, schedule):
  p_cfg, r_cfg = configs()
  r_cfg.schedule = schedule  # 'continuous': the failing batch runs on the retrieval thread
  r_cfg.retrieval_retries, r_cfg.retrieval_backoff_s, r_cfg.retrieval_backoff_max_s = 3, 1.0, 3.0
  sleeps = []
  retriever = ScriptedRetriever(fail_times=-1)
  scripts = [["<search> q </search>", "<answer> Paris </answer>"], ["<search> r </search>", "<answer> b </answer>"]]
  res = rollout.run_rollouts(scripted_factory(tok, scripts), tok, retriever, [QUESTION, dict(QUESTION, id="q2")],
                             p_cfg, r_cfg, sleep=sleeps.append)
  assert sleeps == [1.0, 2.0, 3.0]  # exponential, capped
  assert len(retriever.calls) == 4 and all(c == (["q", "r"], 3) for c in retriever.calls)
  for traj in res.trajectories:
    assert traj.obs_kinds == ["error"] and traj.num_searches == 1
    s, e = traj.obs_spans[0]
    assert traj.ids[s:e].tolist() == enc(tok, r_cfg.retrieval_error_message)
    assert traj.metadata["retrieval_errors"] == ["ConnectionError: retriever down"]
    assert traj.stop_reason == "answer"
  assert [t.reward for t in res.trajectories] == [1.0, 0.0]
  assert res.stats.retrieval_failures == 1 and res.stats.retrieval_attempts == 4


@pytest.mark.parametrize("schedule", rollout.SCHEDULES)
def test_malformed_retriever_result_is_a_failure(tok, schedule):
  p_cfg, r_cfg = configs()
  r_cfg.retrieval_retries, r_cfg.schedule = 0, schedule

  class Short:
    def retrieve(self, queries, topk):
      return []  # no list for the query

  res = rollout.run_rollouts(scripted_factory(tok, [["<search> q </search>", "<answer> a </answer>"]]), tok,
                             Short(), [QUESTION], p_cfg, r_cfg, sleep=lambda s: None)
  (traj,) = res.trajectories
  assert traj.obs_kinds == ["error"]
  assert "0 result lists for 1 queries" in traj.metadata["retrieval_errors"][0]


def test_per_turn_token_limit_then_invalid(tok):
  p_cfg, r_cfg = configs(max_response_length=4)
  long_turn = "<search> a very long query that never closes in time </search>"
  holder = []
  res = rollout.run_rollouts(scripted_factory(tok, [[long_turn, "<answer>x</answer>"]], holder=holder), tok,
                             ScriptedRetriever(), [QUESTION], p_cfg, r_cfg)
  (traj,) = res.trajectories
  s, e = traj.policy_spans[0]
  assert traj.ids[s:e].tolist() == enc(tok, long_turn)[:4]
  assert traj.turn_actions == ["invalid", "answer"] and traj.obs_kinds == ["invalid"]


def test_total_length_limit(tok):
  p_cfg, r_cfg = configs()
  prompt_len = len(enc(tok, protocol.make_prompt(QUESTION["question"])))
  turn = enc(tok, "<search> q </search>")
  # Room for the first turn, not for its observation plus one more token.
  p_cfg.max_prompt_length = prompt_len + len(turn) + 3
  res = rollout.run_rollouts(scripted_factory(tok, [["<search> q </search>", "<answer> a </answer>"]]), tok,
                             ScriptedRetriever(), [QUESTION], p_cfg, r_cfg)
  (traj,) = res.trajectories
  assert traj.stop_reason == "length" and len(traj.ids) == prompt_len + len(turn) and traj.obs_spans == []
  # A turn cut by the total limit ends the trajectory too.
  p_cfg.max_prompt_length = prompt_len + 2
  holder = []
  res = rollout.run_rollouts(scripted_factory(tok, [["<search> q </search>"]], holder=holder), tok,
                             ScriptedRetriever(), [QUESTION], p_cfg, r_cfg)
  (traj,) = res.trajectories
  assert traj.stop_reason == "length" and len(traj.ids) == prompt_len + 2 and traj.turn_actions == ["invalid"]


def test_prompt_too_long_is_a_clear_error(tok):
  p_cfg, r_cfg = configs(max_start_length=10)
  with pytest.raises(ValueError, match="question id='q1'.*max_start_length=10"):
    rollout.run_rollouts(scripted_factory(tok, [[]]), tok, ScriptedRetriever(), [QUESTION], p_cfg, r_cfg)
  with pytest.raises(KeyError, match="question #0 has no field 'golden_answers'"):
    rollout.run_rollouts(scripted_factory(tok, [[]]), tok, ScriptedRetriever(), [{"id": 1, "question": "x"}],
                         *configs())


def test_chat_template_prompt(tok):
  import copy
  chat_tok = copy.deepcopy(tok)
  chat_tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
  ids = rollout.build_prompt_ids(chat_tok, " Who? ", protocol.SEARCH_R1_TEMPLATE)
  text = "<|user|>" + protocol.SEARCH_R1_TEMPLATE.replace("{question}", "Who?") + "<|end|><|assistant|>"
  assert ids == enc(tok, text)
  assert rollout.build_prompt_ids(tok, "Who", protocol.SEARCH_R1_TEMPLATE) == enc(
      tok, protocol.SEARCH_R1_TEMPLATE.replace("{question}", "Who?"))
  # The one prompt encoder: a system turn goes first; without a chat template a system turn is an error.
  assert protocol.encode_prompt(chat_tok, "hi", system_text="ctx") == enc(
      tok, "<|system|>ctx<|end|><|user|>hi<|end|><|assistant|>")
  with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
    protocol.encode_prompt(tok, "hi", system_text="ctx")


def test_trajectories_pass_validation_and_batch(tok):
  p_cfg, r_cfg = configs()
  scripts = [["<search> a </search>", "<answer> Paris </answer>"], ["oops", "<answer> no </answer>"]]
  res = rollout.run_rollouts(scripted_factory(tok, scripts), tok, ScriptedRetriever(), [QUESTION], p_cfg, r_cfg,
                             group_size=2)
  batch = trajectory_lib.to_batch(res.trajectories, [1.0, -1.0])
  for b, t in enumerate(res.trajectories):
    n = len(t.ids)
    np.testing.assert_array_equal(batch["tokens"][b, :n], t.ids)
    np.testing.assert_array_equal(batch["loss_mask"][b, :n], t.policy_mask)
    assert batch["loss_mask"][b, n:].sum() == 0


def _tagless_tokenizer():
  """Byte-level BPE where '</search>' is several tokens and ' </' (after a space) is one."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  t = Tokenizer(models.BPE())
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = decoders.ByteLevel()
  t.train_from_iterator([protocol.SEARCH_R1_TEMPLATE] * 3, trainers.BpeTrainer(
      vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  return PreTrainedTokenizerFast(tokenizer_object=t, clean_up_tokenization_spaces=False)


def test_stop_strings_end_a_turn_however_they_are_tokenized():
  tok = _tagless_tokenizer()
  plain = enc(tok, "</search>")
  spaced = enc(tok, " </search>")
  assert len(plain) > 1 and spaced[-len(plain):] != plain  # after a space, '</search>' is other tokens
  # The loop stops the turn on the token that completes ' </search>' (the scripted session runs the rollout's stop
  # automaton, as the sampler does on device): what the script has after it is never sampled.
  p_cfg, r_cfg = configs()
  for turn in ("<search> capital </search>", "<search> capital</search>", "<search>capital.</search>"):
    res = rollout.run_rollouts(scripted_factory(tok, [[turn + " and more text", "<answer> Paris </answer>"]]), tok,
                               ScriptedRetriever(), [QUESTION], p_cfg, r_cfg)
    (traj,) = res.trajectories
    s, e = traj.policy_spans[0]
    assert tok.decode(traj.ids[s:e].tolist()) == turn
    assert traj.queries == [turn[len("<search>"):-len("</search>")].strip()] and traj.answer == "Paris"


def test_decode_slots_run_question_groups_in_waves(tok):
  """rollout.decode_slots=4 with group_size 3, schedule 'sync': one question (3 rows) per wave, the second admitted
  once the first finished; the trajectories and counters equal the one-wave run's (scripted sessions)."""
  p_cfg, r_cfg = configs()
  q2 = {"id": "q2", "question": "Who wrote Hamlet?", "golden_answers": ["Shakespeare"]}
  scripts = [["<search> a </search>", "<answer> Paris </answer>"], ["<answer> paris city </answer>"],
             ["nothing", "<answer> x </answer>"], ["<search> c </search>", "<answer> Shakespeare </answer>"],
             ["<answer> Marlowe </answer>"], ["<answer> the Shakespeare </answer>"]]
  whole = rollout.run_rollouts(scripted_factory(tok, scripts), tok, ScriptedRetriever(), [QUESTION, q2], p_cfg,
                               r_cfg, group_size=3)
  sessions = []
  r_cfg.decode_slots = 4
  retriever = ScriptedRetriever()
  res = rollout.run_rollouts(scripted_factory(tok, scripts, holder=sessions), tok, retriever, [QUESTION, q2], p_cfg,
                             r_cfg, group_size=3)
  (sess,) = sessions
  assert sess.admit_calls == [[3, 4, 5]] and sess.finish_calls == [[1], [0, 2], [4, 5], [3]]  # q2 after q1
  assert sess.begin_calls[0][0] == [0, 1, 2]
  assert retriever.calls == [(["a"], 3), (["c"], 3)]
  assert [t.ids.tolist() for t in res.trajectories] == [t.ids.tolist() for t in whole.trajectories]
  assert [(t.question_id, t.sample_index, t.reward) for t in res.trajectories] == \
      [(t.question_id, t.sample_index, t.reward) for t in whole.trajectories]
  assert res.stats.num_trajectories == 6 and res.stats.num_queries == whole.stats.num_queries == 2
  assert res.stats.num_turns == whole.stats.num_turns == 9
  assert res.stats.retrieval_calls == 2 and whole.stats.retrieval_calls == 1


def _schedule_scripts():
  """Eight work items whose turns end at different times: searches, invalid turns, answers, long turns."""
  return [["<search> a </search>", "<answer> Paris </answer>"],
          ["<answer> paris city </answer>"],
          ["nothing here at all", "<search> b </search>", "<answer> x </answer>"],
          ["<search> c </search>", "<search> d </search>", "<answer> Shakespeare </answer>"],
          ["a long turn with many words before it decides to " * 2 + "<search> e </search>", "<answer> y </answer>"],
          ["<answer> the Shakespeare </answer>"],
          ["<search> f </search>", "still nothing", "<answer> z </answer>"],
          ["<search> g </search>", "<search> h </search>", "<search> i </search>", "<answer> w </answer>"]]


@pytest.mark.parametrize("slots", [0, 3, 5])
def test_continuous_schedule_gives_the_sync_trajectories(tok, slots):
  """Scripted sessions decoding 4 tokens per step: 'continuous' (any number of slots) yields the trajectories
  of 'sync' token for token, with every decode batch at most `slots` items and items admitted as others finish."""
  p_cfg, r_cfg = configs()
  questions = [dict(QUESTION, id=f"q{k}") for k in range(4)]
  runs = {}
  for schedule in ("sync", "continuous"):
    r_cfg.schedule, r_cfg.decode_slots = schedule, slots
    holder, retriever = [], ScriptedRetriever()
    res = rollout.run_rollouts(scripted_factory(tok, _schedule_scripts(), holder=holder, chunk=4), tok, retriever,
                               questions, p_cfg, r_cfg, group_size=2)
    runs[schedule] = (res, holder[0], retriever)
  (sync, _, sync_retriever), (cont, sess, cont_retriever) = runs["sync"], runs["continuous"]
  for a, b in zip(sync.trajectories, cont.trajectories):
    assert a.ids.tolist() == b.ids.tolist() and a.policy_mask.tolist() == b.policy_mask.tolist()
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert (a.stop_reason, a.answer, a.queries, a.obs_kinds) == (b.stop_reason, b.answer, b.queries, b.obs_kinds)
  assert sorted(q for c in cont_retriever.calls for q in c[0]) == sorted(q for c in sync_retriever.calls for q in c[0])
  assert cont.stats.num_turns == sync.stats.num_turns and cont.stats.num_queries == sync.stats.num_queries
  limit = slots or 8
  assert max(len(c) for c in sess.step_calls) <= limit
  assert len(sess.seqs) == 8 and (slots == 0 or sess.admit_calls)
  assert 0 < cont.stats.occupancy <= 1 and 0 < sync.stats.occupancy <= 1
  if slots:  # no barrier between turns and waves: fewer chunks for the same work
    assert cont.stats.decode_chunks < sync.stats.decode_chunks


@pytest.mark.parametrize("parse", ["search_r1", "strict"])
def test_protocol_parse_mode_decides_the_edge_cases(tok, parse):
  """protocol.parse='search_r1' (default) searches an empty query '' and reads an <answer> inside a <search> as
  part of the query, as Search-R1 does; 'strict' calls the first an invalid turn and the second an answer."""
  p_cfg, r_cfg = configs()
  assert p_cfg.parse == "search_r1"
  p_cfg.parse = parse
  scripts = [["<search> </search>", "<answer> Paris </answer>"],
             ["<search> q <answer> x </answer> </search>", "<answer> Paris </answer>"]]
  retriever = ScriptedRetriever()
  res = rollout.run_rollouts(scripted_factory(tok, scripts), tok, retriever, [QUESTION, dict(QUESTION, id="q2")],
                             p_cfg, r_cfg)
  empty, inner = res.trajectories
  if parse == "search_r1":
    assert retriever.calls == [(["", "q <answer> x </answer>"], 3)]
    assert empty.turn_actions == inner.turn_actions == ["search", "answer"]
    assert empty.answer == inner.answer == "Paris"
  else:
    assert retriever.calls == []
    assert empty.turn_actions == ["invalid", "answer"] and inner.turn_actions == ["answer"]
    assert inner.answer == "x"
  p_cfg.parse = "loose"
  with pytest.raises(ValueError, match="protocol.parse"):
    rollout.run_rollouts(scripted_factory(tok, scripts), tok, retriever, [QUESTION], p_cfg, r_cfg)
