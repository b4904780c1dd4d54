"""Ahead-of-time compilation of a run's jitted programs for a device topology, and what each costs per chip.

    topo = topology("v5p-8")                                   # compile-only TPU devices (needs libtpu)
    mesh, rules = run_mesh(config, topo.devices)               # the config's mesh over those devices
    for program in run_programs(config, mesh, rules):          # abstract sharded inputs: nothing is allocated
      row = compile_program(program, topo.chip)                # memory, collectives, roofline estimate

Every program is the object the trainer runs (the sampler's `engine.Programs`, `steps.GRPOStep`, the OFSD
teacher pass and student step), lowered at the largest shapes the config implies (`RunShapes`). Per program
`compile_program` reports XLA's per-chip memory analysis (arguments, outputs, temporaries, aliased = donated
bytes, and the peak = arguments + outputs - aliased + temporaries), the collectives in the compiled HLO and a
roofline ESTIMATE from analytic FLOPs and minimal HBM bytes (`cost_analysis()` counts a scanned layer body once,
so its numbers are not the program's).

Chip specifications (`CHIPS`) are data with their source; `TOPOLOGIES` maps the names researchers use (`v4-8`,
`v5p-8`, `v5e-16`, ...) to libtpu's topology descriptions.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies

from searche1_jax import sharding as shd
from searche1_jax.agent import trajectory as trajectory_lib
from searche1_jax.models import hf, qwen2
from searche1_jax.rl import grpo_loss, ofsd_loss, ofsd_phase
from searche1_jax.sampling import engine
from searche1_jax.sampling import options as sampling_options
from searche1_jax.sampling import session
from searche1_jax.train import ofsd_runner, optim, steps
from searche1_jax.train.state import TrainState

GIB = 1024 ** 3


# ----------------------------------------------------------------------------------------------- chips


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip: HBM bytes, peak bf16 FLOP/s, HBM bytes/s, bidirectional ICI bytes/s (None: not published
  on the source page), and where the numbers come from."""
  name: str
  hbm_bytes: int
  bf16_flops: float
  hbm_bandwidth: float
  ici_bandwidth: float | None
  source: str

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32 * GIB, 275e12, 1200e9, None, "https://cloud.google.com/tpu/docs/v4 (key specifications)"),
    "v5e": Chip("v5e", 16 * 10 ** 9, 197e12, 819e9, 400e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2765e9, 1200e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", 32 * 10 ** 9, 918e12, 1638e9, 800e9, "https://cloud.google.com/tpu/docs/v6e"),
}


@dataclasses.dataclass(frozen=True)
class TopologySpec:
  """A researcher's topology name and how libtpu describes it (megacore: one JAX device per v4 / v5p chip)."""
  chip: str
  libtpu_name: str
  chip_config: str
  chips_per_host: tuple[int, int, int]


TOPOLOGIES: dict[str, TopologySpec] = {
    "v4-8": TopologySpec("v4", "v4:2x2x1", "megacore", (2, 2, 1)),
    "v4-16": TopologySpec("v4", "v4:2x2x2", "megacore", (2, 2, 1)),
    "v5p-8": TopologySpec("v5p", "v5p:2x2x1", "megacore", (2, 2, 1)),
    "v5p-16": TopologySpec("v5p", "v5p:2x2x2", "megacore", (2, 2, 1)),
    "v5e-4": TopologySpec("v5e", "v5e:2x2", "default", (2, 2, 1)),
    "v5e-8": TopologySpec("v5e", "v5e:2x4", "default", (2, 4, 1)),
    "v5e-16": TopologySpec("v5e", "v5e:4x4", "default", (2, 2, 1)),
    "v6e-8": TopologySpec("v6e", "v6e:2x4", "default", (2, 4, 1)),
    "v6e-16": TopologySpec("v6e", "v6e:4x4", "default", (2, 2, 1)),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str
  chip: Chip
  devices: tuple
  num_processes: int


def topology(name: str) -> Topology:
  """Compile-only devices of a named topology (TOPOLOGIES). Needs libtpu (`pip install -e '.[tpu]'`); no TPU."""
  if name not in TOPOLOGIES:
    raise ValueError(f"--topology {name!r}: unknown; known: {sorted(TOPOLOGIES)}")
  spec = TOPOLOGIES[name]
  # Off a TPU VM there is no metadata server for libtpu to ask.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # Compile-only use holds no chip: let several processes (test workers, a subprocess) load libtpu at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    desc = topologies.get_topology_desc(topology_name=spec.libtpu_name, platform="tpu",
                                        chip_config_name=spec.chip_config, chips_per_host_bounds=spec.chips_per_host,
                                        num_slices=1)
  except (RuntimeError, ValueError) as e:
    raise RuntimeError(f"--topology {name}: libtpu could not describe {spec.libtpu_name} ({e}); is the tpu extra "
                       "installed (pip install -e '.[tpu]')?") from e
  devices = tuple(desc.devices)
  return Topology(name, CHIPS[spec.chip], devices, len({d.process_index for d in devices}))


