"""The jitted programs of the sampler: its copy of the weights, new state, extend (= prefill), a chunk of decode
steps, and the row moves (relayout, grow, copy_rows).

Device state per session is (cache, last_hidden):
  cache        KVCache (per layer k and v in cfg.kv_cache_layout: qwen2.cache_axes); slot s of row b holds
               position s of the
               sequence in that row.
  last_hidden  [B, D] final-norm hidden state at the row's last held token: the next token's logits come
               from it, so the cache always holds every token of a sequence, including the last one.
Row lengths, sequence ids and activity are host-side numpy arrays passed in on each call (a few bytes).

Programs are cached per (model config, mesh, rules) so every session over the same model reuses them; each
program is traced once per bucketed shape. `TRACE_COUNTS` counts traces (a python side effect that only runs
while jax traces), which the tests use to bound the number of compiled programs.
"""
from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp

from searche1_jax import sharding
from searche1_jax.models import qwen2
from searche1_jax.sampling import ops, stops

TRACE_COUNTS: collections.Counter = collections.Counter()

# Stop-reason codes returned by decode_chunk (0 = still going).
REASONS = (None, "eos", "stop_sequence", "length", "cache_full")
_EOS, _STOP, _LENGTH, _FULL = 1, 2, 3, 4


def _hidden_after(hidden, counts, previous):
  """Each row's last hidden state after an extend: hidden [R, T, D] at its last taken token (counts [R]), or
  `previous` [R, D] for a row that took none."""
  h_last = jnp.take_along_axis(hidden, jnp.maximum(counts - 1, 0)[:, None, None], axis=1)[:, 0]
  return jnp.where((counts > 0)[:, None], h_last.astype(previous.dtype), previous)


