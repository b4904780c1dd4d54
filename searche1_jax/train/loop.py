"""The self-evolution trainer: GRPO rounds interleaved with OFSD phases, evaluation, checkpoints and resume.

    eval (round 0, 'init')
    for round r in 1..R:
        GRPO phase: `train.grpo_steps_per_round` steps of  rollouts -> EM reward -> group advantages -> update
        OFSD phase (ofsd.enabled and ofsd.mode == 'offline'): snapshot = teacher; rollouts on training questions;
                   pairs; teacher targets computed once; `ofsd.epochs` passes of student updates
        eval (round r)

The host steers and the device computes: rollouts are Python over the jitted sampler with retrieval on the host
between turns; every update is one call of a jitted, sharded, donated train step.

Everything resumes. A checkpoint holds the params, both optimizer states, the step counters, the cursor (round,
phase, step within the phase, position in the training-question stream) and, inside an OFSD phase, the target
buffer. Every random choice is a function of (config.seed, round, phase, step) and the question stream is a
seeded permutation per epoch, so a run killed at any moment and restarted from its last checkpoint replays
exactly the steps an uninterrupted run would have taken (same metrics, same params).

Files in WORKDIR: results.json (one entry per evaluation), metrics.jsonl (one line per train step),
tensorboard/, checkpoints/, eval/<round>_<phase>/ (results.md, trajectories.jsonl), samples.jsonl (a few
decoded training trajectories per round).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from searche1_jax import config_utils, sharding
from searche1_jax import rewards
from searche1_jax import sampling
from searche1_jax.agent import rollout as rollout_lib
from searche1_jax.agent import trajectory as trajectory_lib
from searche1_jax.data import qa
from searche1_jax.models import hf
from searche1_jax.retrieval import make_retriever
from searche1_jax.rl import grpo as grpo_math
from searche1_jax.rl import grpo_loss, ofsd_loss, ofsd_phase
from searche1_jax.train import checkpoint as checkpoint_lib
from searche1_jax.train import evaluation
from searche1_jax.train import metrics as metrics_lib
from searche1_jax.train import faults, ofsd_runner
from searche1_jax.train import optim, steps

RESULTS_JSON = "results.json"
SAMPLES_JSONL = "samples.jsonl"
PHASES = ("init", "grpo", "ofsd", "eval", "done")


@dataclasses.dataclass
class Cursor:
  """Where the run is. Saved in every checkpoint's meta."""
  global_step: int = 0  # train updates so far (GRPO + OFSD): the x-axis of metrics.jsonl
  round: int = 1  # the round in progress (1-based; round 0 is the starting evaluation)
  phase: str = "init"  # the phase in progress, one of PHASES
  phase_step: int = 0  # steps done inside the phase
  data_position: int = 0  # training questions consumed by GRPO rollouts (the question stream)
  ofsd_position: int = 0  # training questions consumed by OFSD rollouts (a second stream, its own seed)
  metric_rows: int = 0  # lines in metrics.jsonl when the checkpoint was taken


def _seed(config, *parts) -> int:
  """A 31-bit seed that is a pure function of the run seed and the given parts (round, phase, step...).

  Strings go through crc32, not hash(): Python's string hash changes from process to process, and a resumed
  run must draw exactly the seeds the interrupted one drew."""
  words = [int(config.seed)] + [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]
  return int(np.random.SeedSequence(words).generate_state(1)[0] & 0x7FFFFFFF)


class QuestionStream:
  """Training questions in a seeded order: epoch e is permutation(seed, e); position p is a pure index."""

  def __init__(self, questions: list[dict], seed: int):
    if not questions:
      raise ValueError("the training split is empty: nothing to train on (check config.data.train_dataset)")
    self.questions = questions
    self.seed = seed
    self._perms: dict[int, np.ndarray] = {}

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.questions))
    return self._perms[epoch]

  def take(self, position: int, n: int) -> list[dict]:
    out = []
    for p in range(position, position + n):
      epoch, i = divmod(p, len(self.questions))
      out.append(self.questions[int(self._perm(epoch)[i])])
    return out


def _mean(xs) -> float:
  xs = list(xs)
  return float(np.mean(xs)) if xs else 0.0


