"""A stateful sampling session over a KV cache: the device side of a multi-turn rollout.

    sess = Session(params, cfg, prompts, max_len=4096, temperature=1.0, eos_ids=[eos], seed=step)
    out = sess.decode(500, stop_sequences=[ids("</search>"), ids("</answer>")])
    # out.tokens[i], out.logprobs[i], out.stop_reason[i] for each sequence i that was live
    sess.finish([i for i in range(n) if out.stop_reason[i] in ("eos", "cache_full") or answered(i)])
    sess.extend({i: observation_ids(i) for i in searched})   # no recompute of what the cache holds
    out = sess.decode(500, stop_sequences=...)                # next turn, only the live sequences
    ...
    sess.tokens(i), sess.policy_mask(i), sess.logprobs(i)    # the trajectory, aligned token by token

A turn at a time per sequence (continuous batching: agent/rollout.py's 'continuous' schedule), the same work one
chunk at a time, so the host can act between chunks:

    sess.begin([0, 3], 500, stop_automaton)    # these sequences start a turn
    out = sess.step()                          # one chunk for every sequence in a turn; out.stop_reason[i] once
                                               # sequence i's turn ended (it then waits: extend, begin again)
    new = sess.admit([prompt_ids, ...])        # more sequences, into the rows of finished ones

Sequence i (the i-th prompt, then the admitted ones in order) keeps its index for the whole session. It is *live*
until `finish([i])`; live sequences decode in their turns and may be extended between them; finished ones never
change again, and once enough have finished their cache rows are given up (compaction into a smaller batch
bucket) or handed to admitted sequences.

Where the work goes: every token a sequence holds is in the cache (slot == position). `decode` runs jitted
chunks of `options.decode_chunk` steps (one lax.while_loop each, cache donated); all live rows decode in the
same batch, a row that stopped only idles (its writes are dropped). `extend` runs one jitted forward over the
new tokens of all extended rows at once. Shapes are bucketed (see `SamplerOptions`). Both read the session's
copy of the weights (`options.gather_weights`): compute dtype, gathered over the mesh's 'fsdp' axis once.

Sampling randomness is keyed by (seed, sequence index, position), so results do not depend on batch layout,
compaction or chunking, and G copies of one prompt (different indices) sample independently.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import jax
import numpy as np

from searche1_jax import distributed, sharding
from searche1_jax.models import qwen2
from searche1_jax.sampling import engine, ops, stops
from searche1_jax.sampling.options import SamplerOptions, bucket


@dataclasses.dataclass
class DecodeOutput:
  """What one `decode` call produced, indexed by sequence index (length = number of sequences).

  tokens[i]: the new token ids (including the EOS id or the matched stop sequence that ended them);
  logprobs[i]: float32 [len(tokens[i])], log-prob of each under the model at temperature 1;
  stop_reason[i]: 'eos' | 'stop_sequence' | 'length' (this call's max_new_tokens) | 'cache_full' (the
  sequence reached max_len before that), or None when sequence i was not live (then tokens[i] == []).
  A reason that ends the sequence's generation for good is 'eos' or 'cache_full'; the rollout loop decides
  (it must `finish` them or they decode again next call; a 'cache_full' one ends at once with no tokens).
  """
  tokens: list[list[int]]
  logprobs: list[np.ndarray]
  stop_reason: list[str | None]


# Token-id stop sequences -> their automaton, shared by every session (tuples of tuples, vocab size).
_token_stops = functools.lru_cache(maxsize=32)(stops.from_token_sequences)


def check_sampling_params(temperature: float, top_p: float, top_k: int) -> None:
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
  if int(top_k) != top_k or top_k < 0:
    raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")


def _check_ids(ids: Sequence[int], vocab: int, what: str) -> list[int]:
  out = []
  for j, t in enumerate(ids):
    if isinstance(t, (bool, np.bool_)) or int(t) != t or not 0 <= int(t) < vocab:
      raise ValueError(f"{what}: token #{j} is {t!r}, not an id in [0, {vocab})")
    out.append(int(t))
  return out


class Session:
  """Sampling state for a fixed set of sequences (see the module docstring for the protocol).

  Args:
    params, cfg: the Qwen2 params pytree (sharded by `qwen2.shard_params` when mesh is given) and config.
    prompts: N non-empty lists of token ids; prefilled at construction.
    max_len: the most tokens one sequence may hold (prompt + everything decoded or appended).
    temperature, top_p, top_k: default sampling parameters (temperature 0 = greedy; top_k 0 = off);
      `decode` may override them per call.
    eos_ids: token ids that end a generation (included in its output). Per-call override in `decode`.
    seed: PRNG seed; see the module docstring.
    mesh, rules: a ('data', 'fsdp', 'tensor') mesh and logical rules (`searche1_jax.sharding`): batch rows
      over data x fsdp, KV heads over tensor (the cache's axes: `qwen2.cache_axes(cfg)`).
    options: `SamplerOptions` or a `configs/parts/sampling.py` block (bucketing, chunking, compaction, and
      `gather_weights`: the session runs on its own copy of params in the compute dtype, gathered over 'fsdp').
  """

  def __init__(self, params, cfg: qwen2.Qwen2Config, prompts: Sequence[Sequence[int]], *, max_len: int,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, eos_ids: Sequence[int] = (),
               seed: int = 0, mesh=None, rules=sharding.DEFAULT_RULES, options=None):
    self.cfg, self.mesh = cfg, mesh
    self._opts = SamplerOptions.from_config(options)
    self._prog = engine.programs(cfg, mesh, tuple(rules))
    gather = self._opts.gather_weights and self._prog.weights_needed(params)
    self._params = self._prog.weights(params) if gather else params
    check_sampling_params(temperature, top_p, top_k)
    self._defaults = dict(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                          eos_ids=_check_ids(eos_ids, cfg.vocab_size, "eos_ids"))
    self.seed = int(seed)
    if not prompts:
      raise ValueError("Session needs at least one prompt")
    prompts = [_check_ids(p, cfg.vocab_size, f"prompt #{i}") for i, p in enumerate(prompts)]
    for i, p in enumerate(prompts):
      if not p:
        raise ValueError(f"prompt #{i} is empty; every sequence needs at least one token")
    self.max_len = int(max_len)
    longest = max(len(p) for p in prompts)
    if longest > self.max_len:
      raise ValueError(f"prompt #{int(np.argmax([len(p) for p in prompts]))} has {longest} tokens > max_len "
                       f"{self.max_len}")
    n = len(prompts)
    self._tokens: list[list[int]] = [[] for _ in range(n)]
    self._mask: list[list[int]] = [[] for _ in range(n)]
    self._lps: list[list[float]] = [[] for _ in range(n)]
    self._lengths = np.zeros(n, np.int64)
    self._finished = np.zeros(n, bool)
    self._row = np.arange(n)  # row of sequence i in the device batch; -1 once compacted away
    # The turn each sequence is in (`begin` .. its stop): tokens it may still produce, its stop-automaton state, and
    # a stop found at `begin` (max_new_tokens 0 or a full sequence) that the next `step` reports.
    self._in_turn = np.zeros(n, bool)
    self._budget = np.zeros(n, np.int64)
    self._stop_state = np.zeros(n, np.int32)
    self._ended: dict[int, str] = {}
    self._turn_stops: stops.StopAutomaton | None = None
    self._min_batch = self._opts.min_batch
    if mesh is not None:
      self._min_batch = max(self._min_batch, sharding.data_parallel_size(mesh))
    self._cache_bucket(self.max_len)  # fail now, not mid-rollout, if max_len exceeds the cache buckets
    # Identical prompts (the G samples of one question) are prefilled once; their cache rows are then copied. On a
    # batch-sharded cache, once per batch shard they occupy (sequence i in row i), so no row crosses chips when
    # each shard's prompts fit its share of the prefill batch (`shard_local_sources`).
    first_of: dict[tuple, int] = {}
    source = np.asarray([first_of.setdefault(tuple(p), i) for i, p in enumerate(prompts)])
    shards, prefill_rows = sharding.data_parallel_size(mesh) if mesh is not None else 1, None
    if self._opts.share_prompts and shards > 1:
      local = shard_local_sources(source, self._batch_bucket(n), self._batch_bucket, shards)
      if local is not None:
        source, prefill_rows = local
    unique = np.flatnonzero(source == np.arange(n))
    shared = self._opts.share_prompts and len(unique) < n
    self._batch = self._batch_bucket(len(unique) if shared else n)
    first = min(self.max_len, longest + self._opts.decode_chunk) if self._opts.grow_cache else self.max_len
    self._cache_len = self._cache_bucket(first)
    self._cache, self._last_hidden = self._prog.new_state(batch=self._batch, length=self._cache_len)
    self.stats = dict(extend_calls=0, sub_batch_extends=0, decode_chunks=0, relayouts=0, shard_local_relayouts=0,
                      shared_prefills=0)
    if shared:
      self._row[:] = -1
      self._row[unique] = np.arange(len(unique)) if prefill_rows is None else prefill_rows
      self._append({int(i): prompts[i] for i in unique}, policy=False)
      self._copy_sequences(source, shards=1 if prefill_rows is None else shards)
    else:
      self._append(dict(enumerate(prompts)), policy=False)

  # ------------------------------------------------------------------------------------------ inspection

  @property
  def num_sequences(self) -> int:
    return len(self._tokens)

  @property
  def lengths(self) -> np.ndarray:
    """[N] tokens each sequence holds now (prompt + decoded + appended)."""
    return self._lengths.copy()

  @property
  def finished(self) -> np.ndarray:
    """[N] bool: sequences marked done by `finish`."""
    return self._finished.copy()

  @property
  def live(self) -> list[int]:
    """Indices of the sequences that are not finished."""
    return [int(i) for i in np.flatnonzero(~self._finished)]

  @property
  def room(self) -> np.ndarray:
    """[N] tokens each sequence may still take before max_len."""
    return self.max_len - self._lengths

  @property
  def batch_size(self) -> int:
    """Rows of the device batch now (a bucket >= number of live sequences)."""
    return self._batch

  @property
  def cache_length(self) -> int:
    """Physical KV-cache length now (a bucket; grows with the sequences when options.grow_cache)."""
    return self._cache_len

  def tokens(self, i: int) -> list[int]:
    """Every token id sequence i holds: prompt, then decoded and appended tokens in order."""
    return list(self._tokens[i])

  def policy_mask(self, i: int) -> np.ndarray:
    """int32 [len]: 1 for tokens sampled by `decode`, 0 for prompt and `extend`ed tokens."""
    return np.asarray(self._mask[i], np.int32)

  def logprobs(self, i: int) -> np.ndarray:
    """float32 [len]: log-prob (temperature 1) of each sampled token; 0 where policy_mask is 0."""
    return np.asarray(self._lps[i], np.float32)

  # ------------------------------------------------------------------------------------------ actions

  def finish(self, indices: Sequence[int]) -> None:
    """Mark sequences done: they no longer decode or take tokens; their rows are freed at the next call."""
    for i in indices:
      self._check_index(i)
      self._finished[int(i)] = True
      self._in_turn[int(i)] = False
      self._ended.pop(int(i), None)

  def admit(self, prompts: Sequence[Sequence[int]]) -> list[int]:
    """Add sequences to the session and prefill them (continuous batching: work enters as other work finishes).
    They take rows of finished sequences, or a larger batch bucket; live sequences are untouched. Returns their
    indices, numbered after the existing ones (sampling draws are keyed by them, as for the first prompts)."""
    start = self.num_sequences
    prompts = [_check_ids(p, self.cfg.vocab_size, f"admit: prompt #{k}") for k, p in enumerate(prompts)]
    for k, p in enumerate(prompts):
      if not p or len(p) > self.max_len:
        raise ValueError(f"admit: prompt #{k} has {len(p)} tokens; needs 1..max_len={self.max_len}")
    if not prompts:
      return []
    new = np.arange(start, start + len(prompts))
    self._tokens += [[] for _ in prompts]
    self._mask += [[] for _ in prompts]
    self._lps += [[] for _ in prompts]
    self._lengths = np.concatenate([self._lengths, np.zeros(len(prompts), np.int64)])
    self._finished = np.concatenate([self._finished, np.zeros(len(prompts), bool)])
    self._in_turn = np.concatenate([self._in_turn, np.zeros(len(prompts), bool)])
    self._budget = np.concatenate([self._budget, np.zeros(len(prompts), np.int64)])
    self._stop_state = np.concatenate([self._stop_state, np.zeros(len(prompts), np.int32)])
    self._row = np.concatenate([self._row, np.full(len(prompts), -1)])
    live = np.flatnonzero(~self._finished[:start])
    if len(live) + len(prompts) > self._batch:  # grow the batch: live rows first, the new ones after them
      self._gather_rows(self._row[live], self._batch_bucket(len(live) + len(prompts)), self._cache_len)
      self._row[:start] = -1
      self._row[live] = np.arange(len(live))
    free = np.setdiff1d(np.arange(self._batch), self._row[live])[:len(prompts)]
    old = self._row[:start]  # a view: finished sequences hand their rows on
    old[np.isin(old, free) & self._finished[:start]] = -1
    self._row[new] = free
    # Identical prompts among the admitted (a question's samples) prefill once; the others copy that cache row.
    first_of: dict[tuple, int] = {}
    source = np.asarray([first_of.setdefault(tuple(p), k) if self._opts.share_prompts else k
                         for k, p in enumerate(prompts)])
    self._append({int(new[k]): prompts[k] for k in np.flatnonzero(source == np.arange(len(prompts)))}, policy=False)
    copies = np.flatnonzero(source != np.arange(len(prompts)))
    if len(copies):
      n_rows = self._batch_bucket(len(copies))
      src, dst = np.zeros(n_rows, np.int32), np.full(n_rows, self._batch, np.int32)  # padding entries: dropped
      src[:len(copies)], dst[:len(copies)] = self._row[new[source[copies]]], self._row[new[copies]]
      length = min(self._cache_bucket(int(max(self._lengths[new[source[copies]]]))), self._cache_len)
      self._cache, self._last_hidden = self._prog.copy_rows(self._cache, self._last_hidden, src, dst, length=length)
      for k in copies:
        i, j = new[k], new[source[k]]
        self._tokens[i], self._mask[i], self._lps[i] = list(self._tokens[j]), list(self._mask[j]), list(self._lps[j])
        self._lengths[i] = self._lengths[j]
      self.stats["shared_prefills"] += len(copies)
    return [int(i) for i in new]

  def extend(self, additions: Mapping[int, Sequence[int]]) -> None:
    """Append externally supplied tokens (retrieved passages, glue text) to live sequences, without
    recomputing what the cache already holds. additions: {sequence index: token ids}; empty lists are
    skipped. Raises ValueError (naming the sequence) if a sequence is finished or would exceed max_len."""
    clean = {}
    for i, toks in additions.items():
      self._check_index(i)
      i = int(i)
      if self._finished[i]:
        raise ValueError(f"extend: sequence {i} is finished")
      if self._in_turn[i]:
        raise ValueError(f"extend: sequence {i} is in a turn; step it to its end first")
      toks = _check_ids(toks, self.cfg.vocab_size, f"extend: tokens for sequence {i}")
      if self._lengths[i] + len(toks) > self.max_len:
        raise ValueError(f"extend: sequence {i} holds {self._lengths[i]} tokens; appending {len(toks)} would "
                         f"exceed max_len={self.max_len} (truncate the observation; see Session.room)")
      if toks:
        clean[i] = toks
    if clean:
      self._append(clean, policy=False)

  def begin(self, indices: Sequence[int], max_new_tokens: int,
            stop_sequences: stops.StopAutomaton | Sequence[Sequence[int]] = ()) -> None:
    """Start a turn for live sequences: from now on each `step` decodes them until an EOS id, a stop within the
    turn's output, `max_new_tokens` tokens in the turn, or max_len. Stops as in `decode`; every sequence in a turn
    at the same time must use the same stops (one automaton drives the batch)."""
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
      raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    automaton = self._automaton(stop_sequences)
    if self.in_turn and automaton is not self._turn_stops:
      raise ValueError("begin: sequences already in a turn use other stop sequences; finish their turns first")
    for i in indices:
      self._check_index(i)
      i = int(i)
      if self._finished[i]:
        raise ValueError(f"begin: sequence {i} is finished")
      if self._in_turn[i]:
        raise ValueError(f"begin: sequence {i} is already in a turn")
    self._turn_stops = automaton
    for i in indices:
      i = int(i)
      self._in_turn[i], self._budget[i], self._stop_state[i] = True, int(max_new_tokens), 0
      if max_new_tokens == 0:
        self._ended[i] = "length"
      elif self._lengths[i] >= self.max_len:
        self._ended[i] = "cache_full"

  @property
  def in_turn(self) -> list[int]:
    """Indices of the sequences in a turn (begun and not yet stopped or finished)."""
    return [int(i) for i in np.flatnonzero(self._in_turn)]

  def step(self, *, temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
           eos_ids: Sequence[int] | None = None, exit_stopped: int | None = None) -> DecodeOutput:
    """One jitted chunk (options.decode_chunk steps) for every sequence in a turn; sequences not in a turn keep
    their rows and do not change. The chunk ends early once every turn ended, or once `exit_stopped` turns ended in
    it (None: never early). DecodeOutput holds this chunk's tokens; stop_reason[i] is set for a sequence whose
    turn ended in it (None: still in its turn, or not in one). Sampling parameters default to the session's."""
    d = self._defaults
    temperature = d["temperature"] if temperature is None else float(temperature)
    top_p = d["top_p"] if top_p is None else float(top_p)
    top_k = d["top_k"] if top_k is None else int(top_k)
    check_sampling_params(temperature, top_p, top_k)
    eos = d["eos_ids"] if eos_ids is None else _check_ids(eos_ids, self.cfg.vocab_size, "eos_ids")
    opts = self._opts
    n = self.num_sequences
    out = DecodeOutput([[] for _ in range(n)], [np.zeros(0, np.float32)] * n, [None] * n)
    for i, reason in self._ended.items():
      out.stop_reason[i] = reason
      self._in_turn[i] = False
    self._ended.clear()
    active = self.in_turn
    if not active:
      return out
    eos_table = np.full(bucket(len(eos), (), opts.eos_slots, "eos slots"), ops.NO_TOKEN, np.int32)
    eos_table[:len(eos)] = eos
    greedy = temperature == 0.0
    top_k = 0 if top_k >= self.cfg.vocab_size else top_k
    self._layout(int(max(self._lengths[active])) + opts.decode_chunk)
    b = self._batch
    rows = self._row[active]
    lengths = np.zeros(b, np.int32)
    seq_ids = np.zeros(b, np.int32)
    is_active = np.zeros(b, bool)
    budget = np.ones(b, np.int32)
    stop_state = np.zeros(b, np.int32)
    lengths[rows], seq_ids[rows], is_active[rows] = self._lengths[active], active, True
    budget[rows], stop_state[rows] = self._budget[active], self._stop_state[active]
    self._cache, self._last_hidden, toks, lps, n_new, reason, stop_state = self._prog.decode(
        self._params, self._cache, self._last_hidden, lengths, seq_ids, is_active, budget, stop_state,
        self._stop_table(self._turn_stops), eos_table, np.int32(self.max_len), np.int32(self.seed),
        np.float32(temperature if not greedy else 1.0), np.float32(top_p),
        np.int32(b + 1 if exit_stopped is None else max(1, int(exit_stopped))), greedy=greedy, top_k=top_k,
        use_top_p=top_p < 1.0, steps=opts.decode_chunk)
    self.stats["decode_chunks"] += 1
    # Every process steers every row (the decode batch is one program over the whole mesh): all of them read the
    # whole output.
    toks, lps, n_new, reason, stop_state = distributed.fetch((toks, lps, n_new, reason, stop_state))
    for i, r in zip(active, rows):
      k = int(n_new[r])
      new, new_lp = toks[r, :k].tolist(), lps[r, :k]
      out.tokens[i], out.logprobs[i] = new, new_lp
      self._tokens[i] += new
      self._lps[i] += new_lp.tolist()
      self._mask[i] += [1] * k
      self._lengths[i] += k
      self._budget[i] -= k
      self._stop_state[i] = stop_state[r]
      if reason[r]:
        out.stop_reason[i] = engine.REASONS[int(reason[r])]
        self._in_turn[i] = False
    return out

  def decode(self, max_new_tokens: int, stop_sequences: stops.StopAutomaton | Sequence[Sequence[int]] = (), *,
             temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
             eos_ids: Sequence[int] | None = None) -> DecodeOutput:
    """One whole turn for every live sequence: `begin` them all, then `step` until every turn ended. Stops: a
    `stops.StopAutomaton` (e.g. `stops.from_strings(['</search>'], token_bytes)`: the first token whose text
    completes a stop string, however it was tokenized) or token-id lists (the first complete occurrence of one).
    Sampling parameters default to the session's. See DecodeOutput."""
    if self.in_turn:
      raise ValueError(f"decode: sequences {self.in_turn} are in a turn begun by `begin`; step them to its end")
    self.begin(self.live, max_new_tokens, stop_sequences)
    n = self.num_sequences
    out_tokens: list[list[int]] = [[] for _ in range(n)]
    out_lps: list[list[np.ndarray]] = [[] for _ in range(n)]
    reasons: list[str | None] = [None] * n
    while self.in_turn or self._ended:
      part = self.step(temperature=temperature, top_p=top_p, top_k=top_k, eos_ids=eos_ids)
      for i in range(n):
        out_tokens[i] += part.tokens[i]
        out_lps[i].append(part.logprobs[i])
        reasons[i] = part.stop_reason[i] or reasons[i]
    return DecodeOutput(out_tokens, [np.concatenate(x).astype(np.float32) if x else np.zeros(0, np.float32)
                                     for x in out_lps], reasons)

  # ------------------------------------------------------------------------------------------ internals

  def _automaton(self, stop_sequences) -> stops.StopAutomaton:
    """A stops.StopAutomaton as it is, token-id stop sequences as their (cached, shared) automaton."""
    if isinstance(stop_sequences, stops.StopAutomaton):
      return stop_sequences
    return _token_stops(tuple(tuple(_check_ids(s, self.cfg.vocab_size, f"stop sequence #{j}"))
                              for j, s in enumerate(stop_sequences)), self.cfg.vocab_size)

  def _stop_table(self, automaton: stops.StopAutomaton) -> jax.Array:
    """The device copy of the automaton's table, padded to a bucket of states (kept on the automaton: uploaded
    once per automaton and layout)."""
    states = bucket(automaton.num_states, (), self._opts.stop_states, "stop states")
    layout = (states, self.cfg.vocab_size, self.mesh)
    if layout not in automaton.device:
      target = sharding.replicated(self.mesh) if self.mesh is not None else None
      automaton.device[layout] = jax.device_put(automaton.padded(states, self.cfg.vocab_size), target)
    return automaton.device[layout]

  def _check_index(self, i) -> None:
    if isinstance(i, (bool, np.bool_)) or int(i) != i or not 0 <= int(i) < self.num_sequences:
      raise ValueError(f"sequence index {i!r} out of range [0, {self.num_sequences})")

  def _batch_bucket(self, n: int) -> int:
    return bucket(max(n, 1), self._opts.batch_buckets, self._min_batch, "sampling.batch_buckets")

  def _cache_bucket(self, n: int) -> int:
    return bucket(n, self._opts.cache_buckets, self._opts.min_cache, "sampling.cache_buckets")

  def _layout(self, need_len: int) -> None:
    """Make the cache at least min(need_len, max_len) long, and compact the live rows into a smaller batch
    bucket when options.compact and the live count fits one."""
    live = np.flatnonzero(~self._finished)
    batch = self._batch
    if self._opts.compact:
      batch = min(batch, self._batch_bucket(len(live)))
    length = self._cache_len
    need_len = min(need_len, self.max_len)
    if need_len > length:
      length = self._cache_bucket(need_len)
    if batch == self._batch and length == self._cache_len:
      return
    if batch != self._batch:
      shards = sharding.data_parallel_size(self.mesh) if self.mesh is not None else 1
      pos = _shard_local_positions(self._row[live], self._batch, batch, shards)
      gather = np.full(batch, -1, np.int32)
      if pos is None:  # one device, or a shard whose live rows exceed its share: rows may change chips
        pos, shards = np.arange(len(live)), 1
      gather[pos] = self._row[live]
      self._gather_rows(gather, batch, length, shards=shards)
      self._row[:] = -1
      self._row[live] = pos
    else:  # the same rows, a longer cache
      self._cache, self._last_hidden = self._prog.grow(self._cache, self._last_hidden, length=length)
      self._cache_len = length
      self.stats["relayouts"] += 1

  def _gather_rows(self, rows: np.ndarray, batch: int, length: int, shards: int = 1) -> None:
    """A new device batch of `batch` rows x `length` slots whose row k is old row rows[k] (-1, or k past
    len(rows): empty). shards > 1: every row stays in its batch shard (engine.relayout_local: no row changes
    chips). The caller renumbers self._row."""
    gather = np.full(batch, -1, np.int32)
    gather[:len(rows)] = rows
    if shards > 1:
      self._cache, self._last_hidden = self._prog.relayout_local(self._cache, self._last_hidden, gather,
                                                                 length=length, shards=shards)
      self.stats["shard_local_relayouts"] += 1
    else:
      self._cache, self._last_hidden = self._prog.relayout(self._cache, self._last_hidden, gather, length=length)
    self._batch, self._cache_len = batch, length
    self.stats["relayouts"] += 1

  def _copy_sequences(self, source: np.ndarray, shards: int = 1) -> None:
    """Sequence i becomes a copy of sequence source[i] (its tokens and cache row) in row i of a batch of all
    sequences; shards > 1: every source row is in its copies' batch shard (`shard_local_sources`)."""
    n = self.num_sequences
    self._gather_rows(self._row[source], self._batch_bucket(n), self._cache_len, shards=shards)
    self._row = np.arange(n)
    copies = np.flatnonzero(source != np.arange(n))
    for i in copies:
      j = source[i]
      self._tokens[i], self._mask[i], self._lps[i] = list(self._tokens[j]), list(self._mask[j]), list(self._lps[j])
      self._lengths[i] = self._lengths[j]
    self.stats["shared_prefills"] = len(copies)

  def _append(self, additions: dict[int, list[int]], policy: bool) -> None:
    """Feed tokens through the cache (prefill and extend), at most options.max_extend per row per call."""
    self._layout(int(max(self._lengths[i] + len(t) for i, t in additions.items())))
    opts = self._opts
    offset = 0
    while True:
      chunks = {i: t[offset:offset + opts.max_extend] for i, t in additions.items() if len(t) > offset}
      if not chunks:
        break
      t_len = bucket(max(len(c) for c in chunks.values()), opts.length_buckets, opts.min_length,
                     "sampling.length_buckets")
      fresh = all(self._lengths[i] == 0 for i in chunks)  # a prefill: nothing in the cache to attend
      # The extended rows, packed [R] (R = their batch bucket; padding entries name row B and are dropped).
      n_rows = self._batch_bucket(len(chunks))
      rows = np.full(n_rows, self._batch, np.int32)
      tokens = np.full((n_rows, t_len), opts.pad_id, np.int32)
      starts = np.full(n_rows, self._cache_len, np.int32)  # a padding row writes off the end (dropped)
      counts = np.zeros(n_rows, np.int32)
      for k, (i, c) in enumerate(chunks.items()):
        rows[k], tokens[k, :len(c)], starts[k], counts[k] = self._row[i], c, self._lengths[i], len(c)
      if self.mesh is None and n_rows < self._batch:
        # A few rows of a larger batch (observations, admitted prompts): compute only theirs.
        self._cache, self._last_hidden = self._prog.extend_rows(self._params, self._cache, self._last_hidden, rows,
                                                                tokens, starts, counts, fresh=fresh)
        self.stats["sub_batch_extends"] += 1
      else:  # the whole batch: the packed rows scattered to their places (row B, the padding's, is cut off)
        b = self._batch
        whole = [np.full((b + 1,) + x.shape[1:], fill, x.dtype)
                 for x, fill in ((tokens, opts.pad_id), (starts, self._cache_len), (counts, 0))]
        for out, x in zip(whole, (tokens, starts, counts)):
          out[rows] = x
        self._cache, self._last_hidden = self._prog.extend(self._params, self._cache, self._last_hidden,
                                                           *(x[:b] for x in whole), fresh=fresh)
      self.stats["extend_calls"] += 1
      for i, c in chunks.items():
        self._tokens[i] += c
        self._mask[i] += [int(policy)] * len(c)
        self._lps[i] += [0.0] * len(c)
        self._lengths[i] += len(c)
      offset += opts.max_extend


def _shard_local_positions(rows: np.ndarray, old_batch: int, new_batch: int, shards: int) -> np.ndarray | None:
  """Rows [n] of a batch of old_batch rows, split into `shards` equal blocks (one per data-parallel device), placed
  into a batch of new_batch rows in the same blocks, in order within each: the new position of each, or None when
  there is one shard, the batches do not split evenly, or a block holds more rows than its share of the new batch."""
  if shards <= 1 or old_batch % shards or new_batch % shards:
    return None
  per_old, per_new = old_batch // shards, new_batch // shards
  block = np.asarray(rows) // per_old
  pos = np.empty(len(block), np.int64)
  for k in range(shards):
    mine = np.flatnonzero(block == k)
    if len(mine) > per_new:
      return None
    pos[mine] = k * per_new + np.argsort(np.argsort(np.asarray(rows)[mine], kind="stable"), kind="stable")
  return pos



def shard_local_sources(source: np.ndarray, batch: int, prefill_batch, shards: int
                        ) -> tuple[np.ndarray, np.ndarray] | None:
  """Shared prompts on a batch-sharded cache: sequence i copies sequence source[i] (source[i] == i: prefilled) and
  will sit in row i of a batch of `batch` rows split into `shards` equal blocks (one per data-parallel device). A
  prompt whose copies span several blocks is prefilled once in each, so every copy reads a row of its own block.
  prefill_batch(k): the batch bucket that k prefilled prompts take. Returns (the new source [n], the row of each
  prefilled sequence in that batch [its count], in its block), or None when the batches do not split evenly or a
  block has more prompts than its share of the prefill batch."""
  if batch % shards:
    return None
  n = len(source)
  block = np.arange(n) // (batch // shards)
  first_of: dict[tuple[int, int], int] = {}
  local = np.asarray([first_of.setdefault((int(source[i]), int(block[i])), i) for i in range(n)])
  unique = np.flatnonzero(local == np.arange(n))
  small = prefill_batch(len(unique))
  if small % shards or np.bincount(block[unique], minlength=shards).max() > small // shards:
    return None
  rank = np.arange(len(unique)) - np.searchsorted(block[unique], block[unique])  # place within its block
  return local, block[unique] * (small // shards) + rank
