r"""How the greedy (or sampled) answers of a demo run spend their searches, per evaluation; prints one JSON line.

  python -m launch.search_stats WORKDIR [WORKDIR ...] [--world_dir DIR] [--eval round000_init ...]

Reads WORKDIR/eval/<round>_<phase>/trajectories.jsonl (written with rollout.eval.write_trajectories) and the
synthetic world's test questions (their `metadata.hops`; the world directory comes from WORKDIR/config.json's
data.world_dir unless --world_dir is given). Several workdirs are pooled per evaluation name (e.g. the same
evaluation under several `rollout.eval.seed`s). Per evaluation:
  n, em                       answers and their exact-match rate
  fewer / exact / extra       answers with fewer searches than the question's hops, exactly that many, or more:
                              n, em; for `extra` also how many repeat a query verbatim back to back and how many
                              ended at max_turns
  double_check                answers whose text has transcripts.VERIFY_PHRASE (the verify kind's habit): n, em
  last_hop_without_check      answers with at least the hop count of searches and no double-check: n, em
  correct                     over the correct answers, mean searches split by what each search showed:
                              new    a passage of the question's plan (`World.solve`) not shown before,
                              again  only passages shown before, one of them from the plan (re-reading:
                                     the needless searches a double-check or a verbatim repeat makes),
                              off    no passage of the plan (a retriever miss, a vague or wrong query)
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re

from searche1_jax.agent import trajectory as trajectory_lib
from searche1_jax.demo import synthetic_world
from searche1_jax.demo import transcripts


_TITLE = re.compile(r'\(Title: "?([^")\n]+?)"?\)')


def search_outcomes(obs_texts: list[str], plan_titles: set[str]) -> list[str]:
  """'new' / 'again' / 'off' (see the module docstring) for each search's observation text."""
  seen, out = set(), []
  for text in obs_texts:
    shown = set(_TITLE.findall(text))
    out.append("new" if shown & plan_titles - seen else "again" if shown & plan_titles else "off")
    seen |= shown
  return out


def _group(rows: list[dict]) -> dict:
  return {"n": len(rows), "em": round(sum(r["reward"] for r in rows) / len(rows), 4) if rows else None}


def search_stats(trajectories: list[dict], hops: dict[str, int], plans: dict[str, set[str]]) -> dict:
  """The statistics above for one evaluation. trajectories: rows of trajectories.jsonl; hops: question id ->
  searches the question needs; plans: question id -> the titles of the passages its plan reads."""
  by = collections.defaultdict(list)
  for t in trajectories:
    d = t["num_searches"] - hops[t["question_id"]]
    by["fewer" if d < 0 else "exact" if d == 0 else "extra"].append(t)
  checked = [t for t in trajectories if transcripts.VERIFY_PHRASE in t["response_text"]]
  unchecked = [t for t in trajectories
               if t["num_searches"] >= hops[t["question_id"]] and transcripts.VERIFY_PHRASE not in t["response_text"]]
  extra = by["extra"]
  out = {**_group(trajectories), "fewer": _group(by["fewer"]), "exact": _group(by["exact"]),
         "extra": {**_group(extra),
                   "repeat_query": sum(any(a == b for a, b in zip(t["queries"], t["queries"][1:])) for t in extra),
                   "max_turns": sum(t["stop_reason"] == trajectory_lib.STOP_MAX_TURNS for t in extra)},
         "double_check": _group(checked), "last_hop_without_check": _group(unchecked)}
  correct = [search_outcomes(t["obs_texts"], plans[t["question_id"]]) for t in trajectories if t["reward"] > 0]
  out["correct"] = {"n": len(correct), **{k: round(sum(o.count(k) for o in correct) / max(len(correct), 1), 4)
                                          for k in ("new", "again", "off")}}
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("workdirs", nargs="+")
  p.add_argument("--world_dir", default=None, help="default: data.world_dir of the first WORKDIR/config.json")
  p.add_argument("--eval", nargs="*", default=None, help="evaluation names (default: all found)")
  args = p.parse_args(argv)

  world_dir = args.world_dir
  if world_dir is None:
    path = os.path.join(args.workdirs[0], "config.json")
    if not os.path.exists(path):
      p.error(f"{path} not found: pass --world_dir")
    with open(path) as f:
      world_dir = json.load(f)["data"]["world_dir"]
  world = synthetic_world.load_world(world_dir)
  hops = {q["id"]: int(q["metadata"]["hops"]) for q in world.test_questions}
  plans = {q["id"]: {title for _, title in world.solve(q)} for q in world.test_questions}

  pooled: dict[str, list[dict]] = collections.defaultdict(list)
  for w in args.workdirs:
    root = os.path.join(w, "eval")
    if not os.path.isdir(root):
      p.error(f"{root}: no evaluations (run with rollout.eval.write_trajectories=True)")
    for name in sorted(os.listdir(root)):
      path = os.path.join(root, name, "trajectories.jsonl")
      if os.path.exists(path) and (args.eval is None or name in args.eval):
        with open(path) as f:
          pooled[name] += [json.loads(line) for line in f]
  print(json.dumps({name: search_stats(rows, hops, plans) for name, rows in sorted(pooled.items())}))


if __name__ == "__main__":
  main()
