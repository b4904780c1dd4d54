"""Pure, jitted, sharded train steps with exact micro-batch gradient accumulation, and the GRPO learner.

The generic step
----------------
`make_train_step(loss_fn, tx, ...)` builds `step(state, batch) -> (state, metrics)`, jitted once with explicit
in/out shardings (params by `qwen2.param_shardings`, every batch leaf by `sharding.batch_sharding` on its
leading axis, metrics replicated) and the state donated. It serves every loss of the project through one
contract:

  loss_fn(params, micro_batch, ref_params_or_None) -> (loss_sum, denominator, metrics)

`loss_sum` and `denominator` are float32 scalars with loss = loss_sum / denominator. The step splits the batch
into `num_microbatches` micro-batches (a `lax.scan`), sums the gradients of `loss_sum` and the denominators, and
divides once at the end, so accumulation is exact: the update equals the one of the whole batch at once.
`metrics` is a flat dict of float32 scalars; a value is combined across micro-batches by its form:
  (numerator, count) tuple -> both summed; reported as numerator / count (0 when count is 0): a mean;
  key ending in '_min' / '_max' -> min / max;
  any other scalar -> summed (counts, totals).
The step adds: loss, loss_sum, denominator, grad_norm (before clipping), update_norm, param_norm and
learning_rate (when a schedule is given).

The loss functions and the batch format they read live in `searche1_jax/rl/` (`grpo_loss.py`, `ofsd_loss.py`,
`logprobs.py`); this module knows only the contract above.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from searche1_jax import sharding as shd
from searche1_jax.models import qwen2
from searche1_jax.rl import grpo_loss
from searche1_jax.rl import logprobs as logprobs_lib
from searche1_jax.train.state import TrainState

LossFn = logprobs_lib.LossFn

# ----------------------------------------------------------------------------------------------- metrics


def _check_metric(name, value):
  if isinstance(value, tuple):
    if len(value) != 2:
      raise ValueError(f"loss_fn metric {name!r}: a tuple must be (numerator, count), got {len(value)} items")
    parts = value
  else:
    parts = (value,)
  for p in parts:
    if jnp.shape(p) != ():
      raise ValueError(f"loss_fn metric {name!r} must be a scalar (or a pair of scalars), got shape {jnp.shape(p)}")


def _metric_identity(name, value):
  """The neutral element of a metric's combine rule, matching its structure."""
  if isinstance(value, tuple):
    return tuple(jnp.zeros((), jnp.float32) for _ in value)
  if name.endswith("_min"):
    return jnp.asarray(jnp.inf, jnp.float32)
  if name.endswith("_max"):
    return jnp.asarray(-jnp.inf, jnp.float32)
  return jnp.zeros((), jnp.float32)


def combine_metrics(acc: dict, new: dict) -> dict:
  """Combine two micro-batches' metric dicts by the rules in the module docstring."""
  out = {}
  for k, a in acc.items():
    b = new[k]
    if isinstance(a, tuple):
      out[k] = tuple(x + jnp.asarray(y, jnp.float32) for x, y in zip(a, b))
    elif k.endswith("_min"):
      out[k] = jnp.minimum(a, jnp.asarray(b, jnp.float32))
    elif k.endswith("_max"):
      out[k] = jnp.maximum(a, jnp.asarray(b, jnp.float32))
    else:
      out[k] = a + jnp.asarray(b, jnp.float32)
  return out


def finalize_metrics(metrics: dict) -> dict:
  """(numerator, count) pairs -> numerator / count (0 where count is 0); other scalars unchanged."""
  out = {}
  for k, v in metrics.items():
    if isinstance(v, tuple):
      num, cnt = v
      out[k] = jnp.where(cnt > 0, num / jnp.where(cnt > 0, cnt, 1.0), 0.0)
    else:
      out[k] = v
  return out


# ----------------------------------------------------------------------------------------------- micro-batches


