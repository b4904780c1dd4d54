"""Scale-out helpers: jax.distributed start-up, per-host data shards, global arrays from per-host data.

The device mesh spans every process; each process feeds only its own slice of a batch. The same code runs on one
CPU (one process: the helpers reduce to plain device_put semantics) and on a multi-host TPU pod.

  maybe_initialize(config)         jax.distributed.initialize when a multi-host environment is detected or asked for
  host_shard(items, i, n)          the deterministic share of a list that process i of n loads
  global_batch(local_arrays, mesh) one global jax.Array per leaf, batch axis sharded over the mesh's data axes
  fetch(tree)                      numpy values of (possibly multi-host) arrays on every process
  allgather_json(value)            every process's small host value (e.g. retrieved passages), on every process
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
import numpy as np

from searche1_jax import sharding as sharding_lib

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")


def multihost_environment(environ: dict[str, str] | None = None) -> str | None:
  """The name of a detected multi-process launch environment, or None on a single host.

  Detected: JAX_COORDINATOR_ADDRESS (explicit), a Cloud TPU pod slice (TPU_WORKER_HOSTNAMES lists more than one
  host, or MEGASCALE_COORDINATOR_ADDRESS for multislice), SLURM (SLURM_NTASKS > 1), Open MPI
  (OMPI_COMM_WORLD_SIZE > 1). On a TPU VM whose topology is only in the metadata server nothing is in the
  environment: launch/tpu_pod.py therefore passes --config.distributed.mode=on.
  """
  env = os.environ if environ is None else environ

  def count(name: str) -> int:
    try:
      return int(env.get(name, "1") or "1")
    except ValueError:
      return 1

  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
    return "Cloud TPU pod (TPU_WORKER_HOSTNAMES)"
  if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "Cloud TPU multislice (MEGASCALE_COORDINATOR_ADDRESS)"
  if count("SLURM_NTASKS") > 1:
    return "SLURM"
  if count("OMPI_COMM_WORLD_SIZE") > 1:
    return "Open MPI"
  return None


def _block(config):
  """Accept the whole config (with a .distributed block) or the block itself."""
  if config is None:
    return {}
  if "distributed" in config:
    return config["distributed"]
  return config


def initialize_kwargs(config) -> dict[str, Any]:
  """Keyword arguments for jax.distributed.initialize from the config block; unset fields are left to jax's
  environment / cluster auto-detection."""
  b = _block(config)
  kw: dict[str, Any] = {}
  if b.get("coordinator_address"):
    kw["coordinator_address"] = str(b["coordinator_address"])
  if b.get("num_processes") is not None:
    kw["num_processes"] = int(b["num_processes"])
  if b.get("process_id") is not None:
    kw["process_id"] = int(b["process_id"])
  ids = str(b.get("local_device_ids") or "").strip()
  if ids:
    try:
      kw["local_device_ids"] = [int(x) for x in ids.split(",") if x.strip()]
    except ValueError:
      raise ValueError(f"distributed.local_device_ids={ids!r}: expected comma-separated integers") from None
  if b.get("initialization_timeout_s") is not None:
    kw["initialization_timeout"] = int(b["initialization_timeout_s"])
  return kw


def maybe_initialize(config=None, *, force: bool | None = None) -> bool:
  """Call jax.distributed.initialize once if this run is multi-process; returns whether it is initialized.

  Decision: `force` (e.g. launch/train.py --distributed) if given, else `distributed.mode` of the config:
  'on' always, 'off' never, 'auto' when `multihost_environment()` detects a launcher. Must run before any jax
  computation. Calling it again is a no-op.
  """
  if jax.distributed.is_initialized():
    return True
  b = _block(config)
  mode = str(b.get("mode", "auto"))
  if mode not in MODES:
    raise ValueError(f"distributed.mode={mode!r}: expected one of {MODES}")
  if force is not None:
    wanted, why = bool(force), "--distributed flag"
  elif mode == "auto":
    env = multihost_environment()
    wanted, why = env is not None, f"detected {env}"
  else:
    wanted, why = mode == "on", f"distributed.mode={mode!r}"
  if not wanted:
    return False
  kw = initialize_kwargs(b)
  log.info("jax.distributed.initialize(%s) (%s)", kw, why)
  jax.distributed.initialize(**kw)
  log.info("process %d of %d; %d local / %d global devices", jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())
  return True


def host_shard(items: Sequence[Any], process_index: int | None = None, process_count: int | None = None, *,
               drop_remainder: bool = False) -> list[Any]:
  """The contiguous share of `items` that process `process_index` of `process_count` loads.

  Shares are deterministic and, concatenated in process order, give back `items` (drop_remainder=False: the
  first len % count processes get one extra item, as np.array_split does). drop_remainder=True first drops the
  last len % count items so every process gets the same number (needed when the shares become one global array).
  Defaults: jax.process_index() / jax.process_count().
  """
  i = jax.process_index() if process_index is None else int(process_index)
  n = jax.process_count() if process_count is None else int(process_count)
  if n < 1 or not 0 <= i < n:
    raise ValueError(f"host_shard: process_index={i} must lie in [0, process_count={n})")
  total = len(items)
  if drop_remainder:
    per = total // n
    return list(items[i * per:(i + 1) * per])
  base, extra = divmod(total, n)
  start = i * base + min(i, extra)
  return list(items[start:start + base + (1 if i < extra else 0)])


def global_batch(local_arrays, mesh: Mesh, rules=sharding_lib.DEFAULT_RULES):
  """Global jax.Arrays from process-local numpy data: leading (batch) axis sharded over the mesh's data axes.

  local_arrays: a pytree of arrays [b_local, ...]; every process passes its own rows, all with the same b_local
  (the global batch is the processes' rows concatenated in process order). Other axes are replicated
  (`sharding.batch_sharding`). On one process this equals device_put with that sharding.
  """
  def one(x):
    x = np.asarray(x)
    if x.ndim == 0:
      raise ValueError("global_batch: leaves need a leading batch axis, got a scalar")
    s = sharding_lib.batch_sharding(mesh, x.ndim, rules)
    return jax.make_array_from_process_local_data(s, x)

  return jax.tree.map(one, local_arrays)


def fetch(tree):
  """numpy values of a pytree of jax.Arrays on every process: jax.device_get where each array is fully addressable
  here (one process), else an all-gather across processes (arrays sharded over a multi-host mesh)."""
  if all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(tree)):
    return jax.device_get(tree)
  return process_allgather(tree)


def allgather_json(value) -> list:
  """[value of process 0, value of process 1, ...] on every process, for small JSON-serializable host values
  (e.g. retrieved passages): sizes first, then the padded UTF-8 bytes, as two all-gathers."""
  if jax.process_count() == 1:
    return [value]
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int64))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [json.loads(rows[i, :n].tobytes().decode()) for i, n in enumerate(sizes)]


def process_allgather(tree):
  """Every process gets the full value of each (possibly non-addressable) global array, as numpy."""
  return multihost_utils.process_allgather(tree, tiled=True)
