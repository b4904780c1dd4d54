"""Helpers that assemble experiment configs from the per-area blocks in configs/parts/*.py.

An experiment config (configs/search_e1.py, ...) is `get_config(arg) -> ConfigDict`:

    arg = common.parse_arg(arg, model="3b", mesh="v4-8", root="/mnt/disks/persist")
    config = common.base_config()               # every block with its documented defaults
    common.set_fields(config, {"grpo.kl_coef": 0.001, ...})   # overrides; an unknown field is an error
    common.apply_mesh_preset(config, arg.mesh, arg.model)

The trainer-level blocks (`train`, `checkpoint`, `logging`, `distributed`, `resume`) are defined here: they belong
to the round loop (searche1_jax/train/loop.py) and the launcher (launch/train.py), not to one area.
"""
from __future__ import annotations

import importlib
from typing import Any

import ml_collections
from ml_collections import config_dict

from searche1_jax import config_utils

parse_arg = config_utils.parse_arg

# Blocks of a full Search-R1-protocol experiment, in the order they appear in the config.
PARTS = ("model", "mesh", "sampling", "retrieval", "protocol", "rollout", "data", "optim", "grpo", "ofsd")


def part(name: str) -> ml_collections.ConfigDict:
  """The block of configs/parts/<name>.py (`get()`), with its documented defaults."""
  return importlib.import_module(f"configs.parts.{name}").get()


# ------------------------------------------------------------------------------------- trainer-level blocks

def train_block() -> ml_collections.ConfigDict:
  """The round schedule (consumed by searche1_jax/train/loop.py)."""
  c = ml_collections.ConfigDict()
  c.num_rounds = 5  # self-evolution rounds: GRPO steps, then (ofsd.enabled, offline) an OFSD phase, then eval
  c.grpo_steps_per_round = 200  # rollout batches (GRPO steps) per round
  c.prompts_per_step = 512  # questions per rollout batch (Search-R1 train_batch_size 512)
  c.mini_batch_prompts = 256  # questions per optimizer update (Search-R1 ppo_mini_batch_size 256): 2 updates/step
  c.ppo_epochs = 1  # passes over each rollout batch (Search-R1: 1)
  c.eval_at_start = True  # evaluate the starting policy first (results.json round 0, phase 'init')
  c.eval_every_rounds = 1  # evaluate after every k-th round (0 = only after the last)
  c.eval_every_steps = 0  # also evaluate every k GRPO steps inside a round (0 = off)
  c.eval_after_grpo = False  # offline OFSD: also evaluate between the GRPO steps and the OFSD phase of each round
  # Padded lengths of a GRPO learner batch (its longest trajectory picks the smallest that holds it; the largest
  # must hold protocol.max_prompt_length). () = powers of two. Finer buckets pad less and compile more programs.
  c.length_buckets = ()
  return c


def checkpoint_block() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.keep = 3  # most recent checkpoints kept in WORKDIR/checkpoints
  c.async_save = True  # write in the background (atomic: a crash keeps the previous checkpoints)
  c.every_steps = 50  # also save every k train steps inside a phase (0 = only at phase ends)
  return c


def logging_block() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.every_steps = 1  # write metrics.jsonl / TensorBoard every k train steps
  c.tensorboard = True  # TensorBoard events under WORKDIR/tensorboard
  c.text_samples = 2  # decoded trajectories logged to TensorBoard per rollout batch (0 = none)
  return c


def distributed_block() -> ml_collections.ConfigDict:
  """jax.distributed settings (searche1_jax/distributed.py: maybe_initialize)."""
  c = ml_collections.ConfigDict()
  # 'auto': initialize when a multi-host environment is detected (Cloud TPU pod, SLURM, Open MPI, or
  # JAX_COORDINATOR_ADDRESS set); 'on': always (single host too); 'off': never.
  c.mode = "auto"
  c.coordinator_address = ""  # 'host:port' of process 0; '' = from the environment / cluster auto-detection
  c.num_processes = config_dict.placeholder(int)  # None = from the environment / auto-detection
  c.process_id = config_dict.placeholder(int)  # None = from the environment / auto-detection
  c.local_device_ids = ""  # comma-separated device ids this process uses ('' = all visible)
  c.initialization_timeout_s = 300  # seconds to wait for every process to join
  return c


