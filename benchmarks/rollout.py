"""Rollout throughput of the 'sync' and 'continuous' schedules (rollout.schedule), side by side in one run.

  python -m benchmarks.rollout [--config configs/demo.py] [--slots 32] [--repeats 2] [--workloads ...]

Workloads (the demo's world, tokenizer, MiniLM + ScaNN retriever and protocol: up to 4 searching turns + the final
one, 64 tokens per turn, top-1 passage; training questions, G = 5 samples each, the demo's sampling temperature):
  demo_16     the demo's warm-started policy (0.74M parameters), 16 questions x 5 samples
  demo_64     the same, 64 questions x 5 samples
  policy_20m  a ~20M-parameter Qwen2 (hidden 256, 12 layers, MLP 1024, the demo's vocabulary) with random weights,
              16 questions x 5 samples: decode-heavy (random text: invalid turns that run to the per-turn limit,
              almost no searches)
Both schedules hold at most --slots sequences in the sampler (rollout.decode_slots). Per workload: one untimed
call per schedule (compilation), then --repeats timed calls of each, interleaved; each figure is from the fastest
call. Every call uses the same sampler seed, so both schedules roll out the SAME trajectories (checked, and
reported as `same_trajectories`): the comparison is of scheduling alone.

Per schedule: traj_per_s and tokens_per_s (decoded policy tokens) over the rollout's wall time; retrieval_share =
the time the rollout waited on the retriever / wall time (sync: every retriever call; continuous: what the overlap
with decoding did not hide); retrieval_busy_share = the retriever's own time / wall time (overlapped or not);
occupancy = decoded tokens / (decode steps run x slots). Targets (issue 21): continuous >= 1.5x sync
trajectories/s on the demo workloads, retrieval share <= 10%. Builds (or reuses) the demo's cached artifacts first.
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import jax
import numpy as np

from launch import demo
from searche1_jax import config_utils
from searche1_jax.agent import rollout
from searche1_jax.data import qa
from searche1_jax.models import hf, qwen2
from searche1_jax.retrieval import make_retriever
from searche1_jax.retrieval.cache import CachingRetriever

POLICY_20M = dict(hidden_size=256, intermediate_size=1024, num_layers=12, num_heads=4, num_kv_heads=2, head_dim=64,
                  tie_word_embeddings=True)
GROUP = 5


def _same(a, b) -> bool:
  return all(x.ids.tolist() == y.ids.tolist() and x.policy_mask.tolist() == y.policy_mask.tolist()
             for x, y in zip(a, b)) and len(a) == len(b)


def run_workload(params, model_cfg, questions, config, tokenizer, eos_ids, retriever, slots, repeats) -> dict:
  """`retriever` has no memo: each rollout gets a fresh one of retrieval.cache_size, so no run replays the
  searches of an earlier one."""
  seed = 1234
  calls = {}  # schedule -> [(RolloutResult, memo hits)]
  cache_size = int(config.retrieval.get("cache_size", 0))

  def once(schedule):
    r_cfg = copy.deepcopy(config.rollout)
    r_cfg.schedule, r_cfg.decode_slots = schedule, slots
    s = config.sampling
    make = rollout.sampler_session_factory(params, model_cfg, temperature=float(s.temperature), top_p=float(s.top_p),
                                           top_k=int(s.top_k), eos_ids=eos_ids, seed=seed)
    fresh = CachingRetriever(retriever, cache_size) if cache_size else retriever
    res = rollout.run_rollouts(make, tokenizer, fresh, questions, config.protocol, r_cfg, group_size=GROUP)
    calls.setdefault(schedule, []).append((res, fresh.hits if cache_size else 0))
    print(f"  {schedule}: {res.stats.total_s:.2f}s for {res.stats.num_trajectories} trajectories", file=sys.stderr)
    return res

  for schedule in rollout.SCHEDULES:  # compilation
    once(schedule)
  calls.clear()
  for _ in range(repeats):
    for schedule in rollout.SCHEDULES:
      once(schedule)
  out = {}
  for schedule, results in calls.items():
    best, best_hits = min(results, key=lambda rh: rh[0].stats.total_s)
    st = best.stats
    out[schedule] = {
        "traj_per_s": round(st.num_trajectories / st.total_s, 2),
        "tokens_per_s": round(st.decode_tokens / st.total_s, 1),
        "retrieval_share": round(st.retrieval_s / st.total_s, 4),
        "retrieval_busy_share": round(st.retrieval_busy_s / st.total_s, 4),
        "occupancy": round(st.occupancy, 4),
        "wall_s": round(st.total_s, 3), "decode_s": round(st.decode_s, 3), "extend_s": round(st.extend_s, 3),
        "admit_s": round(st.session_s, 3), "decode_chunks": st.decode_chunks, "retrieval_calls": st.retrieval_calls,
        "retrieval_cache_hits": best_hits, "all_wall_s": [round(r.stats.total_s, 3) for r, _ in results],
    }
  sync, cont = calls["sync"][0][0].trajectories, calls["continuous"][0][0].trajectories
  out["speedup"] = round(out["continuous"]["traj_per_s"] / out["sync"]["traj_per_s"], 3)
  out["same_trajectories"] = _same(sync, cont)
  out["trajectories"] = len(sync)
  out["searches_per_trajectory"] = round(float(np.mean([t.num_searches for t in sync])), 3)
  out["policy_tokens_per_trajectory"] = round(float(np.mean([t.num_policy_tokens for t in sync])), 1)
  out["params"] = int(sum(x.size for x in jax.tree.leaves(params)))
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/demo.py")
  p.add_argument("--slots", type=int, default=32, help="rollout.decode_slots for both schedules")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--workloads", default="demo_16,demo_64,policy_20m")
  args, overrides = p.parse_known_args()
  config = config_utils.load_config(args.config)
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    p.error(f"unrecognized arguments: {bad} (overrides are --config.<field>=<value>)")
  config_utils.apply_overrides(config, [o[len("--config."):] for o in overrides])
  demo.enable_compilation_cache(config)
  log = demo.Log(sys.stderr)  # stdout holds only the JSON line
  world = demo.stage_world(config, log)
  demo.stage_tokenizer(config, world, log)
  demo.stage_index(config, log)
  demo.stage_warm_start(config, world, log)

  from transformers import AutoTokenizer  # deferred: importing transformers takes seconds
  model_cfg, params = hf.model_from_config(config.model)
  tokenizer = AutoTokenizer.from_pretrained(config.model.get("tokenizer_dir", "") or config.model.hf_dir)
  eos_ids = hf.eos_ids_for(tokenizer, config.model.hf_dir)
  uncached = copy.deepcopy(config.retrieval)
  uncached.cache_size = 0
  retriever = make_retriever(uncached)
  data = config.data
  train = qa.load_split(data.train_dataset, data.train_split, qa.source_dir(data.train_dataset, data), data.tfds_dir)
  big_cfg = model_cfg.replace(**POLICY_20M)
  big_params = qwen2.init_params(big_cfg, jax.random.key(0))
  workloads = {"demo_16": (params, model_cfg, 16), "demo_64": (params, model_cfg, 64),
               "policy_20m": (big_params, big_cfg, 16)}
  out = {"benchmark": "rollout", "config": args.config, "slots": args.slots, "group_size": GROUP,
         "repeats": args.repeats, "max_turns": int(config.protocol.max_turns),
         "max_response_length": int(config.protocol.max_response_length)}
  for name in args.workloads.split(","):
    w_params, w_cfg, nq = workloads[name]
    print(f"{name}:", file=sys.stderr)
    t0 = time.perf_counter()
    out[name] = run_workload(w_params, w_cfg, train[:nq], config, tokenizer, eos_ids, retriever, args.slots,
                             args.repeats)
    out[name]["bench_s"] = round(time.perf_counter() - t0, 1)
  out["targets"] = {"speedup": 1.5, "retrieval_share": 0.10}
  out["load_avg"] = os.getloadavg()
  out["cpus"] = os.cpu_count()
  print(json.dumps(out))


if __name__ == "__main__":
  main()
