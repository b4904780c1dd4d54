"""Parse one turn's decoded response text into the agent's action: search, answer, or invalid.

Pure string functions, two rule sets (`protocol.parse`; the rollout's default is 'search_r1'):

'search_r1': Search-R1's own rule (`search_r1/llm_agent/generation.py`, `postprocess_predictions`): the
leftmost `<search>` or `<answer>` opening tag and the lazily matched text up to ITS closing tag, stripped. So an
empty `<search> </search>` searches '', an `<answer>` inside a `<search>` is part of the query, and with nested
tags the outer (leftmost) one counts. Published Search-R1 numbers come from this rule.

'strict': the complete tag pair that CLOSES first, as decoding stops at the first `</search>`, else at the first
`</answer>`:

- search: the first complete `<search> q </search>`; the query is stripped and cut to `max_query_chars`
  characters. With nested opening tags the innermost complete pair counts (`<search> a <search> b </search>` ->
  `b`), the same rule as `rewards.extract_answer`. An empty query is invalid.
- answer: when a complete `<answer>...</answer>` closes before any complete search, the answer is the last complete
  one in the turn (`rewards.extract_answer`; with a stopping sampler there is exactly one).
- invalid: neither (an answer without tags, an unclosed `<search>` / `<answer>`, an empty query). `Action.reason`
  says why, for logs and the trajectory inspector.

On text without such edge cases (one tag pair ending the turn) both rules agree.
"""
from __future__ import annotations

import dataclasses
import re

from searche1_jax import rewards
from searche1_jax.agent import protocol

SEARCH = "search"
ANSWER = "answer"
INVALID = "invalid"
KINDS = (SEARCH, ANSWER, INVALID)
PARSE_MODES = ("search_r1", "strict")


@dataclasses.dataclass(frozen=True)
class Action:
  """One turn's action.

  kind: 'search' | 'answer' | 'invalid'.
  content: the query (search), the answer text (answer), '' (invalid).
  reason: '' for a valid action; otherwise a short human-readable cause ('empty search query', ...).
  truncated: the query was longer than `max_query_chars` and was cut (search only).
  end: character offset just past the closing tag of the action in the parsed text (-1 for invalid).
  """
  kind: str
  content: str = ""
  reason: str = ""
  truncated: bool = False
  end: int = -1


def _innermost_pair(open_tag: str, close_tag: str) -> re.Pattern:
  # Body may not contain another opening tag; the lazy body stops at the first closing tag.
  o, c = re.escape(open_tag), re.escape(close_tag)
  return re.compile(f"{o}((?:(?!{o}).)*?){c}", re.DOTALL)


_SEARCH_RE = _innermost_pair(protocol.SEARCH_OPEN, protocol.SEARCH_CLOSE)
_ANSWER_RE = _innermost_pair(protocol.ANSWER_OPEN, protocol.ANSWER_CLOSE)
# Search-R1: r'<(search|answer)>(.*?)</\1>' with re.DOTALL, first match.
_LEFTMOST_RE = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)
assert (protocol.SEARCH_OPEN, protocol.ANSWER_OPEN) == ("<search>", "<answer>")


def _query(query: str, max_query_chars: int, end: int) -> Action:
  truncated = len(query) > max_query_chars
  if truncated:
    query = query[:max_query_chars].rstrip()
  return Action(SEARCH, content=query, truncated=truncated, end=end)


def _invalid(text: str) -> Action:
  if protocol.SEARCH_OPEN in text:
    reason = f"unclosed {protocol.SEARCH_OPEN}"
  elif protocol.ANSWER_OPEN in text:
    reason = f"unclosed {protocol.ANSWER_OPEN}"
  else:
    reason = f"no {protocol.SEARCH_OPEN} or {protocol.ANSWER_OPEN} tag"
  return Action(INVALID, reason=reason)


def parse_action(text: str, max_query_chars: int, mode: str = "strict") -> Action:
  """Parses one turn's response text (only this turn's policy text, never the prompt or observations).

  Args:
    text: the decoded tokens the policy produced in this turn.
    max_query_chars: queries longer than this many characters (after stripping) are cut to it; >= 1.
    mode: 'search_r1' | 'strict' (module docstring).
  Returns:
    An `Action`.
  """
  if not isinstance(text, str):
    raise TypeError(f"parse_action: text must be str, got {type(text).__name__}")
  if max_query_chars < 1:
    raise ValueError(f"parse_action: max_query_chars must be >= 1, got {max_query_chars}")
  if mode not in PARSE_MODES:
    raise ValueError(f"parse_action: protocol.parse={mode!r}, expected one of {PARSE_MODES}")
  if mode == "search_r1":
    m = _LEFTMOST_RE.search(text)
    if m is None:
      return _invalid(text)
    if m.group(1) == ANSWER:
      return Action(ANSWER, content=m.group(2).strip(), end=m.end())
    return _query(m.group(2).strip(), max_query_chars, m.end())
  search = _SEARCH_RE.search(text)
  first_answer = _ANSWER_RE.search(text)
  if search is not None and (first_answer is None or search.end() <= first_answer.end()):
    query = search.group(1).strip()
    if not query:
      return Action(INVALID, reason="empty search query", end=-1)
    return _query(query, max_query_chars, search.end())
  if first_answer is not None:
    last = None
    for last in _ANSWER_RE.finditer(text):
      pass
    answer = rewards.extract_answer(text)
    return Action(ANSWER, content=answer, end=last.end())
  return _invalid(text)
