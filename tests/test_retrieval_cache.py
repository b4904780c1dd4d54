"""The search-result memo (retrieval/cache.py): repeated queries skip the inner retriever, results are the inner
retriever's exactly, the least recently used entry goes first, and concurrent callers get their own results."""
import threading

import pytest

from searche1_jax.retrieval.cache import CachingRetriever
from searche1_jax.retrieval.passage import Passage


class Counting:
  """Passages named after the query; records every call."""

  def __init__(self):
    self.calls = []

  def retrieve(self, queries, topk):
    self.calls.append(list(queries))
    return [[Passage(id=f"{q}-{k}", title=q, text=f"text {k}", score=float(-k)) for k in range(topk)]
            for q in queries]


def test_repeated_queries_are_replayed_exactly():
  inner = Counting()
  cached = CachingRetriever(inner, size=8)
  first = cached.retrieve(["a", "b", "a"], 2)
  assert inner.calls == [["a", "b"]] and first == Counting().retrieve(["a", "b", "a"], 2)
  second = cached.retrieve(["b", "c", "a"], 2)
  assert inner.calls == [["a", "b"], ["c"]] and second == Counting().retrieve(["b", "c", "a"], 2)
  assert cached.retrieve(["a"], 3) == Counting().retrieve(["a"], 3) and inner.calls[-1] == ["a"]  # topk is keyed
  assert (cached.hits, cached.misses) == (2, 4)  # a repeat within one call is the inner call's to dedupe
  second[0].append("mutated")  # callers get copies: the memo is not changed through them
  assert cached.retrieve(["b"], 2) == Counting().retrieve(["b"], 2)


def test_least_recently_used_goes_first():
  inner = Counting()
  cached = CachingRetriever(inner, size=2)
  cached.retrieve(["a", "b"], 1)
  cached.retrieve(["a"], 1)  # 'a' is now the most recent
  cached.retrieve(["c"], 1)  # evicts 'b'
  cached.retrieve(["a", "b"], 1)
  assert inner.calls == [["a", "b"], ["c"], ["b"]]
  with pytest.raises(ValueError, match="retrieval.cache_size=0"):
    CachingRetriever(inner, 0)


def test_concurrent_callers_get_their_own_results():
  cached = CachingRetriever(Counting(), size=16)
  errors = []

  def work(t):
    for k in range(50):
      qs = [f"q{(t + k) % 7}", f"q{k % 5}"]
      if cached.retrieve(qs, 1) != Counting().retrieve(qs, 1):
        errors.append((t, k))

  threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
  for th in threads:
    th.start()
  for th in threads:
    th.join()
  assert errors == []
