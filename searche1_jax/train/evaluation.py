"""Evaluation: greedy search-agent rollouts over benchmark splits, EM per benchmark, and the published table layout.

`evaluate(...)` rolls out every question of every benchmark once (batched, `rollout.eval.batch_size` questions per
rollout, a progress bar over questions), scores the answer of each trajectory, and writes into `workdir`:

  results.json        per benchmark: n, em, f1, mean_searches, mean_response_tokens, mean_policy_tokens,
                      invalid_action_rate, answered_rate, stop_reasons; 'average' = the unweighted mean over the
                      benchmarks (docs/reference.md's average EM); timings of decoding vs retrieval.
  results.md          the EM table in docs/reference.md's layout (one row, a column per benchmark, then Avg.) and a
                      details table.
  trajectories.jsonl  every trajectory with its decoded text (appended batch by batch, so a crash keeps what ran).

Metric definitions: em = mean Search-R1 EM of the answering turn's answer (0 without an answer); f1 = mean SQuAD
token F1 of the same answer (logged only; not a published number); mean_searches = executed searches per question;
mean_response_tokens = tokens after the prompt (policy + observations); mean_policy_tokens = tokens the policy wrote;
invalid_action_rate = turns with neither a search nor an answer / all turns.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import time
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from searche1_jax import models
from searche1_jax import rewards, sharding
from searche1_jax.agent import rollout as rollout_lib
from searche1_jax.agent import trajectory as trajectory_lib
from searche1_jax.data import qa
from searche1_jax.models import hf, qwen2
from searche1_jax.retrieval import make_retriever
from searche1_jax.train import checkpoint

# Column titles of docs/reference.md / the Search-R1 paper for the seven benchmarks; other names are shown as they are.
BENCHMARK_TITLES = {
    "nq": "NQ", "triviaqa": "TriviaQA", "popqa": "PopQA", "hotpotqa": "HotpotQA", "2wikimultihopqa": "2Wiki",
    "musique": "MuSiQue", "bamboogle": "Bamboogle", "synthetic_world": "World",
}
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
TRAJECTORIES_JSONL = "trajectories.jsonl"


def benchmark_metrics(trajs: Sequence[trajectory_lib.Trajectory]) -> dict[str, Any]:
  """Metrics of one benchmark's trajectories (one per question); see the module docstring."""
  if not trajs:
    return {"n": 0}
  em = [rewards.exact_match(t.answer, t.golden_answers) for t in trajs]
  f1 = [rewards.f1(t.answer, t.golden_answers) for t in trajs]
  turns = sum(t.num_turns for t in trajs)
  return {
      "n": len(trajs),
      "em": float(np.mean(em)),
      "f1": float(np.mean(f1)),
      "mean_searches": float(np.mean([t.num_searches for t in trajs])),
      "mean_response_tokens": float(np.mean([len(t.response_ids) for t in trajs])),
      "mean_policy_tokens": float(np.mean([t.num_policy_tokens for t in trajs])),
      "mean_turns": turns / len(trajs),
      "invalid_action_rate": sum(t.num_invalid for t in trajs) / max(turns, 1),
      "answered_rate": float(np.mean([t.answer is not None for t in trajs])),
      "stop_reasons": dict(collections.Counter(t.stop_reason for t in trajs)),
  }


_AVERAGED = ("em", "f1", "mean_searches", "mean_response_tokens", "mean_policy_tokens", "invalid_action_rate")


