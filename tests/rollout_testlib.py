"""Shared stand-ins for the rollout tests: a tiny byte-level BPE tokenizer, a scripted policy session that emits
fixed token streams through the same interface as the sampler's Session, and a scripted retriever."""
from __future__ import annotations

import dataclasses
import types

import numpy as np

from searche1_jax.agent import protocol
from searche1_jax.sampling import stops

import configs.parts.protocol as protocol_part
import configs.parts.rollout as rollout_part


def make_tokenizer():
  """Byte-level BPE (any text round-trips) with the protocol tags as single added tokens; no chat template."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                special_tokens=["<pad>", "<eos>"], show_progress=False)
  text = [protocol.SEARCH_R1_TEMPLATE, protocol.INVALID_ACTION_MESSAGE,
          "Doc 1(Title: Paris) Paris is the capital of France. Who founded the company? The answer is",
          "\n\n<information>Doc 1(Title: \"Paris\") Paris is a city.</information>\n\n" * 3]
  tok.train_from_iterator(text, trainer)
  tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in protocol.TAGS])
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                                 clean_up_tokenization_spaces=False)


def enc(tokenizer, text: str) -> list[int]:
  return list(tokenizer.encode(text, add_special_tokens=False))


def fake_logprob(position: int) -> float:
  """The scripted policy's log-prob of the token it writes at `position` (unique per position: checks alignment)."""
  return -0.001 * (position + 1)


class ScriptedSession:
  """Implements the DecodeSession protocol: sequence i emits scripts[i][k] (token ids) in its k-th turn, at most
  `chunk` tokens per `step` (None: a whole turn per step).

  Like the sampler it stops after the first stop in the turn's output (a stops.StopAutomaton or token-id stop
  sequences), at max_new_tokens and at max_len; after its script runs out it emits `fallback` tokens. Admitted
  sequences take the next scripts in order. It records every call so tests can check the protocol.
  """

  def __init__(self, prompts, max_len, scripts, fallback=(), chunk=None):
    self.seqs = [list(p) for p in prompts]
    self.max_len = max_len
    self.scripts = scripts
    self.fallback = list(fallback)
    self.chunk = chunk
    self.turn = [0] * len(prompts)
    self.finished = set()
    self.turns = {}  # sequence -> [tokens left in its turn's stream, budget, stop state, produced]
    self.stops = None
    self.begin_calls = []  # (indices, max_new_tokens)
    self.step_calls = []  # sequences in a turn at each step
    self.extend_calls = []
    self.finish_calls = []
    self.admit_calls = []

  def begin(self, indices, max_new_tokens, stop_sequences=()):
    self.stops = stop_sequences
    self.begin_calls.append((list(indices), max_new_tokens))
    for i in indices:
      assert i not in self.finished and i not in self.turns, f"begin of sequence {i}"
      script = self.scripts[i]
      stream = list(script[self.turn[i]]) if self.turn[i] < len(script) else list(self.fallback)
      self.turn[i] += 1
      self.turns[i] = [stream, max_new_tokens, 0, []]

  def step(self, exit_stopped=None):  # a scripted step ends every turn's chunk on its own: exit_stopped unused
    n = len(self.seqs)
    out = types.SimpleNamespace(tokens=[[] for _ in range(n)], logprobs=[[] for _ in range(n)],
                                stop_reason=[None] * n)
    self.step_calls.append(sorted(self.turns))
    automaton = self.stops if isinstance(self.stops, stops.StopAutomaton) else None
    for i in sorted(self.turns):
      stream, budget, state, produced = self.turns[i]
      new, reason = [], None
      while reason is None and (self.chunk is None or len(new) < self.chunk):
        if len(produced) >= budget or not stream:
          reason = "length"
          break
        if len(self.seqs[i]) >= self.max_len:
          reason = "cache_full"
          break
        t = stream.pop(0)
        new.append(t)
        produced.append(t)
        self.seqs[i].append(t)
        if automaton is not None:
          state, fired = automaton.advance(state, t)
        else:
          fired = any(len(s) and produced[-len(s):] == list(s) for s in self.stops)
        if fired:
          reason = "stop_sequence"
      self.turns[i][2] = state
      out.tokens[i] = new
      start = len(self.seqs[i]) - len(new)
      out.logprobs[i] = [fake_logprob(start + k) for k in range(len(new))]
      out.stop_reason[i] = reason
      if reason is not None:
        del self.turns[i]
    return out

  def extend(self, tokens):
    for i, toks in tokens.items():
      assert i not in self.finished and i not in self.turns, f"extend of sequence {i}"
      self.seqs[i].extend(toks)
    self.extend_calls.append({i: list(t) for i, t in tokens.items()})

  def finish(self, indices):
    for i in indices:
      assert i not in self.finished, f"finish twice: {i}"
      self.turns.pop(i, None)
    self.finished.update(indices)
    self.finish_calls.append(list(indices))

  def admit(self, prompts):
    start = len(self.seqs)
    assert start + len(prompts) <= len(self.scripts), "more sequences than scripts"
    self.seqs += [list(p) for p in prompts]
    self.turn += [0] * len(prompts)
    self.admit_calls.append(list(range(start, start + len(prompts))))
    return list(range(start, start + len(prompts)))


