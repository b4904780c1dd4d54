"""Stop strings matched by their bytes, whatever the tokenization: a per-token transition table of the stop strings'
automaton.

A decode call stops a row the moment the text it decoded in that call first contains one of the stop strings.
With a byte-level BPE tokenizer `</search>` can arrive as '</' 'search' '>', ' </' 'search' '>\\n', '")</' ...
so no list of token sequences covers every case. Instead each token id has its byte string (`token_bytes`); an
Aho-Corasick automaton over the stop strings' bytes, made deterministic, reads a whole token at once:

  table[s, t] = s'        reading token t's bytes from state s ends in state s' and completes no stop string
  table[s, t] = -1 - s'   ... and a stop string ends somewhere inside those bytes (the row stops on token t)

S = 1 + the stop strings' total bytes at most (their trie), so the table is [S, V] int32, built once per
(tokenizer, stop strings) on the host with numpy and read on device with one gather per decode step
(`step`). Token-id stop sequences are the same automaton over the alphabet of token ids (`from_token_sequences`).
"""
from __future__ import annotations

import dataclasses
import json
import weakref
from typing import Sequence

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class StopAutomaton:
  """table [S, V] int32 (module docstring); state 0 = nothing of a stop string read yet. `device` holds the
  sampler's device copies of the padded table (filled by sampling.Session), so an automaton built once per
  tokenizer is uploaded once per layout, not once per rollout."""
  table: np.ndarray
  device: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def num_states(self) -> int:
    return self.table.shape[0]

  def padded(self, states: int, vocab_size: int) -> np.ndarray:
    """The table as [states, vocab_size] (states >= num_states; extra rows are never reached). Token ids past the
    table's columns add no text (a model's embedding is often larger than its tokenizer): they keep the state."""
    if states < self.num_states:
      raise ValueError(f"a stop automaton of {self.num_states} states does not fit in {states}")
    out = np.repeat(np.arange(states, dtype=np.int32)[:, None], vocab_size, axis=1)
    v = min(vocab_size, self.table.shape[1])
    out[:self.num_states, :v] = self.table[:, :v]
    return out

  def advance(self, state: int, token: int) -> tuple[int, bool]:
    """Host side, one token: (next state, whether a stop fires on it). Ids past the table keep the state."""
    if token >= self.table.shape[1]:
      return state, False
    code = int(self.table[state, token])
    return (-1 - code, True) if code < 0 else (code, False)

  def first_stop(self, tokens: Sequence[int]) -> int | None:
    """Host side: the index of the token in `tokens` on which a stop fires (from state 0), or None."""
    state = 0
    for i, t in enumerate(tokens):
      state, fired = self.advance(state, int(t))
      if fired:
        return i
    return None


