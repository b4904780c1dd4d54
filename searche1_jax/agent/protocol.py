"""Search-R1 protocol: the prompt template, the tags, and the text glued between turns.

Everything here is text-in, text-out; the rollout loop, the transcripts and the tokenizer all
take their strings from this single module so they agree byte for byte with Search-R1
(PeterGriffinJin/Search-R1: `scripts/data_process/qa_search_*.py` for the template,
`search_r1/llm_agent/generation.py` for the observation and the invalid-action message).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SEARCH_OPEN, SEARCH_CLOSE = "<search>", "</search>"
INFORMATION_OPEN, INFORMATION_CLOSE = "<information>", "</information>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

# The eight tags; the demo tokenizer makes each of them one token.
TAGS = (
    THINK_OPEN, THINK_CLOSE,
    SEARCH_OPEN, SEARCH_CLOSE,
    INFORMATION_OPEN, INFORMATION_CLOSE,
    ANSWER_OPEN, ANSWER_CLOSE,
)

# A generation turn stops at the first of these (search first, then answer); see docs/design.md.
STOP_STRINGS = (SEARCH_CLOSE, ANSWER_CLOSE)

# Search-R1 `template_type='base'`, byte-exact ({question} is already stripped, '?' appended).
SEARCH_R1_TEMPLATE = (
    "Answer the given question. "
    "You must conduct reasoning inside <think> and </think> first every time you get new information. "
    "After reasoning, if you find you lack some knowledge, you can call a search engine by "
    "<search> query </search> and it will return the top searched results between <information> and "
    "</information>. "
    "You can search as many times as your want. "
    "If you find no further external knowledge needed, you can directly provide the answer inside "
    "<answer> and </answer>, without detailed illustrations. For example, <answer> Beijing </answer>. "
    "Question: {question}\n"
)

# Appended as the observation when a turn holds neither a search nor an answer.
INVALID_ACTION_MESSAGE = (
    "\nMy previous action is invalid. "
    "If I want to search, I should put the query between <search> and </search>. "
    "If I want to give the final answer, I should put the answer between <answer> and </answer>. "
    "Let me try again.\n"
)


def normalize_question(question: str) -> str:
  """Strips the question and appends '?' when it does not end with one (as Search-R1 does)."""
  if not isinstance(question, str):
    raise TypeError(f"question must be a str, got {type(question).__name__}")
  q = question.strip()
  if not q:
    raise ValueError("question is empty")
  if not q.endswith("?"):
    q += "?"
  return q


def make_prompt(question: str, template: str = SEARCH_R1_TEMPLATE) -> str:
  """The raw prompt text for one question (no chat template applied)."""
  if "{question}" not in template:
    raise ValueError("template has no '{question}' placeholder")
  return template.replace("{question}", normalize_question(question))


def encode_prompt(tokenizer, user_text: str, system_text: str | None = None) -> list[int]:
  """The prompt's token ids, the one encoder of the package (rollouts, OFSD layouts, warm start): with a chat
  template, the user turn (after an optional system turn) plus the generation prompt, encoded without extra special
  tokens; without one, the raw text as `tokenizer.encode` gives it (a system turn then is an error)."""
  if getattr(tokenizer, "chat_template", None):
    messages = [{"role": "system", "content": system_text}] if system_text is not None else []
    messages.append({"role": "user", "content": user_text})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]
  if system_text is not None:
    raise ValueError("a system turn (ofsd.context_position='system') needs a tokenizer with a chat template; this "
                     "tokenizer has none (use 'before_question' or 'after_question')")
  return [int(i) for i in tokenizer.encode(user_text)]


def split_contents(contents: str) -> tuple[str, str]:
  """Splits a wiki-18 `contents` string into (first line, rest), as Search-R1 does.

  The first line keeps its quotes (`"Title"`); use `strip_title_quotes` to drop them.
  """
  first, _, rest = contents.partition("\n")
  return first, rest


def strip_title_quotes(title: str) -> str:
  """`"Title"` -> `Title`; other strings are returned unchanged."""
  if len(title) >= 2 and title[0] == '"' and title[-1] == '"':
    return title[1:-1]
  return title


def _contents_of(passage: Any) -> str:
  if isinstance(passage, str):
    return passage
  if isinstance(passage, Mapping):
    if "document" in passage:  # an item of the retrieval server's `result` lists
      return _contents_of(passage["document"])
    if "contents" in passage:
      return passage["contents"]
    if "title" in passage and "text" in passage:
      return f'"{passage["title"]}"\n{passage["text"]}'
  raise TypeError(
      "a passage must be a wiki-18 dict {'id', 'contents'}, a retrieval-server item "
      f"{{'document': ...}}, a dict with 'title' and 'text', or a contents string; got {passage!r:.200}")


def format_passages(passages: Sequence[Any], keep_title_quotes: bool = True) -> str:
  """`Doc {i}(Title: {title}) {text}\\n` for each passage, i from 1 (Search-R1 `_passages2string`)."""
  out = []
  for i, passage in enumerate(passages):
    title, text = split_contents(_contents_of(passage))
    if not keep_title_quotes:
      title = strip_title_quotes(title)
    out.append(f"Doc {i + 1}(Title: {title}) {text}\n")
  return "".join(out)


def format_observation(passages: Sequence[Any], keep_title_quotes: bool = True,
                       strip_docs: bool = True) -> str:
  """The text appended after a `</search>`: `\\n\\n<information>DOCS</information>\\n\\n`.

  Defaults follow Search-R1's code byte for byte: the title is the first line of `contents`
  as stored (wiki-18 keeps it in quotes) and the doc string is `.strip()`-ed, so the last doc
  has no trailing newline. `keep_title_quotes=False, strip_docs=False` gives the variant
  written in docs/reference.md (bare titles, `\\n` after every doc).
  Truncation to `max_obs_length` tokens is the rollout's job (it needs the tokenizer).
  """
  docs = format_passages(passages, keep_title_quotes=keep_title_quotes)
  if strip_docs:
    docs = docs.strip()
  return f"\n\n{INFORMATION_OPEN}{docs}{INFORMATION_CLOSE}\n\n"
