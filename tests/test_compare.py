"""launch/compare.py: its statistics against plain numpy and a printed t table, per-run summaries, the tables and
the plot from known numbers, the variants' equal-compute step counts, and a smoke comparison end to end (the smoke
demo, 2 seeds x Search-E1 and on-policy SD; it is also the trainer's on-policy SD test)."""
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import demo as demo_config
from launch import compare
from searche1_jax import config_utils

# Two-sided 95% Student-t quantiles t_{0.975, df} from a printed table.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}


@pytest.mark.parametrize("values", [[0.30, 0.35, 0.41], [0.1, 0.4], [0.2, 0.25, 0.31, 0.18, 0.22]])
def test_mean_interval_equals_numpy_and_the_t_table(values):
  x = np.array(values)
  half = T975[len(x) - 1] * np.sqrt(np.sum((x - x.mean()) ** 2) / (len(x) - 1)) / np.sqrt(len(x))
  got = compare.mean_interval(values)
  assert got.n == len(values) and math.isclose(got.mean, x.mean(), rel_tol=1e-12)
  assert math.isclose(got.hi - got.mean, half, rel_tol=2e-4) and math.isclose(got.mean - got.lo, half, rel_tol=2e-4)


def test_mean_interval_of_one_or_none():
  assert compare.mean_interval([0.5]) == compare.Interval(0.5, 0.5, 0.5, 1)
  assert compare.mean_interval([None, 0.5]).n == 1
  assert compare.mean_interval([]).n == 0 and math.isnan(compare.mean_interval([]).mean)


def _rows(em, sc):
  """Evaluations of a 2-round Search-E1 run: warm start, then (grpo, ofsd) per round."""
  phases = [(0, "init"), (1, "grpo"), (1, "ofsd"), (2, "grpo"), (2, "ofsd")]
  return [{"round": r, "phase": p, "avg_em": e, "multi_hop_em": e / 2, "searches_correct": s,
           "mean_response_tokens": 100.0 + i} for i, ((r, p), e, s) in enumerate(zip(phases, em, sc))]


def _without_ofsd(rows):
  return [r for r in rows if r["phase"] != "ofsd"]


def test_run_summary_final_gain_and_ofsd_phase_changes():
  s = compare.run_summary(_rows([0.1, 0.2, 0.25, 0.3, 0.28], [2.0, 1.9, 1.7, 1.8, 1.75]))
  assert s["avg_em"] == 0.28 and math.isclose(s["gain"], 0.18) and s["multi_hop_em"] == 0.14
  assert s["searches_correct"] == 1.75 and s["mean_response_tokens"] == 104.0 and s["start_em"] == 0.1
  assert [p["round"] for p in s["ofsd_phases"]] == [1, 2]
  assert np.allclose([p["d_em"] for p in s["ofsd_phases"]], [0.05, -0.02])
  assert np.allclose([p["d_searches_correct"] for p in s["ofsd_phases"]], [-0.2, -0.05])
  assert compare.run_summary(_without_ofsd(_rows([0.1, 0.2, 0.2, 0.3, 0.3], [2.0] * 5)))["ofsd_phases"] == []
  with pytest.raises(ValueError, match="without evaluations"):
    compare.run_summary([])


def test_summary_tables_and_plot(tmp_path):
  runs = {"search_e1": {0: compare.run_summary(_rows([0.1, 0.2, 0.25, 0.3, 0.28], [2.0, 1.9, 1.7, 1.8, 1.75])),
                        1: compare.run_summary(_rows([0.12, 0.2, 0.22, 0.32, 0.33], [2.1, 1.8, 1.8, 1.9, 1.7]))},
          "grpo_only": {0: compare.run_summary(_without_ofsd(_rows([0.1, 0.2, 0.2, 0.3, 0.3], [2.0] * 5))),
                        1: compare.run_summary(_without_ofsd(_rows([0.12, 0.21, 0.2, 0.31, 0.3], [2.0] * 5)))}}
  summary = compare.summarize(runs)
  final = summary["search_e1"]["final"]["avg_em"]
  assert math.isclose(final.mean, 0.305) and final.n == 2
  assert math.isclose(final.hi - final.mean, T975[1] * np.std([0.28, 0.33], ddof=1) / np.sqrt(2), rel_tol=2e-4)
  phase1 = summary["search_e1"]["ofsd_phases"][1]["d_em"]
  assert math.isclose(phase1.mean, (0.05 + 0.02) / 2) and summary["grpo_only"]["ofsd_phases"] == {}
  text = compare.format_tables(summary, "compute")
  assert f"| search_e1 | 0,1 | {final.format()} |" in text
  assert "| search_e1 | 1 | 0.035 [" in text and "grpo_only | 1 |" not in text
  seeds = compare.format_seed_table(runs)
  assert "| search_e1 | 1 | 0.120 | 0.330 | +0.210 |" in seeds and "| grpo_only | 0 | 0.100 | 0.300 | +0.200 |" in seeds
  path = compare.plot(summary, str(tmp_path / "compare.png"))
  assert os.path.getsize(path) > 5000