def average_metrics(per_benchmark: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
  """Unweighted mean over the benchmarks with at least one question (as the published average EM)."""
  rows = [m for m in per_benchmark.values() if m.get("n", 0) > 0]
  out = {"num_benchmarks": len(rows)}
  for k in _AVERAGED:
    out[k] = float(np.mean([m[k] for m in rows])) if rows else 0.0
  return out


def markdown_table(results: Mapping[str, Any], method: str = "policy") -> str:
  """docs/reference.md's layout: one row per method, EM per benchmark then the average; then a details table."""
  names = list(results["benchmarks"])
  titles = [BENCHMARK_TITLES.get(n, n) for n in names]
  lines = ["| method | " + " | ".join(titles) + " | Avg. |", "|---" * (len(names) + 2) + "|"]
  ems = [f"{results['benchmarks'][n]['em']:.3f}" if results["benchmarks"][n].get("n") else "-" for n in names]
  lines.append(f"| {method} | " + " | ".join(ems) + f" | {results['average']['em']:.3f} |")
  lines += ["", "| benchmark | n | EM | F1 | searches | response tokens | policy tokens | invalid-action rate |",
            "|---|---|---|---|---|---|---|---|"]
  for n, title in zip(names, titles):
    m = results["benchmarks"][n]
    if not m.get("n"):
      lines.append(f"| {title} | 0 | - | - | - | - | - | - |")
      continue
    lines.append(f"| {title} | {m['n']} | {m['em']:.3f} | {m['f1']:.3f} | {m['mean_searches']:.2f} | "
                 f"{m['mean_response_tokens']:.1f} | {m['mean_policy_tokens']:.1f} | "
                 f"{m['invalid_action_rate']:.3f} |")
  return "\n".join(lines) + "\n"


def evaluate(make_session: rollout_lib.SessionFactory, tokenizer, retriever,
             benchmarks: Mapping[str, Sequence[Mapping[str, Any]]], protocol_cfg, rollout_cfg, *,
             workdir: str | None = None, policy_version: int = 0, method: str = "policy",
             progress: bool = True) -> dict[str, Any]:
  """Greedy (or as `make_session` samples) rollouts of every question, one per question; see the module docstring.

  Args:
    make_session: a `rollout.SessionFactory` (e.g. `rollout.sampler_session_factory(..., temperature=0.0)`).
    tokenizer, retriever: as for `rollout.run_rollouts`.
    benchmarks: {benchmark name: question records ('id', 'question', 'golden_answers')}, in table order.
    protocol_cfg, rollout_cfg: the protocol and rollout config blocks (batch size: rollout_cfg.eval.batch_size).
    workdir: where results.json / results.md / trajectories.jsonl go (None: nothing is written).
    policy_version: recorded in the trajectories and results.
    method: the row name of the markdown table.
    progress: show a tqdm progress bar over questions.
  Returns:
    The results dict written to results.json (plus 'markdown').
  """
  batch_size = int(rollout_cfg.eval.batch_size)
  if batch_size < 1:
    raise ValueError(f"rollout.eval.batch_size must be >= 1, got {batch_size}")
  write_trajs = bool(rollout_cfg.eval.write_trajectories) and workdir is not None
  if workdir is not None:
    os.makedirs(workdir, exist_ok=True)
    traj_path = os.path.join(workdir, TRAJECTORIES_JSONL)
    if write_trajs and os.path.exists(traj_path):
      os.remove(traj_path)
  decode_text = lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False)

  total = sum(len(qs) for qs in benchmarks.values())
  bar = tqdm(total=total, desc="eval", unit="q", disable=not progress)
  timing = collections.Counter()
  per_benchmark = {}
  t_start = time.perf_counter()
  try:
    for name, questions in benchmarks.items():
      bar.set_postfix_str(name)
      trajs = []
      for start in range(0, len(questions), batch_size):
        batch = questions[start:start + batch_size]
        res = rollout_lib.run_rollouts(make_session, tokenizer, retriever, batch, protocol_cfg, rollout_cfg,
                                       group_size=1, policy_version=policy_version)
        for t in res.trajectories:
          t.metadata["benchmark"] = name
        for k in ("session_s", "decode_s", "extend_s", "retrieval_s", "total_s", "retrieval_failures",
                  "num_queries"):
          timing[k] += getattr(res.stats, k)
        if write_trajs:
          trajectory_lib.save_jsonl(res.trajectories, traj_path, decode=decode_text, append=True)
        trajs.extend(res.trajectories)
        bar.update(len(batch))
      per_benchmark[name] = benchmark_metrics(trajs)
  finally:
    bar.close()
  results = {
      "benchmarks": per_benchmark,
      "average": average_metrics(per_benchmark),
      "policy_version": policy_version,
      "timing": {**{k: float(v) for k, v in timing.items()}, "wall_s": time.perf_counter() - t_start},
  }
  md = markdown_table(results, method)
  if workdir is not None:
    with open(os.path.join(workdir, RESULTS_JSON), "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2, sort_keys=False)
    with open(os.path.join(workdir, RESULTS_MD), "w", encoding="utf-8") as f:
      f.write(md)
  results["markdown"] = md
  return results


# ------------------------------------------------------------------------------------- from an experiment config

def load_trainer_checkpoint(path: str, config, mesh, rules):
  """The policy params of the trainer's latest orbax checkpoint under `path` (a workdir or its checkpoints/
  directory), placed on `mesh` with `rules` when given. Returns (Qwen2Config, params) like `models.load_hf`."""
  del config
  cfg, params, _, _ = checkpoint.load_policy(path, mesh=mesh, rules=rules)
  return cfg, params


def load_benchmarks(data_cfg, limit: int | None = None) -> dict[str, list[dict]]:
  """{benchmark: questions} for data_cfg.eval_datasets / eval_split, in that order, through searche1_jax.data.qa.

  limit > 0 takes the first `limit` questions of every benchmark (overriding data_cfg.eval_limit)."""
  out = {}
  for name in data_cfg.eval_datasets:
    n = limit if limit else qa.eval_limit(name, data_cfg)
    out[name] = qa.load_split(name, data_cfg.eval_split, qa.source_dir(name, data_cfg), data_cfg.tfds_dir, limit=n)
  return out


def evaluate_from_config(config, workdir: str, *, checkpoint: str | None = None, limit: int | None = None,
                         progress: bool = True) -> dict[str, Any]:
  """Loads the policy, tokenizer, retriever and questions an experiment config names, then `evaluate`s.

  Uses config.model (hf_dir, param_dtype, dtype, optional tokenizer_dir), the optional config.mesh and
  config.sampling blocks, config.retrieval, config.data, config.protocol and config.rollout. `checkpoint`
  (default config.model.hf_dir) is an HF directory, or else goes to the `load_trainer_checkpoint` hook.
  """
  from transformers import AutoTokenizer  # deferred: importing transformers takes ~4 s

  if limit is not None and limit < 0:
    raise ValueError(f"limit must be >= 0, got {limit}")
  ckpt = checkpoint or config.model.get("hf_dir", "")
  if not ckpt:
    raise ValueError("no policy to evaluate: pass --checkpoint DIR or set config.model.hf_dir")
  if not os.path.isdir(ckpt):
    raise FileNotFoundError(f"checkpoint {ckpt}: directory not found")
  mesh, rules = sharding.mesh_and_rules(config)
  if hf.is_hf_checkpoint(ckpt):
    model_cfg, params = models.load_hf(ckpt, dtype=jnp.dtype(config.model.get("param_dtype", "float32")),
                                       mesh=mesh, rules=rules, compute_dtype=config.model.get("dtype", None))
    model_cfg = model_cfg.replace(**qwen2.numerics_from_block(config.model))  # remat, attention from the config
    model_dir = ckpt
  else:
    model_cfg, params = load_trainer_checkpoint(ckpt, config, mesh, rules)
    model_dir = config.model.get("hf_dir", "")
  tokenizer_dir = config.model.get("tokenizer_dir", "") or model_dir
  if not tokenizer_dir:
    raise ValueError("no tokenizer: set config.model.tokenizer_dir (or config.model.hf_dir)")
  tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
  eos_ids = hf.eos_ids_for(tokenizer, model_dir)
  logging.info("policy %s (%d params), tokenizer %s, eos ids %s", ckpt, model_cfg.num_params, tokenizer_dir,
               eos_ids)
  retriever = make_retriever(config.retrieval)
  benchmarks = load_benchmarks(config.data, limit)
  ev = config.rollout.eval
  sampling_block = config.get("sampling")
  make_session = rollout_lib.sampler_session_factory(
      params, model_cfg, temperature=float(ev.temperature), eos_ids=eos_ids, seed=int(ev.seed), mesh=mesh,
      rules=rules, options=sampling_block if sampling_block is not None and len(sampling_block) else None)
  return evaluate(make_session, tokenizer, retriever, benchmarks, config.protocol, config.rollout,
                  workdir=workdir, progress=progress, method=os.path.basename(os.path.normpath(ckpt)))
