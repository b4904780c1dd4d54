"""The trainer's side of the offline OFSD phase: one phase as resumable steps.

`searche1_jax.rl.ofsd_phase` has the pieces (pairs, layouts, teacher targets, batches, metrics); this module
drives them from the round loop so that a phase can stop after any update and continue identically:

  runner = PhaseRunner(model_cfg, ofsd_phase.OfsdOptions.from_config(config.ofsd, template), mesh, rules, tok)
  carry = runner.start(params, trajectories)     # buffer + targets (once), fresh student optimizer, divergence
  for s in range(carry.num_steps()):             # epochs x batches, in a seeded order per epoch
      state, metrics = runner.step(state, carry, s, seed)
  runner.end_metrics(state.params, carry)        # divergence after, reference vs student statistics

The student update changes only `state.params`; the GRPO optimizer state in `state` is untouched and the student
optimizer (ofsd.optim) starts fresh each phase. What a checkpoint needs is `carry.state_tree()` (optimizer state,
update count, and the teacher snapshot in full-vocabulary mode) plus `carry.extra()` (the buffer as numpy).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from searche1_jax import sharding as shd
from searche1_jax.models import qwen2
from searche1_jax.rl import ofsd_loss, ofsd_phase
from searche1_jax.train import optim
from searche1_jax.train import steps


def make_ofsd_step(cfg: qwen2.Qwen2Config, opts: ofsd_phase.OfsdOptions, mesh, *, total_steps: int | None = None,
                   rules=shd.DEFAULT_RULES, donate: bool = True) -> steps.TrainStep:
  """The student train step of the offline phase: ofsd_loss_fn for the options, the student's own optimizer
  (ofsd.optim), ofsd.num_microbatches, and the teacher snapshot in ref_params in full-vocabulary mode."""
  total = total_steps or ofsd_phase.max_updates_per_phase(opts)
  tx = optim.make_optimizer(opts.optim, total)
  return steps.model_train_step(cfg, ofsd_loss.ofsd_loss_fn(cfg, opts.divergence), tx, mesh, rules,
                                num_microbatches=opts.phase.num_microbatches, with_ref_params=not opts.divergence.top_k,
                                lr_schedule=optim.make_schedule(opts.optim, total), donate=donate)


@dataclasses.dataclass
class PhaseCarry:
  buffer: ofsd_phase.OfsdBuffer | None
  opt_state: Any
  step: Any
  teacher: Any  # full-vocabulary mode: the round's snapshot (the teacher's params); else None
  batch_size: int
  epochs: int
  divergence_before: float = float("nan")

  def num_steps(self) -> int:
    if self.buffer is None or self.buffer.num_pairs == 0:
      return 0
    return self.epochs * ofsd_phase.num_batches(self.buffer, self.batch_size)

  def state_tree(self) -> dict:
    tree = {"opt_state": self.opt_state, "step": self.step}
    if self.teacher is not None:
      tree["teacher"] = self.teacher
    return tree

  def extra(self) -> dict[str, np.ndarray]:
    out = dict(self.buffer.to_numpy())
    out["divergence_before"] = np.asarray(self.divergence_before, np.float64)
    return out

  def restored(self, tree: dict, extra: dict) -> "PhaseCarry":
    extra = dict(extra)
    div = float(np.asarray(extra.pop("divergence_before")))
    return dataclasses.replace(self, buffer=ofsd_phase.OfsdBuffer.from_numpy(extra), opt_state=tree["opt_state"],
                               step=tree["step"], teacher=tree.get("teacher"), divergence_before=div)

  def buffer_metrics(self) -> dict[str, float]:
    m = ofsd_phase.phase_metrics(self.buffer, divergence_before=self.divergence_before)
    m["updates"] = float(self.num_steps())
    return m


class PhaseRunner:
  """Builds the student step once; runs any number of phases."""

  def __init__(self, model_cfg, opts: ofsd_phase.OfsdOptions, mesh, rules, tokenizer):
    self.cfg = model_cfg
    self.opts = opts
    self.tokenizer = tokenizer
    self.workdir = None
    self.train = make_ofsd_step(model_cfg, opts, mesh, rules=rules)
    self.full = not opts.divergence.top_k
    self.eval_fn = ofsd_phase.make_eval_fn(ofsd_loss.ofsd_loss_fn(model_cfg, opts.divergence))
    # Batches pad with token 0 under a zero attention mask; the pad id never reaches a loss.
    self.rows = ofsd_phase.data_parallel_rows(opts.phase.micro_batch_size, mesh, rules)
    self.batch_size = opts.phase.batch_size
    self.epochs = opts.phase.epochs

  def empty_carry(self, params) -> PhaseCarry:
    """A carry with the right structure and shardings (the restore target of a mid-phase checkpoint): a fresh
    optimizer state and, in 'full' mode, the teacher's copy of params; no other model-sized buffer."""
    opt_state = self.train.init_opt_state(params)
    step = jax.device_put(np.zeros((), np.int32), shd.replicated(self.train.mesh))
    teacher = steps.fresh_copy(params, self.train.param_shardings) if self.full else None
    return PhaseCarry(buffer=None, opt_state=opt_state, step=step, teacher=teacher,
                      batch_size=self.batch_size, epochs=self.epochs)

  def start(self, params, trajectories, group_size: int, *, name: str = "phase") -> PhaseCarry:
    """Snapshot the teacher, select pairs, compute targets once, and measure the divergence before updates."""
    del group_size  # siblings are grouped by question id
    carry = self.empty_carry(params)  # the teacher copy (full mode) is taken before any update
    teacher = carry.teacher if self.full else params
    carry.buffer = ofsd_phase.build_buffer(
        teacher, self.cfg, ofsd_phase.group_by_question(trajectories), self.tokenizer, self.opts,
        workdir=self.workdir, name=name, mesh=self.train.mesh, rules=self.train.rules)
    carry.divergence_before = self.divergence(params, carry)
    return carry

  def divergence(self, params, carry: PhaseCarry) -> float:
    return ofsd_phase.mean_divergence(params, carry.buffer, self.eval_fn, self.rows,
                                      ref_params=carry.teacher if self.full else None,
                                      shard_batch=self.train.shard_batch)

  def step(self, state, carry: PhaseCarry, index: int, *, seed: int):
    """Update `index` of the phase (epoch index // batches, batch index % batches) on state.params."""
    epoch, batch = ofsd_phase.phase_batch(carry.buffer, index, self.batch_size, seed)
    student = steps.TrainState(params=state.params, opt_state=carry.opt_state, step=carry.step,
                               ref_params=carry.teacher)
    student, metrics = self.train(student, self.train.shard_batch(batch))
    # The step donated its input: take every array back from its output.
    carry.opt_state, carry.step, carry.teacher = student.opt_state, student.step, student.ref_params
    out = {k: float(v) for k, v in jax.device_get(metrics).items()}
    out["epoch"] = float(epoch)
    return state.replace(params=student.params), out

  def end_metrics(self, params, carry: PhaseCarry, post_trajectories=None) -> dict[str, float]:
    """Divergence after the phase, buffer statistics, and (given rollouts of the updated policy on the phase's
    questions) the change in searches, policy tokens and EM on those questions."""
    after = self.divergence(params, carry) if carry.buffer.num_pairs else float("nan")
    m = ofsd_phase.phase_metrics(carry.buffer, divergence_before=carry.divergence_before, divergence_after=after,
                                 post_trajectories=post_trajectories)
    m["updates"] = float(carry.num_steps())
    return m

