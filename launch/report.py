r"""Plots and a markdown summary of a training run, from WORKDIR/results.json and WORKDIR/metrics.jsonl.

  python -m launch.report WORKDIR [--out WORKDIR]

Writes OUT/report.md (per-evaluation table: EM per split, average, mean searches, mean response tokens,
invalid-action rate; timings per phase) and OUT/report/*.png:
  em.png               EM per benchmark and the average, per evaluation (results.json)
  reward.png           training reward per step                        (metrics.jsonl)
  searches.png         searches per question: per step and per evaluation
  response_tokens.png  response length: per step and per evaluation
  kl.png               KL to the reference (GRPO) and the OFSD divergence per step
  loss.png             loss per step and phase
  timings.png          seconds per phase of each round                 (results.json timings)
A metric that was not logged is skipped with a note in report.md; nothing else is required to exist.
metrics.jsonl keys looked for (first present per phase): see SERIES.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

import matplotlib

# Per plot: metrics.jsonl keys tried in order, per phase (the first one a phase logs is drawn).
SERIES: dict[str, tuple[str, ...]] = {
    "reward": ("reward", "reward_mean", "rewards/mean", "em"),
    "searches": ("num_searches", "mean_searches", "searches"),
    "response_tokens": ("response_tokens", "mean_response_tokens", "response_length"),
    "kl": ("kl_ref", "kl", "kl_to_ref", "ref_kl", "divergence", "ofsd_divergence", "sd_loss"),
    "loss": ("loss",),
}
TITLES = {"reward": "training reward", "searches": "searches per question",
          "response_tokens": "response tokens per trajectory", "kl": "KL to reference / OFSD divergence",
          "loss": "loss"}
RESULTS_KEYS = {"searches": "mean_searches", "response_tokens": "mean_response_tokens"}


def _number(v: Any) -> float | None:
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    return None
  return float(v)


def read_results(workdir: str, notes: list[str]) -> list[dict]:
  path = os.path.join(workdir, "results.json")
  if not os.path.isfile(path):
    notes.append(f"no {path}: evaluation table and EM/timing plots skipped")
    return []
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    notes.append(f"{path}: invalid JSON (line {e.lineno}): evaluation table and EM/timing plots skipped")
    return []
  rounds = data.get("rounds") if isinstance(data, dict) else None
  if not isinstance(rounds, list):
    notes.append(f"{path}: no 'rounds' list: evaluation table and EM/timing plots skipped")
    return []
  return [r for r in rounds if isinstance(r, dict)]


def read_metrics(workdir: str, notes: list[str]) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    notes.append(f"no {path}: per-step plots skipped")
    return []
  rows, bad = [], 0
  with open(path, encoding="utf-8") as f:
    for line in f:
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        bad += 1  # e.g. a line cut by a crash mid-write
        continue
      if isinstance(row, dict) and _number(row.get("step")) is not None:
        rows.append(row)
  if bad:
    notes.append(f"{path}: {bad} unreadable line(s) skipped")
  return rows


def _label(r: dict, i: int) -> str:
  rnd, phase = r.get("round", i), r.get("phase", "")
  return f"r{rnd} {phase}".strip()


def _fmt(v: Any, digits: int = 3) -> str:
  n = _number(v)
  return "-" if n is None else f"{n:.{digits}f}"


def splits_of(rounds: list[dict]) -> list[str]:
  seen: list[str] = []
  for r in rounds:
    for s in (r.get("em") or {}) if isinstance(r.get("em"), dict) else {}:
      if s not in seen:
        seen.append(s)
  return seen


def markdown_table(rounds: list[dict]) -> str:
  splits = splits_of(rounds)
  head = ["round", "phase"] + splits + ["avg EM", "mean searches", "mean response tokens", "invalid rate"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for i, r in enumerate(rounds):
    em = r.get("em") if isinstance(r.get("em"), dict) else {}
    cells = [str(r.get("round", i)), str(r.get("phase", ""))] + [_fmt(em.get(s)) for s in splits]
    cells += [_fmt(r.get("avg_em")), _fmt(r.get("mean_searches"), 2), _fmt(r.get("mean_response_tokens"), 1),
              _fmt(r.get("invalid_rate"))]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def timings_table(rounds: list[dict]) -> str | None:
  phases: list[str] = []
  for r in rounds:
    for k in (r.get("timings") or {}) if isinstance(r.get("timings"), dict) else {}:
      if k not in phases:
        phases.append(k)
  if not phases:
    return None
  lines = ["| round | phase | " + " | ".join(phases) + " | total |", "|" + "---|" * (len(phases) + 3)]
  for i, r in enumerate(rounds):
    t = r.get("timings") if isinstance(r.get("timings"), dict) else {}
    vals = [_number(t.get(p)) for p in phases]
    total = sum(v for v in vals if v is not None)
    lines.append(f"| {r.get('round', i)} | {r.get('phase', '')} | " +
                 " | ".join("-" if v is None else f"{v:.1f}" for v in vals) + f" | {total:.1f} |")
  return "\n".join(lines)


def step_series(rows: list[dict], keys: tuple[str, ...]) -> dict[str, tuple[str, list[float], list[float]]]:
  """{phase: (key, steps, values)} using, per phase, the first of `keys` that phase logs."""
  phases: list[str] = []
  for row in rows:
    p = str(row.get("phase", ""))
    if p not in phases:
      phases.append(p)
  out = {}
  for p in phases:
    prow = [r for r in rows if str(r.get("phase", "")) == p]
    for k in keys:
      pts = [(float(r["step"]), _number(r.get(k))) for r in prow]
      pts = [(s, v) for s, v in pts if v is not None]
      if pts:
        out[p] = (k, [s for s, _ in pts], [v for _, v in pts])
        break
  return out


def _new_figure(title: str):
  import matplotlib.pyplot as plt  # deferred: importing pyplot picks a backend; make_report chose Agg
  fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  return fig, ax


def _save(fig, path: str) -> None:
  import matplotlib.pyplot as plt  # deferred: importing pyplot picks a backend; make_report chose Agg
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_em_lines(title: str, labels: list[str], series: dict[str, list[float | None]], path: str,
                  styles: dict[str, dict] | None = None) -> None:
  """One EM line per series (None = no point) over evaluations `labels`; `styles` overrides a line's
  matplotlib kwargs (default: circles, width 1.2). launch/demo.py draws its per-type curves with it."""
  fig, ax = _new_figure(title)
  x = list(range(len(labels)))
  for name, ys in series.items():
    style = (styles or {}).get(name, dict(marker="o", lw=1.2))
    ax.plot(x, [math.nan if y is None else y for y in ys], **style, label=name)
  ax.set_xticks(x, labels, rotation=30, ha="right")
  ax.set_ylabel("EM")
  ax.legend(fontsize=7, ncol=2)
  _save(fig, path)


def plot_em(rounds: list[dict], path: str) -> str | None:
  splits = splits_of(rounds)
  avg = [_number(r.get("avg_em")) for r in rounds]
  if not splits and all(v is None for v in avg):
    return "EM plot skipped: no 'em' / 'avg_em' in results.json"
  series = {s: [_number((r.get("em") or {}).get(s)) if isinstance(r.get("em"), dict) else None for r in rounds]
            for s in splits}
  if any(v is not None for v in avg):
    series["average"] = avg
  plot_em_lines("exact match per benchmark", [_label(r, i) for i, r in enumerate(rounds)], series, path,
                styles={"average": dict(marker="s", lw=2.6, color="black")})
  return None


def plot_steps(name: str, rows: list[dict], rounds: list[dict], path: str) -> str | None:
  series = step_series(rows, SERIES[name])
  res_key = RESULTS_KEYS.get(name)
  evals = [(i, _number(r.get(res_key))) for i, r in enumerate(rounds)] if res_key else []
  evals = [(i, v) for i, v in evals if v is not None]
  if not series and not evals:
    looked = list(SERIES[name]) + ([f"results.json {res_key}"] if res_key else [])
    return f"{name} plot skipped: not logged (looked for {', '.join(looked)})"
  fig, ax = _new_figure(TITLES[name])
  for phase, (key, steps, values) in series.items():
    ax.plot(steps, values, lw=1.0, label=f"{phase}: {key}" if phase else key)
  if series:
    ax.set_xlabel("train step")
  if evals:
    # Evaluations sit at the global step of the last train row before them when known; else on a secondary axis.
    ax2 = ax.twiny() if series else ax
    ax2.plot([i for i, _ in evals], [v for _, v in evals], marker="D", ls="--", color="black",
             label=f"eval: {res_key}")
    ax2.set_xticks([i for i, _ in evals], [_label(rounds[i], i) for i, _ in evals], fontsize=7)
    ax2.legend(loc="upper right", fontsize=7)
  if series:
    ax.legend(loc="upper left", fontsize=7)
  _save(fig, path)
  return None


def plot_timings(rounds: list[dict], path: str) -> str | None:
  phases: list[str] = []
  for r in rounds:
    for k in (r.get("timings") or {}) if isinstance(r.get("timings"), dict) else {}:
      if k not in phases:
        phases.append(k)
  if not phases:
    return "timings plot skipped: no 'timings' in results.json"
  fig, ax = _new_figure("seconds per phase")
  x = list(range(len(rounds)))
  bottom = [0.0] * len(rounds)
  for p in phases:
    vals = [(_number((r.get("timings") or {}).get(p)) or 0.0) if isinstance(r.get("timings"), dict) else 0.0
            for r in rounds]
    ax.bar(x, vals, bottom=bottom, label=p)
    bottom = [b + v for b, v in zip(bottom, vals)]
  ax.set_xticks(x, [_label(r, i) for i, r in enumerate(rounds)], rotation=30, ha="right")
  ax.set_ylabel("seconds")
  ax.legend(fontsize=7)
  _save(fig, path)
  return None


def make_report(workdir: str, out: str | None = None) -> dict:
  """Write OUT/report.md and OUT/report/*.png. Returns {'plots': [paths], 'notes': [...], 'markdown': path}."""
  matplotlib.use("Agg")
  out = out or workdir
  plot_dir = os.path.join(out, "report")
  os.makedirs(plot_dir, exist_ok=True)
  notes: list[str] = []
  rounds = read_results(workdir, notes)
  rows = read_metrics(workdir, notes)
  plots = []

  def attempt(name: str, fn, *args) -> None:
    path = os.path.join(plot_dir, f"{name}.png")
    note = fn(*args, path)
    if note:
      notes.append(note)
      if os.path.exists(path):  # a stale plot from an earlier report must not look current
        os.remove(path)
    else:
      plots.append(path)

  if rounds:
    attempt("em", plot_em, rounds)
  for name in SERIES:
    if rows or (rounds and name in RESULTS_KEYS):
      attempt(name, lambda *a, n=name: plot_steps(n, *a), rows, rounds)
    else:
      notes.append(f"{name} plot skipped: no metrics.jsonl rows")
  if rounds:
    attempt("timings", plot_timings, rounds)

  md = [f"# Report: {os.path.abspath(workdir)}", ""]
  if rounds:
    md += ["## Evaluations (results.json)", "", markdown_table(rounds), ""]
    tt = timings_table(rounds)
    if tt:
      md += ["## Timings per round (seconds)", "", tt, ""]
  if rows:
    last = rows[-1]
    md += [f"Train steps logged: {len(rows)} (last step {int(last['step'])}, phase {last.get('phase', '')!r}).", ""]
  if plots:
    md += ["## Plots", ""] + [f"![{os.path.basename(p)[:-4]}]({os.path.relpath(p, out)})" for p in plots] + [""]
  if notes:
    md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
  md_path = os.path.join(out, "report.md")
  with open(md_path, "w", encoding="utf-8") as f:
    f.write("\n".join(md))
  return {"plots": plots, "notes": notes, "markdown": md_path}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m launch.report", description=__doc__.split("\n")[0])
  p.add_argument("workdir", help="training run directory (results.json, metrics.jsonl)")
  p.add_argument("--out", default=None, help="where report.md and report/*.png go (default: WORKDIR)")
  args = p.parse_args(argv)
  if not os.path.isdir(args.workdir):
    print(f"launch/report.py: {args.workdir}: not a directory", file=sys.stderr)
    return 2
  result = make_report(args.workdir, args.out)
  print(f"wrote {result['markdown']} and {len(result['plots'])} plot(s)")
  for n in result["notes"]:
    print(f"note: {n}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
