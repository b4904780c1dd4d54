"""Search-R1 protocol block: `config.protocol = parts.protocol.get()`.

Values follow Search-R1 (PeterGriffinJin/Search-R1, `scripts/nq_hotpotqa/v0.2/train_grpo.sh` and
`search_r1/llm_agent/generation.py`); see docs/reference.md. The strings themselves live in
`searche1_jax/agent/protocol.py` so there is one copy of them.
"""
import ml_collections

from searche1_jax.agent import protocol


def get() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Prompt template with a '{question}' placeholder; Search-R1 `template_type='base'`, byte-exact.
  c.template = protocol.SEARCH_R1_TEMPLATE
  # Tag strings (each is a single token in the demo tokenizer).
  c.think_open, c.think_close = protocol.THINK_OPEN, protocol.THINK_CLOSE
  c.search_open, c.search_close = protocol.SEARCH_OPEN, protocol.SEARCH_CLOSE
  c.information_open, c.information_close = protocol.INFORMATION_OPEN, protocol.INFORMATION_CLOSE
  c.answer_open, c.answer_close = protocol.ANSWER_OPEN, protocol.ANSWER_CLOSE
  # How a turn's text becomes its action (searche1_jax/agent/actions.py): 'search_r1' = Search-R1's rule (the
  # leftmost <search>/<answer> tag up to its own closing tag: an empty query searches '', an <answer> inside a
  # <search> is part of the query), which its published numbers come from; 'strict' = the pair that closes first,
  # an empty query is invalid.
  c.parse = "search_r1"
  # A turn stops at the first of these strings (else EOS or max_response_length); with parse='search_r1' the
  # answer's closing tag does not stop decoding, the turn is cut after it (as Search-R1 cuts its text).
  c.stop_strings = protocol.STOP_STRINGS
  # Observation appended when a turn holds neither a search nor an answer.
  c.invalid_action_message = protocol.INVALID_ACTION_MESSAGE
  # Searching turns; one more turn without search follows (Search-R1 max_turns).
  c.max_turns = 4
  # Passages returned per search (Search-R1 retriever.topk).
  c.topk = 3
  # Tokens kept of each observation (Search-R1 data.max_obs_length).
  c.max_obs_length = 500
  # Tokens generated per turn at most (Search-R1 data.max_response_length).
  c.max_response_length = 500
  # Tokens of the initial prompt at most (Search-R1 data.max_start_length).
  c.max_start_length = 2048
  # Tokens of the whole rolling context (prompt + all turns + observations) at most
  # (Search-R1 data.max_prompt_length).
  c.max_prompt_length = 4096
  # Observation text: keep wiki-18 titles in their quotes and strip the doc string, as Search-R1's
  # code does; False/False gives the docs/reference.md wording (bare titles, '\n' after every doc).
  c.obs_keep_title_quotes = True
  c.obs_strip_docs = True
  return c
