"""Builds an index directory from a JSONL corpus: scan -> encode in shards (resumable) -> index.

With `from_faiss`, the passage vectors come from a FAISS flat index file instead of the encoder (Search-R1's
`e5_Flat.index` over wiki-18: no re-encoding of 21M passages); they are copied shard by shard from a memory map.

Layout while a build is unfinished: build_state.json (what is being built), offsets.npy and
shards/NNNNNN.npy (one float32 [shard_size, D] file per finished shard, written atomically).
A re-run with the same corpus, encoder and shard size skips finished shards. The manifest is
written last, so a directory with manifest.json is a finished index.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from typing import Any

import numpy as np
from tqdm import tqdm

from searche1_jax.fingerprint import file_fingerprint
from searche1_jax.retrieval import index as index_lib
from searche1_jax.retrieval.corpus import Corpus, scan_corpus
from searche1_jax.retrieval.encoder import Encoder
from searche1_jax.retrieval.faiss_flat import read_flat_index

STATE = "build_state.json"
SHARDS = "shards"
INDEX_TYPES = ("scann", "exact")


def _save_npy_atomic(path: str, array: np.ndarray) -> None:
  tmp = path + ".tmp.npy"
  np.save(tmp, array)
  os.replace(tmp, path)


def _write_json_atomic(path: str, obj: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _check_same(recorded: dict, wanted: dict, path: str) -> None:
  diff = [k for k in sorted(wanted) if recorded.get(k) != wanted[k]]
  if diff:
    detail = "; ".join(f"{k}: recorded {recorded.get(k)!r} vs now {wanted[k]!r}" for k in diff)
    raise index_lib.IndexMismatchError(
        f"{path}: this directory holds a build of something else ({detail}); use another --out "
        "or delete the directory")


def _encode_shards(corpus: Corpus, encoder: Encoder, shard: int, shard_paths: list[str],
                   stop_after_shards: int | None, progress: bool, vectors: np.ndarray | None = None) -> bool:
  """Encodes (or, given `vectors` [n, D], copies) the shards whose file is missing; returns False when stopped
  early by `stop_after_shards`."""
  n = len(corpus)
  todo = [k for k, path in enumerate(shard_paths) if not os.path.isfile(path)]
  bar = None
  if progress:
    done = n - sum(min(shard, n - k * shard) for k in todo)
    bar = tqdm(total=n, initial=done, unit="passage", desc=f"encoding {os.path.basename(corpus.path)}")
  try:
    for count, k in enumerate(todo):
      if stop_after_shards is not None and count >= stop_after_shards:
        return False
      if vectors is not None:
        part = np.asarray(vectors[k * shard:(k + 1) * shard], np.float32)
      else:
        part = encoder.encode([p.contents for p in corpus.slice(k * shard, (k + 1) * shard)], kind="passage")
      _save_npy_atomic(shard_paths[k], part)
      if bar is not None:
        bar.update(len(part))
  finally:
    if bar is not None:
      bar.close()
  return True


def _concatenate_shards(shard_paths: list[str], shard: int, n: int, dim: int, out_path: str) -> None:
  """Writes the shards into one float32 [n, dim] .npy without holding it in memory."""
  tmp = out_path + ".tmp.npy"
  out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
  for k, path in enumerate(shard_paths):
    part = np.load(path, mmap_mode="r")
    if part.shape != (min(shard, n - k * shard), dim):
      raise ValueError(f"{path}: shape {part.shape} does not fit shard {k} of {n} passages; delete it and re-run")
    out[k * shard: k * shard + len(part)] = part
  out.flush()
  del out
  os.replace(tmp, out_path)


def build_index(corpus_path: str, encoder: Encoder, out_dir: str, index_type: str, cfg: Any,
                stop_after_shards: int | None = None, progress: bool = True,
                from_faiss: str | None = None) -> dict | None:
  """Builds (or resumes) an index of `corpus_path` in `out_dir`.

  cfg: the retrieval config block (uses cfg.build, cfg.scann). `stop_after_shards`: encode at most
  this many shards in this call, then return None (the build resumes on the next call).
  from_faiss: a FAISS flat inner-product index file whose row i is corpus line i's embedding by `encoder` (which
  still encodes the queries and is recorded in the manifest); its vectors are used instead of encoding.
  Returns the manifest once the index is complete.
  """
  if index_type not in INDEX_TYPES:
    raise ValueError(f"index type {index_type!r}: expected one of {INDEX_TYPES}")
  corpus_path = os.path.abspath(corpus_path)
  if not os.path.isfile(corpus_path):
    raise FileNotFoundError(f"{corpus_path}: corpus file not found")
  os.makedirs(out_dir, exist_ok=True)
  corpus_fp = file_fingerprint(corpus_path)
  identity = encoder.identity
  wanted = {"corpus_path": corpus_path, "corpus_fingerprint": corpus_fp,
            "encoder": {k: v for k, v in identity.items() if k != "name"}, "index_type": index_type,
            "shard_size": int(cfg.build.shard_size), "skip_malformed": bool(cfg.build.skip_malformed)}
  flat = None
  if from_faiss:
    flat = read_flat_index(from_faiss)
    if flat.metric != "inner_product":
      raise ValueError(f"{from_faiss}: a FAISS {flat.metric} index; the indexes here rank by inner product, so "
                       "only an IndexFlatIP can be imported (its neighbours would differ otherwise)")
    if flat.dim != encoder.dim:
      raise ValueError(f"{from_faiss}: vectors of dimension {flat.dim}, but encoder {encoder.model_dir} gives "
                       f"{encoder.dim}: the queries must be encoded by the model that encoded the passages")
    if cfg.build.skip_malformed:
      raise ValueError(f"{from_faiss}: skip_malformed would shift corpus lines against the index's rows")
    wanted["from_faiss"] = {"path": flat.path, "fingerprint": file_fingerprint(flat.path)}

  manifest_path = os.path.join(out_dir, index_lib.MANIFEST)
  if os.path.isfile(manifest_path):  # already finished: accept only an identical request
    m = index_lib.read_manifest(out_dir)
    _check_same(m["build_request"], wanted, manifest_path)
    return m

  state_path = os.path.join(out_dir, STATE)
  offsets_path = os.path.join(out_dir, index_lib.OFFSETS)
  if os.path.isfile(state_path):
    with open(state_path) as f:
      state = json.load(f)
    _check_same(state["request"], wanted, state_path)
    offsets = np.load(offsets_path)
  else:
    scan = scan_corpus(corpus_path, skip_malformed=cfg.build.skip_malformed)
    offsets = scan.offsets
    _save_npy_atomic(offsets_path, offsets)
    state = {"request": wanted, "num_passages": int(len(offsets)), "num_skipped": scan.num_skipped,
             "skipped_lines": list(scan.skipped_lines)}
    _write_json_atomic(state_path, state)

  n, shard = len(offsets), int(cfg.build.shard_size)
  if flat is not None and flat.ntotal != n:
    raise ValueError(f"{from_faiss}: {flat.ntotal} vectors for the {n} passages of {corpus_path}: not the index "
                     "of this corpus")
  shard_dir = os.path.join(out_dir, SHARDS)
  os.makedirs(shard_dir, exist_ok=True)
  shard_paths = [os.path.join(shard_dir, f"{k:06d}.npy") for k in range(-(-n // shard))]
  with contextlib.closing(Corpus(corpus_path, offsets)) as corpus:
    if not _encode_shards(corpus, encoder, shard, shard_paths, stop_after_shards, progress,
                          None if flat is None else flat.vectors):
      return None
  emb_path = os.path.join(out_dir, index_lib.EMBEDDINGS)
  _concatenate_shards(shard_paths, shard, n, encoder.dim, emb_path)

  scann_params, embeddings_file = None, index_lib.EMBEDDINGS
  if index_type == "scann":
    scann_params = index_lib.scann_params(n, cfg.scann)
    searcher = index_lib.ScannIndex.build(np.load(emb_path, mmap_mode="r"), scann_params,
                                          num_threads=cfg.scann.num_threads)
    searcher.save(os.path.join(out_dir, index_lib.SCANN_DIR))
    del searcher
    embeddings_file = index_lib.share_scann_dataset(out_dir)

  manifest = {
      "format_version": index_lib.FORMAT_VERSION,
      "index_type": index_type,
      "num_passages": n,
      "dim": encoder.dim,
      "embeddings_file": embeddings_file,
      "encoder": identity,
      "corpus": {"path": corpus_path, "fingerprint": corpus_fp, "num_skipped": state["num_skipped"],
                 "skipped_lines": state["skipped_lines"]},
      "scann": scann_params,
      "build_request": wanted,
      "created_unix": time.time(),
  }
  _write_json_atomic(manifest_path, manifest)
  shutil.rmtree(shard_dir)
  os.remove(state_path)
  return manifest