def rollout_summary(trajs: list[trajectory_lib.Trajectory], stats: rollout_lib.RolloutStats) -> dict[str, float]:
  """Scalars of one rollout batch for metrics.jsonl."""
  rewards = [t.reward or 0.0 for t in trajs]
  correct = [t for t in trajs if (t.reward or 0.0) > 0]
  return {
      "reward": _mean(rewards),
      "searches": _mean(t.num_searches for t in trajs),
      "searches_correct": _mean(t.num_searches for t in correct),
      "response_tokens": _mean(len(t.response_ids) for t in trajs),
      "policy_tokens": _mean(t.num_policy_tokens for t in trajs),
      "invalid_turns": float(stats.num_invalid_turns),
      "answered": _mean(t.answer is not None for t in trajs),
      "time_rollout_s": stats.total_s - stats.retrieval_s,
      "time_retrieval_s": stats.retrieval_s,
  }


def eval_entry(results: dict, cursor_round: int, phase: str, global_step: int, trajs=None) -> dict:
  """One results.json entry from `evaluation.evaluate` output."""
  bench = results["benchmarks"]
  entry = {
      "round": cursor_round, "phase": phase, "global_step": global_step,
      "em": {k: v["em"] for k, v in bench.items() if v.get("n")},
      "avg_em": results["average"]["em"],
      "mean_searches": results["average"]["mean_searches"],
      "mean_response_tokens": results["average"]["mean_response_tokens"],
      "invalid_rate": results["average"]["invalid_action_rate"],
      "benchmarks": bench,
  }
  if trajs:
    entry["by_type"] = metrics_by_type(trajs)
  return entry


def metrics_by_type(trajs) -> dict[str, dict[str, float]]:
  """EM, searches and searches on correct answers per question type (metadata['type'] of the question)."""
  groups = collections.defaultdict(list)
  for t in trajs:
    qtype = (t.metadata or {}).get("type")
    if qtype:
      groups[qtype].append(t)
  out = {}
  for qtype, ts in sorted(groups.items()):
    em = [rewards.exact_match(t.answer, t.golden_answers) for t in ts]
    out[qtype] = {"n": len(ts), "em": _mean(em), "mean_searches": _mean(t.num_searches for t in ts),
                  "searches_correct": _mean(t.num_searches for t, e in zip(ts, em) if e),
                  "mean_response_tokens": _mean(len(t.response_ids) for t in ts)}
  return out


