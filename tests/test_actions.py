"""Parsing one turn's text into search / answer / invalid, with the edge cases of the protocol."""
import pytest

from searche1_jax.agent.actions import ANSWER, INVALID, SEARCH, parse_action

MAX = 100


@pytest.mark.parametrize("text, kind, content", [
    ("<think> hmm </think>\n<search> capital of France </search>", SEARCH, "capital of France"),
    ("<search>\n  spaced   query \n</search>", SEARCH, "spaced   query"),
    ("<think> ok </think> <answer> Paris </answer>", ANSWER, "Paris"),
    ("<answer></answer>", ANSWER, ""),  # an empty answer is an answer (it scores 0)
    # Repeated tags: the first complete search (generation stops there) / the last complete answer.
    ("<search> one </search> <search> two </search>", SEARCH, "one"),
    ("<answer> a </answer> then <answer> b </answer>", ANSWER, "b"),
    # Nested opening tags: the innermost complete pair counts.
    ("<search> outer <search> inner </search>", SEARCH, "inner"),
    ("<answer> x <answer> y </answer>", ANSWER, "y"),
    # Whichever action closes first wins.
    ("<answer> early </answer> <search> late </search>", ANSWER, "early"),
    ("<search> first </search> <answer> later </answer>", SEARCH, "first"),
    # A search inside an unclosed answer still closes first.
    ("<answer> maybe <search> q </search>", SEARCH, "q"),
    # A stray closing tag without an opening one is nothing.
    ("q </search>", INVALID, ""),
])
def test_parse(text, kind, content):
  a = parse_action(text, MAX)
  assert (a.kind, a.content) == (kind, content)
  if kind != INVALID:
    assert a.reason == ""


@pytest.mark.parametrize("text, reason", [
    ("<think> I will search </think> <search> unfinished query", "unclosed <search>"),
    ("<answer> Paris", "unclosed <answer>"),
    ("The answer is Paris.", "no <search> or <answer> tag"),
    ("", "no <search> or <answer> tag"),
    ("<search>   </search>", "empty search query"),
    ("<search></search> <answer> x </answer>", "empty search query"),  # the search closes first
])
def test_invalid(text, reason):
  a = parse_action(text, MAX)
  assert a.kind == INVALID and a.content == "" and a.reason == reason and a.end == -1


def test_long_query_truncated_to_max_chars():
  q = ("abcdefghij" * 200)  # 2,000 characters
  a = parse_action(f"<search> {q} </search>", 512)
  assert a.kind == SEARCH and a.truncated and a.content == q[:512] and len(a.content) == 512
  b = parse_action(f"<search> {q[:512]} </search>", 512)
  assert not b.truncated and b.content == q[:512]
  # Cutting inside whitespace leaves no trailing space.
  c = parse_action("<search> ab    cd </search>", 4)
  assert c.content == "ab" and c.truncated


def test_end_offset_and_bad_arguments():
  text = "x <search> q </search> tail"
  assert parse_action(text, MAX).end == text.index("</search>") + len("</search>")
  with pytest.raises(ValueError, match="max_query_chars"):
    parse_action("a", 0)
  with pytest.raises(TypeError, match="must be str"):
    parse_action(b"<search> q </search>", MAX)


def search_r1_reference(text):
  """Search-R1's postprocess_predictions (search_r1/llm_agent/generation.py), as its code reads: the first match
  of <(search|answer)>(.*?)</\1> (DOTALL), content stripped; (None, '') without one."""
  import re
  m = re.search(r"<(search|answer)>(.*?)</\1>", text, re.DOTALL)
  return (m.group(1), m.group(2).strip()) if m else (None, "")


@pytest.mark.parametrize("text", [
    "<search> </search>",  # an empty query: Search-R1 searches ''
    "<search> q <answer> x </answer> </search>",  # an answer inside a search is part of the query
    "<search> a <search> b </search>",  # nested: the leftmost opening tag's lazy match
    "<answer> a <search> q </search>",  # an unclosed answer before a search
    "<answer> x </answer> more text </search>",  # text after </answer> before </search>
    "<answer> early </answer> <search> late </search>",
    "<search> first </search> <answer> later </answer>",
    "<answer>\n multi\nline </answer>",
    "no tags at all",
    "q </search>",
])
def test_search_r1_mode_parses_as_search_r1_does(text):
  a = parse_action(text, MAX, mode="search_r1")
  kind, content = search_r1_reference(text)
  assert (a.kind, a.content) == ({None: INVALID}.get(kind, kind), content)


def test_modes_differ_only_on_the_edge_cases():
  assert parse_action("<search> </search>", MAX, mode="strict").kind == INVALID
  assert parse_action("<search> q <answer> x </answer> </search>", MAX, mode="strict").kind == ANSWER
  assert parse_action("<search> a <search> b </search>", MAX, mode="strict").content == "b"
  for text in ("<search> q </search>", "<answer> a </answer>", "<think> x </think> <search> y </search>"):
    assert parse_action(text, MAX, mode="strict") == parse_action(text, MAX, mode="search_r1")
  long = parse_action("<search> " + "w" * 150 + " </search>", MAX, mode="search_r1")
  assert long.truncated and len(long.content) == MAX
  with pytest.raises(ValueError, match="protocol.parse='loose'"):
    parse_action("x", MAX, mode="loose")
