"""Simulated retrieval misses: for a seeded fraction of query strings the retriever skips its best passage.

A real retriever sometimes ranks a look-alike above the passage a query needs, and a second wording may then
find it; searching again is what an agent learns to do about it. The synthetic demo's MiniLM index is almost
never wrong (top-1 0.97 on the world's plan queries), so `retrieval.miss_rate` > 0 makes it wrong on purpose:
whether a query misses depends only on its normalized text and `miss_seed`, so the same search misses again,
another wording is an independent draw, runs are reproducible, and the warm-start transcripts
(`demo/transcripts.py`, `transcripts.miss_rate`) script the same misses the rollouts then meet.
"""
from __future__ import annotations

import hashlib

from searche1_jax.retrieval.passage import Passage, Retriever


def query_key(query: str) -> str:
  """The text a miss depends on: lower-cased, whitespace collapsed (retyping a search does not change it)."""
  return " ".join(query.lower().split())


def check_rate(rate: float, field: str) -> None:
  """Raises ValueError naming `field` unless 0 <= rate < 1."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"{field}={rate!r} must be in [0, 1)")


def missed(query: str, rate: float, seed: int) -> bool:
  """True for a `rate` fraction of query texts (a hash of `seed` and `query_key(query)`, uniform in [0, 1))."""
  if rate <= 0.0:
    return False
  digest = hashlib.blake2b(f"{seed}\x00{query_key(query)}".encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") / 2.0**64 < rate


class MissingRetriever:
  """Wraps a `Retriever`: a missed query gets ranks 2..topk+1 of the inner retriever instead of 1..topk."""

  def __init__(self, inner: Retriever, rate: float, seed: int):
    check_rate(rate, "retrieval.miss_rate")
    self.inner, self.rate, self.seed = inner, float(rate), int(seed)

  def retrieve(self, queries: list[str], topk: int) -> list[list[Passage]]:
    results = self.inner.retrieve(queries, topk + 1)
    return [r[1:topk + 1] if missed(q, self.rate, self.seed) else r[:topk] for q, r in zip(queries, results)]
