"""Vector indexes over unit-norm embeddings (score = dot product): exact (JAX) and ScaNN.

An index directory (written by `searche1_jax.retrieval.build.build_index`) holds
  manifest.json     encoder identity, dimension, corpus path + fingerprint, index type and parameters
  embeddings.npy    float32 [N, D], opened memory-mapped (for a ScaNN index with float32 re-scoring,
                    ScaNN's identical scann/dataset.npy is used instead; manifest field embeddings_file)
  offsets.npy       int64 [N, 2], byte range of passage i in the corpus file
  scann/            the serialized ScaNN searcher (index type 'scann' only)
Both indexes return (scores float32 [Q, k'], ids int64 [Q, k']) sorted by score, k' = min(k, N).
"""
from __future__ import annotations

import functools
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from searche1_jax.retrieval.encoder import bucket

MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.npy"
OFFSETS = "offsets.npy"
SCANN_DIR = "scann"
FORMAT_VERSION = 1


class IndexMismatchError(ValueError):
  """The index was built from a different corpus or encoder than the one given."""


# ------------------------------------------------------------------------------------------- exact


@functools.partial(jax.jit, static_argnames=("k",))
def topk_merge_step(queries, chunk, n_valid, offset, best_scores, best_ids, *, k):
  """One chunk of exact search, merged into the running top-k.

  queries [Q, D]; chunk [C, D] (rows >= n_valid are padding); offset: global id of chunk row 0;
  best_scores [Q, k] float32 (-inf when empty), best_ids [Q, k] int32. Returns the new (scores, ids).
  """
  scores = jnp.dot(queries, chunk.T, precision=jax.lax.Precision.HIGHEST).astype(jnp.float32)
  scores = jnp.where(jnp.arange(chunk.shape[0])[None, :] < n_valid, scores, -jnp.inf)
  cs, ci = jax.lax.top_k(scores, min(k, chunk.shape[0]))
  all_s = jnp.concatenate([best_scores, cs], axis=1)
  all_i = jnp.concatenate([best_ids, ci.astype(jnp.int32) + offset], axis=1)
  ts, ti = jax.lax.top_k(all_s, k)
  return ts, jnp.take_along_axis(all_i, ti, axis=1)


class ExactIndex:
  """Brute-force inner product in chunks (ground truth, and the index for small corpora)."""

  def __init__(self, embeddings: np.ndarray, chunk_size: int = 65_536, max_resident_bytes: int = 4 << 30,
               min_query_bucket: int = 8):
    if embeddings.ndim != 2:
      raise ValueError(f"embeddings must be [N, D], got shape {embeddings.shape}")
    self.embeddings = embeddings
    self.size, self.dim = embeddings.shape
    self.chunk_size = int(min(chunk_size, max(self.size, 1)))
    self.min_query_bucket = int(min_query_bucket)
    self._resident = None
    if embeddings.nbytes <= max_resident_bytes:
      self._resident = [jnp.asarray(c) for c in self._host_chunks()]

  def _host_chunks(self):
    c = self.chunk_size
    for start in range(0, self.size, c):
      block = np.asarray(self.embeddings[start: start + c], dtype=np.float32)
      if len(block) < c:  # pad the last chunk so every chunk has one shape (one compiled program)
        block = np.concatenate([block, np.zeros((c - len(block), self.dim), np.float32)])
      yield block

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    queries = _check_queries(queries, self.dim)
    k = min(int(k), self.size)
    n = len(queries)
    qb = bucket(n, self.min_query_bucket, max(n, self.min_query_bucket))
    q = jnp.asarray(np.pad(queries, ((0, qb - n), (0, 0))))
    best_s = jnp.full((qb, k), -jnp.inf, jnp.float32)
    best_i = jnp.full((qb, k), -1, jnp.int32)
    chunks = self._resident if self._resident is not None else self._host_chunks()
    for j, chunk in enumerate(chunks):
      start = j * self.chunk_size
      best_s, best_i = topk_merge_step(q, chunk, min(self.chunk_size, self.size - start), start,
                                       best_s, best_i, k=k)
    return np.asarray(best_s)[:n], np.asarray(best_i)[:n].astype(np.int64)


