"""Engine knobs of the sampler (shape buckets, chunking, compaction) and the bucket rule.

Every jitted program of the sampler is compiled per input shape, so shapes are rounded up to buckets: batch
rows, tokens per prefill / extend call, physical cache length, stop-automaton states. A rollout of many turns then
compiles a bounded number of programs. The block `configs/parts/sampling.py` holds the same fields.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from searche1_jax import schema


def next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def bucket(n: int, table: Sequence[int], minimum: int, what: str) -> int:
  """Smallest bucket >= n: the next power of two (at least `minimum`) when table is empty, else the smallest
  entry of table that is >= n. `what` names the config field in the error when n exceeds the table."""
  if n < 0:
    raise ValueError(f"{what}: negative size {n}")
  if not table:
    return max(int(minimum), next_pow2(n))
  for b in sorted(table):
    if b >= n:
      return int(b)
  raise ValueError(f"{what}: size {n} exceeds the largest configured bucket {max(table)}; add a larger bucket")


def _opt(kind, default, **spec):
  return schema.option(kind, default, optional=True, **spec)


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
  """How the sampler lays out work: the engine fields of the `sampling` block (configs/parts/sampling.py),
  declared once (searche1_jax/schema.py); every field is optional in a block. Defaults are sensible for CPU
  tests and TPU rollouts alike."""
  decode_chunk: int = _opt("int", 64, lo=1)  # decode steps per jitted while_loop call; the host syncs once per chunk
  batch_buckets: tuple[int, ...] = _opt("ints", (), lo=1)  # allowed batch sizes; () = powers of two
  min_batch: int = _opt("int", 1, lo=1)  # smallest batch bucket (raised to the mesh's data-parallel size when sharded)
  length_buckets: tuple[int, ...] = _opt("ints", (), lo=1)  # tokens per prefill / extend program; () = powers of two
  min_length: int = _opt("int", 16, lo=1)  # smallest prefill / extend bucket
  max_extend: int = _opt("int", 512, lo=1)  # longest prefill / extend program; longer inputs take several calls
  cache_buckets: tuple[int, ...] = _opt("ints", (), lo=1)  # physical KV-cache lengths; () = powers of two
  min_cache: int = _opt("int", 128, lo=1)  # smallest physical cache length
  grow_cache: bool = _opt("bool", True)  # True: the cache grows by buckets as sequences lengthen; False: max_len
  compact: bool = _opt("bool", True)  # move live rows into a smaller batch bucket once enough sequences finished
  share_prompts: bool = _opt("bool", True)  # identical prompts prefill once; their cache rows are copied
  # True: a session decodes from its own copy of the weights, in the compute dtype and gathered over 'fsdp', made
  # once (engine.Programs.weights); False: from the training layout (fsdp shards gathered inside every step).
  gather_weights: bool = _opt("bool", True)
  stop_states: int = _opt("int", 32, lo=1)  # smallest padded number of stop-automaton states (tables: [states, V])
  eos_slots: int = _opt("int", 4, lo=1)  # smallest padded number of EOS ids
  pad_id: int = _opt("int", 0, lo=0)  # token id used for padding (never visible in results)

  def __post_init__(self):
    schema.check(self, "sampling")

  @classmethod
  def _cross_problems(cls, v: dict) -> list[tuple[str, str]]:
    if v.get("length_buckets") and v.get("max_extend", 512) > max(v["length_buckets"]):
      return [("max_extend", f"exceeds the largest of sampling.length_buckets={tuple(v['length_buckets'])}")]
    return []

  @classmethod
  def from_config(cls, block: Mapping[str, Any] | None) -> "SamplerOptions":
    """From a `configs/parts/sampling.py` block (a ConfigDict or dict). Sampling parameters in the block
    (temperature, top_p, top_k) are not engine options and are skipped here; any other unknown field is an
    error naming it."""
    if block is None:
      return cls()
    if isinstance(block, cls):
      return block
    items = dict(block.items())
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(items) - fields - set(SAMPLING_PARAM_FIELDS))
    if unknown:
      known = sorted(fields | set(SAMPLING_PARAM_FIELDS))
      raise ValueError(f"unknown sampling config field(s) {unknown}; known: {known}")
    return schema.build(cls, items, "sampling", "configs/parts/sampling.py")


# Fields of the sampling config block that are per-call sampling parameters, not engine options.
SAMPLING_PARAM_FIELDS = ("temperature", "top_p", "top_k")