def run_mesh(config, devices: Sequence) -> tuple[jax.sharding.Mesh, tuple]:
  """The config's ('data', 'fsdp', 'tensor') mesh over `devices`; a size that does not match is one error."""
  block = config.mesh
  sizes = (int(block.data), int(block.fsdp), int(block.tensor))
  known = math.prod(s for s in sizes if s != -1)
  if (-1 not in sizes and known != len(devices)) or (-1 in sizes and len(devices) % known):
    raise ValueError(f"mesh.(data, fsdp, tensor)={sizes} does not fit the topology's {len(devices)} devices; "
                     "pick the config's mesh preset for this topology (e.g. mesh=v5e-16) or set one axis to -1")
  rules = shd.rules_from_config(block.rules) if block.get("rules") else shd.DEFAULT_RULES
  return shd.make_mesh(*sizes, devices=list(devices)), tuple(rules)


# ----------------------------------------------------------------------------------------------- shapes


def model_config(block) -> qwen2.Qwen2Config:
  """The model's shape and numerics, without weights: the checkpoint's config.json when hf_dir holds one,
  else the preset (a paper config's hf_dir names the same shapes as its preset)."""
  path = os.path.join(block.hf_dir, hf.CONFIG_FILE) if block.hf_dir else ""
  if path and os.path.isfile(path):
    with open(path) as f:
      cfg = hf.config_from_hf(json.load(f))
    return cfg.replace(**qwen2.numerics_from_block(block))
  return qwen2.config_from_block(block)


def _pow2(n: int) -> int:
  return trajectory_lib.bucket_length(max(int(n), 1))


