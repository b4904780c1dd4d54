"""Reads the vectors of a FAISS flat index file (e.g. Search-R1's `e5_Flat.index`) without FAISS, memory-mapped.

`faiss.write_index` of an IndexFlatIP / IndexFlatL2 writes (little-endian): the fourcc 'IxFI' / 'IxF2', the index
header (d int32, ntotal int64, two int64 placeholders, is_trained uint8, metric_type int32, plus a float32
metric_arg only for metric types > 1), then the vectors as a length-prefixed array (uint64 count of float32
values = ntotal x d, then the values, row-major [ntotal, d]). Row i is the embedding of corpus line i.
"""
from __future__ import annotations

import dataclasses
import os
import struct

import numpy as np

_HEADER = struct.Struct("<4siqqq?i")  # fourcc, d, ntotal, 2 placeholders, is_trained, metric_type
_COUNT = struct.Struct("<Q")
_FLAT = {b"IxFI": "inner_product", b"IxF2": "l2"}
_OTHER = {b"IxFl": "a flat index with another metric", b"IxMp": "an IndexIDMap", b"IxM2": "an IndexIDMap2",
          b"IwFl": "an IVF-flat index", b"IwPQ": "an IVF-PQ index", b"IHNf": "an HNSW-flat index",
          b"IxPq": "a PQ index"}


class FaissFormatError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class FlatVectors:
  """metric: 'inner_product' | 'l2'; vectors: read-only float32 memmap [ntotal, dim]."""
  path: str
  metric: str
  dim: int
  vectors: np.ndarray

  @property
  def ntotal(self) -> int:
    return int(self.vectors.shape[0])


def read_flat_index(path: str) -> FlatVectors:
  """The vectors of a FAISS IndexFlatIP / IndexFlatL2 file, memory-mapped (nothing is read until used).
  Any other index type, or a file whose size does not match its header, is a FaissFormatError naming the file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: FAISS index file not found")
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(_HEADER.size + _COUNT.size)
  if len(head) < 4:
    raise FaissFormatError(f"{path}: {size} bytes, too short for a FAISS index")
  fourcc = head[:4]
  if fourcc not in _FLAT:
    what = _OTHER.get(fourcc, f"index type {fourcc!r}")
    raise FaissFormatError(f"{path}: {what}; only flat indexes (IndexFlatIP / IndexFlatL2, which store the "
                           "vectors themselves) can be imported")
  if len(head) < _HEADER.size + _COUNT.size:
    raise FaissFormatError(f"{path}: {size} bytes, too short for a FAISS flat index header")
  _, dim, ntotal, _, _, _, metric_type = _HEADER.unpack_from(head)
  (count,) = _COUNT.unpack_from(head, _HEADER.size)
  offset = _HEADER.size + _COUNT.size
  if dim < 1 or ntotal < 0 or metric_type not in (0, 1) or count != dim * ntotal:
    raise FaissFormatError(f"{path}: inconsistent flat index header (d={dim}, ntotal={ntotal}, "
                           f"metric_type={metric_type}, {count} values)")
  if size < offset + 4 * count:
    raise FaissFormatError(f"{path}: {size} bytes, but its header announces {ntotal} x {dim} float32 vectors "
                           f"({offset + 4 * count} bytes): the file is truncated")
  vectors = np.memmap(path, dtype="<f4", mode="r", offset=offset, shape=(ntotal, dim)) if ntotal else \
      np.zeros((0, dim), np.float32)
  return FlatVectors(path=os.path.abspath(path), metric=_FLAT[fourcc], dim=dim, vectors=vectors)
