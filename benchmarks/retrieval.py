"""ScaNN (automatic settings from configs/parts/retrieval.py) against the exact JAX index, side by side.

  python -m benchmarks.retrieval            # prints one JSON line

(a) real text: MiniLM embeddings of the 47 hand-written fixture passages plus each of their sentences
    (281 texts), queried with the 47 fixture questions (exact_top1_from_gold_passage: the exact top-1 is
    the question's passage or one of its sentences). The corpus is below scann.brute_force_below, so the automatic
    mode is brute force; the tree + asymmetric hashing path is forced here to measure it on real embeddings.
(b) synthetic: N (default 1M) unit vectors of dimension 768 drawn around random cluster centres; queries
    are drawn near the centres. Automatic ScaNN settings for that N.
recall@k = |ScaNN top-k ∩ exact top-k| / k, averaged over queries. q/s = queries / wall time of batched
search (batch size in the JSON), after warm-up (compilation), both indexes on the same queries; the
exact index runs on the first `exact_queries` of them (its results are the ground truth).
"""
import argparse
import json
import os
import re
import time

import numpy as np

from configs.parts import retrieval as retrieval_config
from searche1_jax.retrieval import Encoder
from searche1_jax.retrieval import ExactIndex, ScannIndex, iter_passages
from searche1_jax.retrieval import index as index_lib

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                        "retrieval")


def _unit_rows(x: np.ndarray) -> np.ndarray:
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x


def synthetic(n: int, dim: int, clusters: int, num_queries: int, noise: float, query_noise: float, seed: int):
  """Clustered gaussian data on the unit sphere: x = normalize(c + noise * g / sqrt(dim)), g ~ N(0, I)."""
  rng = np.random.default_rng(seed)
  centers = _unit_rows(rng.standard_normal((clusters, dim), dtype=np.float32))
  db = np.empty((n, dim), np.float32)
  step = 1 << 16
  for s in range(0, n, step):
    m = min(step, n - s)
    block = centers[rng.integers(0, clusters, m)]
    block += (noise / np.sqrt(dim)) * rng.standard_normal((m, dim), dtype=np.float32)
    db[s: s + m] = _unit_rows(block)
  q = centers[rng.integers(0, clusters, num_queries)]
  q = q + (query_noise / np.sqrt(dim)) * rng.standard_normal(q.shape, dtype=np.float32)
  return db, _unit_rows(q.astype(np.float32))


def timed_search(index, queries: np.ndarray, k: int, batch: int):
  """Batched search of all queries -> (ids [Q, k], queries per second)."""
  t0 = time.perf_counter()
  ids = np.concatenate([index.search(queries[s: s + batch], k)[1] for s in range(0, len(queries), batch)])
  return ids, len(queries) / (time.perf_counter() - t0)


def recall_at_k(ids: np.ndarray, ref: np.ndarray) -> float:
  k = ref.shape[1]
  return float(np.mean([len(set(a[:k]) & set(b)) / k for a, b in zip(ids, ref)]))


def compare(db: np.ndarray, queries: np.ndarray, k: int, batch: int, scann_block, exact_block, exact_queries: int):
  """ScaNN vs exact on the same queries; exact (the slow one) runs on the first `exact_queries`."""
  t0 = time.perf_counter()
  params = index_lib.scann_params(len(db), scann_block)
  scann = ScannIndex.build(db, params, scann_block.num_threads, scann_block.query_batch)
  build_s = time.perf_counter() - t0
  scann.search(queries[:batch], k)  # warm-up
  got, scann_qps = timed_search(scann, queries, k, batch)
  del scann  # free its copy of the data before the exact index makes its own

  make_exact = lambda x: ExactIndex(x, exact_block.chunk_size, exact_block.max_resident_bytes,
                                    exact_block.min_query_bucket)
  qe = queries[:exact_queries]
  make_exact(db[: exact_block.chunk_size]).search(qe[:batch], k)  # compiles the same shapes on one chunk
  exact = make_exact(db)
  ref, exact_qps = timed_search(exact, qe, k, batch)
  return {
      "n": len(db), "dim": db.shape[1], "queries": len(queries), "exact_queries": len(qe), "k": k,
      "batch_size": batch, f"recall@{k}": round(recall_at_k(got[: len(qe)], ref), 4),
      "scann_qps": round(scann_qps, 1), "exact_qps": round(exact_qps, 2), "speedup": round(scann_qps / exact_qps, 1),
      "scann_build_s": round(build_s, 1), "scann": params,
  }, exact


def real_text(cfg, k: int):
  passages = list(iter_passages(os.path.join(FIXTURES, "wiki_passages.jsonl")))
  with open(os.path.join(FIXTURES, "questions.jsonl")) as f:
    questions = [json.loads(l) for l in f]
  split = [re.split(r"(?<=[.!?])\s+(?=[A-Z])", p.text) for p in passages]
  texts = [p.contents for p in passages] + [s for sents in split for s in sents]
  source = np.array(list(range(len(passages))) + [i for i, sents in enumerate(split) for _ in sents])
  encoder = Encoder.from_config("minilm", cfg.encoding)
  db = encoder.encode(texts, kind="passage")
  queries = encoder.encode([q["question"] for q in questions], kind="query")
  auto_mode = index_lib.scann_params(len(db), cfg.scann)["mode"]
  cfg.scann.brute_force_below = 0  # force the tree + hashing path on this small corpus
  out, exact = compare(db, queries, k, len(queries), cfg.scann, cfg.exact, len(queries))
  _, top1 = exact.search(queries, 1)
  out["auto_mode_for_this_n"] = auto_mode
  gold = np.array([int(q["passage_id"]) for q in questions])
  out["exact_top1_from_gold_passage"] = round(float(np.mean(source[top1[:, 0]] == gold)), 4)
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--n", type=int, default=1_000_000)
  ap.add_argument("--dim", type=int, default=768)
  ap.add_argument("--clusters", type=int, default=1000)
  ap.add_argument("--noise", type=float, default=1.0, help="cluster spread (norm of the offset from the centre)")
  ap.add_argument("--query_noise", type=float, default=0.5)
  ap.add_argument("--queries", type=int, default=4096, help="ScaNN queries (synthetic)")
  ap.add_argument("--exact_queries", type=int, default=256, help="the first ones also run exactly (ground truth)")
  ap.add_argument("--batch", type=int, default=256, help="queries per batched search call")
  ap.add_argument("--k", type=int, default=10)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--skip_real_text", action="store_true")
  args = ap.parse_args(argv)

  cfg = retrieval_config.get()
  result = {"benchmark": "retrieval", "cpu_count": os.cpu_count()}
  t0 = time.perf_counter()
  if not args.skip_real_text:
    result["real_text_minilm"] = real_text(retrieval_config.get(), args.k)
  db, queries = synthetic(args.n, args.dim, args.clusters, args.queries, args.noise, args.query_noise, args.seed)
  synth, _ = compare(db, queries, args.k, args.batch, cfg.scann, cfg.exact, args.exact_queries)
  synth.update(clusters=args.clusters, noise=args.noise, query_noise=args.query_noise)
  result["synthetic"] = synth
  result["total_s"] = round(time.perf_counter() - t0, 1)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
