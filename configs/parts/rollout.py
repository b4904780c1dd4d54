"""Rollout and evaluation block: `config.rollout = parts.rollout.get()`.

The Search-R1 protocol itself (template, max_turns, topk, token limits) is `config.protocol`
(configs/parts/protocol.py); this block holds the knobs of the host loop around it
(searche1_jax/agent/rollout.py) and of evaluation (searche1_jax/train/evaluation.py). The group size is
`config.grpo.group_size`; training sampling parameters (temperature, top_p, top_k) are the sampling block's.
"""
import ml_collections


def get() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Search queries longer than this many characters are cut to it (e5/MiniLM read at most 256 tokens anyway).
  c.max_query_chars = 512
  # Retries of one batched retriever call after the first attempt fails (any exception or a malformed result).
  c.retrieval_retries = 2
  # Delay before the first retry in seconds; doubles each retry, capped at retrieval_backoff_max_s.
  c.retrieval_backoff_s = 0.5
  c.retrieval_backoff_max_s = 8.0
  # Observation spliced in for each search of a batch whose retrieval failed after all retries (the rollout goes on).
  c.retrieval_error_message = "\n\n<information>Search failed: the search engine is unavailable.</information>\n\n"

  # How work items (question x sample) share the decode batch (searche1_jax/agent/rollout.py):
  #   'sync'        Search-R1's loop: waves of decode_slots // group_size questions, turns in lockstep, one
  #                 retriever call per turn.
  #   'continuous'  decode_slots items decode at once, each on its own turns; a finished one's slot goes to the next
  #                 waiting item, and retrieval overlaps with decoding. Same trajectories as 'sync' for one seed.
  c.schedule = "sync"
  # 'continuous': a decode chunk (sampling.decode_chunk steps) ends early once this fraction of the decode slots ended
  # a turn in it, so the host refills idle rows soon (smaller: fuller batch, more host round trips).
  c.refill_fraction = 0.25
  # Most sequences the sampler holds at once; 0 = a whole rollout batch. This bounds the KV cache and the prefill
  # program (python -m launch.aot_compile sizes them per topology; configs/common.DECODE_SLOTS).
  c.decode_slots = 0
  # Evaluation (which benchmarks, split and per-benchmark limits: the data block, configs/parts/data.py).
  c.eval = ml_collections.ConfigDict()
  # Questions decoded together in one rollout batch (Search-R1 val batch: 256).
  c.eval.batch_size = 256
  # 0 = greedy (Search-R1 validation); > 0 samples at this temperature with eval.seed (+ the batch number).
  c.eval.temperature = 0.0
  c.eval.seed = 0
  # Also write every trajectory (with its decoded text) to <workdir>/trajectories.jsonl.
  c.eval.write_trajectories = True
  return c
