"""Answer extraction and scoring: SQuAD-style normalization, exact match (EM), token F1, the Search-R1 EM reward.

Pure string functions (no I/O, no globals). The reward follows Search-R1 (`verl/utils/reward_score/qa_em.py`):
EM of the last complete `<answer>...</answer>` of the *response* after normalization, 0 when there is none.
Unlike Search-R1, callers pass only the response text (never the prompt, whose template contains an example
`<answer> Beijing </answer>`), so the last complete answer is always the model's own.
"""
from __future__ import annotations

import collections
import re
import string
from typing import Iterable, Union

Golden = Union[str, bytes, Iterable[Union[str, bytes]]]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# Innermost complete answer: the body may not contain another opening tag, and the lazy body stops at the first
# closing tag. So `<answer> a <answer> b </answer>` yields " b ", and a stray extra `</answer>` is ignored.
_ANSWER = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)


def normalize_answer(s: str) -> str:
  """SQuAD normalization: lowercase, drop ASCII punctuation, drop the words a/an/the, collapse whitespace.

  Accented letters are kept as they are (no Unicode folding), as in the SQuAD / Search-R1 scripts.
  """
  s = s.lower()
  s = "".join(ch for ch in s if ch not in _PUNCTUATION)
  s = _ARTICLES.sub(" ", s)
  return " ".join(s.split())


def extract_answer(response_text: str) -> str | None:
  """Content of the last complete `<answer>...</answer>` in the response, stripped; None if there is none.

  Pass only the generated response (never the prompt). An unclosed trailing `<answer>` is ignored; with nested
  opening tags the innermost complete one counts.
  """
  if not isinstance(response_text, str):
    raise TypeError(f"extract_answer: response_text must be str, got {type(response_text).__name__}")
  last = None
  for match in _ANSWER.finditer(response_text):
    last = match
  return None if last is None else last.group(1).strip()


def _golden_list(golden_answers: Golden, fn: str) -> list[str]:
  if isinstance(golden_answers, (str, bytes)):
    golden_answers = [golden_answers]
  out = []
  for g in golden_answers:
    if isinstance(g, bytes):
      g = g.decode("utf-8")
    if not isinstance(g, str):
      raise TypeError(f"{fn}: golden_answers must be a str or a list of str, got an item of type {type(g).__name__}")
    out.append(g)
  if not out:
    raise ValueError(f"{fn}: golden_answers is empty; every question needs at least one golden answer")
  return out


def exact_match(prediction: str | None, golden_answers: Golden) -> int:
  """1 if the normalized prediction equals any normalized golden answer, else 0 (None -> 0).

  golden_answers: a str or a list of str (bytes are decoded as UTF-8, e.g. from TFDS).
  """
  golden = _golden_list(golden_answers, "exact_match")
  if prediction is None:
    return 0
  pred = normalize_answer(prediction)
  return int(any(pred == normalize_answer(g) for g in golden))


def _f1_single(pred_tokens: list[str], gold_tokens: list[str]) -> float:
  if not pred_tokens or not gold_tokens:
    # SQuAD v2 convention: two empty answers agree, an empty and a non-empty one do not.
    return float(pred_tokens == gold_tokens)
  common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
  num_same = sum(common.values())
  if num_same == 0:
    return 0.0
  precision = num_same / len(pred_tokens)
  recall = num_same / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


def f1(prediction: str | None, golden_answers: Golden) -> float:
  """SQuAD token F1 (bag of normalized whitespace tokens), max over golden answers, in [0, 1]. None -> 0."""
  golden = _golden_list(golden_answers, "f1")
  if prediction is None:
    return 0.0
  pred_tokens = normalize_answer(prediction).split()
  return max(_f1_single(pred_tokens, normalize_answer(g).split()) for g in golden)


def em_reward(response_text: str, golden_answers: Golden) -> float:
  """Search-R1 reward: EM of the last complete `<answer>` in the response (0.0 if there is none)."""
  return float(exact_match(extract_answer(response_text), golden_answers))


_SEARCH_R1_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def search_r1_em(prompt_text: str, response_text: str, golden_answers: Golden) -> float:
  """A replica of Search-R1's training reward (`verl/utils/reward_score/qa_em.py`, `compute_score_em`, format
  score 0) for re-scoring its trajectories; off the training path here (`em_reward` is the trainer's).

  Search-R1 scores the decoded prompt + response (observations included): the last of the lazily matched
  `<answer>...</answer>` there, stripped, by EM, and 0 unless there are at least two matches. Its base template
  already holds two (`inside <answer> and </answer>` and the example `<answer> Beijing </answer>`), so a trajectory
  that never answers is scored as answering 'Beijing', and an `<answer>` that a retrieved passage wrote counts like
  the model's own.
  """
  if not isinstance(prompt_text, str) or not isinstance(response_text, str):
    raise TypeError("search_r1_em: prompt_text and response_text must be str")
  matches = list(_SEARCH_R1_ANSWER.finditer(prompt_text + response_text))
  if len(matches) <= 1:
    return 0.0
  return float(exact_match(matches[-1].group(1).strip(), golden_answers))