def test_variants_match_the_search_e1_schedule_in_compute():
  config = config_utils.load_config("configs/demo.py")
  v = demo_config.variants(config)
  assert v["search_e1"] == {} and v["grpo_only"] == {"ofsd.enabled": False, "train.grpo_steps_per_round": 12}
  assert v["on_policy"] == {"ofsd.mode": "on_policy", "ofsd.group_size": 8, "train.grpo_steps_per_round": 3}
  with pytest.raises(ValueError, match="only 'compute'"):
    demo_config.variants(config, "wall")
  seeded = compare.seed_config(config, 2, v["grpo_only"])
  assert seeded.seed == 2 and seeded.warm_start.seed == 2 and not seeded.ofsd.enabled
  assert seeded.train.eval_after_grpo and not config.train.eval_after_grpo  # each OFSD phase is measured
  assert seeded.model.hf_dir == seeded.warm_start.out_dir == os.path.join(config.demo.cache_dir, "warm_start_seed2")
  assert config.seed == 0 and config.ofsd.enabled  # the base config is untouched


def test_cli_refuses_unknown_variants_and_bad_seeds(tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for args, msg in ((["--variants", "nope"], "--variants ['nope']: unknown; known: ['grpo_only', 'on_policy', "
                                             "'search_e1']"),
                    (["--seeds", "0,x"], "--seeds '0,x': a comma-separated list of integers")):
    r = subprocess.run([sys.executable, "-m", "launch.compare", "--config", f"configs/demo.py:smoke,cache={tmp_path}",
                        "--workdir", str(tmp_path / "w")] + args, cwd=repo, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert r.returncode != 0 and msg in r.stderr, r.stderr[-2000:]
  assert not os.path.exists(tmp_path / "w")  # nothing ran


@pytest.mark.slow  # ~60 s on 2 cores: 2 warm starts and 4 smoke runs
def test_smoke_comparison_end_to_end(tmp_path):
  config = config_utils.load_config(f"configs/demo.py:smoke,cache={tmp_path / 'cache'}")
  workdir = str(tmp_path / "compare")
  got = compare.compare(config, ["search_e1", "on_policy"], [0, 1], "compute", workdir, out=io.StringIO())
  for name in ("compare.md", "compare.json", "compare.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  with open(os.path.join(workdir, "compare.md")) as f:
    assert f.read().strip() == got["text"]
  # Each seed has its own warm start; the variants of one seed start from the same one.
  cache = str(tmp_path / "cache")
  assert sorted(d for d in os.listdir(cache) if d.startswith("warm_start_seed")) == ["warm_start_seed0",
                                                                                   "warm_start_seed1"]
  finals = {}
  for v in ("search_e1", "on_policy"):
    for seed in (0, 1):
      run = os.path.join(workdir, v, f"seed{seed}")
      with open(os.path.join(run, "config.json")) as f:
        saved = json.load(f)
      assert saved["seed"] == seed and saved["warm_start"]["seed"] == seed
      assert saved["model"]["hf_dir"] == os.path.join(cache, f"warm_start_seed{seed}")
      with open(os.path.join(run, "results.json")) as f:
        rounds = json.load(f)["rounds"]
      finals.setdefault(v, []).append(rounds[-1]["avg_em"])
      with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
      grpo = [r for r in rows if r["phase"] == "grpo"]
      if v == "on_policy":  # L_GRPO + alpha L_SD in every step, no offline phase, 1 step per round (equal compute)
        assert len(grpo) == config.train.num_rounds * demo_config.variants(config)["on_policy"][
            "train.grpo_steps_per_round"]
        assert all(any(k.startswith("sd_") for k in r) and np.isfinite(r["loss"]) for r in grpo)
        assert not [r for r in rows if r["phase"].startswith("ofsd")]
        assert all(r["phase"] != "ofsd" for r in rounds)
      else:
        assert [r["phase"] for r in rounds] == ["init", "grpo", "ofsd"]
  summary = got["summary"]
  for v, values in finals.items():
    assert math.isclose(summary[v]["final"]["avg_em"].mean, float(np.mean(values)))
  assert list(summary["search_e1"]["ofsd_phases"]) == [1] and summary["on_policy"]["ofsd_phases"] == {}
  # A second call reuses the finished runs: same numbers.
  again = compare.compare(config, ["search_e1", "on_policy"], [0, 1], "compute", workdir, out=io.StringIO())
  assert again["doc"] == got["doc"]