class _DropOrbaxInfo(logging.Filter):
  """Orbax logs every checkpoint step at INFO through absl; keep its warnings and errors only."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname.replace("\\", "/")


def quiet_orbax() -> None:
  for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
    if not any(isinstance(f, _DropOrbaxInfo) for f in handler.filters):
      handler.addFilter(_DropOrbaxInfo())


class Trainer:
  """Owns the policy, the steps, the data streams and the run's files. `run()` executes the schedule."""

  def __init__(self, config, workdir: str):
    from transformers import AutoTokenizer  # deferred: importing transformers takes ~4 s

    self.config = config
    self.workdir = os.path.abspath(workdir)
    os.makedirs(self.workdir, exist_ok=True)
    self.is_main = jax.process_index() == 0
    self.timings: collections.Counter = collections.Counter()

    mesh, self.rules = sharding.mesh_and_rules(config)
    self.mesh = mesh if mesh is not None else sharding.make_mesh(1, 1, 1)

    model_block = config.model
    self.hf_dir = model_block.get("hf_dir", "")
    if not self.hf_dir:
      raise ValueError("config.model.hf_dir is empty: the trainer starts from an HF checkpoint directory "
                       "(a Qwen2.5 download, or the demo's warm start)")
    if not hf.is_hf_checkpoint(self.hf_dir):
      raise FileNotFoundError(f"config.model.hf_dir={self.hf_dir!r}: no config.json + *.safetensors there")
    # The checkpoint's shapes with the block's numerics (dtypes, remat, attention).
    self.model_cfg, self.init_params = hf.model_from_config(model_block, mesh=self.mesh, rules=self.rules)
    tokenizer_dir = model_block.get("tokenizer_dir", "") or self.hf_dir
    self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    self.tokenizer_dir = tokenizer_dir
    self.eos_ids = hf.eos_ids_for(self.tokenizer, self.hf_dir)
    self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
    self.retriever = make_retriever(config.retrieval)

    data = config.data
    train = qa.load_split(data.train_dataset, data.train_split, qa.source_dir(data.train_dataset, data),
                          data.tfds_dir)
    # Every process reads the whole stream: each steers every row of the (global) rollout and learner batches.
    self.stream = QuestionStream(train, _seed(config, "grpo-data"))
    self.ofsd_stream = QuestionStream(train, _seed(config, "ofsd-data"))
    self.benchmarks = evaluation.load_benchmarks(data)

    t = config.train
    self.group_size = int(config.grpo.group_size)
    self.updates_per_step = max(1, int(t.prompts_per_step) // int(t.mini_batch_prompts)) * int(t.ppo_epochs)
    # At least 1: with grpo_steps_per_round = 0 (OFSD phases only) the GRPO schedule exists but is never stepped.
    total_updates = max(int(t.num_rounds) * int(t.grpo_steps_per_round) * self.updates_per_step, 1)
    self.grpo_tx = optim.make_optimizer(config.optim, total_updates)
    # The config's blocks, typed once (config_utils validated them); the steps below take these objects.
    grpo_options = grpo_loss.GRPOOptions.from_config(config.grpo)
    ofsd_options = (ofsd_phase.OfsdOptions.from_config(config.ofsd, config.protocol.template)
                    if bool(config.ofsd.enabled) else None)
    self.ofsd_options = ofsd_options if ofsd_options and config.ofsd.mode == "offline" else None
    # The on-policy OFSD variant replaces the GRPO loss with L_GRPO + alpha * L_SD (rl/ofsd_loss.py).
    self.on_policy = ofsd_options if ofsd_options and config.ofsd.mode == "on_policy" else None
    loss_kw = ({"loss_fn": ofsd_loss.grpo_sd_loss_fn(self.model_cfg, grpo_options, self.on_policy.divergence)}
               if self.on_policy else {})
    self.grpo = steps.make_grpo_step(self.model_cfg, grpo_options, self.grpo_tx, self.mesh, rules=self.rules,
                                     lr_schedule=optim.make_schedule(config.optim, total_updates), **loss_kw)
    o = self.grpo.options
    # Zero-advantage rows add nothing to the loss or its gradient without a KL term: the learner skips them (the
    # denominator still counts them, so the update is the same; grpo_loss.learner_rows). Needs one mini-batch per
    # rollout batch (several would split a different set of rows), and one process (hosts would pick different
    # row counts).
    self.skip_zero_advantage = (bool(config.grpo.skip_zero_advantage_rows) and not o.uses_ref
                                and self.on_policy is None and jax.process_count() == 1
                                and int(t.mini_batch_prompts) == int(t.prompts_per_step))
    self.batch_multiple = int(o.num_microbatches) * steps.batch_axes_size(self.mesh, self.rules)
    self.length_buckets = tuple(t.length_buckets) or None  # learner batch lengths (None: powers of two)
    # 'precompute' reference mode: the frozen reference lives outside the train state (on the host if asked).
    self.ref_params = (self.grpo.place_ref_params(self.init_params)
                       if o.uses_ref and o.ref_logprobs == "precompute" else None)
    self.ofsd_enabled = self.ofsd_options is not None
    self._ofsd = None  # built lazily (its own step and optimizer)

    self.ckpt = checkpoint_lib.Checkpointer(os.path.join(self.workdir, "checkpoints"),
                                            keep=int(config.checkpoint.keep),
                                            async_save=bool(config.checkpoint.async_save))
    self.cursor, self.state, self.ofsd_carry = self._restore_or_init()
    resumed = self.ckpt.latest_step() is not None
    self.metrics = metrics_lib.MetricsWriter(
        self.workdir, resume_step=self.cursor.global_step if resumed else None,
        keep_rows=self.cursor.metric_rows if resumed else None, tensorboard=bool(config.logging.tensorboard))
    self.results = self._load_results()

  # --------------------------------------------------------------------------------------------- state

  def _fresh_state(self):
    ref = self.init_params if self.grpo.options.uses_ref and self.grpo.options.ref_logprobs == "in_step" else None
    return self.grpo.init_state(self.init_params, ref)

  def _checkpoint_tree(self) -> dict:
    tree = {"params": self.state.params, "opt_state": self.state.opt_state, "step": self.state.step}
    if self.ofsd_carry is not None:
      tree["ofsd"] = self.ofsd_carry.state_tree()
    return tree

  def _restore_or_init(self):
    """The newest readable checkpoint's (cursor, state, ofsd_carry), or a fresh start when there is none. A newest
    checkpoint that cannot be read (corrupt, or cut short by a kill mid-write) is skipped with a warning naming it;
    if none can be read the error names the directory (starting over would overwrite the run's records)."""
    self.state = self._fresh_state()
    steps = sorted(self.ckpt.all_steps(), reverse=True)
    if not steps:
      return Cursor(), self.state, None
    errors = []
    for step in steps:
      try:
        out = self._restore(step)
      except Exception as e:  # noqa: BLE001  any unreadable checkpoint: try the one before
        reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
        errors.append(f"checkpoint {step}: {reason}")
        logging.warning("cannot restore checkpoint %d of %s (%s); trying the previous one", step,
                        self.ckpt.directory, reason)
        continue
      logging.info("resumed from checkpoint %d: %s", step, out[0])
      return out
    raise RuntimeError(f"{self.ckpt.directory}: no checkpoint could be restored; move it aside to start over:\n"
                       + "\n".join(errors))

  def _restore(self, step: int):
    meta = self.ckpt.restore_meta(step)
    cursor = Cursor(**meta["cursor"])
    ofsd_carry = None
    abstract = {"params": self.state.params, "opt_state": self.state.opt_state, "step": self.state.step}
    # A checkpoint written on entering the OFSD phase (before its buffer exists) has no OFSD subtree; checkpoints
    # from before this flag was recorded always had one.
    if cursor.phase == "ofsd" and meta.get("ofsd_buffer", True):
      ofsd_carry = self._ofsd_runner().empty_carry(self.state.params)
      abstract["ofsd"] = ofsd_carry.state_tree()
    restored, meta, extra = self.ckpt.restore(step, checkpoint_lib.abstract_like(abstract))
    state = self.state.replace(params=restored["params"], opt_state=restored["opt_state"], step=restored["step"])
    if ofsd_carry is not None:
      ofsd_carry = ofsd_carry.restored(restored["ofsd"], extra)
    return cursor, state, ofsd_carry

  def save(self, force_meta: dict | None = None) -> None:
    self.cursor.metric_rows = self.metrics.rows
    meta = {"cursor": dataclasses.asdict(self.cursor), "model_config": dataclasses.asdict(self.model_cfg),
            "hf_dir": self.hf_dir, "tokenizer_dir": self.tokenizer_dir, "policy_version": self.cursor.global_step,
            "ofsd_buffer": self.ofsd_carry is not None}
    meta.update(force_meta or {})
    extra = self.ofsd_carry.extra() if self.ofsd_carry is not None else None
    # The checkpoint id is the save counter: several saves can share a global step (phase boundaries).
    latest = self.ckpt.latest_step()
    self.ckpt.save(0 if latest is None else latest + 1, self._checkpoint_tree(), meta, extra)
    faults.point("checkpoint_write")

  # --------------------------------------------------------------------------------------------- results

  def _load_results(self) -> list[dict]:
    path = os.path.join(self.workdir, RESULTS_JSON)
    if not os.path.exists(path):
      return []
    with open(path, encoding="utf-8") as f:
      rounds = json.load(f).get("rounds", [])
    # Entries past the checkpoint (written, then killed before the next save) are recomputed identically.
    return [e for e in rounds if e["global_step"] <= self.cursor.global_step]

  def _write_results(self) -> None:
    if not self.is_main:
      return
    path = os.path.join(self.workdir, RESULTS_JSON)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump({"rounds": self.results}, f, indent=2)
    os.replace(path + ".tmp", path)

  # --------------------------------------------------------------------------------------------- pieces

  def session_factory(self, params, *, temperature: float, seed: int):
    s = self.config.sampling
    return rollout_lib.sampler_session_factory(
        params, self.model_cfg, temperature=temperature, top_p=float(s.top_p), top_k=int(s.top_k),
        eos_ids=self.eos_ids, seed=seed, mesh=self.mesh if self.mesh.size > 1 else None, rules=self.rules,
        options=sampling.SamplerOptions.from_config(s))

  def rollouts(self, params, questions, *, group_size: int, temperature: float, seed: int, tag: str = ""):
    """Rollouts; wall time goes to timings[tag + 'rollout'] and timings[tag + 'retrieval'] (tag '' = GRPO's)."""
    t0 = time.perf_counter()
    res = rollout_lib.run_rollouts(self.session_factory(params, temperature=temperature, seed=seed),
                                   self.tokenizer, self.retriever, questions, self.config.protocol,
                                   self.config.rollout, group_size=group_size,
                                   policy_version=self.cursor.global_step)
    self.timings[tag + "retrieval"] += res.stats.retrieval_s
    self.timings[tag + "rollout"] += time.perf_counter() - t0 - res.stats.retrieval_s
    return res

  def evaluate(self, phase: str) -> dict:
    t0 = time.perf_counter()
    c = self.config.rollout.eval
    name = f"round{self.cursor.round if phase != 'init' else 0:03d}_{phase}"
    out_dir = os.path.join(self.workdir, "eval", name)
    make = self.session_factory(self.state.params, temperature=float(c.temperature), seed=int(c.seed))
    res = evaluation.evaluate(make, self.tokenizer, self.retriever, self.benchmarks, self.config.protocol,
                              self.config.rollout, workdir=out_dir if self.is_main else None,
                              policy_version=self.cursor.global_step, method=name, progress=self.is_main)
    faults.point("eval")
    trajs = []
    traj_path = os.path.join(out_dir, evaluation.TRAJECTORIES_JSONL)
    if self.is_main and os.path.exists(traj_path):
      trajs = trajectory_lib.load_jsonl(traj_path)
    self.timings["eval"] += time.perf_counter() - t0
    entry = eval_entry(res, 0 if phase == "init" else self.cursor.round, phase, self.cursor.global_step, trajs)
    entry["timings"] = {k: round(v, 3) for k, v in self.timings.items()}
    self.timings.clear()
    self.results = [e for e in self.results if (e["round"], e["phase"]) != (entry["round"], entry["phase"])]
    self.results.append(entry)
    self._write_results()
    self.metrics.scalars(self.cursor.global_step, "eval", {"avg_em": entry["avg_em"],
                                                           "mean_searches": entry["mean_searches"],
                                                           **{f"em/{k}": v for k, v in entry["em"].items()}})
    logging.info("eval %s: avg EM %.3f, searches %.2f", name, entry["avg_em"], entry["mean_searches"])
    return entry

  def log_samples(self, trajs, tag: str, n: int) -> None:
    if not self.is_main or n <= 0:
      return
    decode = lambda ids: self.tokenizer.decode(list(ids), skip_special_tokens=False)
    with open(os.path.join(self.workdir, SAMPLES_JSONL), "a", encoding="utf-8") as f:
      for t in trajs[:n]:
        row = {"global_step": self.cursor.global_step, "round": self.cursor.round, "tag": tag,
               **t.to_json(decode)}
        f.write(json.dumps({k: row[k] for k in ("global_step", "round", "tag", "question", "golden_answers",
                                                "response_text", "reward", "num_searches")}) + "\n")
        self.metrics.text(self.cursor.global_step, tag,
                          f"Q: {t.question}\n\ngold: {t.golden_answers}\n\nreward: {t.reward}\n\n"
                          f"{row['response_text']}")

  # --------------------------------------------------------------------------------------------- GRPO

  def grpo_step(self) -> dict:
    """One GRPO step: rollouts on the next questions, advantages, `updates_per_step` optimizer updates."""
    t = self.config.train
    c = self.cursor
    questions = self.stream.take(c.data_position, int(t.prompts_per_step))
    seed = _seed(self.config, "grpo", c.round, c.phase_step)
    res = self.rollouts(self.state.params, questions, group_size=self.group_size,
                        temperature=float(self.config.sampling.temperature), seed=seed)
    trajs = res.trajectories
    faults.point("grpo_rollout")
    rewards = np.asarray([tr.reward or 0.0 for tr in trajs], np.float32)
    adv = np.asarray(grpo_math.group_advantages(jnp.asarray(rewards), self.group_size,
                                                estimator=self.config.grpo.estimator,
                                                eps=float(self.config.grpo.adv_eps)))
    pad_to = self.length_buckets
    batch = trajectory_lib.to_batch(trajs, adv, pad_to=pad_to, pad_id=self.pad_id)
    rows = np.arange(len(trajs))
    if self.skip_zero_advantage:
      rows, extra = grpo_loss.learner_rows(adv, batch["loss_mask"], self.grpo.options.agg, multiple=self.batch_multiple)
      if len(rows) < len(trajs):  # rebuilt from the kept rows: their own (often shorter) length bucket
        batch = trajectory_lib.to_batch([trajs[i] for i in rows], adv[rows], pad_to=pad_to, pad_id=self.pad_id)
        batch["denominator_extra"] = extra
    if self.on_policy is not None:
      batch.update(ofsd_phase.on_policy_sd_fields(trajs, batch, self.tokenizer, self.on_policy,
                                                  step=self.cursor.global_step, agg=self.grpo.options.agg))
    t0 = time.perf_counter()
    prepared = self.grpo.prepare_batch(self.state, batch, self.ref_params)
    n = len(rows)
    per_update = n * int(t.mini_batch_prompts) // int(t.prompts_per_step) if self.updates_per_step > 1 else n
    order = np.arange(n)
    # On-policy SD over several updates: each update's sd_weight from its own rows (alpha exact per update).
    sd_host = ({k: batch[k] for k in ("loss_mask", "distill_mask", "sd_weight")}
               if self.on_policy is not None and per_update < n else None)
    step_metrics = []
    for epoch in range(int(t.ppo_epochs)):
      if epoch > 0:  # later PPO epochs see the rollout batch in a fresh (seeded) order
        order = np.random.default_rng(_seed(self.config, "ppo", c.round, c.phase_step, epoch)).permutation(n)
      for start in range(0, n, per_update):
        idx = order[start:start + per_update]
        mb = prepared if len(idx) == n else {k: v[idx] for k, v in prepared.items()}
        if sd_host is not None:
          mb["sd_weight"] = jnp.asarray(ofsd_phase.minibatch_sd_weight(sd_host, idx, self.grpo.options.agg))
        self.state, m = self.grpo.train(self.state, mb)
        step_metrics.append(jax.device_get(m))
        faults.point("grpo_update")
    self.timings["learner"] += time.perf_counter() - t0
    out = {k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[-1]}
    out.update(rollout_summary(trajs, res.stats))
    out["learner_rows"] = float(n)
    out["learner_length"] = float(batch["tokens"].shape[1])  # the padded length (train.length_buckets)
    out["zero_std_groups"] = float(grpo_math.zero_std_group_fraction(jnp.asarray(rewards), self.group_size))
    out["time_learner_s"] = time.perf_counter() - t0
    self.last_trajs = trajs
    return out

  def run_grpo_phase(self) -> None:
    t = self.config.train
    total = int(t.grpo_steps_per_round)
    every = int(self.config.checkpoint.every_steps)
    bar = tqdm(total=total, initial=self.cursor.phase_step, desc=f"round {self.cursor.round} GRPO",
               disable=not self.is_main)
    while self.cursor.phase_step < total:
      m = self.grpo_step()
      self.cursor.global_step += 1
      self.cursor.phase_step += 1
      self.cursor.data_position += int(t.prompts_per_step)
      if self.cursor.global_step % int(self.config.logging.every_steps) == 0:
        self.metrics.write(self.cursor.global_step, "grpo", {"round": self.cursor.round, **m})
      if self.cursor.phase_step == 1:
        self.log_samples(self.last_trajs, f"round{self.cursor.round}/grpo", int(self.config.logging.text_samples))
      bar.update(1)
      bar.set_postfix(loss=f"{m['loss']:.4f}", reward=f"{m['reward']:.3f}", searches=f"{m['searches']:.2f}")
      if self.cursor.phase_step < total and every > 0 and self.cursor.phase_step % every == 0:
        self.save()
      ev = int(t.eval_every_steps)
      if ev > 0 and self.cursor.phase_step % ev == 0 and self.cursor.phase_step < total:
        self.evaluate(f"grpo_step{self.cursor.phase_step}")
    bar.close()

  # --------------------------------------------------------------------------------------------- OFSD

  def _ofsd_runner(self):
    if self._ofsd is None:
      self._ofsd = ofsd_runner.PhaseRunner(self.model_cfg, self.ofsd_options, self.mesh, self.rules,
                                           self.tokenizer)
      self._ofsd.workdir = self.workdir  # ofsd.storage='disk' keeps targets under WORKDIR/ofsd/
    return self._ofsd

  def run_ofsd_phase(self) -> None:
    """Snapshot -> rollouts -> pairs -> targets (once) -> epochs of student updates. Resumable mid-phase."""
    runner = self._ofsd_runner()
    c = self.cursor
    o = self.config.ofsd
    if self.ofsd_carry is None:  # phase start: build the buffer from the round's snapshot
      faults.point("ofsd_enter", settle=self.ckpt.wait)  # the phase's entry checkpoint is on disk
      t0 = time.perf_counter()
      questions = self.ofsd_stream.take(c.ofsd_position, int(o.questions_per_phase))
      res = self.rollouts(self.state.params, questions, group_size=int(o.group_size),
                          temperature=float(o.rollout_temperature), seed=_seed(self.config, "ofsd", c.round),
                          tag="ofsd_")
      t1 = time.perf_counter()
      self.ofsd_carry = runner.start(self.state.params, res.trajectories, int(o.group_size),
                                     name=f"round{c.round:03d}")
      self.timings["ofsd_targets"] += time.perf_counter() - t1
      c.ofsd_position += len(questions)
      self.log_samples(res.trajectories, f"round{c.round}/ofsd", int(self.config.logging.text_samples))
      self.metrics.write(c.global_step, "ofsd_buffer", {"round": c.round, **self.ofsd_carry.buffer_metrics(),
                                                        **rollout_summary(res.trajectories, res.stats),
                                                        "time_ofsd_build_s": time.perf_counter() - t0})
      faults.point("ofsd_targets")
      self.save()
    every = int(self.config.checkpoint.every_steps)
    total = self.ofsd_carry.num_steps()
    bar = tqdm(total=total, initial=c.phase_step, desc=f"round {c.round} OFSD", disable=not self.is_main)
    while c.phase_step < total:
      t0 = time.perf_counter()
      self.state, m = runner.step(self.state, self.ofsd_carry, c.phase_step,
                                  seed=_seed(self.config, "ofsd-order", c.round))
      self.timings["ofsd_learner"] += time.perf_counter() - t0
      faults.point("ofsd_update")
      c.global_step += 1
      c.phase_step += 1
      if c.global_step % int(self.config.logging.every_steps) == 0:
        self.metrics.write(c.global_step, "ofsd", {"round": c.round, **m})
      bar.update(1)
      bar.set_postfix(loss=f"{m['loss']:.4f}")
      if c.phase_step < total and every > 0 and c.phase_step % every == 0:
        self.save()
    bar.close()
    post = None
    if bool(o.post_phase_rollouts):  # the same questions again, greedy: did the student's behaviour move?
      n = int(o.questions_per_phase)
      questions = self.ofsd_stream.take(c.ofsd_position - n, n)
      post = self.rollouts(self.state.params, questions, group_size=1, temperature=0.0,
                           seed=_seed(self.config, "ofsd-post", c.round), tag="ofsd_post_").trajectories
    self.metrics.write(c.global_step, "ofsd_end", {"round": c.round,
                                                   **runner.end_metrics(self.state.params, self.ofsd_carry, post)})

  # --------------------------------------------------------------------------------------------- schedule

  def _advance(self, phase: str) -> None:
    self.cursor.phase = phase
    self.cursor.phase_step = 0
    if phase != "ofsd":
      self.ofsd_carry = None
    self.save()

  def run(self) -> dict:
    t = self.config.train
    rounds = int(t.num_rounds)
    c = self.cursor
    if c.phase == "init":
      if bool(t.eval_at_start):
        self.evaluate("init")
      self._advance("grpo")
    while c.phase != "done":
      if c.phase == "grpo":
        self.run_grpo_phase()
        if bool(t.eval_after_grpo) and self.ofsd_enabled:
          self.evaluate("grpo")
        self._advance("ofsd" if self.ofsd_enabled else "eval")
      elif c.phase == "ofsd":
        self.run_ofsd_phase()
        self._advance("eval")
      elif c.phase == "eval":
        ev = int(t.eval_every_rounds)
        if c.round == rounds or (ev > 0 and c.round % ev == 0):
          self.evaluate("ofsd" if self.ofsd_enabled else "grpo")
        if c.round >= rounds:
          self._advance("done")
        else:
          c.round += 1
          self._advance("grpo")
      else:
        raise ValueError(f"checkpoint cursor has unknown phase {c.phase!r}")
    self.ckpt.wait()
    self.metrics.flush()
    return {"rounds": self.results}

  def close(self) -> None:
    self.ckpt.close()
    self.metrics.close()


def run(config, workdir: str) -> dict:
  """Run (or resume) the experiment `config` in `workdir`; returns the results.json content."""
  config_utils.check_workdir(workdir)
  quiet_orbax()
  trainer = Trainer(config, workdir)
  try:
    return trainer.run()
  finally:
    trainer.close()
