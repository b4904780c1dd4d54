"""Content fingerprints and the JSON stamps that record them: how every cached artifact (demo stages, warm start,
TFDS builds, retrieval indexes) knows whether it is still valid.

- `digest(obj)`: 16 hex digits of the sha256 of `obj` as sorted-key JSON (config blocks become plain dicts).
- `sha256_file(path)`: the sha256 of a whole file, read in 1 MiB blocks.
- `file_fingerprint(path)`: a cheap one for multi-GB files (size, edge hashes, line count).
- `read_json(path)` / `write_json_atomic(path, obj)`: stamps are written to `path.tmp` and renamed, so a crash
  leaves either the old stamp or none, never half of one.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

_READ_CHUNK = 1 << 24  # 16 MiB per read when counting lines


def plain(x) -> Any:
  """`x` as plain JSON values: a ConfigDict (anything with `to_dict`) becomes a dict; other objects their str."""
  if hasattr(x, "to_dict"):
    x = x.to_dict()
  return json.loads(json.dumps(x, sort_keys=True, default=str))


def digest(obj) -> str:
  """16 hex digits of the sha256 of `plain(obj)` dumped with sorted keys."""
  return hashlib.sha256(json.dumps(plain(obj), sort_keys=True).encode()).hexdigest()[:16]


def sha256_file(path: str) -> str:
  """The hex sha256 of the whole file."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def file_fingerprint(path: str, edge_bytes: int = 1 << 20, count_lines: bool = True) -> dict:
  """Size, sha256 of the first and last `edge_bytes` bytes and (optionally) the number of lines.

  The line count reads the whole file once (a few seconds per GB); edges alone catch most changes.
  """
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = hashlib.sha256(f.read(edge_bytes)).hexdigest()
    f.seek(max(0, size - edge_bytes))
    tail = hashlib.sha256(f.read(edge_bytes)).hexdigest()
    fp = {"size": size, "head_sha256": head, "tail_sha256": tail, "edge_bytes": edge_bytes}
    if count_lines:
      f.seek(0)
      lines, last = 0, b"\n"
      while chunk := f.read(_READ_CHUNK):
        lines += chunk.count(b"\n")
        last = chunk[-1:]
      fp["num_lines"] = lines + (last != b"\n")  # a last line without a trailing newline counts
  return fp


def fingerprint_mismatch(recorded: dict, actual: dict) -> list[str]:
  """Names of the fields that differ (fields missing from either side are not compared)."""
  return [k for k in sorted(recorded) if k in actual and recorded[k] != actual[k]]


def read_json(path: str) -> Any | None:
  """The JSON value in `path`, or None when the file is missing or unreadable (a stamp that is not there)."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def write_json_atomic(path: str, obj, indent: int = 2) -> None:
  """Writes `obj` as JSON to `path` through `path.tmp` and a rename."""
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=indent, sort_keys=True)
  os.replace(tmp, path)
