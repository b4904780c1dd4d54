"""Pure on-device sampling math: token choice, log-probs, EOS membership (stop strings: stops.py).

Every function takes arrays and returns arrays (jit-able, no I/O). Shapes: B = batch rows, V = vocabulary.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Filler of unused token slots (and of padded EOS tables): never equal to a real token id (>= 0).
NO_TOKEN = -1


def row_keys(seed: jax.Array, seq_ids: jax.Array, positions: jax.Array) -> jax.Array:
  """One PRNG key per row, a function of (seed, sequence id, position) only.

  seed: int scalar; seq_ids, positions: [B] int. Returns typed keys [B]. The draw for a token therefore does
  not depend on batch layout, bucketing, compaction or how decoding is split into chunks.
  """
  base = jax.random.key(seed)
  return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.fold_in(base, s), p))(seq_ids, positions)


def filter_logits(logits: jax.Array, *, top_k: int, top_p: jax.Array | float, use_top_p: bool):
  """Candidates left by top-k then top-p (nucleus) filtering, as in HF's warpers (temperature applied before).

  logits: [B, V] float32 (already divided by the temperature). top_k: static int, 0 = off. top_p: scalar in
  (0, 1], used only when use_top_p (static). Top-p keeps the highest-probability tokens, in order, while the
  mass of the tokens before them is < top_p (so at least one token, and the token that crosses top_p is kept).
  Returns (values [B, C], ids [B, C] int32 or None): C = top_k, V, or V with ids None (no filtering);
  removed candidates have value -inf.
  """
  v = logits.shape[-1]
  if 0 < top_k < v:
    vals, ids = jax.lax.top_k(logits, top_k)
  elif use_top_p:
    vals, ids = jax.lax.top_k(logits, v)  # a full descending sort
  else:
    return logits, None
  if use_top_p:
    probs = jax.nn.softmax(vals, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < top_p).at[:, 0].set(True)
    vals = jnp.where(keep, vals, -jnp.inf)
  return vals, ids.astype(jnp.int32)


def sample_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array | float, *, greedy: bool,
                  top_k: int = 0, top_p: jax.Array | float = 1.0, use_top_p: bool = False) -> jax.Array:
  """Next token per row. logits: [B, V] float32; keys: [B] typed PRNG keys. Returns int32 [B].

  greedy (static) takes the argmax. Otherwise samples from softmax(logits / temperature) restricted by top-k /
  top-p (Gumbel-max over the candidates, one key per row).
  """
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  vals, ids = filter_logits(logits / temperature, top_k=top_k, top_p=top_p, use_top_p=use_top_p)
  noise = jax.vmap(lambda k: jax.random.gumbel(k, vals.shape[-1:], jnp.float32))(keys)
  choice = jnp.argmax(vals + noise, axis=-1)
  if ids is None:
    return choice.astype(jnp.int32)
  return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]


def token_logprob(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """log softmax(logits)[token] per row (the model's own distribution, temperature 1). [B, V], [B] -> [B] f32."""
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def is_member(tokens: jax.Array, ids: jax.Array) -> jax.Array:
  """tokens [B] in ids [E] (padded with NO_TOKEN) -> [B] bool."""
  return jnp.any(tokens[:, None] == ids[None, :], axis=-1)
