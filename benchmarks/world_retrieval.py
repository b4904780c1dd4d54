"""How often the demo's retriever finds the passage each hop of the synthetic world's test questions needs.

  python -m benchmarks.world_retrieval [--cache workdirs/demo_cache] [--miss_rate 0.0]    # one JSON line

Needs a demo cache (world + MiniLM/ScaNN index; `make demo` builds it). For every hop of every test question
(`World.plan`) it sends each wording the warm-start transcripts use (`transcripts.hop_wordings`: the canonical
query, then the paraphrases) and counts how often the hop's passage is the top-1 result and in the top 3.
This is why `retrieval.miss_rate` exists: with 0 misses an extra search almost never finds anything new.
"""
import argparse
import json
import os

from configs.parts import retrieval as retrieval_config
from searche1_jax.demo import synthetic_world, transcripts
from searche1_jax.retrieval import make_retriever


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--cache", default="workdirs/demo_cache", help="the demo's artifacts cache (configs/demo.py)")
  p.add_argument("--miss_rate", type=float, default=0.0, help="retrieval.miss_rate to measure with")
  args = p.parse_args(argv)

  world = synthetic_world.load_world(os.path.join(args.cache, "world"))
  cfg = retrieval_config.get()
  cfg.index_dir = os.path.join(args.cache, "index_minilm_scann")
  cfg.miss_rate = args.miss_rate
  retriever = make_retriever(cfg)

  hops = [hop for q in world.test_questions for hop in world.plan(q)]
  wordings = [transcripts.hop_wordings(hop) for hop in hops]
  names = ["canonical"] + [f"paraphrase_{i}" for i in range(1, len(wordings[0]))]
  results = retriever.retrieve([w for ws in wordings for w in ws], 3)
  top1 = {n: 0 for n in names}
  top3 = {n: 0 for n in names}
  for h, hop in enumerate(hops):
    for j, n in enumerate(names):
      titles = [r.title for r in results[h * len(names) + j]]
      top1[n] += titles[:1] == [hop.title]
      top3[n] += hop.title in titles
  print(json.dumps({"test_questions": len(world.test_questions), "hops": len(hops), "miss_rate": args.miss_rate,
                    "top1": {n: round(v / len(hops), 4) for n, v in top1.items()},
                    "top3": {n: round(v / len(hops), 4) for n, v in top3.items()}}))


if __name__ == "__main__":
  main()
