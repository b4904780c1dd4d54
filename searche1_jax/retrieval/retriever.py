"""The retriever facade: query strings -> top-k passages, in-process (ScaNN / exact) or over HTTP."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

from searche1_jax import distributed
from searche1_jax.fingerprint import file_fingerprint, fingerprint_mismatch
from searche1_jax.retrieval import index as index_lib
from searche1_jax.retrieval.cache import CachingRetriever
from searche1_jax.retrieval.client import HttpRetriever
from searche1_jax.retrieval.corpus import Corpus
from searche1_jax.retrieval.encoder import Encoder
from searche1_jax.retrieval.misses import MissingRetriever
from searche1_jax.retrieval.passage import Passage, check_queries

BACKENDS = ("scann", "exact", "http")


class IndexRetriever:
  """Encoder + vector index + corpus, all in this process."""

  def __init__(self, encoder: Encoder, index: Any, corpus: Corpus):
    if index.size != len(corpus):
      raise ValueError(f"index has {index.size} vectors but corpus {corpus.path} has {len(corpus)} passages")
    self.encoder, self.index, self.corpus = encoder, index, corpus

  def retrieve(self, queries: list[str], topk: int) -> list[list[Passage]]:
    """Top-k passages per query. Repeated queries of one call (siblings often issue the same search) are
    encoded and searched once; the result depends only on the call's queries, so runs stay reproducible."""
    check_queries(queries, topk)
    if not queries:
      return []
    unique = list(dict.fromkeys(queries))
    scores, ids = self.index.search(self.encoder.encode(unique, kind="query"), topk)
    found = {q: [dataclasses.replace(self.corpus[int(i)], score=float(s)) for s, i in zip(srow, irow) if i >= 0]
             for q, srow, irow in zip(unique, scores, ids)}
    return [list(found[q]) for q in queries]


class HostShardedRetriever:
  """Each process retrieves its contiguous share of a call's queries (distributed.host_shard) with `inner`, and
  the processes exchange the passages, so every process returns every query's results. On a multi-host run every
  process steers every rollout row (sampling/session.py), so each would otherwise search the whole batch. A failure
  on any process fails the call on all of them (the rollout's retries then run in step everywhere)."""

  def __init__(self, inner):
    self.inner = inner

  def retrieve(self, queries: list[str], topk: int) -> list[list[Passage]]:
    check_queries(queries, topk)
    mine = distributed.host_shard(queries)
    try:
      local = {"ok": [[dataclasses.asdict(p) for p in r] for r in self.inner.retrieve(mine, topk)] if mine else []}
    except Exception as e:  # noqa: BLE001  reported to every process, which raise it together
      local = {"error": f"process {jax.process_index()}: {type(e).__name__}: {e}"}
    parts = distributed.allgather_json(local)
    errors = [p["error"] for p in parts if "error" in p]
    if errors:
      raise RuntimeError("; ".join(errors))
    return [[Passage(**d) for d in r] for p in parts for r in p["ok"]]


def check_corpus(manifest: dict, corpus_path: str, count_lines: bool, where: str) -> None:
  """Raises IndexMismatchError unless `corpus_path` has the fingerprint recorded in the manifest."""
  if not os.path.isfile(corpus_path):
    raise FileNotFoundError(f"{corpus_path}: corpus of index {where} not found (set retrieval.corpus_path "
                            "if the file moved)")
  recorded = manifest["corpus"]["fingerprint"]
  actual = file_fingerprint(corpus_path, recorded.get("edge_bytes", 1 << 20), count_lines=count_lines)
  diff = fingerprint_mismatch(recorded, actual)
  if diff:
    raise index_lib.IndexMismatchError(
        f"{where}: corpus {corpus_path} is not the one the index was built from "
        f"({manifest['corpus']['path']}): {', '.join(diff)} differ")


def load_index_retriever(cfg: Any, encoder: Encoder | None = None) -> IndexRetriever:
  """Loads cfg.index_dir with cfg.backend ('scann' | 'exact'). Corpus and encoder must match the manifest.

  `encoder`: an already loaded encoder to use instead of the one named by cfg.encoder / the manifest.
  """
  index_dir = cfg.index_dir
  if not index_dir:
    raise ValueError("retrieval.index_dir is empty: set it to a directory built by launch/build_index.py")
  manifest = index_lib.read_manifest(index_dir)
  where = os.path.join(index_dir, index_lib.MANIFEST)
  corpus_path = cfg.corpus_path or manifest["corpus"]["path"]
  check_corpus(manifest, corpus_path, cfg.verify_corpus_lines, where)

  recorded = manifest["encoder"]
  if encoder is None:
    encoder = Encoder.from_config(cfg.encoder or recorded["name"], cfg.encoding,
                                  default_prefixes=(recorded["query_prefix"], recorded["passage_prefix"]))
  index_lib.check_encoder(recorded, encoder.identity, where)

  offsets = index_lib.load_offsets(index_dir)
  embeddings = index_lib.load_embeddings(index_dir)
  n = manifest["num_passages"]
  if embeddings.shape != (n, manifest["dim"]) or len(offsets) != n:
    raise ValueError(f"{index_dir}: embeddings {embeddings.shape} / offsets {offsets.shape} do not match "
                     f"the manifest ({n} passages, dim {manifest['dim']})")
  if cfg.backend == "exact":
    index = index_lib.ExactIndex(embeddings, cfg.exact.chunk_size, cfg.exact.max_resident_bytes,
                                 cfg.exact.min_query_bucket)
  elif cfg.backend == "scann":
    if manifest["index_type"] != "scann":
      raise ValueError(f"{where}: index_type={manifest['index_type']!r} has no ScaNN searcher; set "
                       "retrieval.backend='exact' or rebuild with --index scann")
    index = index_lib.ScannIndex.load(os.path.join(index_dir, index_lib.SCANN_DIR), n, manifest["dim"],
                                      manifest["scann"], cfg.scann.num_threads, cfg.scann.query_batch)
  else:
    raise ValueError(f"retrieval.backend={cfg.backend!r} is not an in-process index backend")
  return IndexRetriever(encoder, index, Corpus(corpus_path, offsets))


def make_retriever(cfg: Any):
  """cfg = configs/parts/retrieval.py get() (possibly overridden). Returns a `Retriever`; with
  cfg.miss_rate > 0 it misses that fraction of query texts on purpose (`retrieval/misses.py`); with
  cfg.cache_size > 0 it replays repeated queries from a memo (`retrieval/cache.py`)."""
  if cfg.backend == "http":
    retriever = HttpRetriever.from_config(cfg)
  elif cfg.backend in ("scann", "exact"):
    retriever = load_index_retriever(cfg)
  else:
    raise ValueError(f"retrieval.backend={cfg.backend!r}: expected one of {BACKENDS}")
  rate = float(cfg.get("miss_rate", 0.0))
  retriever = MissingRetriever(retriever, rate, int(cfg.get("miss_seed", 0))) if rate > 0 else retriever
  retriever = HostShardedRetriever(retriever) if jax.process_count() > 1 else retriever
  # Outermost: every process sees the same queries in the same order, so all hit (and skip the exchange) together.
  size = int(cfg.get("cache_size", 0))
  return CachingRetriever(retriever, size) if size > 0 else retriever
