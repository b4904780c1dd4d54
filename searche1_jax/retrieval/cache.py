"""A bounded memo of search results: a repeated query skips the encoder and the index.

The G samples of one question often issue the same search, and under the rollouts' 'continuous' schedule they do
so in different retriever calls (a call only dedupes its own queries). Results are a function of (query, topk)
for a fixed index (simulated misses are a hash of the query text, retrieval/misses.py), so replaying one is
exact. Least recently used entries are dropped past `size`. Thread-safe (the rollout calls from a worker thread).
"""
from __future__ import annotations

import collections
import threading

from searche1_jax.retrieval.passage import Passage, Retriever, check_queries


class CachingRetriever:
  """Wraps a `Retriever`; `hits` / `misses` count queries answered from the memo / by the inner retriever."""

  def __init__(self, inner: Retriever, size: int):
    if int(size) != size or size < 1:
      raise ValueError(f"retrieval.cache_size={size!r} must be an integer >= 1 (0 turns the cache off)")
    self.inner, self.size = inner, int(size)
    self._memo: collections.OrderedDict[tuple[str, int], list[Passage]] = collections.OrderedDict()
    self._lock = threading.Lock()
    self.hits = self.misses = 0

  def retrieve(self, queries: list[str], topk: int) -> list[list[Passage]]:
    check_queries(queries, topk)
    with self._lock:
      new = list(dict.fromkeys(q for q in queries if (q, topk) not in self._memo))
    found = dict(zip(new, self.inner.retrieve(new, topk))) if new else {}
    with self._lock:
      out = []
      for q in queries:
        key = (q, topk)
        if q in found:
          self._memo[key] = list(found[q])
        else:
          self.hits += 1
        out.append(list(self._memo[key]))
        self._memo.move_to_end(key)
      self.misses += len(new)
      while len(self._memo) > self.size:
        self._memo.popitem(last=False)
    return out
