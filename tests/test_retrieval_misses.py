"""Simulated retrieval misses (searche1_jax/retrieval/misses.py): which query texts miss, and what a missed
query gets back."""
import numpy as np
import pytest

from searche1_jax.retrieval import misses
from searche1_jax.retrieval.passage import Passage


def test_missed_is_a_seeded_fraction_of_query_texts():
  queries = [f"where was person {i} born" for i in range(20_000)]
  hits = np.array([misses.missed(q, 0.25, 0) for q in queries])
  assert abs(hits.mean() - 0.25) < 0.015  # binomial sd at n=20k: 0.003
  assert list(hits) == [misses.missed(q, 0.25, 0) for q in queries]  # deterministic
  other_seed = np.array([misses.missed(q, 0.25, 1) for q in queries])
  assert abs(other_seed.mean() - 0.25) < 0.015 and (hits != other_seed).mean() > 0.2
  assert not any(misses.missed(q, 0.0, 0) for q in queries[:1000])
  # Retyping the same search (case, spacing) draws the same; the rate is a threshold on one uniform draw.
  missed_q = queries[int(np.argmax(hits))]
  assert misses.missed("  " + missed_q.upper().replace(" ", "   ") + " ", 0.25, 0)
  assert all(misses.missed(q, 0.5, 0) for q, h in zip(queries[:2000], hits) if h)


class _Ranked:
  """Inner retriever: query q -> passages q/0, q/1, ... in rank order; records the topk asked for."""

  def __init__(self):
    self.asked = []

  def retrieve(self, queries, topk):
    self.asked.append(topk)
    return [[Passage(id=f"{q}/{r}", title=q, text=str(r)) for r in range(topk)] for q in queries]


def test_missing_retriever_drops_the_best_passage_of_missed_queries():
  queries = [f"query {i}" for i in range(200)]
  inner = _Ranked()
  retriever = misses.MissingRetriever(inner, 0.3, 4)
  out = retriever.retrieve(queries, 2)
  assert inner.asked == [3]
  for q, got in zip(queries, out):
    ranks = [int(p.text) for p in got]
    assert ranks == ([1, 2] if misses.missed(q, 0.3, 4) else [0, 1]), q
  assert 0.15 < np.mean([misses.missed(q, 0.3, 4) for q in queries]) < 0.45
  for bad in (-0.1, 1.0):
    with pytest.raises(ValueError, match="retrieval.miss_rate"):
      misses.MissingRetriever(inner, bad, 0)