class Programs:
  """Jitted sampler programs for one model config on one mesh (or a single device when mesh is None)."""

  def __init__(self, cfg: qwen2.Qwen2Config, mesh=None, rules=sharding.DEFAULT_RULES):
    self.cfg, self.mesh, self.rules = cfg, mesh, rules
    self.weight_rules = sharding.without_mesh_axis(rules, "fsdp")
    self.weights = jax.jit(self._weights)
    self.new_state = jax.jit(self._new_state, static_argnames=("batch", "length"))
    self.extend = jax.jit(self._extend, donate_argnums=(1, 2), static_argnames=("fresh",))
    self.extend_rows = jax.jit(self._extend_rows, donate_argnums=(1, 2), static_argnames=("fresh",))
    self.decode = jax.jit(self._decode, static_argnames=("greedy", "top_k", "use_top_p", "steps"),
                          donate_argnums=(1, 2))
    self.relayout = jax.jit(self._relayout, static_argnames=("length",))
    self.grow = jax.jit(self._grow, static_argnames=("length",))
    self.relayout_local = jax.jit(self._relayout_local, static_argnames=("length", "shards"))
    self.copy_rows = jax.jit(self._copy_rows, donate_argnums=(0, 1), static_argnames=("length",))

  # -- sharding helpers (no-ops on a single device)

  def _constrain(self, x, names):
    if self.mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, sharding.named_sharding(self.mesh, x.shape, names, self.rules))

  def _replicate(self, x):
    if self.mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, sharding.replicated(self.mesh))

  def _constrain_state(self, cache: qwen2.KVCache, last_hidden):
    k_axes, v_axes = qwen2.cache_axes(self.cfg)
    cache = qwen2.KVCache(tuple(self._constrain(k, k_axes) for k in cache.k),
                          tuple(self._constrain(v, v_axes) for v in cache.v))
    return cache, self._constrain(last_hidden, ("batch", None))

  # -- programs

  def weights_needed(self, params) -> bool:
    """Whether `weights` would change params: a floating leaf not in the compute dtype, or an fsdp axis to gather."""
    dtype = jnp.dtype(self.cfg.dtype)
    recast = any(jnp.issubdtype(p.dtype, jnp.floating) and p.dtype != dtype for p in jax.tree.leaves(params))
    return recast or (self.mesh is not None and self.mesh.shape["fsdp"] > 1)

  def _weights(self, params):
    """The sampler's copy of the weights (made once per session): floating leaves in the compute dtype, and on a
    mesh gathered over 'fsdp' (still split over 'tensor', by `weight_rules`).

    A decode step then reads each chip's local bfloat16 weights instead of all-gathering the fsdp shards inside
    every step (what the training layout costs: the whole model over ICI per token). Bit-identical results: the
    matmuls, embedding and norms cast their weights to the compute dtype anyway (qwen2.py). Memory: params x
    compute-dtype bytes / tensor-axis size per chip while a session lives."""
    TRACE_COUNTS["weights"] += 1
    dtype = jnp.dtype(self.cfg.dtype)
    params = jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
    if self.mesh is None:
      return params
    layout = qwen2.param_shardings(self.cfg, self.mesh, self.weight_rules, params)
    return jax.tree.map(jax.lax.with_sharding_constraint, params, layout)

  def _new_state(self, *, batch: int, length: int):
    """Zero cache (batch rows, `length` slots) and zero last_hidden [batch, D]."""
    TRACE_COUNTS["new_state"] += 1
    cfg = self.cfg
    return self._constrain_state(qwen2.init_cache(cfg, batch, length),
                                 jnp.zeros((batch, cfg.hidden_size), cfg.dtype))

  def _extend(self, params, cache, last_hidden, tokens, starts, counts, fresh: bool = False):
    """Append tokens [B, T] at slots starts[b] .. starts[b] + counts[b] - 1 (prefill is extend from 0).

    Rows that take nothing pass starts = S (the physical cache length): all their writes fall off the cache
    and are dropped. Padding columns past counts[b] are written above the row's new length, where the next
    real token overwrites them before any query can see them. fresh (static): every row that takes tokens
    starts at 0 (a prefill), so attention need not read the cache (qwen2.forward_with_cache).
    Returns (cache, last_hidden).
    """
    TRACE_COUNTS["extend"] += 1
    tokens = self._constrain(tokens.astype(jnp.int32), ("batch", None))
    # Activations batch-sharded: XLA gathers each layer's weights instead of all-reducing [rows, T, D] partial sums
    # (a prefill moves far more activation than weight bytes); and the splash kernel's shard_map needs the mesh.
    # Decode stays unconstrained: one token per row, so partial sums are the smaller thing to move.
    with sharding.activation_mesh(self.mesh, self.rules):
      hidden, cache = qwen2.forward_with_cache(params, self.cfg, tokens, cache, starts.astype(jnp.int32), fresh)
    return self._constrain_state(cache, _hidden_after(hidden, counts, last_hidden))

  def _extend_rows(self, params, cache, last_hidden, rows, tokens, starts, counts, fresh: bool = False):
    """`_extend` for a few rows of a large batch, at the cost of those rows: rows [R] (indices into the batch;
    B = a padding entry, dropped) take tokens [R, T] at slots starts[r] .. starts[r] + counts[r] - 1. Their cache
    rows are gathered, run through the layers, and written back. Single-device layouts only (on a mesh the row
    gather would move cache rows between devices). Returns (cache, last_hidden)."""
    TRACE_COUNTS["extend_rows"] += 1
    safe = jnp.minimum(rows, last_hidden.shape[0] - 1)
    sub = qwen2.KVCache(tuple(k[safe] for k in cache.k), tuple(v[safe] for v in cache.v))
    hidden, sub = qwen2.forward_with_cache(params, self.cfg, tokens.astype(jnp.int32), sub,
                                           starts.astype(jnp.int32), fresh)
    cache = qwen2.KVCache(tuple(k.at[rows].set(x, mode="drop") for k, x in zip(cache.k, sub.k)),
                          tuple(v.at[rows].set(x, mode="drop") for v, x in zip(cache.v, sub.v)))
    return cache, last_hidden.at[rows].set(_hidden_after(hidden, counts, last_hidden[safe]), mode="drop")

  def _decode(self, params, cache, last_hidden, lengths, seq_ids, active, budget, stop_state, stop_table, eos_ids,
              max_len, seed, temperature, top_p, exit_stopped, *, greedy: bool, top_k: int, use_top_p: bool,
              steps: int):
    """Up to `steps` decode steps for the active rows, in one lax.while_loop that exits once all rows stopped, or
    once `exit_stopped` (int32 scalar) of them stopped (continuous batching: the host refills the idle rows).

    Args (B rows): lengths [B] tokens held; seq_ids [B] (the RNG stream of the row); active [B] bool;
    budget [B] tokens this row may still produce in this call; stop_state [B] int32, the row's state in the stop
    automaton after what it decoded in this call (0 at the call's start); stop_table [S, V] int32
    (stops.StopAutomaton); eos_ids [E] (NO_TOKEN padded); max_len: scalar cap on a row's length; seed int;
    temperature, top_p: scalars.
    Returns (cache, last_hidden, tokens [B, steps] (-1 past n_new), logprobs [B, steps] f32 at temperature 1,
    n_new [B], reason [B] (index into REASONS; 0 = the chunk ended first), stop_state [B]).
    """
    TRACE_COUNTS["decode"] += 1
    cfg = self.cfg
    b = lengths.shape[0]
    s = qwen2.cache_length(cfg, cache)
    lengths = lengths.astype(jnp.int32)
    init = dict(i=jnp.int32(0), cache=cache, last_hidden=last_hidden, lengths=lengths, done=~active,
                n_new=jnp.zeros((b,), jnp.int32), reason=jnp.zeros((b,), jnp.int32),
                stop_state=stop_state.astype(jnp.int32),
                tokens=jnp.full((b, steps), ops.NO_TOKEN, jnp.int32), logprobs=jnp.zeros((b, steps), jnp.float32))

    def cond(st):
      return (st["i"] < steps) & jnp.any(~st["done"]) & (jnp.sum(st["done"] & active) < exit_stopped)

    def body(st):
      live = ~st["done"]
      logits = qwen2.logits_from_hidden(params, cfg, st["last_hidden"])  # [B, V] f32
      keys = ops.row_keys(seed, seq_ids, st["lengths"])
      tok = ops.sample_tokens(logits, keys, temperature, greedy=greedy, top_k=top_k, top_p=top_p,
                              use_top_p=use_top_p)
      lp = ops.token_logprob(logits, tok)
      write = jnp.where(live, st["lengths"], s)  # finished rows write off the end: dropped
      hidden, new_cache = qwen2.forward_with_cache(params, cfg, tok[:, None], st["cache"], write)
      lengths = st["lengths"] + live
      n_new = st["n_new"] + live
      stop_state, stopped = stops.step(stop_table, st["stop_state"], tok)
      stop_state = jnp.where(live, stop_state, st["stop_state"])
      code = jnp.select([ops.is_member(tok, eos_ids), stopped, n_new >= budget, lengths >= max_len],
                        [_EOS, _STOP, _LENGTH, _FULL], 0)
      code = jnp.where(live, code, 0)
      new_cache, new_hidden = self._constrain_state(
          new_cache, jnp.where(live[:, None], hidden[:, 0].astype(st["last_hidden"].dtype), st["last_hidden"]))
      return dict(i=st["i"] + 1, cache=new_cache, last_hidden=new_hidden, lengths=lengths,
                  done=st["done"] | (code > 0), n_new=n_new, reason=jnp.where(code > 0, code, st["reason"]),
                  stop_state=stop_state, tokens=st["tokens"].at[:, st["i"]].set(jnp.where(live, tok, ops.NO_TOKEN)),
                  logprobs=st["logprobs"].at[:, st["i"]].set(jnp.where(live, lp, 0.0)))

    st = jax.lax.while_loop(cond, body, init)
    # The small per-row outputs are replicated so every host of a multi-host mesh can read them.
    small = [self._replicate(st[k]) for k in ("tokens", "logprobs", "n_new", "reason", "stop_state")]
    return (st["cache"], st["last_hidden"], *small)

  def _relayout(self, cache, last_hidden, rows, *, length: int):
    """Gather rows [B'] (indices into the old batch; -1 = an empty row, zero-filled) into a cache of physical
    length `length` (longer: zero-padded; shorter: truncated, the caller guarantees nothing is lost). On a
    batch-sharded cache XLA moves the whole new cache between chips, so the layers go one at a time."""
    TRACE_COUNTS["relayout"] += 1
    safe = jnp.maximum(rows, 0)
    keep = rows >= 0

    def gather(x):  # [B, ...] -> [B', ...]
      return jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x[safe], 0)

    new_cache = _map_cache(lambda x, axis: _fit_slots(gather(x), axis, length), cache, self.cfg, in_sequence=True)
    return self._constrain_state(new_cache, gather(last_hidden))

  def _relayout_local(self, cache, last_hidden, rows, *, length: int, shards: int):
    """`_relayout` where every new row comes from the same batch shard: with the batch split into `shards`
    equal blocks (one per data-parallel device, in order), new row r of block k is old row rows[r] of block k
    (-1 = empty). Each device gathers from its own rows: no row crosses chips (a `_relayout` by arbitrary
    indices all-reduces the whole new cache, docs/tpu.md)."""
    TRACE_COUNTS["relayout_local"] += 1
    b_old, b_new = last_hidden.shape[0], rows.shape[0]
    keep = (rows >= 0).reshape(shards, b_new // shards)
    local = jnp.maximum(rows.reshape(shards, b_new // shards) - (jnp.arange(shards) * (b_old // shards))[:, None], 0)

    def gather(x):  # [B, ...] -> [shards, B / shards, ...] (the block axis on the batch shards) -> [B', ...]
      blocks = self._constrain(x.reshape((shards, x.shape[0] // shards) + x.shape[1:]),
                               ("batch",) + (None,) * x.ndim)
      y = jax.vmap(lambda xs, i: xs[i])(blocks, local)
      y = jnp.where(keep.reshape(keep.shape + (1,) * (y.ndim - 2)), y, 0)
      return y.reshape((b_new,) + x.shape[1:])

    new_cache = _map_cache(lambda x, axis: _fit_slots(gather(x), axis, length), cache, self.cfg)
    return self._constrain_state(new_cache, gather(last_hidden))

  def _grow(self, cache, last_hidden, *, length: int):
    """The cache lengthened to `length` slots (zero-padded past the old ones), every row in place. On a
    batch-sharded cache each chip pads its own rows; a relayout by row indices (even the identity) would gather
    the whole cache onto every chip (docs/tpu.md)."""
    TRACE_COUNTS["grow"] += 1
    return self._constrain_state(_map_cache(lambda x, axis: _fit_slots(x, axis, length), cache, self.cfg),
                                 last_hidden)

  def _copy_rows(self, cache, last_hidden, src, dst, *, length: int):
    """Row dst[r] becomes a copy of row src[r] in place: its hidden state and cache slots 0 .. length - 1 (the
    source's tokens; slots at and past a row's length are never read before they are overwritten). dst = B
    entries are dropped. Copying only the filled prefix keeps the move small: on a batch-sharded cache a row
    crosses chips, and XLA gathers what it copies (a whole-cache copy all-gathers every layer's cache)."""
    TRACE_COUNTS["copy_rows"] += 1
    src = jnp.minimum(src, last_hidden.shape[0] - 1)

    def copy(x, slot_axis):
      prefix = [slice(None)] * (x.ndim - 1)
      prefix[slot_axis - 1] = slice(0, length)
      return x.at[(dst, *prefix)].set(x[(src, *prefix)], mode="drop")

    cache = _map_cache(copy, cache, self.cfg, in_sequence=True)
    return self._constrain_state(cache, last_hidden.at[dst].set(last_hidden[src], mode="drop"))


def _fit_slots(x, slot_axis: int, length: int):
  """x with `length` slots on slot_axis: zero-padded past the old ones, or truncated."""
  s = x.shape[slot_axis]
  if length >= s:
    widths = [(0, 0)] * x.ndim
    widths[slot_axis] = (0, length - s)
    return jnp.pad(x, widths)
  return jax.lax.slice_in_dim(x, 0, length, axis=slot_axis)


def _map_cache(fn, cache: qwen2.KVCache, cfg: qwen2.Qwen2Config, in_sequence: bool = False) -> qwen2.KVCache:
  """fn(x, slot_axis) over the cache's arrays (every layer's k, then every layer's v).

  in_sequence: each call waits on the previous one's result (an optimization barrier). A row move on a
  batch-sharded cache gathers the moved rows onto every chip; in sequence only one array's are held at a time
  (measured, the shared-prompt copy of 3B on v5p-8: 28.5 GiB of temporaries at once, 1.5 GiB in sequence)."""
  k_slots, v_slots = (axes.index("length") for axes in qwen2.cache_axes(cfg))
  out, prev = [], None
  for x, slot_axis in [(k, k_slots) for k in cache.k] + [(v, v_slots) for v in cache.v]:
    if in_sequence and prev is not None:
      prev, x = jax.lax.optimization_barrier((prev, x))
      out[-1] = prev
    prev = fn(x, slot_axis)
    out.append(prev)
  n = len(cache.k)
  return qwen2.KVCache(tuple(out[:n]), tuple(out[n:]))


@functools.lru_cache(maxsize=16)
def programs(cfg: qwen2.Qwen2Config, mesh=None, rules=sharding.DEFAULT_RULES) -> Programs:
  """The shared Programs for (cfg, mesh, rules); the same object (and its compiled executables) every call."""
  return Programs(cfg, mesh, rules)
