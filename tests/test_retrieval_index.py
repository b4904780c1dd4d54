"""Exact (JAX) and ScaNN indexes against numpy; automatic ScaNN settings; index directories:
save/load round trip and refusal of a different corpus or encoder."""
import json
import os

import numpy as np
import pytest

from fixtures.retrieval.helpers import make_tiny_bert, retrieval_cfg, small_corpus
from searche1_jax.retrieval import misses
from searche1_jax.retrieval import Encoder, ExactIndex, IndexMismatchError, ScannIndex, make_retriever
from searche1_jax.retrieval import index as index_lib
from searche1_jax.retrieval.build import build_index


def _numpy_topk(db, q, k):
  s = q @ db.T
  ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(s, ids, 1), ids


def _unit(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _clustered(n, d, clusters, seed, noise=0.3):
  rng = np.random.default_rng(seed)
  centers = _unit(rng.normal(size=(clusters, d)))
  db = _unit(centers[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, d)) / np.sqrt(d))
  queries = _unit(centers[rng.integers(0, clusters, 64)] + noise * rng.normal(size=(64, d)) / np.sqrt(d))
  return db, queries


@pytest.mark.parametrize("n,chunk,k,resident", [(1000, 256, 10, True), (1000, 256, 300, False), (7, 4, 20, True)])
def test_exact_index_matches_numpy(n, chunk, k, resident):
  rng = np.random.default_rng(n + k)
  db = _unit(rng.normal(size=(n, 16)))
  q = _unit(rng.normal(size=(5, 16)))
  idx = ExactIndex(db, chunk_size=chunk, max_resident_bytes=(1 << 40) if resident else 0)
  scores, ids = idx.search(q, k)
  ref_s, ref_i = _numpy_topk(db, q, min(k, n))
  assert ids.shape == (5, min(k, n)) and ids.dtype == np.int64
  np.testing.assert_array_equal(ids, ref_i)
  np.testing.assert_allclose(scores, ref_s, atol=1e-5)


def test_scann_auto_params():
  block = retrieval_cfg().scann
  assert index_lib.scann_params(10, block) == {"mode": "brute_force"}
  p = index_lib.scann_params(1_000_000, block)
  assert p["mode"] == "tree_ah" and p["num_leaves"] == 1000
  assert p["leaves_to_search"] == max(block.min_leaves_to_search, int(np.ceil(block.search_fraction * 1000)))
  p = index_lib.scann_params(21_000_000, block)
  assert p["num_leaves"] == round(np.sqrt(21e6)) and p["partition_training_sample"] == 64 * p["num_leaves"]
  assert p["hash_training_sample"] == block.hash_training_sample
  assert index_lib.scann_params(200_000, block)["partition_training_sample"] == 100_000
  block.brute_force_below, block.num_leaves, block.leaves_to_search = 0, 50, 500
  p = index_lib.scann_params(30, block)
  assert p["num_leaves"] == 30 and p["leaves_to_search"] == 30  # clipped to what exists


def test_scann_tiny_corpus_auto_settings_equal_exact():
  rng = np.random.default_rng(1)
  db = _unit(rng.normal(size=(10, 24)))
  q = _unit(rng.normal(size=(4, 24)))
  params = index_lib.scann_params(10, retrieval_cfg().scann)
  idx = ScannIndex.build(db, params)
  scores, ids = idx.search(q, 3)
  ref_s, ref_i = _numpy_topk(db, q, 3)
  np.testing.assert_array_equal(ids, ref_i)
  np.testing.assert_allclose(scores, ref_s, atol=1e-5)
  scores, ids = idx.search(q, 50)  # more than the corpus: all 10, sorted
  assert ids.shape == (4, 10) and np.all(np.diff(scores, axis=1) <= 0)
  np.testing.assert_array_equal(ids, _numpy_topk(db, q, 10)[1])


def test_scann_tree_ah_recall_and_save_load(tmp_path):
  db, q = _clustered(6000, 32, 40, seed=2)
  block = retrieval_cfg().scann
  block.brute_force_below = 0
  params = index_lib.scann_params(len(db), block)
  assert params["mode"] == "tree_ah" and params["num_leaves"] == 77
  idx = ScannIndex.build(db, params)
  scores, ids = idx.search(q, 10)
  _, ref = _numpy_topk(db, q, 10)
  recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref)])
  assert recall >= 0.9, recall
  assert np.all(np.diff(scores, axis=1) <= 1e-6)
  np.testing.assert_allclose(scores, np.take_along_axis(q @ db.T, ids, 1), atol=1e-4)  # exact re-scoring
  idx.save(str(tmp_path / "s"))
  loaded = ScannIndex.load(str(tmp_path / "s"), len(db), 32, params)
  s2, i2 = loaded.search(q, 10)
  np.testing.assert_array_equal(i2, ids)
  np.testing.assert_array_equal(s2, scores)


