"""Run logging: `metrics.jsonl` (one JSON object per train step), TensorBoard events, and text samples.

On resume from a checkpoint taken at global step S, lines with step > S are dropped from `metrics.jsonl` and
TensorBoard purges events past S, so a resumed run's logs read exactly like an uninterrupted one's.
Only process 0 writes.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np


def _to_python(v: Any):
  if isinstance(v, (np.generic, np.ndarray, jax.Array)):
    v = np.asarray(v)
    v = v.item() if v.ndim == 0 else v.tolist()
  if isinstance(v, float) and not math.isfinite(v):
    return None  # strict JSON has no NaN / inf (e.g. a divergence over zero pairs)
  return v


class MetricsWriter:

  def __init__(self, workdir: str, *, resume_step: int | None = None, keep_rows: int | None = None,
               tensorboard: bool = True):
    """resume_step: the global step of the checkpoint resumed from (None: a fresh run, or no checkpoint yet).
    keep_rows: with resume_step, keep exactly the first keep_rows lines (the count the checkpoint recorded), so
    rows written after it — even at the same step — are dropped and written again identically."""
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self.rows = 0
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._truncate(resume_step, keep_rows)
    self.rows = len(read_metrics(workdir))
    self._file = open(self.path, "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter  # deferred: only with tensorboard=True
      purge = None if resume_step is None else resume_step + 1
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge)

  def _truncate(self, resume_step: int | None, keep_rows: int | None) -> None:
    if not os.path.exists(self.path):
      return
    keep = []
    with open(self.path, encoding="utf-8") as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash mid-write
          continue
        if resume_step is None or (keep_rows is not None and len(keep) >= keep_rows):
          continue
        if row.get("step", -1) <= resume_step:
          keep.append(line if line.endswith("\n") else line + "\n")
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(keep)
    os.replace(tmp, self.path)

  def write(self, step: int, phase: str, scalars: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "phase": phase}
    row.update({k: _to_python(v) for k, v in scalars.items()})
    self._file.write(json.dumps(row, sort_keys=False) + "\n")
    self._file.flush()
    self.rows += 1
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
          self._tb.add_scalar(f"{phase}/{k}", v, step)

  def scalars(self, step: int, prefix: str, scalars: dict[str, Any]) -> None:
    """TensorBoard only (e.g. eval results, timings)."""
    if self._tb is None:
      return
    for k, v in scalars.items():
      v = _to_python(v)
      if isinstance(v, (int, float)) and math.isfinite(v):
        self._tb.add_scalar(f"{prefix}/{k}", v, step)

  def text(self, step: int, tag: str, text: str) -> None:
    if self._tb is not None:
      self._tb.add_text(tag, text, step)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if not self.enabled:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
