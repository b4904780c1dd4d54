"""build_index: an interrupted build resumes (skipping finished shards) and equals an uninterrupted one;
malformed corpus lines; the launch/build_index.py command line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fixtures.retrieval.helpers import make_tiny_bert, retrieval_cfg, small_corpus
from launch import build_index as build_cli
from searche1_jax.retrieval import CorpusFormatError, Encoder, IndexMismatchError, make_retriever
from searche1_jax.retrieval import index as index_lib
from searche1_jax.retrieval.build import build_index

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CountingEncoder:
  """Wraps an Encoder and records how many passages each encode call got."""

  def __init__(self, encoder):
    self.inner, self.calls = encoder, []

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def encode(self, texts, kind="query"):
    self.calls.append(len(texts))
    return self.inner.encode(texts, kind)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("build")
  corpus = small_corpus(str(root / "corpus.jsonl"), n=10)
  enc_dir = make_tiny_bert(str(root / "enc"), seed=0)
  return root, corpus, enc_dir, Encoder.from_hf(enc_dir, batch_size=8)


def _cfg(shard_size=4):
  cfg = retrieval_cfg()
  cfg.build.shard_size = shard_size
  return cfg


def test_resume_equals_uninterrupted_build(setup):
  root, corpus, _, encoder = setup
  full = build_index(corpus, encoder, str(root / "full"), "scann", _cfg(), progress=False)

  out = str(root / "resumed")
  enc = CountingEncoder(encoder)
  assert build_index(corpus, enc, out, "scann", _cfg(), stop_after_shards=1, progress=False) is None
  assert enc.calls == [4]
  assert sorted(os.listdir(os.path.join(out, "shards"))) == ["000000.npy"]
  assert not os.path.exists(os.path.join(out, "manifest.json"))
  with pytest.raises(FileNotFoundError, match="unfinished build"):
    index_lib.read_manifest(out)

  enc.calls.clear()
  resumed = build_index(corpus, enc, out, "scann", _cfg(), progress=False)
  assert enc.calls == [4, 2]  # shard 0 was not encoded again
  assert resumed["num_passages"] == full["num_passages"] == 10
  assert resumed["encoder"] == full["encoder"] and resumed["scann"] == full["scann"]
  np.testing.assert_array_equal(index_lib.load_embeddings(out), index_lib.load_embeddings(str(root / "full")))
  np.testing.assert_array_equal(index_lib.load_offsets(out), index_lib.load_offsets(str(root / "full")))

  queries = ["Who painted the Mona Lisa?", "tallest mountain", "radioactivity research"]
  results = []
  for d in (root / "full", out):
    cfg = _cfg()
    cfg.index_dir, cfg.backend = str(d), "scann"
    results.append(make_retriever(cfg).retrieve(queries, 5))
  assert results[0] == results[1]

  enc.calls.clear()  # a finished index: re-running is a no-op
  assert build_index(corpus, enc, out, "scann", _cfg(), progress=False)["created_unix"] == resumed["created_unix"]
  assert enc.calls == []


def test_resume_refuses_a_different_request(setup, tmp_path):
  root, corpus, _, encoder = setup
  out = str(tmp_path / "idx")
  build_index(corpus, encoder, out, "exact", _cfg(), stop_after_shards=1, progress=False)
  with pytest.raises(IndexMismatchError, match="shard_size"):
    build_index(corpus, encoder, out, "exact", _cfg(shard_size=3), progress=False)
  other = Encoder.from_hf(make_tiny_bert(str(tmp_path / "other"), seed=9))
  with pytest.raises(IndexMismatchError, match="encoder"):
    build_index(corpus, other, out, "exact", _cfg(), progress=False)
  build_index(corpus, encoder, out, "exact", _cfg(), progress=False)
  with pytest.raises(IndexMismatchError, match="index_type"):
    build_index(corpus, encoder, out, "scann", _cfg(), progress=False)


def test_malformed_corpus_line(setup, tmp_path):
  root, corpus, _, encoder = setup
  lines = open(corpus).read().splitlines()
  lines.insert(3, '{"id": "oops", "contents": ')
  bad = tmp_path / "bad.jsonl"
  bad.write_text("\n".join(lines) + "\n")
  with pytest.raises(CorpusFormatError, match=f"{bad}:4:"):
    build_index(str(bad), encoder, str(tmp_path / "a"), "exact", _cfg(), progress=False)
  cfg = _cfg()
  cfg.build.skip_malformed = True
  m = build_index(str(bad), encoder, str(tmp_path / "b"), "exact", cfg, progress=False)
  assert m["num_passages"] == 10 and m["corpus"]["num_skipped"] == 1 and m["corpus"]["skipped_lines"] == [4]


def test_command_line_stop_and_resume(setup, tmp_path, capsys):
  _, corpus, enc_dir, _ = setup
  out = str(tmp_path / "cli")
  args = ["--corpus", corpus, "--encoder", enc_dir, "--index", "exact", "--out", out, "--shard_size", "6",
          "--batch_size", "8", "--no_progress", "--set", "exact.chunk_size=128"]
  assert build_cli.main(args + ["--stop_after_shards", "1"]) == 0
  assert os.listdir(os.path.join(out, "shards")) == ["000000.npy"]
  assert build_cli.main(args) == 0
  m = json.load(open(os.path.join(out, "manifest.json")))
  assert m["num_passages"] == 10 and m["build_request"]["shard_size"] == 6
  with pytest.raises(SystemExit) as e:
    build_cli.main(args + ["--set", "scann.nope=1"])
  assert e.value.code == 2 and "unknown config field 'scann.nope'" in capsys.readouterr().err


def test_scripts_run_from_repo_root_as_modules():
  for module in ("launch.build_index", "launch.serve_retriever"):
    r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--index" in r.stdout, r.stderr


# ----------------------------------------------------------------------------------- import from FAISS

def _faiss_index(path, vectors, kind="ip"):
  """A FAISS index file written by faiss itself (faiss-cpu, test extra)."""
  import faiss  # deferred: only these tests need it
  index = {"ip": faiss.IndexFlatIP, "l2": faiss.IndexFlatL2}[kind](vectors.shape[1])
  index.add(np.ascontiguousarray(vectors, np.float32))
  faiss.write_index(index, str(path))
  return index


def test_import_from_a_faiss_flat_index_encodes_no_passage(setup, tmp_path):
  """Search-R1's prebuilt e5_Flat.index path: the vectors of a FAISS IndexFlatIP become the index's embeddings
  (copied shard by shard, resumable), passages are never encoded, and retrieval ranks as FAISS ranks."""
  _, corpus, _, encoder = setup
  vectors = np.random.default_rng(3).normal(size=(10, encoder.dim)).astype(np.float32)  # not the encoder's
  faiss_index = _faiss_index(tmp_path / "e5_Flat.index", vectors)
  enc = CountingEncoder(encoder)
  out = str(tmp_path / "imported")
  assert build_index(corpus, enc, out, "exact", _cfg(), progress=False, from_faiss=str(tmp_path / "e5_Flat.index"),
                     stop_after_shards=1) is None
  m = build_index(corpus, enc, out, "exact", _cfg(), progress=False, from_faiss=str(tmp_path / "e5_Flat.index"))
  assert enc.calls == [] and m["num_passages"] == 10
  np.testing.assert_array_equal(index_lib.load_embeddings(out), vectors)
  cfg = _cfg()
  cfg.index_dir, cfg.backend, cfg.cache_size = out, "exact", 0
  retriever = make_retriever(cfg)
  queries = ["Who painted the Mona Lisa?", "tallest mountain", "radioactivity research"]
  got = retriever.retrieve(queries, 4)
  scores, ids = faiss_index.search(encoder.encode(queries, kind="query"), 4)
  assert [[int(p.id) for p in ps] for ps in got] == [[int(x) for x in row] for row in ids]  # fixture ids = rows
  np.testing.assert_allclose([[p.score for p in ps] for ps in got], scores, rtol=1e-5, atol=1e-5)


def test_faiss_imports_refuse_what_does_not_fit(setup, tmp_path):
  import faiss
  _, corpus, _, encoder = setup
  out = str(tmp_path / "idx")
  rng = np.random.default_rng(0)
  _faiss_index(tmp_path / "l2.index", rng.normal(size=(10, encoder.dim)), kind="l2")
  _faiss_index(tmp_path / "dim.index", rng.normal(size=(10, encoder.dim + 1)))
  _faiss_index(tmp_path / "count.index", rng.normal(size=(9, encoder.dim)))
  quantizer = faiss.IndexFlatIP(encoder.dim)
  ivf = faiss.IndexIVFFlat(quantizer, encoder.dim, 2, faiss.METRIC_INNER_PRODUCT)
  ivf.train(rng.normal(size=(64, encoder.dim)).astype(np.float32))
  faiss.write_index(ivf, str(tmp_path / "ivf.index"))
  good = tmp_path / "good.index"
  _faiss_index(good, rng.normal(size=(10, encoder.dim)))
  cut = tmp_path / "cut.index"
  cut.write_bytes(good.read_bytes()[:-7])
  for name, message in [("l2.index", "l2 index"), ("dim.index", f"dimension {encoder.dim + 1}"),
                        ("count.index", "9 vectors for the 10 passages"), ("ivf.index", "an IVF-flat index"),
                        ("cut.index", "truncated")]:
    with pytest.raises(ValueError, match=message) as e:
      build_index(corpus, encoder, out, "exact", _cfg(), progress=False, from_faiss=str(tmp_path / name))
    assert name in str(e.value)