# ----------------------------------------------------------------------------- index directories


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("idx")
  corpus = small_corpus(str(root / "corpus.jsonl"), n=10)
  enc_dir = make_tiny_bert(str(root / "enc_a"), seed=0)
  encoder = Encoder.from_hf(enc_dir, batch_size=8)
  cfg = retrieval_cfg()
  cfg.build.shard_size = 4
  build_index(corpus, encoder, str(root / "scann_idx"), "scann", cfg, progress=False)
  build_index(corpus, encoder, str(root / "exact_idx"), "exact", cfg, progress=False)
  return root, corpus, enc_dir, encoder


def _cfg(index_dir, backend, **kw):
  cfg = retrieval_cfg()
  cfg.index_dir, cfg.backend = str(index_dir), backend
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def test_index_dir_round_trip_scann_equals_exact(built):
  root, corpus, enc_dir, _ = built
  m = json.load(open(root / "scann_idx" / "manifest.json"))
  assert m["num_passages"] == 10 and m["dim"] == 32 and m["index_type"] == "scann"
  assert m["scann"] == {"mode": "brute_force"} and m["corpus"]["path"] == corpus
  assert m["encoder"]["name"] == enc_dir and len(m["encoder"]["model_fingerprint"]) == 64
  assert not os.path.exists(root / "scann_idx" / "shards")
  # the ScaNN index shares ScaNN's float32 copy of the embeddings instead of keeping a second one
  assert m["embeddings_file"] == "scann/dataset.npy" and not os.path.exists(root / "scann_idx" / "embeddings.npy")
  emb = index_lib.load_embeddings(str(root / "scann_idx"))
  assert isinstance(emb, np.memmap) and emb.shape == (10, 32)
  np.testing.assert_array_equal(emb, index_lib.load_embeddings(str(root / "exact_idx")))

  queries = ["Who designed the Eiffel Tower?", "river with the most water", "first woman Nobel prize"]
  results = {}
  for name, backend in (("scann_idx", "scann"), ("scann_idx", "exact"), ("exact_idx", "exact")):
    r = make_retriever(_cfg(root / name, backend))
    results[name, backend] = r.retrieve(queries, 4)
  ref = results["exact_idx", "exact"]
  for key, res in results.items():
    assert [[p.id for p in ps] for ps in res] == [[p.id for p in ps] for ps in ref], key
    for ps, rps in zip(res, ref):
      np.testing.assert_allclose([p.score for p in ps], [p.score for p in rps], atol=1e-5)
  for ps in ref:
    assert len(ps) == 4 and all(a.score >= b.score for a, b in zip(ps, ps[1:]))
  # retrieval.miss_rate > 0: the missed query texts get ranks 2..5 of the same index, the others ranks 1..4.
  cfg = _cfg(root / "exact_idx", "exact")
  cfg.miss_rate, cfg.miss_seed = 0.5, 3
  noisy = make_retriever(cfg).retrieve(queries, 4)
  full = make_retriever(_cfg(root / "exact_idx", "exact")).retrieve(queries, 5)
  missed = [misses.missed(q, 0.5, 3) for q in queries]
  assert 0 < sum(missed) < len(queries)  # both cases occur with this seed
  for m, got, ps in zip(missed, noisy, full):
    assert [p.id for p in got] == [p.id for p in (ps[1:] if m else ps[:4])]


def test_different_encoder_is_refused(built, tmp_path):
  root, *_ = built
  other = make_tiny_bert(str(tmp_path / "enc_b"), seed=1)
  with pytest.raises(IndexMismatchError, match="model_fingerprint"):
    make_retriever(_cfg(root / "exact_idx", "exact", encoder=other))
  cfg = _cfg(root / "exact_idx", "exact")
  cfg.encoding.query_prefix = "query: "
  with pytest.raises(IndexMismatchError, match="query_prefix"):
    make_retriever(cfg)


def test_different_corpus_is_refused(built, tmp_path):
  root, corpus, *_ = built
  changed = tmp_path / "corpus.jsonl"
  text = open(corpus).read()
  changed.write_text(text.replace("Eiffel", "Eiffle", 1))
  with pytest.raises(IndexMismatchError, match="corpus .* is not the one the index was built from"):
    make_retriever(_cfg(root / "exact_idx", "exact", corpus_path=str(changed)))
  moved = tmp_path / "moved.jsonl"
  moved.write_text(text)  # the same bytes elsewhere are accepted
  r = make_retriever(_cfg(root / "exact_idx", "exact", corpus_path=str(moved)))
  assert len(r.retrieve(["tower"], 2)[0]) == 2


def test_backend_and_dir_errors(built, tmp_path):
  root, *_ = built
  with pytest.raises(ValueError, match="no ScaNN searcher"):
    make_retriever(_cfg(root / "exact_idx", "scann"))
  with pytest.raises(ValueError, match="retrieval.backend='faiss'"):
    make_retriever(_cfg(root / "exact_idx", "faiss"))
  with pytest.raises(FileNotFoundError, match="not a finished index directory"):
    make_retriever(_cfg(tmp_path, "exact"))
  with pytest.raises(ValueError, match="index_dir is empty"):
    make_retriever(_cfg("", "exact"))
