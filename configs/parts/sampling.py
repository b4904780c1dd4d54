"""Sampler block: `config.sampling = parts.sampling.get()`.

Engine fields go to `searche1_jax.sampling.SamplerOptions.from_config(config.sampling)` (passed as
`options=` to `Session` / `generate`); temperature / top_p / top_k are the default sampling parameters the
rollout passes to `Session`.
"""
import ml_collections


def get() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Sampling parameters (training rollouts; evaluation overrides temperature to 0 = greedy).
  c.temperature = 1.0  # Search-R1 GRPO rollouts sample at temperature 1
  c.top_p = 1.0  # nucleus filtering; 1.0 = off
  c.top_k = 0  # top-k filtering; 0 = off
  # Engine: how work is laid out on the device (see searche1_jax/sampling/options.py).
  c.decode_chunk = 64  # decode steps per jitted while_loop call; the host syncs once per chunk
  c.batch_buckets = ()  # allowed batch sizes; () = powers of two
  c.min_batch = 1  # smallest batch bucket (raised to the mesh's data x fsdp size when sharded)
  c.length_buckets = ()  # tokens per prefill / extend program; () = powers of two
  c.min_length = 16  # smallest prefill / extend bucket
  c.max_extend = 512  # longest prefill / extend program; longer inputs are fed in several calls
  c.cache_buckets = ()  # physical KV-cache lengths; () = powers of two
  c.min_cache = 128  # smallest physical cache length
  c.grow_cache = True  # grow the cache by buckets as sequences lengthen (False: allocate max_len up front)
  c.compact = True  # move live rows into a smaller batch bucket once enough sequences have finished
  c.share_prompts = True  # identical prompts (a question's G samples) prefill once; their cache rows are copied
  # Decode from a per-session copy of the weights in the compute dtype, gathered over the fsdp axis once (costs
  # params x compute-dtype bytes / tensor per chip); False: the fsdp shards are gathered inside every decode step.
  c.gather_weights = True
  c.stop_states = 32  # smallest padded number of stop-automaton states (searche1_jax/sampling/stops.py)
  c.eos_slots = 4  # smallest padded number of EOS ids
  c.pad_id = 0  # token id used for padding (never visible in results)
  return c
