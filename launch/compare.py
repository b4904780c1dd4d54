r"""Search-E1 against its baselines on the embedded demo, over warm-start seeds, with 95% intervals.

  python -m launch.compare --config configs/demo.py --variants search_e1,grpo_only,on_policy --seeds 0,1,2 \
      --equal compute --workdir workdirs/compare

Each seed s gives a warm start (warm_start.seed = s, its own directory under the demo's artifacts cache; the world,
tokenizer and index are shared) and the loop seed (config.seed = s); every variant starts from that warm start with
the overrides `configs/demo.py` `variants()` gives it for the --equal mode (equal compute: about the seconds per
round of the config's Search-E1 schedule, from the demo's measured step costs). A (variant, seed) run lives in
WORKDIR/<variant>/seed<s>; re-running the command resumes unfinished runs and reuses finished ones.

Writes WORKDIR/compare.md and compare.json: per variant, the mean over seeds and a 95% Student-t interval of the
final held-out EM, its gain over the warm start, multi-hop EM, searches per correct answer and response tokens; per
OFSD phase (variants that run one), the change in EM and in searches per correct answer across the phase; and
WORKDIR/compare.png (final EM and gain per variant with their intervals). Extra --config.F=V flags apply to every
run (e.g. the smoke config's sizes).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Sequence

import matplotlib
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from scipy import stats as scipy_stats

from configs import common
from configs import demo as demo_config
from launch import demo
from launch import train as train_launch
from searche1_jax import config_utils

# Per-run metrics of the final evaluation (round_rows keys) and their titles.
FINAL_METRICS = (("avg_em", "final EM"), ("gain", "gain over warm start"), ("multi_hop_em", "multi-hop EM"),
                 ("searches_correct", "searches per correct answer"), ("mean_response_tokens", "response tokens"))
PHASE_METRICS = (("d_em", "EM change"), ("d_searches_correct", "searches per correct answer change"))


@dataclasses.dataclass(frozen=True)
class Interval:
  """Mean of n values and the two-sided Student-t interval at `level` (lo = hi = mean for n = 1)."""
  mean: float
  lo: float
  hi: float
  n: int

  def format(self, digits: int = 3) -> str:
    if self.n < 2:
      return f"{self.mean:.{digits}f} (n=1)"
    return f"{self.mean:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
  """Mean and Student-t confidence interval: mean +- t_{(1+level)/2, n-1} * sd / sqrt(n), sd with n - 1."""
  x = np.asarray([v for v in values if v is not None], np.float64)
  if x.size == 0:
    return Interval(math.nan, math.nan, math.nan, 0)
  m = float(x.mean())
  if x.size == 1:
    return Interval(m, m, m, 1)
  half = float(scipy_stats.t.ppf((1 + level) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
  return Interval(m, m - half, m + half, int(x.size))


def run_summary(rows: list[dict]) -> dict:
  """One run's numbers from its evaluations (demo.round_rows, warm start first): the final evaluation's metrics,
  its EM gain over the warm start, and per OFSD phase the change from the evaluation after the round's GRPO steps
  to the one after its OFSD phase."""
  if not rows:
    raise ValueError("a run without evaluations")
  final = rows[-1]
  out = {k: final.get(k) for k, _ in FINAL_METRICS if k != "gain"}
  out["start_em"] = rows[0].get("avg_em")
  out["gain"] = _diff(final.get("avg_em"), out["start_em"])
  phases = []
  for i, r in enumerate(rows):
    if r.get("phase") == "ofsd" and i > 0 and rows[i - 1].get("round") == r.get("round"):
      before = rows[i - 1]
      phases.append({"round": r["round"], "d_em": _diff(r.get("avg_em"), before.get("avg_em")),
                     "d_searches_correct": _diff(r.get("searches_correct"), before.get("searches_correct"))})
  out["ofsd_phases"] = phases
  return out


def _diff(a, b):
  return None if a is None or b is None else a - b


def summarize(runs: dict[str, dict[int, dict]], level: float = 0.95) -> dict:
  """runs[variant][seed] = run_summary(...) -> per variant: {metric: Interval} and per OFSD phase round
  {metric: Interval}, over the seeds."""
  out = {}
  for variant, by_seed in runs.items():
    summaries = list(by_seed.values())
    final = {k: mean_interval([s[k] for s in summaries], level) for k, _ in FINAL_METRICS}
    rounds = sorted({p["round"] for s in summaries for p in s["ofsd_phases"]})
    phases = {r: {k: mean_interval([p[k] for s in summaries for p in s["ofsd_phases"] if p["round"] == r], level)
                  for k, _ in PHASE_METRICS} for r in rounds}
    out[variant] = {"seeds": sorted(by_seed), "final": final, "ofsd_phases": phases}
  return out


def format_tables(summary: dict, equal: str, level: float = 0.95) -> str:
  pct = f"{level:.0%}"
  head = ["variant", "seeds"] + [t for _, t in FINAL_METRICS]
  lines = [f"Held-out evaluation after the last round, mean over seeds [{pct} t-interval], equal {equal}:", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for v, s in summary.items():
    cells = [v, ",".join(map(str, s["seeds"]))]
    cells += [s["final"][k].format(2 if k in ("searches_correct",) else 1 if k == "mean_response_tokens" else 3)
              for k, _ in FINAL_METRICS]
    lines.append("| " + " | ".join(cells) + " |")
  rows = [(v, r, m) for v, s in summary.items() for r, m in s["ofsd_phases"].items()]
  if rows:
    lines += ["", f"Per OFSD phase (evaluation after the phase minus the one before it, same round), mean over "
                  f"seeds [{pct} t-interval]:", "", "| variant | round | EM change | searches per correct answer "
                  "change |", "|---|---|---|---|"]
    for v, r, m in rows:
      lines.append(f"| {v} | {r} | {m['d_em'].format()} | {m['d_searches_correct'].format(2)} |")
  return "\n".join(lines)


def format_seed_table(runs: dict[str, dict[int, dict]]) -> str:
  """Per variant and seed: warm-start EM, final EM and the gain (run_summary values), one row per run."""
  lines = ["Per seed: held-out EM of the warm start, after the last round, and the gain:", "",
           "| variant | seed | warm start EM | final EM | gain |", "|---|---|---|---|---|"]
  fmt = lambda x, sign="": "-" if x is None else f"{x:{sign}.3f}"
  for v, by_seed in runs.items():
    for seed, r in sorted(by_seed.items()):
      lines.append(f"| {v} | {seed} | {fmt(r.get('start_em'))} | {fmt(r.get('avg_em'))} | {fmt(r.get('gain'), '+')} |")
  return "\n".join(lines)


def plot(summary: dict, path: str) -> str:
  """Final EM and gain per variant with their intervals."""
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # after the backend is chosen
  variants = list(summary)
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
  for ax, (key, title) in zip(axes, (("avg_em", "final held-out EM"), ("gain", "EM gain over the warm start"))):
    iv = [summary[v]["final"][key] for v in variants]
    y = np.array([i.mean for i in iv])
    err = np.array([[i.mean - i.lo for i in iv], [i.hi - i.mean for i in iv]])
    ax.errorbar(np.arange(len(variants)), y, yerr=err, fmt="o", capsize=6, lw=2)
    ax.set_xticks(np.arange(len(variants)), variants)
    ax.set_title(title)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def seed_config(base, seed: int, variant_overrides: dict):
  """The config of one (variant, seed) run: warm-start and loop seed `seed`, the seed's own warm-start directory,
  an evaluation after each round's GRPO steps as well (it measures the round's OFSD phase), then the variant's
  overrides."""
  config = base.copy_and_resolve_references()
  ws_dir = os.path.join(config.demo.cache_dir, f"warm_start_seed{seed}")
  common.set_fields(config, {"seed": seed, "warm_start.seed": seed, "warm_start.out_dir": ws_dir,
                             "model.hf_dir": ws_dir, "train.eval_after_grpo": True, **variant_overrides})
  return config


def compare(base, variants: Sequence[str], seeds: Sequence[int], equal: str, workdir: str, *, out=None,
            level: float = 0.95) -> dict:
  """Runs (or resumes / reuses) every (variant, seed) and writes compare.md, compare.json, compare.png."""
  table = demo_config.variants(base, equal)
  unknown = [v for v in variants if v not in table]
  if unknown:
    raise ValueError(f"--variants {unknown}: unknown; known: {sorted(table)} (configs/demo.py variants())")
  os.makedirs(workdir, exist_ok=True)
  runs: dict[str, dict[int, dict]] = {}
  for v in variants:
    for s in seeds:
      run_dir = os.path.join(workdir, v, f"seed{s}")
      config = seed_config(base, s, table[v])
      config_utils.check_workdir(run_dir)
      config_utils.validate_config(config)
      train_launch.sync_config_file(run_dir, config)  # written, or checked against the saved one on a resume
      result = demo.run_demo(config, run_dir, out=out)
      runs.setdefault(v, {})[s] = run_summary(result["rows"])
  summary = summarize(runs, level)
  text = format_tables(summary, equal, level) + "\n\n" + format_seed_table(runs)
  with open(os.path.join(workdir, "compare.md"), "w", encoding="utf-8") as f:
    f.write(text + "\n")
  doc = {"equal": equal, "level": level, "runs": {v: {str(s): r for s, r in by.items()} for v, by in runs.items()},
         "summary": {v: {"seeds": s["seeds"],
                         "final": {k: dataclasses.asdict(i) for k, i in s["final"].items()},
                         "ofsd_phases": {str(r): {k: dataclasses.asdict(i) for k, i in m.items()}
                                         for r, m in s["ofsd_phases"].items()}}
                     for v, s in summary.items()}}
  with open(os.path.join(workdir, "compare.json"), "w", encoding="utf-8") as f:
    json.dump(doc, f, indent=1)
  png = plot(summary, os.path.join(workdir, "compare.png"))
  print("\n" + text + f"\n\ntable: {os.path.join(workdir, 'compare.md')}\nplot:  {png}", file=out or sys.stdout,
        flush=True)
  return {"summary": summary, "text": text, "doc": doc, "plot": png}


def main(argv) -> None:
  del argv
  variants = [v for v in FLAGS.variants if v]
  bad = [s for s in FLAGS.seeds if not s.lstrip("-").isdigit()]
  if bad or not FLAGS.seeds:
    raise SystemExit(f"launch/compare.py: --seeds {','.join(FLAGS.seeds)!r}: a comma-separated list of integers")
  try:
    compare(_CONFIG.value, variants, [int(s) for s in FLAGS.seeds], FLAGS.equal, FLAGS.workdir)
  except ValueError as e:  # a ConfigError names the file / field / flag
    raise SystemExit(f"launch/compare.py: {e}") from None


if __name__ == "__main__":
  FLAGS = flags.FLAGS
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Demo config: configs/demo.py[:smoke][,cache=DIR].",
                                            lock_config=True)
  flags.DEFINE_list("variants", ["search_e1", "grpo_only", "on_policy"], "Variants (configs/demo.py variants()).")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Warm-start (and loop) seeds.")
  flags.DEFINE_enum("equal", "compute", ["compute"], "What the variants are matched on.")
  flags.DEFINE_string("workdir", "workdirs/compare", "Where the runs, compare.md, compare.json and the plot go.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