def scripted_factory(tokenizer, texts_per_seq, fallback_text="", holder=None, chunk=None):
  """A SessionFactory whose sessions emit `texts_per_seq[i][k]` (tokenized) as sequence i's k-th turn (work item
  i: admitted sequences take the scripts after the first prompts')."""

  def make(prompts, max_len):
    scripts = [[enc(tokenizer, t) for t in texts] for texts in texts_per_seq]
    assert len(prompts) <= len(scripts), (len(scripts), len(prompts))
    sess = ScriptedSession(prompts, max_len, scripts, fallback=enc(tokenizer, fallback_text), chunk=chunk)
    if holder is not None:
      holder.append(sess)
    return sess

  return make


@dataclasses.dataclass(frozen=True)
class FakePassage:
  id: str
  title: str
  text: str
  score: float = 0.0

  @property
  def contents(self) -> str:
    return f'"{self.title}"\n{self.text}'


class ScriptedRetriever:
  """Returns passages[query] (or a default list), failing the first `fail_times` calls (always if -1)."""

  def __init__(self, passages=None, default=None, fail_times=0, short=False):
    self.passages = passages or {}
    self.default = default if default is not None else [
        FakePassage("d1", "Alpha", "alpha text."), FakePassage("d2", "Beta", "beta text."),
        FakePassage("d3", "Gamma", "gamma text."), FakePassage("d4", "Delta", "delta text.")]
    self.fail_times = fail_times
    self.calls = []

  def retrieve(self, queries, topk):
    self.calls.append((list(queries), topk))
    if self.fail_times == -1 or len(self.calls) <= self.fail_times:
      raise ConnectionError("retriever down")
    return [list(self.passages.get(q, self.default)) for q in queries]


def configs(**protocol_overrides):
  p = protocol_part.get()
  r = rollout_part.get()
  for k, v in protocol_overrides.items():
    p[k] = v
  return p, r


def word_tokens(tok, n):
  """n distinct token ids that decode to plain words of >= 3 letters (no tag, no space)."""
  out = []
  for i in range(len(tok)):
    s = tok.decode([i])
    if s.isalpha() and len(s) >= 3 and s not in protocol.TAGS:
      out.append(i)
    if len(out) == n:
      return out
  raise AssertionError("tokenizer has too few word tokens")


def random_params(cfg, seed=0):
  """Random normal(0.02) params in init_params' tree and shapes, unit final norm (eval_shape: no op-by-op init)."""
  import jax
  from searche1_jax.models import qwen2
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: qwen2.init_params(cfg, jax.random.PRNGKey(seed)))
  params = jax.tree_util.tree_map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  params["final_norm"]["scale"] = np.ones_like(params["final_norm"]["scale"])
  return params


def chain_params(cfg, chain, seed=0):
  """Random params with zero attention / MLP outputs and an LM head whose greedy next token follows `chain`
  ({current token id: next token id, or a tuple of equally likely next ids}): the residual stream is the
  embedding, so the model is a bigram machine."""
  params = random_params(cfg, seed)
  params["layers"]["attn"]["o"]["kernel"] = np.zeros_like(params["layers"]["attn"]["o"]["kernel"])
  params["layers"]["mlp"]["down"]["kernel"] = np.zeros_like(params["layers"]["mlp"]["down"]["kernel"])
  emb = params["embed"]["embedding"]
  normed = emb / np.sqrt(np.mean(emb**2, axis=-1, keepdims=True) + cfg.rms_norm_eps)  # final_norm(emb)
  head = np.asarray(params["lm_head"]["kernel"]) * 0.01
  for cur, nxt in chain.items():
    for n in (nxt if isinstance(nxt, tuple) else (nxt,)):
      head[:, n] += 10.0 * normed[cur] / np.sum(normed[cur]**2)
  params["lm_head"]["kernel"] = head
  return params


def search_answer_chain(tok):
  """The chain prompt-end '\n' -> '<search>' A '</search>'; observation-end '\n\n' -> '<answer>' B '</answer>'.

  Returns (chain, A, B) with A, B token ids of plain words."""
  nl = tok.encode("\n", add_special_tokens=False)
  ids = {t: tok.convert_tokens_to_ids(t) for t in protocol.TAGS}
  a, b = word_tokens(tok, 2)
  obs_tail = tok.encode(protocol.INFORMATION_CLOSE + "\n\n", add_special_tokens=False)
  assert len(nl) == 1 and obs_tail[0] == ids["</information>"] and obs_tail[-1] != nl[0], (nl, obs_tail)
  chain = {nl[0]: ids["<search>"], ids["<search>"]: a, a: ids["</search>"],
           obs_tail[-1]: ids["<answer>"], ids["<answer>"]: b, b: ids["</answer>"]}
  return chain, a, b