def _check_queries(queries: np.ndarray, dim: int) -> np.ndarray:
  queries = np.ascontiguousarray(queries, dtype=np.float32)
  if queries.ndim != 2 or queries.shape[1] != dim:
    raise ValueError(f"queries must be [Q, {dim}], got shape {queries.shape}")
  return queries


# ------------------------------------------------------------------------------------------- ScaNN


def scann_params(n: int, block: Any) -> dict:
  """Resolves the ScaNN parameters for a corpus of `n` vectors from the `scann` config block.

  Below `brute_force_below` vectors: exact brute force. Otherwise a partition tree with ~sqrt(n)
  leaves (searching `search_fraction` of them, at least `min_leaves_to_search`), 4-bit asymmetric
  hashing of the residuals and exact re-scoring of the best `reorder` candidates.
  """
  if n < block.brute_force_below:
    return {"mode": "brute_force"}
  num_leaves = block.num_leaves or max(1, int(round(math.sqrt(n))))
  num_leaves = min(num_leaves, n)
  to_search = block.leaves_to_search or max(block.min_leaves_to_search,
                                            int(math.ceil(block.search_fraction * num_leaves)))
  partition_sample = block.partition_training_sample or max(100_000, 64 * num_leaves)
  return {
      "mode": "tree_ah",
      "num_leaves": num_leaves,
      "leaves_to_search": min(to_search, num_leaves),
      "partition_training_sample": min(partition_sample, n),
      "hash_training_sample": min(block.hash_training_sample, n),
      "spherical": bool(block.spherical),
      "dims_per_block": block.dims_per_block,
      "anisotropic_threshold": block.anisotropic_threshold,
      "hash_type": block.hash_type,
      "reorder": block.reorder,
      "reorder_dtype": block.reorder_dtype,
  }


def _threads(num_threads: int) -> int:
  return num_threads or os.cpu_count() or 1


class ScannIndex:
  """ScaNN searcher (dot product). `params` comes from `scann_params` and is stored in the manifest."""

  def __init__(self, searcher, size: int, dim: int, params: dict, num_threads: int = 0, query_batch: int = 256):
    self.searcher = searcher
    self.size, self.dim = size, dim
    self.params = params
    self.query_batch = query_batch
    searcher.set_num_threads(_threads(num_threads))

  @classmethod
  def build(cls, embeddings: np.ndarray, params: dict, num_threads: int = 0, query_batch: int = 256):
    import scann  # deferred: heavy (TensorFlow ops); only ScaNN indexes need it

    db = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = db.shape
    b = scann.scann_ops_pybind.builder(db, 10, "dot_product")
    if params["mode"] == "brute_force":
      b = b.score_brute_force()
    elif params["mode"] == "tree_ah":
      reorder_type = {"float32": scann.ReorderType.FLOAT32, "bfloat16": scann.ReorderType.BFLOAT16,
                      "int8": scann.ReorderType.INT8}
      if params["reorder_dtype"] not in reorder_type:
        raise ValueError(f"retrieval.scann.reorder_dtype={params['reorder_dtype']!r}; one of {sorted(reorder_type)}")
      threshold = params["anisotropic_threshold"] if params["anisotropic_threshold"] > 0 else float("nan")
      b = (b.tree(num_leaves=params["num_leaves"], num_leaves_to_search=params["leaves_to_search"],
                  training_sample_size=params["partition_training_sample"], spherical=params["spherical"])
           .score_ah(params["dims_per_block"], anisotropic_quantization_threshold=threshold,
                     training_sample_size=params["hash_training_sample"], hash_type=params["hash_type"])
           .reorder(params["reorder"], quantize=reorder_type[params["reorder_dtype"]]))
    else:
      raise ValueError(f"unknown ScaNN mode {params['mode']!r}")
    searcher = b.set_n_training_threads(_threads(num_threads)).build()
    return cls(searcher, n, dim, params, num_threads, query_batch)

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    self.searcher.serialize(directory, True)  # relative asset paths: the index dir can be moved

  @classmethod
  def load(cls, directory: str, size: int, dim: int, params: dict, num_threads: int = 0, query_batch: int = 256):
    import scann  # deferred: heavy (TensorFlow ops); only ScaNN indexes need it

    if not os.path.isfile(os.path.join(directory, "scann_assets.pbtxt")):
      raise FileNotFoundError(f"{directory}: no ScaNN searcher (scann_assets.pbtxt); the index was built "
                              "with --index exact: use backend='exact' or rebuild with --index scann")
    searcher = scann.scann_ops_pybind.load_searcher(directory, assets_backcompat_shim=False)
    return cls(searcher, size, dim, params, num_threads, query_batch)

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    queries = _check_queries(queries, self.dim)
    k = min(int(k), self.size)
    if len(queries) == 0:
      return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    kwargs = {}
    if self.params["mode"] == "tree_ah":
      kwargs["pre_reorder_num_neighbors"] = max(self.params["reorder"], k)
    ids, scores = self.searcher.search_batched_parallel(queries, final_num_neighbors=k,
                                                        batch_size=self.query_batch, **kwargs)
    ids, scores = np.asarray(ids, np.int64)[:, :k], np.asarray(scores, np.float32)[:, :k]
    # ScaNN pads missing neighbours with NaN scores (e.g. tiny partitions); mark them id -1, score -inf.
    missing = ~np.isfinite(scores)
    ids[missing], scores[missing] = -1, -np.inf
    return scores, ids