# Fields (or whole blocks) that may differ between the config saved in a workdir and the one a resumed run is
# launched with: they change where or how fast things run, or how long, not what is learned so far.
RESUME_MAY_CHANGE = (
    "train.num_rounds", "train.eval_every_rounds", "train.eval_every_steps", "checkpoint", "logging",
    "distributed", "mesh", "resume", "retrieval.url", "retrieval.http", "retrieval.server",
    "retrieval.encoding.batch_size", "retrieval.encoding.platform", "retrieval.encoding.num_devices",
    "retrieval.scann.num_threads", "retrieval.scann.query_batch", "retrieval.verify_corpus_lines",
    "rollout.retrieval_retries", "rollout.retrieval_backoff_s", "rollout.retrieval_backoff_max_s",
    "rollout.eval.batch_size", "rollout.eval.write_trajectories",
    # Hardware layout like the mesh: it decides which sampler wave (and seed) a question lands in, not the method.
    "rollout.decode_slots",
    # The attention implementation (results agree to float rounding) and its blocking: speed and memory only.
    "model.attention", "model.attention_block",
    # Learner memory layout (LEARNER): exact gradient accumulation, where the reference is scored and kept.
    "grpo.num_microbatches", "ofsd.num_microbatches", "grpo.ref_logprobs", "grpo.ref_on_host",
    # The sampler's weight layout (GATHER_WEIGHTS): bit-identical samples; the KV cache's key layout: float rounding.
    "sampling.gather_weights", "model.kv_cache_layout",
    # Padding of the learner's batches: masked positions, the same update to float rounding.
    "train.length_buckets")


def resume_block() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.may_change = RESUME_MAY_CHANGE  # see RESUME_MAY_CHANGE; launch/train.py --allow_config_change skips the check
  return c


# ------------------------------------------------------------------------------------------------ assembly

def base_config(parts: tuple[str, ...] = PARTS, *, name: str = "", seed: int = 0) -> ml_collections.ConfigDict:
  """A complete config: the given area blocks with their defaults plus the trainer-level blocks."""
  config = ml_collections.ConfigDict()
  config.name = name  # experiment name (logs, reports)
  config.seed = seed  # root of every RNG stream (init, sampling, data order)
  for p in parts:
    config[p] = part(p)
  config.train = train_block()
  config.checkpoint = checkpoint_block()
  config.logging = logging_block()
  config.distributed = distributed_block()
  config.resume = resume_block()
  return config


def set_fields(config: ml_collections.ConfigDict, values: dict[str, Any]) -> ml_collections.ConfigDict:
  """Set fields by dotted path; a path that does not exist is a ConfigError naming it (typos never pass)."""
  config_utils.apply_overrides(config, values)
  return config


# Mesh presets: (data, fsdp, tensor) per host type and model size. One v4-8 host has 4 chips (megacore: one JAX
# device each, 32 GiB HBM); a v5p-8 host 4 chips of 95 GiB; a v5e-16 (v5litepod-16) pod 4 hosts x 4 chips of
# 16 GiB. Params are fully sharded (fsdp); on v5e-16 the 7B model adds 2-way tensor parallelism so each decode
# step all-gathers half as much.
MESH_PRESETS: dict[str, dict[str, tuple[int, int, int]]] = {
    "cpu": {"3b": (1, -1, 1), "7b": (1, -1, 1)},
    "v4-8": {"3b": (1, 4, 1), "7b": (1, 4, 1)},
    "v5p-8": {"3b": (1, 4, 1), "7b": (1, 4, 1)},
    "v5e-16": {"3b": (1, 16, 1), "7b": (1, 8, 2)},
}


# Sampler rows held at once (rollout.decode_slots) per host type and model size: the KV cache of every row at
# protocol.max_prompt_length (4096) must fit beside the params and the learner's optimizer state (resident through
# the rollouts); sized with `python -m launch.aot_compile`
# (docs/tpu.md has the table). 0 = the whole rollout batch (the CPU runs are small).
DECODE_SLOTS: dict[str, dict[str, int]] = {
    "cpu": {"3b": 0, "7b": 0},
    # 3B at 256: rollout_extend 28.9 GiB + the learner's optimizer state held through the rollout 5.75 = 34.7 of 32
    "v4-8": {"3b": 128, "7b": 128},
    "v5p-8": {"3b": 512, "7b": 256},  # 7B at 512: rollout_extend 94.5 of 95.0 GiB
    "v5e-16": {"3b": 256, "7b": 128},  # 7B at 256: rollout_extend 14.0 of 14.9 GiB
}

