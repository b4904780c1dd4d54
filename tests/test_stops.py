"""Stop strings matched by bytes (searche1_jax/sampling/stops.py): the automaton tables against plain-python
references (substring search over decoded bytes, suffix search over token ids), the device step against the host
one, token bytes of byte-level tokenizers, and the real Qwen2.5 tokenizer's many spellings of '</search>'."""
import jax.numpy as jnp
import numpy as np
import pytest

from searche1_jax.agent import protocol
from searche1_jax.sampling import stops

import qwen_testlib
from rollout_testlib import make_tokenizer

STOPS = ["</search>", "</answer>"]


def _first_containing(token_bytes, tokens, patterns):
  """Reference: index of the first token after which the decoded bytes contain a pattern, or None."""
  text = b""
  for i, t in enumerate(tokens):
    text += token_bytes[t]
    if any(p in text for p in patterns):
      return i
  return None


def _first_suffix(tokens, seqs):
  for i in range(len(tokens)):
    if any(len(s) <= i + 1 and tokens[i + 1 - len(s):i + 1] == s for s in seqs):
      return i
  return None


def test_string_automaton_fires_where_the_text_first_contains_a_stop():
  """Random vocabularies of short byte strings over a small alphabet (so stop strings straddle tokens in every
  way) and random token streams: the automaton stops on exactly the token the substring search names."""
  rng = np.random.default_rng(0)
  alphabet = b"<>/ab"
  patterns = ["</ab>", "b/a", ">>"]
  for trial in range(20):
    vocab = [bytes(rng.choice(list(alphabet), size=rng.integers(0, 5))) for _ in range(40)]
    auto = stops.from_strings(patterns, vocab)
    assert auto.table.shape == (auto.num_states, 40) and auto.num_states <= 1 + sum(map(len, patterns))
    for _ in range(50):
      tokens = rng.integers(0, 40, size=30).tolist()
      want = _first_containing(vocab, tokens, [p.encode() for p in patterns])
      assert auto.first_stop(tokens) == want, (trial, tokens)


def test_token_automaton_fires_on_the_first_complete_sequence():
  rng = np.random.default_rng(1)
  seqs = [[1, 2], [3], [2, 2, 4, 1], [2, 4]]
  auto = stops.from_token_sequences(seqs, 6)
  found = 0
  for _ in range(500):
    tokens = rng.integers(0, 6, size=12).tolist()
    tokens = [t if t != 3 or rng.random() < 0.1 else 0 for t in tokens]
    want = _first_suffix(tokens, seqs)
    assert auto.first_stop(tokens) == want, tokens
    found += want is not None
  assert 100 < found < 500
  with pytest.raises(ValueError, match="#1 is empty"):
    stops.from_token_sequences([[1], []], 6)
  with pytest.raises(ValueError, match="outside"):
    stops.from_token_sequences([[7]], 6)


def test_device_step_equals_host_advance():
  rng = np.random.default_rng(2)
  vocab = [bytes(rng.choice(list(b"</search>x "), size=rng.integers(0, 4))) for _ in range(64)]
  auto = stops.from_strings(STOPS, vocab)
  table = auto.padded(32, 80)  # 16 ids past the tokenizer's: they keep the state
  tokens = rng.integers(0, 80, size=(40, 16))
  state = jnp.zeros(40, jnp.int32)
  host = [0] * 40
  for j in range(16):
    state, fired = stops.step(jnp.asarray(table), state, jnp.asarray(tokens[:, j], jnp.int32))
    for b in range(40):
      host_state, host_fired = auto.advance(host[b], int(tokens[b, j]))
      host[b] = host_state
      assert bool(fired[b]) == host_fired and int(state[b]) == host_state


def test_byte_level_token_bytes_spell_the_text():
  tok = make_tokenizer()  # byte-level BPE with the protocol tags as added tokens
  tb = stops.token_bytes(tok)
  assert len(tb) == len(tok)
  for text in ["<search> Paris é 東京 </search>\n\n", "Doc 1(Title: \"x\")\t ok</answer>"]:
    ids = tok.encode(text, add_special_tokens=False)
    assert b"".join(tb[i] for i in ids) == text.encode("utf-8")
  assert tb[tok.convert_tokens_to_ids(protocol.SEARCH_CLOSE)] == b"</search>"
  assert stops.token_bytes(tok, len(tok) + 3)[-3:] == [b""] * 3


@pytest.fixture(scope="module")
def qwen():
  tok = qwen_testlib.qwen25_tokenizer()
  return tok, stops.for_tokenizer(tok, STOPS), stops.token_bytes(tok)


def test_qwen25_tokenizer_is_the_real_one(qwen):
  tok, _, _ = qwen
  assert tok.encode("Hello world") == [9707, 1879]
  assert len(tok) == 151665 and tok.convert_tokens_to_ids("<|im_end|>") == 151645
  assert tok.convert_ids_to_tokens(tok.encode("x </search>"))[1:] == ["Ġ</", "search", ">"]  # a split stop string


@pytest.mark.parametrize("before,after", [("x ", ""), ('x"', ""), ("f(x)", ""), ("end.", ""), ("q", ">\n\n"),
                                          ("<search> q ", "\n\n"), ("", "")])
def test_qwen25_spellings_of_a_stop_string_all_stop(qwen, before, after):
  """'</search>' arrives as ' </' 'search' '>', '"</' ..., ')</' ..., '.</' ..., and '>\\n\\n' merges at its end:
  the stop fires on the token that completes it, and on no earlier one."""
  tok, auto, tb = qwen
  for stop in STOPS:
    ids = tok.encode(before + stop + after)
    want = _first_containing(tb, ids, [s.encode() for s in STOPS])
    assert want is not None and auto.first_stop(ids) == want
    assert stop.encode() in b"".join(tb[i] for i in ids[:want + 1])
    assert auto.first_stop(ids[:want]) is None


def test_qwen25_random_text_matches_the_substring_reference(qwen):
  tok, auto, tb = qwen
  rng = np.random.default_rng(3)
  pieces = ["</", "search", ">", " ", "\n", "answer", "</search>", "<", "/", "x", ".", '"', "é", "</answer>\n"]
  hits = 0
  for _ in range(200):
    text = "".join(rng.choice(pieces, size=8))
    ids = tok.encode(text)
    assert b"".join(tb[i] for i in ids) == text.encode()
    want = _first_containing(tb, ids, [s.encode() for s in STOPS])
    assert auto.first_stop(ids) == want, text
    hits += want is not None
  assert 50 < hits < 200