def batch_axes_size(mesh: Mesh, rules) -> int:
  spec = shd.logical_to_mesh(("batch",), rules)[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  return math.prod(mesh.shape[a] for a in axes)


def check_batch_size(batch_size: int, num_microbatches: int, mesh: Mesh | None, rules=shd.DEFAULT_RULES):
  """Raise a clear error unless B splits into equal micro-batches that each spread over the data axes."""
  dp = 1 if mesh is None else batch_axes_size(mesh, rules)
  if num_microbatches < 1:
    raise ValueError(f"num_microbatches={num_microbatches} must be >= 1")
  if batch_size % (num_microbatches * dp):
    raise ValueError(f"batch size B={batch_size} must be a multiple of num_microbatches ({num_microbatches}) x "
                     f"the data-parallel mesh size ({dp})")


def split_microbatches(batch, num_microbatches: int, mesh: Mesh | None = None, rules=shd.DEFAULT_RULES):
  """[B, ...] leaves -> [M, B/M, ...]. Micro-batch m holds rows m, m + M, m + 2M, ...

  Strided rather than contiguous: with the batch sharded in contiguous row blocks over the data axes, every
  device keeps exactly its own rows in every micro-batch (no data moves, every device works on every
  micro-batch).
  """
  m = num_microbatches

  def split(x):
    b = x.shape[0]
    x = jnp.swapaxes(x.reshape((b // m, m) + x.shape[1:]), 0, 1)
    if mesh is not None:
      names = (None, "batch") + (None,) * (x.ndim - 2)
      x = jax.lax.with_sharding_constraint(x, shd.named_sharding(mesh, x.shape, names, rules))
    return x

  return jax.tree.map(split, batch)


def merge_microbatches(x: jax.Array) -> jax.Array:
  """Inverse of split_microbatches for one array: [M, B/M, ...] -> [B, ...]."""
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


# ----------------------------------------------------------------------------------------------- the step


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """A compiled-once train step and the shardings it was built for.

  step: jitted (state, batch) -> (state, metrics); the state argument is donated.
  state_shardings: a TrainState of NamedShardings (the step's state in/out shardings).
  batch_sharding: the sharding of every batch leaf (leading axis over the data axes).
  """
  step: Any
  tx: optax.GradientTransformation
  mesh: Mesh
  param_shardings: Any
  state_shardings: TrainState
  batch_sharding: NamedSharding
  num_microbatches: int
  rules: Any
  init_opt_state: Any  # jitted tx.init with the opt_state out_shardings

  def __call__(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    for k, x in batch.items():
      if jnp.ndim(x) < 1:
        raise ValueError(f"batch[{k!r}] must have a leading batch axis, got a scalar")
    check_batch_size(next(iter(batch.values())).shape[0], self.num_microbatches, self.mesh, self.rules)
    return self.step(state, batch)

  def init_state(self, params, ref_params=None) -> TrainState:
    """A fresh sharded state (step 0) holding copies of params (and ref_params), never aliases of them:
    the step donates its state, and the caller's arrays must survive that."""
    has_ref = self.state_shardings.ref_params is not None
    if (ref_params is not None) != has_ref:
      raise ValueError("init_state: this step was built with_ref_params="
                       f"{has_ref} but ref_params is {'None' if ref_params is None else 'given'}")
    params = fresh_copy(params, self.param_shardings)
    if has_ref:
      ref_params = fresh_copy(ref_params, self.param_shardings)
    opt_state = self.init_opt_state(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shd.replicated(self.mesh))
    return TrainState(params=params, opt_state=opt_state, step=step, ref_params=ref_params)

  def shard_batch(self, batch):
    return jax.device_put(dict(batch), self.batch_sharding)


def fresh_copy(tree, shardings):
  """tree placed with `shardings` in newly allocated buffers. (device_put may reuse the source buffers even
  with may_alias=False, e.g. for a replicated copy of a one-device array; a donated state must not.)"""
  placed = jax.device_put(tree, shardings)
  return jax.jit(lambda t: jax.tree.map(jnp.copy, t), in_shardings=(shardings,), out_shardings=shardings)(placed)


def _tree_zeros_like(shapes, shardings):
  return jax.tree.map(lambda s, sh: jax.lax.with_sharding_constraint(jnp.zeros(s.shape, jnp.float32), sh),
                      shapes, shardings)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, mesh: Mesh, abstract_params,
                    param_shardings, num_microbatches: int = 1, with_ref_params: bool = False,
                    lr_schedule: Callable | None = None, rules=shd.DEFAULT_RULES, donate: bool = True) -> TrainStep:
  """Build the jitted, sharded step `(state, batch) -> (state, metrics)` for `loss_fn` (contract above).

  Args:
    loss_fn: loss_fn(params, micro_batch, ref_params_or_None) -> (loss_sum, denominator, metrics).
    tx: the optimizer (e.g. `optim.make_optimizer`).
    mesh: the device mesh; abstract_params: a pytree of ShapeDtypeStruct like the params;
    param_shardings: a pytree of NamedSharding like the params (`qwen2.param_shardings`).
    num_microbatches: M; the batch of B rows is processed as M micro-batches of B / M rows.
    with_ref_params: the state carries frozen reference params passed to loss_fn (else None is passed).
    lr_schedule: optional schedule(step) -> learning rate, only to report `learning_rate`.
    rules: logical -> mesh axis rules (for the batch axis).
    donate: donate the state argument (its buffers are reused for the new state).
  """
  if num_microbatches < 1:
    raise ValueError(f"make_train_step: num_microbatches={num_microbatches} must be >= 1")
  repl = shd.replicated(mesh)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                        transform_non_params=lambda _: repl)
  state_shardings = TrainState(params=param_shardings, opt_state=opt_shardings, step=repl,
                               ref_params=param_shardings if with_ref_params else None)
  batch_sharding = shd.batch_sharding(mesh, 1, rules)  # a prefix: leading axis sharded, the rest replicated
  f32 = jnp.float32

  def micro_grads(params, ref, mb):
    def f(p):
      loss_sum, denom, metrics = loss_fn(p, mb, ref)
      return jnp.asarray(loss_sum, f32), (jnp.asarray(denom, f32), metrics)

    (loss_sum, (denom, metrics)), grads = jax.value_and_grad(f, has_aux=True)(params)
    for k, v in metrics.items():
      _check_metric(k, v)
    grads = jax.tree.map(lambda g: g.astype(f32), grads)
    grads = jax.lax.with_sharding_constraint(grads, param_shardings)
    return grads, loss_sum, denom, metrics

  def train_step(state: TrainState, batch):
    with shd.activation_mesh(mesh, rules):
      return _train_step(state, batch)

  def _train_step(state: TrainState, batch):
    ref = state.ref_params if with_ref_params else None
    if num_microbatches == 1:
      grads, loss_sum, denom, metrics = micro_grads(state.params, ref, batch)
      metrics = combine_metrics({k: _metric_identity(k, v) for k, v in metrics.items()}, metrics)
    else:
      mbs = split_microbatches(batch, num_microbatches, mesh, rules)
      one = jax.eval_shape(lambda p, r, b: micro_grads(p, r, jax.tree.map(lambda x: x[0], b)), state.params, ref,
                           mbs)
      carry0 = (_tree_zeros_like(one[0], param_shardings), jnp.zeros((), f32), jnp.zeros((), f32),
                {k: _metric_identity(k, v) for k, v in one[3].items()})

      def body(carry, mb):
        g_acc, l_acc, d_acc, m_acc = carry
        g, l, d, m = micro_grads(state.params, ref, mb)
        return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, d_acc + d, combine_metrics(m_acc, m)), None

      (grads, loss_sum, denom, metrics), _ = jax.lax.scan(body, carry0, mbs)

    has_denom = denom > 0
    safe = jnp.where(has_denom, denom, 1.0)
    grads = jax.tree.map(lambda g, p: jnp.where(has_denom, g / safe, 0.0).astype(p.dtype), grads, state.params)
    new_state = state.apply_gradients(grads, tx)
    delta = jax.tree.map(lambda a, b: a.astype(f32) - b.astype(f32), new_state.params, state.params)
    out = finalize_metrics(metrics)
    out.update(loss=loss_sum / safe, loss_sum=loss_sum, denominator=denom, grad_norm=optax.global_norm(grads),
               update_norm=optax.global_norm(delta), param_norm=optax.global_norm(new_state.params))
    if lr_schedule is not None:
      out["learning_rate"] = jnp.asarray(lr_schedule(state.step), f32)
    return new_state, out

  jitted = jax.jit(train_step, in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, repl),
                   donate_argnums=(0,) if donate else ())
  return TrainStep(step=jitted, tx=tx, mesh=mesh, param_shardings=param_shardings,
                   state_shardings=state_shardings, batch_sharding=batch_sharding,
                   num_microbatches=num_microbatches, rules=rules,
                   init_opt_state=jax.jit(tx.init, out_shardings=opt_shardings))


def model_train_step(cfg: qwen2.Qwen2Config, loss_fn: LossFn, tx: optax.GradientTransformation, mesh: Mesh,
                     rules=shd.DEFAULT_RULES, **kw) -> TrainStep:
  """make_train_step for a Qwen2 policy: abstract params and shardings from the model config."""
  abstract = jax.eval_shape(functools.partial(qwen2.init_params, cfg), jax.random.key(0))
  return make_train_step(loss_fn, tx, mesh=mesh, abstract_params=abstract,
                         param_shardings=qwen2.param_shardings(cfg, mesh, rules, abstract), rules=rules, **kw)


# ----------------------------------------------------------------------------------------------- log-probs

def make_logprob_fn(cfg: qwen2.Qwen2Config, *, mesh: Mesh, param_shardings, chunk_size: int = 128,
                    temperature: float = 1.0, num_microbatches: int = 1, rules=shd.DEFAULT_RULES):
  """A jitted no-grad pass (params, batch) -> [B, T] float32 log-probs aligned with tokens (0 at column 0 and
  where loss_mask is 0). Used to recompute old log-probs and to precompute reference log-probs. Runs the
  micro-batches one after another (lax.map) to bound activation memory like the train step."""
  bsh = shd.batch_sharding(mesh, 1, rules)
  bsh2 = shd.batch_sharding(mesh, 2, rules)

  def score(params, batch):
    with shd.activation_mesh(mesh, rules):
      return _score(params, batch)

  def _score(params, batch):
    batch = {k: batch[k] for k in (*logprobs_lib.BATCH_FIELDS, *logprobs_lib.PACKED_FIELDS) if k in batch}
    one = lambda mb: logprobs_lib.align_to_tokens(logprobs_lib.shifted_logprobs(params, cfg, mb, chunk_size=chunk_size,
                                                      temperature=temperature))
    if num_microbatches == 1:
      return one(batch)
    return merge_microbatches(jax.lax.map(one, split_microbatches(batch, num_microbatches, mesh, rules)))

  jitted = jax.jit(score, in_shardings=(param_shardings, bsh), out_shardings=bsh2)

  def call(params, batch):
    logprobs_lib.check_fields(batch, logprobs_lib.BATCH_FIELDS, "logprob pass")
    check_batch_size(batch["tokens"].shape[0], num_microbatches, mesh, rules)
    return jitted(params, {k: batch[k] for k in (*logprobs_lib.BATCH_FIELDS, *logprobs_lib.PACKED_FIELDS) if k in batch})

  call.jitted = jitted
  return call


# ----------------------------------------------------------------------------------------------- GRPO wiring


@dataclasses.dataclass(frozen=True)
class GRPOStep:
  """The GRPO train step with its optimizer and its old / reference log-prob passes.

  Per step:  batch = prepare_batch(state, batch, ref_params);  state, metrics = train(state, batch).
  - old_logprobs='recompute': prepare_batch moves the sampler's log-probs to batch['sampler_logprobs'] and
    sets batch['old_logprobs'] to a no-grad pass with state.params. With several updates per rollout batch,
    recompute once for the whole rollout batch before the first update (the old policy is the sampler's).
  - old_logprobs='current' (one update per rollout batch): no pass; the loss detaches its own policy log-probs
    as the old ones and reads the sampler's from batch['old_logprobs'].
  - kl_coef > 0 and ref_logprobs='precompute': prepare_batch adds batch['ref_logprobs'] from ref_params (on
    the host when ref_on_host: put on the device only for that call). With ref_logprobs='in_step' the
    reference params live in the TrainState and the step scores them itself.
  """
  options: grpo_loss.GRPOOptions
  cfg: qwen2.Qwen2Config
  train: TrainStep
  logprobs: Callable

  def init_state(self, params, ref_params=None) -> TrainState:
    """A sharded TrainState. In 'in_step' reference mode the state holds a copy of ref_params (default:
    params); otherwise it holds none, and the caller keeps `place_ref_params(...)` for prepare_batch."""
    if self.options.uses_ref and self.options.ref_logprobs == "in_step":
      return self.train.init_state(params, params if ref_params is None else ref_params)
    return self.train.init_state(params)

  def place_ref_params(self, ref_params):
    """Reference params as prepare_batch wants them: host numpy arrays when ref_on_host, else sharded."""
    if self.options.ref_on_host:
      return jax.device_get(ref_params)
    return fresh_copy(ref_params, self.train.param_shardings)

  def prepare_batch(self, state: TrainState, batch, ref_params=None) -> dict:
    """Add what the configured modes need (recomputed old log-probs, precomputed reference log-probs)."""
    fields = dict(logprobs_lib.BATCH_FIELDS, old_logprobs=2, advantages=1)
    logprobs_lib.check_fields(batch, fields, "GRPO batch")
    check_batch_size(batch["tokens"].shape[0], self.options.num_microbatches, self.train.mesh, self.train.rules)
    batch = self.train.shard_batch(batch)
    if self.options.old_logprobs == "recompute":
      batch["sampler_logprobs"] = batch["old_logprobs"]
      batch["old_logprobs"] = self.logprobs(state.params, batch)
    if self.options.uses_ref and self.options.ref_logprobs == "precompute":
      if ref_params is None:
        raise ValueError("GRPO prepare_batch: kl_coef > 0 with ref_logprobs='precompute' needs ref_params")
      on_host = any(isinstance(x, np.ndarray) for x in jax.tree.leaves(ref_params))
      placed = jax.device_put(ref_params, self.train.param_shardings) if on_host else ref_params
      batch["ref_logprobs"] = self.logprobs(placed, batch)
      if on_host:
        batch["ref_logprobs"].block_until_ready()
        for x in jax.tree.leaves(placed):
          x.delete()
    return batch

  def __call__(self, state: TrainState, batch, ref_params=None) -> tuple[TrainState, dict]:
    """prepare_batch then the train step (for one update per rollout batch)."""
    return self.train(state, self.prepare_batch(state, batch, ref_params))


def make_grpo_step(cfg: qwen2.Qwen2Config, o: grpo_loss.GRPOOptions, tx: optax.GradientTransformation, mesh: Mesh, *,
                   rules=shd.DEFAULT_RULES, lr_schedule: Callable | None = None, donate: bool = True,
                   loss_fn: LossFn | None = None) -> GRPOStep:
  """Wire grpo_loss_fn, the optimizer `tx` and the log-prob passes for a Qwen2 policy on `mesh`.

  o: the typed `grpo` block (grpo_loss.GRPOOptions.from_config(config.grpo)).
  loss_fn: replaces grpo_loss_fn(cfg, o) (e.g. GRPO plus an extra term on the same batch); the
  old / reference log-prob modes of `o` still decide what prepare_batch adds and whether the state holds
  reference params.
  """
  in_step_ref = o.uses_ref and o.ref_logprobs == "in_step"
  loss_fn = grpo_loss.grpo_loss_fn(cfg, o) if loss_fn is None else loss_fn
  train = model_train_step(cfg, loss_fn, tx, mesh, rules,
                           num_microbatches=o.num_microbatches, with_ref_params=in_step_ref,
                           lr_schedule=lr_schedule, donate=donate)
  logprobs = make_logprob_fn(cfg, mesh=mesh, param_shardings=train.param_shardings,
                             chunk_size=o.logprob_chunk_size, temperature=o.temperature,
                             num_microbatches=o.num_microbatches, rules=rules)
  return GRPOStep(options=o, cfg=cfg, train=train, logprobs=logprobs)