# Whether sampler sessions decode from their own bfloat16 copy of the weights gathered over fsdp
# (sampling.gather_weights): a decode step then reads local weights instead of all-gathering the model every step,
# at the price of params x 2 bytes / tensor per chip while a rollout runs. On where it fits beside the largest
# rollout program and the resident train state (docs/tpu.md, "Decode: HBM bytes per step").
GATHER_WEIGHTS: dict[str, dict[str, bool]] = {
    "cpu": {"3b": True, "7b": True},
    "v4-8": {"3b": True, "7b": False},  # 3B (128 slots): rollout_extend 24.9 of 32 GiB with the copy and the optimizer
    "v5p-8": {"3b": True, "7b": True},
    "v5e-16": {"3b": False, "7b": False},  # 7B: a 7.1 GiB copy per chip (tensor 2) beside a 9.3 GiB decode
}

# Learner memory per host type and model size, sized with `python -m launch.aot_compile` (docs/tpu.md has the
# tables): GRPO micro-batches (gradient accumulation is exact: the update is the same) and where the frozen
# reference lives. 'precompute' scores the reference in its own pass before the update, as Search-R1's separate
# reference worker does, and ref_on_host keeps its weights in host memory between passes, so the learner step holds
# no second copy of the model.
_OFSD = {"ofsd.num_microbatches": 4}  # the OFSD student step: 64 pairs per update in 4 micro-batches
LEARNER: dict[str, dict[str, dict[str, object]]] = {
    "cpu": {"3b": {"grpo.num_microbatches": 20, **_OFSD}, "7b": {"grpo.num_microbatches": 20, **_OFSD}},
    "v4-8": {"3b": {"grpo.num_microbatches": 80, "grpo.ref_logprobs": "precompute", "grpo.ref_on_host": True,
                    **_OFSD},
             "7b": {"grpo.num_microbatches": 20, **_OFSD}},  # 7B on v4-8: not sized (not a paper setting)
    "v5p-8": {"3b": {"grpo.num_microbatches": 20, **_OFSD}, "7b": {"grpo.num_microbatches": 40, **_OFSD}},
    "v5e-16": {"3b": {"grpo.num_microbatches": 20, **_OFSD},  # 3B on v5e-16: not sized
               "7b": {"grpo.num_microbatches": 160, "grpo.ref_logprobs": "precompute", "grpo.ref_on_host": True,
                      "optim.mu_dtype": "bfloat16", "ofsd.num_microbatches": 8, "ofsd.optim.mu_dtype": "bfloat16"}},
}


def apply_mesh_preset(config: ml_collections.ConfigDict, mesh: str, model: str) -> None:
  if mesh not in MESH_PRESETS:
    raise config_utils.ConfigError(f"mesh={mesh!r}: unknown mesh preset; known: {sorted(MESH_PRESETS)}")
  if model not in MESH_PRESETS[mesh]:
    raise config_utils.ConfigError(f"model={model!r}: no {mesh} mesh preset for it; known: "
                                   f"{sorted(MESH_PRESETS[mesh])}")
  data, fsdp, tensor = MESH_PRESETS[mesh][model]
  set_fields(config, {"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor,
                      "rollout.decode_slots": DECODE_SLOTS[mesh][model],
                      "sampling.gather_weights": GATHER_WEIGHTS[mesh][model],
                      # TPU: the KV cache slots-major (models/qwen2.py KV_CACHE_LAYOUTS; docs/tpu.md)
                      "model.kv_cache_layout": "heads_major" if mesh == "cpu" else "slots_major",
                      **LEARNER[mesh][model]})


MODEL_SIZES = {"3b": ("qwen2.5-3b", "Qwen2.5-3B"), "7b": ("qwen2.5-7b", "Qwen2.5-7B")}


def apply_model(config: ml_collections.ConfigDict, model: str, root: str) -> None:
  """Model preset and the HF checkpoint directory under `root` (docs/tpu.md: ROOT/models/Qwen2.5-3B, ...)."""
  if model not in MODEL_SIZES:
    raise config_utils.ConfigError(f"model={model!r}: unknown model size; known: {sorted(MODEL_SIZES)}")
  preset, hf_name = MODEL_SIZES[model]
  set_fields(config, {"model.preset": preset, "model.hf_dir": f"{root}/models/{hf_name}",
                      "model.dtype": "bfloat16", "model.param_dtype": "float32", "model.remat": "full"})


def apply_search_r1_data(config: ml_collections.ConfigDict, root: str) -> None:
  """Search-R1 data and retrieval under `root`: NQ+HotpotQA training mix, the seven test sets, e5 over wiki-18."""
  set_fields(config, {
      "data.raw_dir": f"{root}/raw", "data.tfds_dir": f"{root}/tfds",
      "retrieval.backend": "scann", "retrieval.index_dir": f"{root}/index/e5_wiki18",
      "retrieval.topk": 3, "protocol.topk": 3})
