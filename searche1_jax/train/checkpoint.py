"""Orbax checkpoints of everything a run needs to continue identically.

A checkpoint holds two items:
  state: a pytree of arrays (params, optimizer state, RNG key data, ...) restored into the layout (shardings) of
         an abstract target, so a resumed run places every array straight where it lives;
  extra: a pytree of host numpy arrays whose shapes vary between checkpoints (the OFSD target buffer), restored
         as saved;
plus `meta`, a JSON dict (round, phase, step within the phase, data position, ...).
Writes are asynchronous and atomic (orbax writes to a temporary directory and renames it when complete), so a
crash or SIGKILL at any moment leaves the previous checkpoints intact; the last `keep` are kept.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from searche1_jax import sharding
from searche1_jax.models import qwen2

# Orbax refuses an empty item; a checkpoint without extra data stores this one-byte marker instead.
_NO_EXTRA = {"_none": np.zeros((), np.int8)}


class Checkpointer:
  """Thin wrapper over ocp.CheckpointManager. `step` is a monotonically increasing save counter."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_names=("state", "extra", "meta"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                             create=True, cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict, extra: Any | None = None) -> None:
    """Starts an async save; returns once the arrays are copied off the device (safe to donate them after)."""
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    args["extra"] = ocp.args.StandardSave(extra if extra else _NO_EXTRA)
    self._manager.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, Any]:
    """Restore (state, meta, extra). abstract_state: a pytree of jax.ShapeDtypeStruct (with .sharding)."""
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore(),
        extra=ocp.args.StandardRestore()))
    extra = out.extra
    if isinstance(extra, dict) and set(extra) == set(_NO_EXTRA):
      extra = None
    return out.state, dict(out.meta), extra

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Only state['params'] (e.g. for evaluation or export): the optimizer state is never read."""
    abstract = {"params": abstract_params}
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    path = os.path.join(self.directory, str(step), "state")
    with ocp.PyTreeCheckpointer() as ckptr:
      out = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args,
                                                            partial_restore=True))
    return out["params"]

  def restore_meta(self, step: int) -> dict:
    return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """Shape/dtype/sharding structs of a pytree of arrays (the restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def find_checkpoint_dir(path: str) -> str:
  """A run's workdir (holding checkpoints/) or the checkpoints directory itself."""
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def load_policy(path: str, step: int | None = None, *, mesh=None, rules=None, host: bool = False):
  """(Qwen2Config, params, meta, step) of a trainer checkpoint.

  path: a run's workdir or its checkpoints/ directory; step None = the latest. With `mesh`, params are restored
  straight into their sharded layout; with host=True as host numpy arrays (no device memory); else on device 0.
  Raises FileNotFoundError / ValueError naming the directory and what is missing or wrong.
  """
  directory = find_checkpoint_dir(path)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory}: no checkpoints directory (is it a training run's workdir?)")
  # Complete checkpoints only (orbax renames a finished save to its bare step number).
  steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit())
  if not steps:
    raise FileNotFoundError(f"{path}: no trainer checkpoint found (expected {directory}/<step>/)")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f"{directory}: no checkpoint at step {step}; available: {steps}")
  ckpt = Checkpointer(directory, async_save=False)
  try:
    meta = ckpt.restore_meta(step)
    if "model_config" not in meta:
      raise ValueError(f"{directory}/{step}: meta has no 'model_config' (keys: {sorted(meta)}); "
                       "not written by searche1_jax.train.loop")
    try:
      cfg = qwen2.Qwen2Config(**meta["model_config"])
    except TypeError as e:
      raise ValueError(f"{directory}/{step}: meta['model_config'] is not a Qwen2Config: {e}") from None
    abstract = jax.eval_shape(lambda: qwen2.init_params(cfg, jax.random.key(0)))
    if not host:
      if mesh is not None:
        shards = qwen2.param_shardings(cfg, mesh, rules or sharding.DEFAULT_RULES, abstract)
      else:
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shards = jax.tree.map(lambda _: dev, abstract)
      abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shards)
    params = ckpt.restore_params(step, abstract)
  finally:
    ckpt.close()
  want = jax.tree.map(lambda a: (a.shape, np.dtype(a.dtype)), abstract)
  got = jax.tree.map(lambda a: (tuple(a.shape), np.dtype(a.dtype)), params)
  if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
    raise ValueError(f"{directory}/{step}/state: saved params do not match meta['model_config'] "
                     f"(expected {want}, got {got})")
  return cfg, params, meta, step


def load_run(workdir: str):
  """(config, meta, Qwen2Config, params) of a demo / trainer workdir's newest checkpoint; None when the workdir has
  no config.json or no complete checkpoint yet (the notebooks then fall back to an inline model).

  config = WORKDIR/config.json (written by launch/train.py and launch/demo.py) as a ConfigDict; meta carries the
  loop's cursor (`meta['cursor']`: round, phase, global_step).
  """
  config_path = os.path.join(workdir, "config.json")
  directory = find_checkpoint_dir(workdir)
  if not (os.path.isfile(config_path) and os.path.isdir(directory)
          and any(d.isdigit() for d in os.listdir(directory))):
    return None
  cfg, params, meta, _ = load_policy(workdir)
  with open(config_path, encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  return config, meta, cfg, params
