"""Wall time of a self-evolution round of the demo config, split by phase; prints one JSON line.

  python -m benchmarks.round [--config configs/demo.py] [--workdir /tmp/round_bench] [--rounds 2] [--config.F=V ...]

Builds (or reuses) the demo's cached artifacts, then runs `--rounds` rounds of `searche1_jax.train.loop.run`
(GRPO steps, the OFSD phase, the evaluation) from a fresh workdir and reads each round's `timings` from
results.json. It uses the demo's persistent compilation cache (`demo.compilation_cache_dir`): run it twice, and
the second run measures rounds that load every program instead of compiling it (the JSON says whether the cache
held entries at start); the first run, or a fresh cache, includes compilation. Targets (issue #8), judged on the
last round: the OFSD phase (its rollouts and retrieval, teacher targets, student updates) adds <= 15%
to the round's time without it, and retrieval takes <= 10% of rollout time (sampling + retrieval). The post-phase
greedy rollouts (`ofsd.post_phase_rollouts`, a diagnostic like the evaluation) are reported but not counted as
OFSD cost.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time

from launch import demo
from searche1_jax import config_utils
from searche1_jax.train import loop


OFSD_KEYS = ("ofsd_rollout", "ofsd_retrieval", "ofsd_targets", "ofsd_learner")
DIAGNOSTIC_KEYS = ("ofsd_post_rollout", "ofsd_post_retrieval", "eval")


def split(entries: list[dict]) -> dict:
  """One round's phase timings (the 'grpo' and 'ofsd' results entries of that round summed) and its ratios."""
  t: dict[str, float] = {}
  for e in entries:
    for k, v in e.get("timings", {}).items():
      t[k] = t.get(k, 0.0) + v
  ofsd = sum(t.get(k, 0.0) for k in OFSD_KEYS)
  rest = sum(v for k, v in t.items() if k not in OFSD_KEYS)
  sampling = t.get("rollout", 0.0) + t.get("retrieval", 0.0)
  return {"timings_s": {k: round(v, 2) for k, v in sorted(t.items())}, "round_s": round(ofsd + rest, 2),
          "ofsd_s": round(ofsd, 2),
          "ofsd_added_fraction": round(ofsd / max(rest, 1e-9), 4),  # OFSD time / the round's time without it
          "retrieval_fraction_of_rollout": round(t.get("retrieval", 0.0) / max(sampling, 1e-9), 4)}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/demo.py")
  p.add_argument("--workdir", default="/tmp/searche1_round_bench")
  p.add_argument("--rounds", type=int, default=2)
  args, overrides = p.parse_known_args()  # the rest: --config.<field>=<value>, as for launch/train.py

  config = config_utils.load_config(args.config)
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    p.error(f"unrecognized arguments: {bad} (overrides are --config.<field>=<value>)")
  config_utils.apply_overrides(config, [o[len("--config."):] for o in overrides])
  config_utils.apply_overrides(config, {"train.num_rounds": args.rounds, "train.eval_at_start": False,
                                        "train.eval_after_grpo": False})
  cache_dir = demo.enable_compilation_cache(config)
  warm = bool(cache_dir) and any(os.scandir(cache_dir))
  log = demo.Log()
  world = demo.stage_world(config, log)
  demo.stage_tokenizer(config, world, log)
  demo.stage_index(config, log)
  demo.stage_warm_start(config, world, log)
  shutil.rmtree(args.workdir, ignore_errors=True)
  t0 = time.perf_counter()
  results = loop.run(config, args.workdir)
  wall = time.perf_counter() - t0
  rounds = {}
  for e in results["rounds"]:
    rounds.setdefault(e["round"], []).append(e)
  per_round = {r: split(es) for r, es in sorted(rounds.items())}
  last = per_round[max(per_round)]
  out = {
      "benchmark": "round", "config": args.config, "overrides": overrides, "rounds": args.rounds,
      "wall_s": round(wall, 2),
      "per_round": per_round,
      "ofsd_added_fraction": last["ofsd_added_fraction"],
      "retrieval_fraction_of_rollout": last["retrieval_fraction_of_rollout"],
      "targets": {"ofsd_added_fraction": 0.15, "retrieval_fraction_of_rollout": 0.10},
      "met": {"ofsd": last["ofsd_added_fraction"] <= 0.15, "retrieval": last["retrieval_fraction_of_rollout"] <= 0.10},
      "judged_on_round": max(per_round), "compilation_cache": cache_dir or None,
      "compilation_cache_warm_at_start": warm, "load_avg": os.getloadavg(),
  }
  print(json.dumps(out))


if __name__ == "__main__":
  main()
