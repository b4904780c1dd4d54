"""Config block `mesh`: device mesh sizes and the logical-axis -> mesh-axis sharding rules."""
import ml_collections

from searche1_jax import sharding


def get() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data = 1  # pure data-parallel replicas (params replicated across them)
  c.fsdp = -1  # ZeRO-3 style: params, grads and optimizer state sharded over it; -1 = all remaining devices
  c.tensor = 1  # Megatron style: heads / mlp / vocab split over it (keep <= num_kv_heads to shard k/v)
  # (logical axis, mesh axis | tuple of mesh axes | None) pairs; the table is in docs/models_and_sampling.md, "Sharding rules".
  # A dimension the mesh axes do not divide is replicated. Override with a tuple of pairs of your own.
  c.rules = tuple((name, target) for name, target in sharding.DEFAULT_RULES)
  return c
