"""Answer extraction, SQuAD normalization, EM, F1 and the Search-R1 EM reward."""
import pytest

from searche1_jax import rewards
from searche1_jax.agent import protocol


@pytest.mark.parametrize("raw, expected", [
    ("The Eiffel Tower", "eiffel tower"),            # case + leading article
    ("  Paris,   France. ", "paris france"),         # punctuation + whitespace collapse
    ("an apple a day", "apple day"),                 # articles a / an
    ("Theory of the Atom", "theory of atom"),        # 'the' only as a whole word, not inside 'theory'
    ("Ángel Di María", "ángel di maría"),            # accents kept, lowercased
    ("U.S.A.", "usa"),
    ("rock-'n'-roll!", "rocknroll"),                  # punctuation is dropped, not replaced by a space
    ("A", ""),
    ("\tnew\nyork\r\n", "new york"),
    ("«Paris»", "«paris»"),                          # only ASCII string.punctuation is dropped
])
def test_normalize_answer(raw, expected):
  assert rewards.normalize_answer(raw) == expected


@pytest.mark.parametrize("text, expected", [
    ("no tags at all", None),
    ("<think>x</think><answer> Paris ", None),                              # unclosed
    ("<answer> Paris </answer>", "Paris"),
    ("<answer>\n  Paris\n</answer>", "Paris"),                               # whitespace stripped
    ("<answer>Rome</answer> then <answer> Paris </answer>", "Paris"),        # repeated -> last
    ("<answer>Rome</answer> then <answer> Paris", "Rome"),                   # last complete one
    ("<answer> a <answer> Paris </answer>", "Paris"),                        # nested opening -> innermost
    ("<answer>Rome</answer> junk </answer>", "Rome"),                        # stray closing tag ignored
    ("<answer></answer>", ""),
    ("</answer><answer>", None),
    ("<answer>New\nYork</answer>", "New\nYork"),                             # spans lines
])
def test_extract_answer(text, expected):
  assert rewards.extract_answer(text) == expected


def test_extract_answer_rejects_non_str():
  with pytest.raises(TypeError, match="response_text"):
    rewards.extract_answer(None)


def test_exact_match():
  assert rewards.exact_match("the Eiffel tower!", "Eiffel Tower") == 1
  assert rewards.exact_match("Eiffel", ["Eiffel Tower", "La tour Eiffel"]) == 0
  assert rewards.exact_match("la Tour-Eiffel", ["Eiffel Tower", "La tour Eiffel"]) == 0  # hyphen joins words
  assert rewards.exact_match("la tour eiffel", ["Eiffel Tower", "La tour Eiffel"]) == 1
  assert rewards.exact_match("Angel", "Ángel") == 0  # accents are significant
  assert rewards.exact_match(None, ["x"]) == 0
  assert rewards.exact_match("paris", [b"Paris"]) == 1  # TFDS bytes
  assert rewards.exact_match("", ["the"]) == 1  # both normalize to the empty string
  with pytest.raises(ValueError, match="golden_answers is empty"):
    rewards.exact_match("x", [])
  with pytest.raises(TypeError, match="golden_answers"):
    rewards.exact_match("x", [3])


def test_f1():
  assert rewards.f1("Eiffel tower", "the Eiffel Tower") == pytest.approx(1.0)
  # pred {eiffel, tower, paris} vs gold {eiffel, tower}: P = 2/3, R = 1, F1 = 0.8
  assert rewards.f1("Eiffel tower, Paris", "Eiffel Tower") == pytest.approx(0.8)
  # repeated tokens count with multiplicity: pred [new, new] vs gold [new, york]: common 1, P = R = 1/2
  assert rewards.f1("new new", "new york") == pytest.approx(0.5)
  # max over golden answers
  assert rewards.f1("tower", ["Eiffel Tower", "tower"]) == pytest.approx(1.0)
  assert rewards.f1("London", ["Paris"]) == 0.0
  assert rewards.f1(None, ["Paris"]) == 0.0
  assert rewards.f1("the", "a") == 1.0   # both empty after normalization
  assert rewards.f1("the", "Paris") == 0.0


def test_em_reward():
  resp = "<think>hmm</think><search> capital of france </search>\n\n<information>Doc 1(Title: Paris) ...\n" \
         "</information>\n\n<think>ok</think><answer> The Paris </answer>"
  assert rewards.em_reward(resp, ["Paris"]) == 1.0
  assert isinstance(rewards.em_reward(resp, ["Paris"]), float)
  assert rewards.em_reward(resp, ["Lyon"]) == 0.0
  assert rewards.em_reward("<answer> Paris", ["Paris"]) == 0.0  # no complete answer
  assert rewards.em_reward("<answer>Lyon</answer><answer>Paris</answer>", "Paris") == 1.0
  assert rewards.em_reward("<answer>Paris</answer><answer>Lyon</answer>", "Paris") == 0.0


def test_search_r1_em_replica():
  """Search-R1's reward over prompt + response needs two answer matches (its template holds one example)."""
  prompt = protocol.make_prompt("What is the capital of France")
  assert "<answer> Beijing </answer>" in prompt
  assert rewards.search_r1_em(prompt, "<think> x </think> <answer> Paris </answer>", ["Paris"]) == 1.0
  assert rewards.search_r1_em(prompt, "<answer> Lyon </answer>", ["Paris"]) == 0.0
  # No answer in the response: the template's two matches (' and ', then the example) score 'Beijing'.
  assert rewards.search_r1_em(prompt, "<search> q </search>", ["Beijing"]) == 1.0
  assert rewards.search_r1_em(prompt, "<search> q </search>", ["Paris"]) == 0.0
  assert rewards.em_reward("<search> q </search>", ["Beijing"]) == 0.0  # the trainer's reward reads the response
  # An <answer> inside a retrieved passage counts as if the model wrote it.
  obs = "<information>Doc 1(Title: x) it said <answer> Rome </answer></information>"
  assert rewards.search_r1_em(prompt, "<search> q </search>" + obs, ["Rome"]) == 1.0
  # The last match counts, lazily matched.
  assert rewards.search_r1_em(prompt, "<answer> a </answer> <answer> Paris </answer>", "paris") == 1.0
  # Without the template's example a single answer is not enough.
  assert rewards.search_r1_em("Question: ?", "<answer> Paris </answer>", ["Paris"]) == 0.0
