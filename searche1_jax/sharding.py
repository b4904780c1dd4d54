"""Device mesh and logical-axis sharding rules.

Every parameter and activation axis has a logical name ('batch', 'embed', 'heads', ...). A rule table (data,
not code; experiment configs may override it) maps logical names to the mesh axes 'data', 'fsdp', 'tensor'.
The same model code then runs on 1 CPU, 8 fake CPU devices and a TPU pod.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),  # activations: batch over every data-parallel axis
    ("length", None),
    ("embed", "fsdp"),  # parameters: ZeRO-3 style over fsdp ...
    ("vocab", "tensor"),  # ... and Megatron style over tensor
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh. One size may be -1: it takes all remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into data={data} fsdp={fsdp} tensor={tensor}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) > len(devices) or min(sizes) < 1:
    raise ValueError(f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs {math.prod(sizes)} devices, "
                     f"have {len(devices)}")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices[:math.prod(sizes)])


def logical_to_mesh(names: Sequence[str | None], rules=DEFAULT_RULES) -> P:
  """Logical axis names -> PartitionSpec over mesh axes. A mesh axis is used at most once per array."""
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name in names:
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def spec_for_shape(shape: Sequence[int], names: Sequence[str | None], mesh: Mesh, rules=DEFAULT_RULES) -> P:
  """Like logical_to_mesh, but a dimension that the mesh axes do not divide evenly is replicated instead."""
  spec = logical_to_mesh(names, rules)
  fixed = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is not None:
      size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
      if dim % size:
        axes = None
    fixed.append(axes)
  return P(*fixed)


def named_sharding(mesh: Mesh, shape: Sequence[int], names: Sequence[str | None], rules=DEFAULT_RULES):
  return NamedSharding(mesh, spec_for_shape(shape, names, mesh, rules))


_ACTIVATION_RULES = threading.local()


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None, rules=DEFAULT_RULES):
  """While a program over `mesh` is traced: `constrain` pins activations to their logical sharding.

  Enter it inside the traced function (train steps, log-prob passes). The abstract mesh becomes part of the trace
  context, so jitted helpers traced with and without it are cached apart. No-op for None or a one-device mesh.
  """
  if mesh is None or mesh.size == 1:
    yield
    return
  previous = getattr(_ACTIVATION_RULES, "rules", None)
  _ACTIVATION_RULES.rules = tuple(rules)
  try:
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      yield
  finally:
    _ACTIVATION_RULES.rules = previous


def activation_rules():
  """The rules of the enclosing `activation_mesh` (None outside one); its abstract mesh is
  jax.sharding.get_abstract_mesh()."""
  return getattr(_ACTIVATION_RULES, "rules", None)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """x with the sharding its logical axis names give under `activation_mesh`; x itself outside one.

  Model code marks activations this way so that XLA keeps them batch-sharded and gathers fsdp-sharded weights
  for each matmul (what FSDP means) instead of splitting the contraction and all-reducing activations."""
  mesh, rules = jax.sharding.get_abstract_mesh(), activation_rules()
  if mesh.empty or rules is None:
    return x
  return jax.lax.with_sharding_constraint(x, spec_for_shape(x.shape, names, mesh, rules))


def mesh_from_config(block, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh from a `mesh` config block (fields data, fsdp, tensor; see configs/parts/mesh.py)."""
  for f in ("data", "fsdp", "tensor"):
    if not isinstance(block[f], int):
      raise ValueError(f"config mesh.{f} must be an int (-1 = all remaining devices), got {block[f]!r}")
  return make_mesh(block.data, block.fsdp, block.tensor, devices=devices)


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
  """Sharding of a [B, ...] host batch: batch over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, logical_to_mesh(("batch",) + (None,) * (ndim - 1), rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def rules_from_config(pairs) -> tuple[tuple[str, Any], ...]:
  """Rules from a config value: a sequence of (logical, mesh axis | list of mesh axes | None) pairs."""
  out = []
  for i, pair in enumerate(pairs):
    if len(pair) != 2:
      raise ValueError(f"sharding rule #{i} must be a (logical_name, mesh_axes) pair, got {pair!r}")
    name, target = pair
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
      raise ValueError(f"sharding rule for {name!r} names unknown mesh axes {bad}; known: {MESH_AXES}")
    out.append((name, target if isinstance(target, str) or target is None else tuple(target)))
  return tuple(out)


def mesh_and_rules(config) -> tuple[Mesh | None, tuple[tuple[str, Any], ...]]:
  """(mesh, rules) from an experiment config's optional `mesh` block (fields data, fsdp, tensor, optional rules).

  No block: (None, DEFAULT_RULES). A one-device mesh is returned as None (callers then run unsharded)."""
  block = config.get("mesh")
  if block is None:
    return None, DEFAULT_RULES
  rules = rules_from_config(block.rules) if block.get("rules") else DEFAULT_RULES
  mesh = mesh_from_config(block)
  return (mesh if mesh.size > 1 else None), rules


def without_mesh_axis(rules, axis: str) -> tuple[tuple[str, Any], ...]:
  """The rules with mesh axis `axis` removed from every target: what they shard over it is replicated along it
  (the sampler's decode layout of the weights drops 'fsdp': gathered once, then read locally every step)."""
  out = []
  for name, target in rules:
    axes = tuple(a for a in ((target,) if isinstance(target, str) else tuple(target or ())) if a != axis)
    out.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
  return tuple(out)


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