def _aho_corasick(patterns: Sequence[Sequence[int]], alphabet: int) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic Aho-Corasick automaton of `patterns` (non-empty sequences of symbols in [0, alphabet)).
  Returns (delta [S, alphabet] int32, accepting [S] bool: some pattern ends at this state, directly or as a
  suffix)."""
  children: list[dict[int, int]] = [{}]
  accepting = [False]
  for p in patterns:
    s = 0
    for c in p:
      if c not in children[s]:
        children[s][c] = len(children)
        children.append({})
        accepting.append(False)
      s = children[s][c]
    accepting[s] = True
  n = len(children)
  delta = np.zeros((n, alphabet), np.int32)
  fail = np.zeros(n, np.int64)
  accept = np.asarray(accepting, bool)
  order = []  # breadth first: a state's failure state is complete before it is
  for c, child in children[0].items():
    delta[0, c] = child
    order.append(child)
  head = 0
  while head < len(order):
    s = order[head]
    head += 1
    accept[s] |= accept[fail[s]]
    delta[s] = delta[fail[s]]
    for c, child in children[s].items():
      fail[child] = delta[fail[s], c]
      delta[s, c] = child
      order.append(child)
  return delta, accept


def from_token_sequences(sequences: Sequence[Sequence[int]], vocab_size: int) -> StopAutomaton:
  """Stop on the first complete occurrence of any of the token-id `sequences` in the decoded tokens."""
  seqs = [tuple(int(t) for t in s) for s in sequences]
  for j, s in enumerate(seqs):
    if not s:
      raise ValueError(f"stop sequence #{j} is empty")
    if not all(0 <= t < vocab_size for t in s):
      raise ValueError(f"stop sequence #{j} has a token outside [0, {vocab_size}): {list(s)}")
  delta, accept = _aho_corasick(seqs, vocab_size)
  table = np.where(accept[delta], -1 - delta, delta).astype(np.int32)
  return StopAutomaton(table)


def from_strings(stop_strings: Sequence[str], token_byte_strings: Sequence[bytes]) -> StopAutomaton:
  """Stop when the decoded bytes first contain any of `stop_strings` (UTF-8). token_byte_strings[t]: the bytes
  token t adds to the text (`token_bytes`); its length is the vocabulary V of the table."""
  patterns = [s.encode("utf-8") for s in stop_strings]
  for j, p in enumerate(patterns):
    if not p:
      raise ValueError(f"stop string #{j} is empty")
  delta, accept = _aho_corasick(patterns, 256)
  v = len(token_byte_strings)
  lengths = np.fromiter((len(b) for b in token_byte_strings), np.int64, v)
  # Tokens by decreasing length: at byte j only the first count[j] tokens still have bytes to read.
  order = np.argsort(-lengths, kind="stable")
  width = int(lengths.max(initial=0))
  data = np.zeros((v, max(width, 1)), np.uint8)
  for row, t in enumerate(order):
    b = token_byte_strings[t]
    data[row, :len(b)] = np.frombuffer(b, np.uint8)
  count = [int(np.sum(lengths > j)) for j in range(width)]
  state = np.repeat(np.arange(delta.shape[0], dtype=np.int32)[:, None], v, axis=1)  # [S, V] in `order`
  fired = np.zeros(state.shape, bool)
  for j in range(width):
    n = count[j]
    nxt = delta[state[:, :n], data[None, :n, j]]
    fired[:, :n] |= accept[nxt]
    state[:, :n] = nxt
  table = np.empty_like(state)
  table[:, order] = np.where(fired, -1 - state, state)
  return StopAutomaton(table)


# ------------------------------------------------------------------------------------------ token bytes

def _byte_level_alphabet() -> dict[str, int]:
  """GPT-2's printable stand-in for each byte (byte-level BPE vocabularies spell tokens in it) -> the byte.
  (transformers has it too, but importing it would cost the sampler ~1.6 s.)"""
  keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
  chars = {b: chr(b) for b in keep}
  extra = 0
  for b in range(256):
    if b not in chars:
      chars[b] = chr(256 + extra)
      extra += 1
  return {c: b for b, c in chars.items()}


def _is_byte_level(tokenizer) -> bool:
  decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
  if decoder is None:
    return False
  decoder = json.loads(decoder.__getstate__())  # the decoder alone (the whole tokenizer's JSON holds the vocab)
  kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", []) or []]
  return "ByteLevel" in kinds


def token_bytes(tokenizer, vocab_size: int | None = None) -> list[bytes]:
  """The bytes each token id adds to decoded text, for ids 0 .. vocab_size - 1 (default: the tokenizer's size;
  a model's embedding is often larger: ids without a token add nothing).

  Added tokens (special or not, e.g. '<|im_end|>' or the demo's protocol tags) add their content. Byte-level BPE
  vocabularies (GPT-2, Qwen2) are read back through their byte alphabet, exactly. Otherwise a token adds what
  decoding it alone gives, with SentencePiece's '▁' as a space and '<0xNN>' byte tokens as their byte.
  """
  n = len(tokenizer) if vocab_size is None else int(vocab_size)
  pieces = tokenizer.convert_ids_to_tokens(list(range(min(n, len(tokenizer)))))
  added = {int(i): t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
  byte_level = _is_byte_level(tokenizer)
  alphabet = _byte_level_alphabet() if byte_level else {}
  out: list[bytes] = []
  for t in range(n):
    piece = pieces[t] if t < len(pieces) else None
    if t in added:
      out.append(added[t].encode("utf-8"))
    elif piece is None:
      out.append(b"")
    elif byte_level:
      out.append(bytes(alphabet[c] for c in piece) if all(c in alphabet for c in piece) else piece.encode("utf-8"))
    elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
      out.append(bytes([int(piece[3:5], 16)]))
    else:
      out.append(piece.replace("\u2581", " ").encode("utf-8"))
  return out


_BUILT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def for_tokenizer(tokenizer, stop_strings: Sequence[str]) -> StopAutomaton:
  """`from_strings(stop_strings, token_bytes(tokenizer))`, built once per tokenizer object and stop strings."""
  built = _BUILT.setdefault(tokenizer, {})
  key = tuple(stop_strings)
  if key not in built:
    built[key] = from_strings(key, token_bytes(tokenizer))
  return built[key]


# ------------------------------------------------------------------------------------------ device side

def step(table: jnp.ndarray, state: jnp.ndarray, tokens: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """One decode step for every row: table [S, V] int32, state [B] int32, tokens [B] -> (new state [B], fired
  [B] bool: a stop string completed within this token)."""
  code = table[state, tokens]
  fired = code < 0
  return jnp.where(fired, -1 - code, code), fired