# ---------------------------------------------------------------------------------------- manifest


def read_manifest(index_dir: str) -> dict:
  path = os.path.join(index_dir, MANIFEST)
  if not os.path.isfile(path):
    hint = (" (an unfinished build: re-run launch/build_index.py with the same flags to resume)"
            if os.path.isdir(os.path.join(index_dir, "shards")) else "")
    raise FileNotFoundError(f"{path}: not found; {index_dir!r} is not a finished index directory{hint}")
  with open(path) as f:
    try:
      m = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from None
  if m.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path}: format_version={m.get('format_version')!r}, this code reads {FORMAT_VERSION}")
  return m


# Encoder fields that must match between an index and the encoder that queries it.
ENCODER_KEYS = ("dim", "model_fingerprint", "query_prefix", "passage_prefix", "pooling", "normalized")


def check_encoder(recorded: dict, actual: dict, where: str) -> None:
  """Raises IndexMismatchError when the encoder differs from the one the index was built with."""
  diff = [k for k in ENCODER_KEYS if recorded.get(k) != actual.get(k)]
  if diff:
    detail = "; ".join(f"{k}: index {recorded.get(k)!r} vs given {actual.get(k)!r}" for k in diff)
    raise IndexMismatchError(f"{where}: index was built with encoder {recorded.get('name')!r}, "
                             f"the given encoder {actual.get('name')!r} differs ({detail})")


def load_embeddings(index_dir: str) -> np.ndarray:
  """float32 [N, D], memory-mapped (pages are read on demand); the file is named in the manifest."""
  name = EMBEDDINGS
  if os.path.isfile(os.path.join(index_dir, MANIFEST)):
    name = read_manifest(index_dir).get("embeddings_file", EMBEDDINGS)
  return np.load(os.path.join(index_dir, name), mmap_mode="r")


def share_scann_dataset(index_dir: str, num_checked: int = 1024) -> str:
  """Drops embeddings.npy when ScaNN's float32 copy (scann/dataset.npy) holds the same rows.

  Saves N * D * 4 bytes of disk (64 GB for wiki-18 with e5) and, as both backends then read one file,
  page cache. Compares shape, dtype, first/last and `num_checked` random rows. Returns the name of the
  embeddings file, relative to index_dir, to record in the manifest.
  """
  shared = os.path.join(SCANN_DIR, "dataset.npy")
  ours_path, theirs_path = os.path.join(index_dir, EMBEDDINGS), os.path.join(index_dir, shared)
  if not os.path.isfile(theirs_path):
    return EMBEDDINGS
  ours, theirs = np.load(ours_path, mmap_mode="r"), np.load(theirs_path, mmap_mode="r")
  if ours.shape != theirs.shape or ours.dtype != theirs.dtype:
    return EMBEDDINGS
  n = len(ours)
  rows = np.unique(np.concatenate([[0, n - 1], np.random.default_rng(0).integers(0, n, num_checked)]))
  if not np.array_equal(ours[rows], theirs[rows]):
    return EMBEDDINGS
  del ours, theirs
  os.remove(ours_path)
  return shared


def load_offsets(index_dir: str) -> np.ndarray:
  """int64 [N, 2] byte ranges of the passages in the corpus file."""
  return np.load(os.path.join(index_dir, OFFSETS))