@dataclasses.dataclass(frozen=True)
class RunShapes:
  """The largest shapes a run's programs see (rows, tokens), derived from the config as the trainer does.

  rollout_rows: the sampler batch bucket of one GRPO rollout wave (prompts_per_step x group_size, or the OFSD
    phase's questions x ofsd.group_size when larger; at most rollout.decode_slots when set); rollout_questions x
    rollout_group: that wave's questions x samples per question. eval_rows: the same
    for rollout.eval.batch_size. cache: the physical
    KV-cache length at protocol.max_prompt_length. extend: the longest prefill / extend program (max_extend).
  learner_rows: rows of one GRPO update (mini_batch_prompts x group_size); logprob_rows: the whole rollout batch
    (old log-probs are recomputed once for it). seq: a trajectory's bucketed length (max_prompt_length);
    targets: packed scored positions per row (bounded by the policy tokens of max_turns + 1 turns).
  teacher_seq: a privileged teacher sequence (the student's plus a sibling's body: <= 2 x max_prompt_length).
  """
  rollout_rows: int
  rollout_questions: int
  rollout_group: int
  eval_rows: int
  cache: int
  extend: int
  decode_steps: int
  learner_rows: int
  logprob_rows: int
  seq: int
  targets: int
  teacher_seq: int
  ofsd_rows: int
  ofsd_micro_rows: int

  @classmethod
  def from_config(cls, config, mesh) -> "RunShapes":
    s = sampling_options.SamplerOptions.from_config(config.sampling)
    t, p, g = config.train, config.protocol, int(config.grpo.group_size)
    dp = shd.data_parallel_size(mesh)
    slots = int(config.rollout.decode_slots)
    wave = lambda questions, group: questions * group if slots <= 0 else min(questions, slots // group) * group
    waves = [(int(t.prompts_per_step), g)]
    if bool(config.ofsd.enabled):
      waves.append((int(config.ofsd.questions_per_phase), int(config.ofsd.group_size)))
    rows, questions, group = max((wave(q, group), wave(q, group) // group, group) for q, group in waves)
    batch = functools.partial(_batch_bucket, s, dp)
    seq = trajectory_lib.bucket_length(int(p.max_prompt_length), tuple(t.length_buckets) or None)
    # Learner batches are padded to a multiple of micro-batches x data-parallel size, as the trainer pads them.
    grpo_multiple = int(config.grpo.num_microbatches) * dp
    up = lambda n, m: -(-int(n) // m) * m
    ofsd_micro = int(config.ofsd.num_microbatches)
    ofsd_rows = up(config.ofsd.batch_size, ofsd_micro * dp)
    micro = ofsd_phase.data_parallel_rows(ofsd_rows // ofsd_micro, mesh)
    return cls(
        rollout_rows=batch(rows), rollout_questions=questions, rollout_group=group, eval_rows=batch(wave(int(config.rollout.eval.batch_size), 1)),
        cache=sampling_options.bucket(int(p.max_prompt_length), s.cache_buckets, s.min_cache, "sampling.cache_buckets"),
        extend=sampling_options.bucket(min(s.max_extend, int(p.max_start_length)), s.length_buckets, s.min_length,
                                       "sampling.length_buckets"),
        decode_steps=int(s.decode_chunk), learner_rows=up(int(t.mini_batch_prompts) * g, grpo_multiple),
        logprob_rows=up(int(t.prompts_per_step) * g, grpo_multiple), seq=seq,
        targets=min(seq, _pow2((int(p.max_turns) + 1) * int(p.max_response_length))), teacher_seq=_pow2(2 * seq),
        ofsd_rows=ofsd_rows, ofsd_micro_rows=micro)


# ----------------------------------------------------------------------------------------------- programs


def _batch_bucket(s: sampling_options.SamplerOptions, dp: int, n: int) -> int:
  """The sampler's batch bucket of n rows on a mesh with dp data-parallel devices (as Session buckets them)."""
  return sampling_options.bucket(n, s.batch_buckets, max(s.min_batch, dp), "sampling.batch_buckets")


@dataclasses.dataclass
class Program:
  """A jitted function, its abstract (sharded) arguments, and analytic FLOPs / minimal HBM bytes per chip."""
  name: str
  fn: Callable
  args: tuple
  kwargs: dict
  flops: float
  hbm_bytes: float
  shapes: str
  loop_steps: int = 0  # > 0: the program is a loop of this many identical steps (decode); hbm_bytes covers all
  # Per-chip bytes of buffers that stay on the chip while it runs without being its arguments: for the sampler's
  # programs, the learner's optimizer state (and an on-device reference) held through the rollouts.
  resident_bytes: float = 0.0


def _sds(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def _abstract_params(cfg, mesh, rules):
  abstract = jax.eval_shape(functools.partial(qwen2.init_params, cfg), jax.random.key(0))
  shardings = qwen2.param_shardings(cfg, mesh, rules, abstract)
  return jax.tree.map(lambda a, s: _sds(a.shape, a.dtype, s), abstract, shardings)


def _bytes_per_chip(tree) -> float:
  """Bytes one chip holds of an abstract sharded pytree (each leaf's shard shape x itemsize)."""
  return float(sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def matmul_params(cfg: qwen2.Qwen2Config) -> tuple[int, int]:
  """(decoder-layer matmul weights, head weights): the FLOP-carrying parameters of one token's forward pass."""
  d, hd = cfg.hidden_size, cfg.head_dim
  attn = d * cfg.num_heads * hd * 2 + d * cfg.num_kv_heads * hd * 2
  mlp = 3 * d * cfg.intermediate_size
  return cfg.num_layers * (attn + mlp), d * cfg.vocab_size


def forward_flops(cfg: qwen2.Qwen2Config, tokens: float, context: float, head_tokens: float | None = None) -> float:
  """Analytic FLOPs of a forward pass over `tokens` query tokens that each attend to `context` keys (QK^T and
  PV: 4 x layers x heads x head_dim per key), the head projecting `head_tokens` (default: all) positions."""
  layers, head = matmul_params(cfg)
  head_tokens = tokens if head_tokens is None else head_tokens
  attention = 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * tokens * context
  return 2.0 * layers * tokens + 2.0 * head * head_tokens + attention


def _param_count(cfg) -> int:
  abstract = jax.eval_shape(functools.partial(qwen2.init_params, cfg), jax.random.key(0))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))


def _batch_sds(mesh, rules, fields: dict[str, tuple[tuple[int, ...], Any]]) -> dict:
  return {k: _sds(shape, dtype, shd.batch_sharding(mesh, len(shape), rules)) for k, (shape, dtype) in fields.items()}


def _train_state_sds(train: steps.TrainStep, cfg, mesh, rules, with_ref: bool) -> TrainState:
  params = _abstract_params(cfg, mesh, rules)
  opt = jax.eval_shape(train.tx.init, params)
  opt = jax.tree.map(lambda a, s: _sds(a.shape, a.dtype, s), opt, train.state_shardings.opt_state)
  return TrainState(params=params, opt_state=opt, step=_sds((), jnp.int32, shd.replicated(mesh)),
                    ref_params=params if with_ref else None)


def _train_bytes(n_params: int, param_bytes: int, chips: int, weight_reads: float) -> float:
  """Minimal HBM traffic of an optimizer update per chip: params, gradients and Adam moments read and written
  once on this chip's shard (fsdp), plus the gathered compute-dtype weights read `weight_reads` times."""
  state = n_params * (param_bytes * 2 + 4 * 2 + 8 * 2) / chips
  return state + weight_reads * n_params * 2


def _sampler_programs(cfg, config, shapes: RunShapes, mesh, rules) -> list[Program]:
  prog = engine.programs(cfg, mesh, tuple(rules))
  s = sampling_options.SamplerOptions.from_config(config.sampling)
  train_params = _abstract_params(cfg, mesh, rules)
  n_params, chips = _param_count(cfg), mesh.size
  out = []
  # The sessions' copy of the weights (compute dtype, gathered over fsdp), made once a rollout.
  decode_params = _abstract_params(cfg.replace(param_dtype=cfg.dtype), mesh, prog.weight_rules)
  params = train_params
  if s.gather_weights:
    params = decode_params
    out.append(Program("sampler_weights", prog.weights, (train_params,), {}, flops=0.0,
                       hbm_bytes=_bytes_per_chip(train_params) + _bytes_per_chip(decode_params),
                       shapes=f"{n_params / 1e9:.2f}B params -> {jnp.dtype(cfg.dtype).name}, gathered over fsdp"))
  # The least a batch-sharded forward pass reads per chip, whatever the layout: every weight in the compute dtype
  # (its tensor-axis share) once.
  weight_bytes = _bytes_per_chip(decode_params)

  def state(rows, length=shapes.cache):
    cache = jax.eval_shape(lambda: qwen2.init_cache(cfg, rows, length))
    k_axes, v_axes = qwen2.cache_axes(cfg)
    k = tuple(_sds(x.shape, x.dtype, shd.named_sharding(mesh, x.shape, k_axes, rules)) for x in cache.k)
    v = tuple(_sds(x.shape, x.dtype, shd.named_sharding(mesh, x.shape, v_axes, rules)) for x in cache.v)
    hidden = _sds((rows, cfg.hidden_size), cfg.dtype, shd.named_sharding(mesh, (rows, cfg.hidden_size),
                                                                        ("batch", None), rules))
    cache_bytes = sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in cache.k + cache.v)
    return qwen2.KVCache(k, v), hidden, cache_bytes

  def rowvec(rows, dtype, *more):
    shape = (rows,) + tuple(more)
    return _sds(shape, dtype, shd.named_sharding(mesh, shape, ("batch",) + (None,) * len(more), rules))

  rep = shd.replicated(mesh)
  dp = shd.data_parallel_size(mesh)
  rows = shapes.rollout_rows
  cache, hidden, cache_bytes = state(rows)
  tokens = rows * shapes.extend
  # The first call of a prompt (every row from slot 0: causal self-attention over its tokens, the splash kernel
  # where configured) and a later one (a long prompt's next chunk, an observation: attention over the cache).
  for name, fresh, context in (("rollout_prefill", True, shapes.extend / 2), ("rollout_extend", False, shapes.cache)):
    out.append(Program(
        name, prog.extend,
        (params, cache, hidden, rowvec(rows, jnp.int32, shapes.extend), rowvec(rows, jnp.int32),
         rowvec(rows, jnp.int32)), {"fresh": fresh},
        flops=forward_flops(cfg, tokens, context, head_tokens=0) / chips,
        hbm_bytes=weight_bytes + 2 * cache_bytes / chips,
        shapes=f"{rows} rows x {shapes.extend} tokens, cache {shapes.cache}"))
  if s.share_prompts:
    # A question's G samples prefill once; the other G - 1 rows copy that row's cache (Session.admit). On a
    # batch-sharded cache a row moves between chips: at most every row of the wave is written, and read once.
    # Only the prompt's slots are copied (at most protocol.max_start_length, bucketed as the session does).
    prefix = min(shapes.cache, sampling_options.bucket(int(config.protocol.max_start_length), s.cache_buckets,
                                                       s.min_cache, "sampling.cache_buckets"))
    out.append(Program(
        "rollout_copy_rows", prog.copy_rows, (cache, hidden, rowvec(rows, jnp.int32), rowvec(rows, jnp.int32)),
        {"length": prefix}, flops=0.0, hbm_bytes=2 * cache_bytes * prefix / shapes.cache / chips,
        shapes=f"{rows} rows x {prefix} slots copied, cache {shapes.cache}"))
    # A session's start (the sync schedule's rollout wave): the shared prompts prefill in a batch of their own, then
    # every sample's row gathers its prompt's row, at the first cache bucket (the longest prompt plus a decode
    # chunk). Two forms (Session.__init__): each prompt prefilled once per batch shard its samples occupy, so every
    # row gathers inside its shard (rollout_fanout_local, compiled when each shard's prompts fit its share of the
    # prefill batch), or once, with rows gathered across chips (rollout_fanout).
    group, batch = shapes.rollout_group, functools.partial(_batch_bucket, s, dp)
    wave = np.repeat(np.arange(shapes.rollout_questions) * group, group)  # sequence i copies sequence wave[i]
    if group > 1:
      start = min(shapes.cache, sampling_options.bucket(int(config.protocol.max_start_length) + s.decode_chunk,
                                                        s.cache_buckets, s.min_cache, "sampling.cache_buckets"))
      forms = [("rollout_fanout", batch(shapes.rollout_questions), prog.relayout, {"length": start}, "")]
      local = session.shard_local_sources(wave, rows, batch, dp) if dp > 1 else None
      if local is not None:
        forms.append(("rollout_fanout_local", batch(len(local[1])), prog.relayout_local,
                      {"length": start, "shards": dp}, ", rows kept on their chip"))
      index = _sds((rows,), jnp.int32, rep)
      for name, prompts, fn, kwargs, note in forms:
        small, small_hidden, small_bytes = state(prompts, start)
        moved = small_bytes + cache_bytes * start / shapes.cache  # read the prompts' rows, write every row
        out.append(Program(name, fn, (small, small_hidden, index), kwargs, flops=0.0, hbm_bytes=moved / chips,
                           shapes=f"{prompts} -> {rows} rows, cache {start}{note}"))

  # The cache grows by length buckets as sequences lengthen (each chip pads its own rows), and the live rows of a
  # batch compact into a smaller batch bucket (sampling.compact).
  half = max(shapes.cache // 2, 1)
  grow_cache, _, _ = state(rows, half)
  out.append(Program("rollout_grow", prog.grow, (grow_cache, hidden), {"length": shapes.cache}, flops=0.0,
                     hbm_bytes=1.5 * cache_bytes / chips, shapes=f"{rows} rows, cache {half} -> {shapes.cache}"))
  if s.compact and rows // 2 >= dp:
    # Two forms (Session._layout): every live row stays on its chip when each shard's live rows fit its share of
    # the smaller batch (rollout_compact_local); else rows change chips (rollout_compact).
    index = _sds((rows // 2,), jnp.int32, rep)
    out.append(Program("rollout_compact", prog.relayout, (cache, hidden, index), {"length": shapes.cache},
                       flops=0.0, hbm_bytes=cache_bytes / chips,
                       shapes=f"{rows} -> {rows // 2} rows, cache {shapes.cache}"))
    if dp > 1:
      out.append(Program("rollout_compact_local", prog.relayout_local, (cache, hidden, index),
                         {"length": shapes.cache, "shards": dp}, flops=0.0, hbm_bytes=cache_bytes / chips,
                         shapes=f"{rows} -> {rows // 2} rows, cache {shapes.cache}, rows kept on their chip"))

  # The stop automaton of the protocol's stop strings ('</search>', '</answer>': 17 states) fits the first bucket.
  states, eos = s.stop_states, s.eos_slots
  for name, rows, greedy in (("rollout_decode", shapes.rollout_rows, False), ("eval_decode", shapes.eval_rows, True)):
    cache, hidden, cache_bytes = state(rows)
    args = (params, cache, hidden, rowvec(rows, jnp.int32), rowvec(rows, jnp.int32), rowvec(rows, jnp.bool_),
            rowvec(rows, jnp.int32), rowvec(rows, jnp.int32), _sds((states, cfg.vocab_size), jnp.int32, rep),
            _sds((eos,), jnp.int32, rep), _sds((), jnp.int32, rep),
            _sds((), jnp.int32, rep), _sds((), jnp.float32, rep), _sds((), jnp.float32, rep), _sds((), jnp.int32, rep))
    kwargs = dict(greedy=greedy, top_k=int(config.sampling.top_k), use_top_p=float(config.sampling.top_p) < 1.0,
                  steps=shapes.decode_steps)
    steps_ = shapes.decode_steps
    out.append(Program(
        name, prog.decode, args, kwargs,
        flops=steps_ * forward_flops(cfg, rows, shapes.cache) / chips,
        hbm_bytes=steps_ * (weight_bytes + cache_bytes / chips),
        shapes=f"{rows} rows, cache {shapes.cache}, {steps_} steps", loop_steps=steps_))
  return out


def _grpo_programs(cfg, config, shapes: RunShapes, mesh, rules, on_policy) -> list[Program]:
  grpo = grpo_loss.GRPOOptions.from_config(config.grpo)
  tx = optim.make_optimizer(config.optim, 1000)
  loss_fn = ofsd_loss.grpo_sd_loss_fn(cfg, grpo, on_policy.divergence) if on_policy else None
  step = steps.make_grpo_step(cfg, grpo, tx, mesh, rules=rules, loss_fn=loss_fn)
  in_step_ref = grpo.uses_ref and grpo.ref_logprobs == "in_step"
  b, t, k = shapes.learner_rows, shapes.seq, shapes.targets
  fields = {"tokens": ((b, t), jnp.int32), "attention_mask": ((b, t), jnp.int32), "loss_mask": ((b, t), jnp.int32),
            "old_logprobs": ((b, t), jnp.float32), "advantages": ((b,), jnp.float32),
            "target_index": ((b, k), jnp.int32), "target_valid": ((b, k), jnp.int32)}
  if grpo.old_logprobs == "recompute":
    fields["sampler_logprobs"] = ((b, t), jnp.float32)
  if grpo.uses_ref and grpo.ref_logprobs == "precompute":
    fields["ref_logprobs"] = ((b, t), jnp.float32)
  passes = 4.0 if cfg.remat == "full" else 3.0  # forward, backward (2x), and the remat forward
  flops = passes * forward_flops(cfg, b * t, t / 2, head_tokens=b * k)
  if on_policy:
    tt = shapes.teacher_seq
    fields.update(teacher_tokens=((b, tt), jnp.int32), teacher_attention_mask=((b, tt), jnp.int32),
                  teacher_pos=((b, t), jnp.int32), distill_mask=((b, t), jnp.int32), sd_weight=((b,), jnp.float32))
    flops += forward_flops(cfg, b * tt, tt / 2, head_tokens=b * k) + passes * forward_flops(cfg, b * t, t / 2, b * k)
  if in_step_ref:
    flops += forward_flops(cfg, b * t, t / 2, head_tokens=b * k)
  n_params, chips, p_bytes = _param_count(cfg), mesh.size, jnp.dtype(cfg.param_dtype).itemsize
  state = _train_state_sds(step.train, cfg, mesh, rules, in_step_ref)
  out = [Program("grpo_step", step.train.step, (state, _batch_sds(mesh, rules, fields)), {}, flops=flops / chips,
                 hbm_bytes=_train_bytes(n_params, p_bytes, chips, passes * grpo.num_microbatches),
                 shapes=f"{b} rows x {t} tokens, {grpo.num_microbatches} micro-batches")]
  if grpo.old_logprobs == "recompute" or (grpo.uses_ref and grpo.ref_logprobs == "precompute"):
    r = shapes.logprob_rows
    lp_fields = {"tokens": ((r, t), jnp.int32), "attention_mask": ((r, t), jnp.int32),
                 "loss_mask": ((r, t), jnp.int32), "target_index": ((r, k), jnp.int32),
                 "target_valid": ((r, k), jnp.int32)}
    out.append(Program("grpo_logprobs", step.logprobs.jitted, (_abstract_params(cfg, mesh, rules),
                                                              _batch_sds(mesh, rules, lp_fields)), {},
                       flops=forward_flops(cfg, r * t, t / 2, head_tokens=r * k) / chips,
                       hbm_bytes=grpo.num_microbatches * n_params * 2,
                       shapes=f"{r} rows x {t} tokens, {grpo.num_microbatches} micro-batches"))
  return out


def _ofsd_programs(cfg, config, shapes: RunShapes, mesh, rules) -> list[Program]:
  opts = ofsd_phase.OfsdOptions.from_config(config.ofsd, config.protocol.template)
  step = ofsd_runner.make_ofsd_step(cfg, opts, mesh, rules=rules)
  d = opts.divergence
  b, t, tt, k = shapes.ofsd_rows, shapes.seq, shapes.teacher_seq, shapes.targets
  fields = {"tokens": ((b, t), jnp.int32), "attention_mask": ((b, t), jnp.int32),
            "distill_mask": ((b, t), jnp.int32), "target_index": ((b, k), jnp.int32),
            "target_valid": ((b, k), jnp.int32)}
  passes = 4.0 if cfg.remat == "full" else 3.0
  flops = passes * forward_flops(cfg, b * t, t / 2, head_tokens=b * k)
  if d.top_k:
    fields.update(teacher_topk_ids=((b, t, d.top_k), jnp.int32), teacher_topk_logprobs=((b, t, d.top_k), jnp.float32))
  else:
    fields.update(teacher_tokens=((b, tt), jnp.int32), teacher_attention_mask=((b, tt), jnp.int32),
                  teacher_pos=((b, t), jnp.int32))
    flops += forward_flops(cfg, b * tt, tt / 2, head_tokens=b * k)
  n_params, chips, p_bytes = _param_count(cfg), mesh.size, jnp.dtype(cfg.param_dtype).itemsize
  state = _train_state_sds(step, cfg, mesh, rules, not d.top_k)
  out = [Program("ofsd_student_step", step.step, (state, _batch_sds(mesh, rules, fields)), {}, flops=flops / chips,
                 hbm_bytes=_train_bytes(n_params, p_bytes, chips, passes * opts.phase.num_microbatches),
                 shapes=f"{b} rows x {t} tokens, {opts.phase.num_microbatches} micro-batches")]
  if d.top_k:
    r = shapes.ofsd_micro_rows
    bs = lambda *shape: shd.batch_sharding(mesh, len(shape), rules)
    args = (_abstract_params(cfg, mesh, rules), _sds((r, tt), jnp.int32, bs(r, tt)),
            _sds((r, tt), jnp.int32, bs(r, tt)),
            _sds((r, k), jnp.int32, bs(r, k)), _sds((r, k), jnp.bool_, bs(r, k)))
    out.append(Program("ofsd_teacher_targets", ofsd_phase.teacher_topk, (args[0], cfg, *args[1:]),
                       dict(k=d.top_k, chunk_size=d.chunk_size, temperature=d.temperature, mesh=mesh,
                            rules=tuple(rules)),
                       flops=forward_flops(cfg, r * tt, tt / 2, head_tokens=r * k) / chips,
                       hbm_bytes=n_params * 2, shapes=f"{r} rows x {tt} teacher tokens, top-{d.top_k}"))
  return out


def run_programs(config, mesh, rules, shapes: RunShapes | None = None) -> list[Program]:
  """Every jitted program a run of `config` executes, at its largest shapes (`shapes`, default: the config's),
  on `mesh`."""
  cfg = model_config(config.model)
  shapes = shapes or RunShapes.from_config(config, mesh)
  ofsd_on = bool(config.ofsd.enabled)
  on_policy = (ofsd_phase.OfsdOptions.from_config(config.ofsd, config.protocol.template)
               if ofsd_on and config.ofsd.mode == "on_policy" else None)
  programs = _sampler_programs(cfg, config, shapes, mesh, rules)
  grpo_programs = _grpo_programs(cfg, config, shapes, mesh, rules, on_policy)
  resident = _rollout_resident_bytes(config, next(p.args[0] for p in grpo_programs if p.name == "grpo_step"))
  for p in programs:
    p.resident_bytes = resident
  programs += grpo_programs
  if ofsd_on and config.ofsd.mode == "offline":
    programs += _ofsd_programs(cfg, config, shapes, mesh, rules)
  return programs


def run_estimates(config, shapes: RunShapes, rows: Sequence[dict]) -> dict:
  """Roofline ESTIMATES (seconds) of one GRPO step's learner work and of one GRPO rollout, from the programs'
  est_step_s; None where a program they need was not compiled (--only) or did not fit.

  grpo_step_s: updates per rollout batch (prompts_per_step / mini_batch_prompts x ppo_epochs) x grpo_step, plus
    one grpo_logprobs pass (old log-probs recomputed; none with old_logprobs 'sampler' or 'current').
  rollout_s: an upper bound: every wave of rollout rows (prompts_per_step x group_size / rollout rows) prefills
    once (and fans the shared prompts' cache rows out, rollout_fanout[_local], or copies them under the continuous
    schedule, rollout_copy_rows, when compiled) and runs max_turns + 1
    turns, each to max_response_length tokens (decode chunks of rollout_decode) and each but the last followed by
    an extend (an observation).
  """
  est = {r["name"]: r["est_step_s"] for r in rows if r.get("fits") and "est_step_s" in r}
  t, p, g = config.train, config.protocol, int(config.grpo.group_size)
  out = {"grpo_step_s": None, "rollout_s": None}
  if "grpo_step" in est and ("grpo_logprobs" in est or config.grpo.old_logprobs != "recompute"):
    updates = max(1, int(t.prompts_per_step) // int(t.mini_batch_prompts)) * int(t.ppo_epochs)
    recompute = est.get("grpo_logprobs", 0.0) if config.grpo.old_logprobs == "recompute" else 0.0
    out["grpo_step_s"] = updates * est["grpo_step"] + recompute
  if all(k in est for k in ("rollout_prefill", "rollout_extend", "rollout_decode")):
    waves = -(-int(t.prompts_per_step) * g // shapes.rollout_rows)
    turns = int(p.max_turns) + 1
    chunks = -(-int(p.max_response_length) // shapes.decode_steps)
    # The sync schedule starts a session per wave (the shared prompts fan out: the shard-local form where it was
    # compiled); the continuous one admits prompts into freed rows (copied rows).
    if config.rollout.schedule == "sync":
      moves = est.get("rollout_fanout_local", est.get("rollout_fanout", 0.0))
    else:
      moves = est.get("rollout_copy_rows", 0.0)
    out["rollout_s"] = waves * (est["rollout_prefill"] + moves
                                + turns * chunks * est["rollout_decode"]
                                + (turns - 1) * est["rollout_extend"])
  return out


def _rollout_resident_bytes(config, state: TrainState) -> float:
  """Per chip, what the learner keeps on the chips through a rollout besides the params the sampler reads: the
  optimizer state, and the reference's params where they live on device (in the train state, or precomputed
  from device memory)."""
  grpo = grpo_loss.GRPOOptions.from_config(config.grpo)
  out = _bytes_per_chip(state.opt_state)
  if state.ref_params is not None or (grpo.uses_ref and grpo.ref_logprobs == "precompute" and not grpo.ref_on_host):
    out += _bytes_per_chip(state.params)
  return out


def summary_row(doc: dict, config_name: str) -> str:
  """One markdown row of the README's table: config, topology, the largest program with its per-chip peak / HBM
  (GiB), whether every program fits, the estimates (run_estimates) and the total compile seconds."""
  rows = doc["programs"]
  held = lambda r: r["peak_bytes"] + r.get("resident_bytes", 0.0)
  big = max(rows, key=held)
  misses = [r["name"] for r in rows if not r["fits"]]
  fmt = lambda x: "-" if x is None else f"{x:.1f}"
  e = doc["estimates"]
  return (f"| {config_name} | {doc['topology']} | {big['name']} | {held(big) / GIB:.1f} / "
          f"{big['hbm_bytes'] / GIB:.1f} | {'yes' if not misses else 'no: ' + ', '.join(misses)} | "
          f"{fmt(e['grpo_step_s'])} | {fmt(e['rollout_s'])} | {sum(r['compile_s'] for r in rows):.0f} |")


# ----------------------------------------------------------------------------------------------- compile


_COLLECTIVE = re.compile(r"=\s*(\([^=]*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+"
                         r"(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-start)?\(")
_SHAPE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8}


_COPY = re.compile(r"=\s*(\([^=]*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+(copy)()\(")


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {"count", "bytes", "max_bytes"}} of the collectives in compiled HLO text (result shapes; an op in a
  loop body, e.g. the per-layer scan, is counted once)."""
  return _ops(_COLLECTIVE, hlo_text)


def copies(hlo_text: str) -> dict[str, int]:
  """{"count", "bytes", "max_bytes"} of the synchronous `copy` ops in compiled HLO text (a buffer copied, e.g. into
  another layout; counted like `collectives`)."""
  return _ops(_COPY, hlo_text).get("copy", {"count": 0, "bytes": 0, "max_bytes": 0})


_COMPUTATION_HEAD = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
_WHILE_BODY = re.compile(r"\bwhile\(.*?\bbody=%([\w.\-]+)")
_CALLEE = re.compile(r"\b(?:body|condition|to_apply|calls|true_computation|false_computation)=%([\w.\-]+)|"
                     r"branch_computations=\{([^}]*)\}")


def _computations(hlo_text: str) -> tuple[dict[str, str], str | None]:
  """{computation name: its text} of compiled HLO text, and the entry computation's name."""
  comps, entry, name, lines = {}, None, None, []
  for line in hlo_text.splitlines():
    m = _COMPUTATION_HEAD.match(line)
    if m:
      name, lines = m.group(2), []
      entry = name if m.group(1) else entry
    elif line.strip() == "}" and name is not None:
      comps[name], name = "\n".join(lines), None
    elif name is not None:
      lines.append(line)
  return comps, entry


def loop_copies(hlo_text: str) -> dict[str, int]:
  """`copies` of the computations a while loop of the entry computation runs (its body, the loops and calls inside
  it; fusion bodies excluded: a copy fused into another op is no pass of its own): what every iteration copies,
  e.g. every decode step."""
  comps, entry = _computations(hlo_text)
  todo = _WHILE_BODY.findall(comps.get(entry, ""))
  seen: set[str] = set()
  while todo:
    name = todo.pop()
    if name in seen or name not in comps or "fused_computation" in name:
      continue
    seen.add(name)
    for direct, branches in _CALLEE.findall(comps[name]):
      todo += [direct] if direct else [b.strip().lstrip("%") for b in branches.split(",")]
  return copies("\n".join(comps[n] for n in sorted(seen)))


def _ops(pattern: re.Pattern, hlo_text: str) -> dict[str, dict[str, int]]:
  out: dict[str, dict[str, int]] = {}
  for m in pattern.finditer(hlo_text):
    shape_text, kind = m.group(1), m.group(2)
    nbytes = 0
    for dtype, dims in _SHAPE.findall(shape_text):
      n = math.prod(int(x) for x in dims.split(",") if x) if dims else 1
      nbytes += n * _DTYPE_BYTES.get(dtype, 4)
    if m.group(3) and shape_text.startswith("("):
      nbytes //= 2  # async start ops return (operand, result): count the result once
    row = out.setdefault(kind, {"count": 0, "bytes": 0, "max_bytes": 0})
    row["count"] += 1
    row["bytes"] += nbytes
    row["max_bytes"] = max(row["max_bytes"], nbytes)
  return out


_OOM = re.compile(r"memory required for (HLO temporaries|arguments|[a-zA-Z ]+?) \(([0-9.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def _oom_bytes(message: str) -> int | None:
  """The bytes XLA says it needed when it refuses a program that does not fit in HBM, else None."""
  m = _OOM.search(message)
  return None if m is None else int(float(m.group(2)) * _UNITS[m.group(3)])


def compile_program(program: Program, chip: Chip | None) -> dict:
  """Lower and compile `program`; per-chip memory (bytes), fits, compile seconds, collectives, roofline estimate,
  and kernel_calls: the Pallas (Mosaic) kernel calls in the compiled HLO, e.g. splash attention's.

  A loop program (decode: `loop_steps` > 0) also gets step_bytes_min, the minimal HBM bytes of one step (weights
  + the whole cache bucket read once), and step_bytes_xla, XLA's cost analysis of the compiled program's bytes
  accessed per chip, which counts a while loop's body once: one step's traffic, plus the little outside the loop.
  The cost model also counts a fusion's whole operand where it reads a slice or updates one in place (the cache
  row writes), so step_bytes_xla overstates the cache traffic. Every program gets copies: the synchronous `copy`
  ops of its HLO (a buffer copied whole, e.g. into another layout), and a loop program loop_copies: those its loop
  runs every step (a cache-sized one there is a whole extra pass over the cache per decode step).

  fits and headroom count the program's resident_bytes too (the optimizer state the learner holds on the chips
  through a rollout, for the sampler's programs).

  XLA's TPU compiler refuses a program whose buffers exceed HBM (RESOURCE_EXHAUSTED): the row then says
  fits=False with the bytes XLA reported needing (temp_bytes, or peak_bytes) and no collectives.
  """
  row = {"name": program.name, "shapes": program.shapes, "flops_per_chip": program.flops,
         "hbm_traffic_bytes": program.hbm_bytes, "resident_bytes": program.resident_bytes}
  t0 = time.perf_counter()
  lowered = program.fn.lower(*program.args, **program.kwargs)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    need = _oom_bytes(str(e))
    if need is None or "RESOURCE_EXHAUSTED" not in str(e):
      raise
    row.update(args_bytes=0, output_bytes=0, temp_bytes=need, alias_bytes=0, peak_bytes=need,
               compile_s=round(time.perf_counter() - t0, 2), collectives={}, copies={}, kernel_calls=0,
               error=str(e).splitlines()[0][:300])
  else:
    mem, text = compiled.memory_analysis(), compiled.as_text()
    args, out_b = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    temp, alias = int(mem.temp_size_in_bytes), int(mem.alias_size_in_bytes)
    peak = args + out_b - alias + temp + int(getattr(mem, "generated_code_size_in_bytes", 0))
    row.update(args_bytes=args, output_bytes=out_b, temp_bytes=temp, alias_bytes=alias, peak_bytes=peak,
               compile_s=round(time.perf_counter() - t0, 2), collectives=collectives(text), copies=copies(text),
               kernel_calls=text.count('custom_call_target="tpu_custom_call"'))
    if program.loop_steps:
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      row.update(loop_copies=loop_copies(text), step_bytes_min=program.hbm_bytes / program.loop_steps,
                 step_bytes_xla=float((cost or {}).get("bytes accessed", float("nan"))))
  if chip is not None:
    peak = row["peak_bytes"] + program.resident_bytes
    row.update(hbm_bytes=chip.hbm_bytes, headroom_bytes=chip.hbm_bytes - peak,
               fits=peak <= chip.hbm_bytes and "error" not in row,
               est_step_s=max(program.flops / chip.bf16_flops, program.hbm_bytes / chip.hbm_bandwidth))
  return row


def format_table(rows: Sequence[dict]) -> str:
  """The compile table as text: one line per program, GiB per chip."""
  head = f"{'program':22s} {'args':>7s} {'out':>7s} {'temp':>7s} {'alias':>7s} {'peak':>7s} {'res':>6s} {'HBM':>6s} " \
         f"{'fits':>4s} {'est s':>8s} {'compile s':>9s} {'kern':>4s}  collectives"
  lines = [head, "-" * len(head)]
  for r in rows:
    g = lambda k: f"{r[k] / GIB:7.2f}" if k in r else f"{'-':>7s}"
    coll = ", ".join(f"{k} x{v['count']} (max {v['max_bytes'] / 2**20:.0f} MiB)"
                     for k, v in sorted(r["collectives"].items()))
    lines.append(f"{r['name']:22s} {g('args_bytes')} {g('output_bytes')} {g('temp_bytes')} {g('alias_bytes')} "
                 f"{g('peak_bytes')} {r.get('resident_bytes', 0) / GIB:6.2f} {r.get('hbm_bytes', 0) / GIB:6.1f} {('yes' if r.get('fits') else 'NO'):>4s} "
                 f"{r.get('est_step_s', float('nan')):8.3f} {r['compile_s']:9.1f} {r.get('kernel_calls', 0):4d}  "
                 f"{coll or '-'}")
  return "\n".join(lines)
