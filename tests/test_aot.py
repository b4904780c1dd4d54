"""Ahead-of-time TPU compiles (searche1_jax/train/aot.py, launch/aot_compile.py) of a paper config shrunk to a
tiny model, for a 4-chip topology and a multi-host one. Needs libtpu (the tpu extra, which `make test` installs);
the suite itself stays on the CPU backend (conftest)."""
import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest

from launch import aot_compile
from searche1_jax import config_utils
from searche1_jax.models import qwen2
from searche1_jax.train import aot

# Dimensions in multiples of TPU tiles (8 x 128), so per-chip bytes are not dominated by layout padding.
TINY = {"model.hf_dir": "", "model.preset": "qwen2.5-0.5b", "model.vocab_size": 2048, "model.hidden_size": 256,
        "model.intermediate_size": 512, "model.num_layers": 2, "model.num_heads": 2, "model.num_kv_heads": 1,
        "train.prompts_per_step": 8, "train.mini_batch_prompts": 4, "grpo.num_microbatches": 2,
        "grpo.logprob_chunk_size": 32, "protocol.max_prompt_length": 256, "protocol.max_start_length": 128,
        "protocol.max_response_length": 32, "sampling.max_extend": 64, "sampling.decode_chunk": 8,
        "rollout.eval.batch_size": 16, "ofsd.questions_per_phase": 8, "ofsd.batch_size": 8, "ofsd.top_k": 8,
        "ofsd.chunk_size": 32}


def tiny_config(mesh="v5p-8", **overrides):
  config = config_utils.load_config(f"configs/search_e1.py:model=3b,mesh={mesh}")
  config_utils.apply_overrides(config, dict(TINY, **overrides))
  return config


def _param_bytes(config) -> int:
  cfg = aot.model_config(config.model)
  abstract = jax.eval_shape(lambda: qwen2.init_params(cfg, jax.random.key(0)))
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(abstract))


def _tiny_model_and_shapes():
  """The tiny config's model and the shapes its programs are compiled at on v5p-8 (v5p_doc's)."""
  config = tiny_config()
  return aot.model_config(config.model), aot.RunShapes.from_config(config, aot.run_mesh(
      config, aot.topology("v5p-8").devices)[0])


@pytest.fixture(scope="module")
def v5p_doc():
  return aot_compile.compile_run(tiny_config(), "v5p-8")


def test_every_program_of_the_run_is_compiled_and_listed(v5p_doc):
  names = [r["name"] for r in v5p_doc["programs"]]
  assert names == ["sampler_weights", "rollout_prefill", "rollout_extend", "rollout_copy_rows", "rollout_fanout",
                   "rollout_fanout_local", "rollout_grow", "rollout_compact", "rollout_compact_local", "rollout_decode", "eval_decode", "grpo_step",
                   "grpo_logprobs", "ofsd_student_step", "ofsd_teacher_targets"]
  assert v5p_doc["devices"] == 4 and v5p_doc["processes"] == 1 and v5p_doc["mesh"] == {"data": 1, "fsdp": 4,
                                                                                        "tensor": 1}
  assert v5p_doc["chip"]["name"] == "v5p" and v5p_doc["chip"]["hbm_bytes"] == 95 * aot.GIB
  for r in v5p_doc["programs"]:
    live = r["args_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"]
    assert r["fits"] and live <= r["peak_bytes"] < live + 64 * 2 ** 20  # + the program's generated code
    held = r["peak_bytes"] + r["resident_bytes"]
    assert 0 < held < r["hbm_bytes"] and r["headroom_bytes"] == r["hbm_bytes"] - held
    assert r["est_step_s"] > 0 and r["compile_s"] > 0
  json.dumps(v5p_doc)  # the --json document is plain JSON


def test_rollout_programs_count_the_optimizer_state_held_through_rollouts(v5p_doc):
  """The learner's AdamW moments (float32, sharded over the 4 chips) and its in-step reference's params stay on the
  chips while the sampler runs: the sampler programs carry them as resident bytes (in fits and headroom), the
  learner programs (whose arguments they are) do not."""
  config = tiny_config()
  assert config.grpo.ref_logprobs == "in_step" and config.grpo.kl_coef > 0
  moments, ref = 2 * _param_bytes(config) / 4, _param_bytes(config) / 4  # per chip
  for r in v5p_doc["programs"]:
    if r["name"].startswith(("rollout_", "eval_", "sampler_")):
      assert r["resident_bytes"] == pytest.approx(moments + ref, rel=0.01), r["name"]
    else:
      assert r["resident_bytes"] == 0, r["name"]


def test_train_state_is_sharded_over_fsdp_and_donated(v5p_doc):
  """The GRPO step's per-chip arguments hold a quarter of params + Adam moments + the in-step reference (fsdp 4),
  and the whole state is donated: its output aliases its input."""
  total = _param_bytes(tiny_config())
  state_total = total * 4  # params, mu, nu, the frozen reference (all float32)
  step = next(r for r in v5p_doc["programs"] if r["name"] == "grpo_step")
  batch_bytes = step["args_bytes"] - step["alias_bytes"]
  assert state_total / 4 <= step["alias_bytes"] <= state_total / 4 * 1.1 + 4096
  assert 0 < batch_bytes < step["alias_bytes"]
  logprobs = next(r for r in v5p_doc["programs"] if r["name"] == "grpo_logprobs")
  assert logprobs["alias_bytes"] == 0  # reads params, donates nothing
  assert total / 4 <= logprobs["args_bytes"] < total / 4 * 1.1 + 2 ** 20


def test_collectives_are_parsed_from_compiled_hlo():
  text = """
  %all-gather.1 = bf16[4,128]{1,0} all-gather(bf16[1,128]{1,0} %p), dimensions={0}
  %ag-start = (bf16[1,64]{1,0}, bf16[4,64]{1,0}) all-gather-start(bf16[1,64]{1,0} %q), dimensions={0}
  %all-reduce.2 = (f32[8]{0}, f32[]) all-reduce(f32[8]{0} %a, f32[] %b), to_apply=%add
  %rs = f32[2,16]{1,0} reduce-scatter(f32[8,16]{1,0} %c), dimensions={0}
  %x = f32[2]{0} add(f32[2]{0} %y, f32[2]{0} %z)
  """
  got = aot.collectives(text)
  assert got["all-gather"] == {"count": 2, "bytes": 4 * 128 * 2 + (64 + 256) * 2 // 2, "max_bytes": 1024}
  assert got["all-reduce"] == {"count": 1, "bytes": 8 * 4 + 4, "max_bytes": 36}
  assert got["reduce-scatter"] == {"count": 1, "bytes": 128, "max_bytes": 128}
  assert set(got) == {"all-gather", "all-reduce", "reduce-scatter"}


def test_multi_host_topology_compiles_the_learner_step():
  doc = aot_compile.compile_run(tiny_config("v5e-16", **{"mesh.fsdp": 16}), "v5e-16", only=("grpo_step",))
  assert doc["devices"] == 16 and doc["processes"] == 4 and doc["chip"]["name"] == "v5e"
  (step,) = doc["programs"]
  assert step["name"] == "grpo_step" and step["fits"] and step["alias_bytes"] > 0


def test_mismatched_mesh_and_unknown_names_are_clear_errors():
  with pytest.raises(config_utils.ConfigError, match=r"spans 4 devices but 16 are available"):
    aot_compile.compile_run(tiny_config("v5p-8"), "v5e-16")
  with pytest.raises(ValueError, match=r"--topology 'v9-8': unknown; known: \["):
    aot.topology("v9-8")
  with pytest.raises(ValueError, match=r"--only \['nope'\]: not programs of this run"):
    aot_compile.compile_run(tiny_config(), "v5p-8", only=("nope",))


def test_cli_prints_the_table_and_writes_json(tmp_path):
  out = tmp_path / "aot.json"
  args = [sys.executable, "-m", "launch.aot_compile", "--config", "configs/search_e1.py:model=3b,mesh=v5p-8",
          "--topology", "v5p-8", "--json", str(out), "--only", "rollout_prefill"]
  args += [f"--config.{k}={v}" if v != "" else f"--config.{k}=" for k, v in TINY.items()]
  res = subprocess.run(args, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-2000:]
  assert "rollout_prefill" in res.stdout and "v5p-8: 4 chips" in res.stdout
  doc = json.loads(out.read_text())
  assert [r["name"] for r in doc["programs"]] == ["rollout_prefill"]
  assert set(doc["programs"][0]) >= {"name", "args_bytes", "output_bytes", "temp_bytes", "alias_bytes",
                                     "peak_bytes", "hbm_bytes", "fits", "compile_s", "collectives", "est_step_s"}
  assert np.isclose(doc["chip"]["bf16_flops"], 459e12)


def test_a_program_xla_refuses_for_hbm_is_reported_as_not_fitting():
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (287.48G) "
         "exceeds available HBM (95.74G).")
  assert aot._oom_bytes(msg) == int(287.48 * 2 ** 30)
  assert aot._oom_bytes("INTERNAL: something else") is None


def test_learner_collectives_move_weights_not_activations(v5p_doc):
  """FSDP as intended: the learner programs gather at most one weight matrix (in the compute dtype) at a time and
  all-reduce at most one weight's float32 gradient; no activation or [rows, chunk, vocab] logits collective (the
  tiny model's logits chunk, 12 x 32 x 2048, and its layer activations are larger than any weight)."""
  cfg = aot.model_config(tiny_config().model)
  abstract = jax.eval_shape(lambda: qwen2.init_params(cfg, jax.random.key(0)))
  largest = max(math.prod(x.shape) for x in jax.tree.leaves(abstract))
  for r in v5p_doc["programs"]:
    if r["name"] in ("grpo_step", "grpo_logprobs", "ofsd_student_step"):
      c = r["collectives"]
      assert c.get("all-gather", {"max_bytes": 0})["max_bytes"] <= largest * 2, (r["name"], c)  # none: gathered once
      assert c.get("all-reduce", {"max_bytes": 0})["max_bytes"] <= largest * 4, (r["name"], c)


def test_splash_attention_is_compiled_in_and_shrinks_temporaries(v5p_doc):
  """attention='auto' lowers the splash kernel into the TPU programs of full-sequence attention (learner steps,
  teacher pass; the tiny prefill of 64 tokens is below the kernel's 128 and stays einsums) and needs fewer
  temporary bytes than the einsum path ('xla'), whose float32 [T, T] scores the kernel never writes to HBM."""
  rows = {r["name"]: r for r in v5p_doc["programs"]}
  for name in ("grpo_step", "grpo_logprobs", "ofsd_student_step", "ofsd_teacher_targets"):
    assert rows[name]["kernel_calls"] > 0, name
  assert rows["rollout_prefill"]["kernel_calls"] == 0 and rows["rollout_decode"]["kernel_calls"] == 0
  xla = aot_compile.compile_run(tiny_config(**{"model.attention": "xla"}), "v5p-8",
                                only=("grpo_step", "ofsd_teacher_targets"))
  for r in xla["programs"]:
    assert r["kernel_calls"] == 0
    assert rows[r["name"]]["temp_bytes"] < r["temp_bytes"], r["name"]


def test_prefill_and_extend_gather_weights_not_activations(v5p_doc):
  """The sampler's prefill / extend pin activations batch-sharded too: no all-reduce of [rows, T, D] partial sums
  (the tiny run's 64 rows x 64 tokens x 256 in float32 = 4 MiB, twice its largest weight in float32)."""
  cfg = aot.model_config(tiny_config().model)
  abstract = jax.eval_shape(lambda: qwen2.init_params(cfg, jax.random.key(0)))
  largest = max(math.prod(x.shape) for x in jax.tree.leaves(abstract))
  for r in v5p_doc["programs"]:
    if r["name"] in ("rollout_prefill", "rollout_extend"):
      c = r["collectives"]
      assert c.get("all-reduce", {"max_bytes": 0})["max_bytes"] <= largest * 4, (r["name"], c)
      assert c.get("all-gather", {"max_bytes": 0})["max_bytes"] <= largest * 2, (r["name"], c)  # none: gathered once


def test_decode_programs_report_per_step_hbm_bytes(v5p_doc):
  """XLA's bytes accessed of one decode step (its while-loop body) against the minimum: the weights and the
  per-chip share of the cache read once. A step cannot read less than that."""
  for r in v5p_doc["programs"]:
    if r["name"].endswith("_decode"):
      assert r["step_bytes_min"] > 0 and r["step_bytes_xla"] >= r["step_bytes_min"], r
    else:
      assert "step_bytes_xla" not in r


def test_decode_reads_weights_gathered_once_per_session(v5p_doc):
  """sampling.gather_weights: the sampler programs take the session's bfloat16 copy, gathered over fsdp by
  `sampler_weights` once; a decode step then gathers no weights. With the training layout (False) every step
  all-gathers them (the largest gather is a whole weight matrix in bfloat16) and reads more bytes per step."""
  config = tiny_config()
  cfg = aot.model_config(config.model)
  abstract = jax.eval_shape(lambda: qwen2.init_params(cfg, jax.random.key(0)))
  largest = max(math.prod(x.shape) for x in jax.tree.leaves(abstract))
  rows = {r["name"]: r for r in v5p_doc["programs"]}
  assert rows["sampler_weights"]["collectives"]["all-gather"]["max_bytes"] == largest * 2  # bfloat16, whole
  for name in ("rollout_decode", "eval_decode"):  # only the small per-row outputs, replicated for every host
    gathered = rows[name]["collectives"].get("all-gather", {"bytes": 0})["bytes"]
    assert gathered < largest * 2 / 64, rows[name]["collectives"]
  sharded = aot_compile.compile_run(tiny_config(**{"sampling.gather_weights": False}), "v5p-8",
                                    only=("rollout_decode",))["programs"][0]
  assert sharded["collectives"]["all-gather"]["max_bytes"] == largest * 2
  # Same minimum (every weight in bfloat16 once, plus the cache share), more bytes read per step.
  assert sharded["step_bytes_min"] == rows["rollout_decode"]["step_bytes_min"]
  assert sharded["step_bytes_xla"] > rows["rollout_decode"]["step_bytes_xla"]


def test_decode_steps_copy_no_cache_sized_buffer():
  """The TPU presets cache keys and values slots-major (model.kv_cache_layout='slots_major'): no copy of a
  cache-sized buffer inside the decode loop. (Heads-major, the one-slot write made XLA copy every layer's whole
  cache into another layout in every step: 256 MiB copies per layer on 3B.) Two KV heads, as a multi-head cache
  is what XLA relaid out."""
  config = tiny_config(**{"model.num_heads": 4, "model.num_kv_heads": 2, "model.hidden_size": 512})
  assert config.model.kv_cache_layout == "slots_major"
  cfg = aot.model_config(config.model)
  shapes = aot.RunShapes.from_config(config, aot.run_mesh(config, aot.topology("v5p-8").devices)[0])
  layer_cache = shapes.rollout_rows // 4 * cfg.num_kv_heads * cfg.head_dim * shapes.cache * 2  # keys, per chip
  for layout, copied in (("slots_major", False), ("heads_major", True)):
    config.model.kv_cache_layout = layout
    r = aot_compile.compile_run(config, "v5p-8", only=("rollout_decode",))["programs"][0]
    assert (r["loop_copies"]["max_bytes"] >= layer_cache) == copied, (layout, r["loop_copies"])


def test_shared_prompt_copy_moves_the_prompt_slots_one_layer_at_a_time(v5p_doc):
  """rollout_copy_rows on the fsdp-sharded cache: a copied row crosses chips, so XLA gathers the copied rows onto
  every chip. It gathers only the prompt's slots (protocol.max_start_length 128 of 256: half the cache), not every
  slot, and one layer's array at a time (the temporaries hold a few arrays' gathered rows, not all of them).
  Measured before, on 3B / v5p-8: whole-cache all-gathers of 144 GiB and 180 GiB of copies per call; with the
  prefix but no ordering, 28.5 GiB of temporaries; now 36 GiB of all-reduce and 1.5 GiB of temporaries."""
  cfg, shapes = _tiny_model_and_shapes()
  r = next(p for p in v5p_doc["programs"] if p["name"] == "rollout_copy_rows")
  arrays = 2 * cfg.num_layers
  array_bytes = shapes.rollout_rows * cfg.num_kv_heads * cfg.head_dim * shapes.cache * 2  # bf16, whole batch
  prefix = 128 / shapes.cache
  assert prefix == 0.5 and r["shapes"] == f"{shapes.rollout_rows} rows x 128 slots copied, cache {shapes.cache}"
  moved = sum(c["bytes"] for c in r["collectives"].values())
  assert arrays * array_bytes * prefix <= moved <= 1.05 * arrays * array_bytes * prefix, r["collectives"]
  assert r["temp_bytes"] <= 3 * array_bytes * prefix, r["temp_bytes"]


def test_shared_prompt_fanout_moves_no_row_between_chips(v5p_doc):
  """A session's start fans each prompt's prefilled row out to its samples' rows (8 questions x 8 samples). With
  each prompt prefilled once, rows cross chips and XLA gathers the whole new cache onto every chip
  (rollout_fanout); prefilled once per shard its samples occupy, every row gathers inside its shard
  (rollout_fanout_local) and nothing moves between chips. Measured on 3B / v5p-8 (512 rows x 4,096 slots): the
  global form all-gathers 18 GiB per wave, the local one nothing."""
  cfg, shapes = _tiny_model_and_shapes()
  rows = {r["name"]: r for r in v5p_doc["programs"]}
  fanout, local = rows["rollout_fanout"], rows["rollout_fanout_local"]
  array_bytes = shapes.rollout_rows * cfg.num_kv_heads * cfg.head_dim * shapes.cache * 2  # bf16, whole batch
  assert fanout["shapes"] == f"8 -> {shapes.rollout_rows} rows, cache {shapes.cache}"
  assert sum(c["bytes"] for c in fanout["collectives"].values()) >= 2 * cfg.num_layers * array_bytes / 8, fanout
  assert local["collectives"] == {} and local["temp_bytes"] < array_bytes / 16, local


def test_cache_growth_is_local_and_compaction_moves_one_array_at_a_time(v5p_doc):
  """rollout_grow pads every chip's own rows (no collective; a relayout by row indices, even the identity,
  all-gathered the whole cache: 36 GiB and 54 GiB of copies on 3B / v5p-8). rollout_compact gathers the live rows
  into half the batch: XLA moves the new cache (all-reduce), one layer's array at a time; rollout_compact_local,
  where every live row stays on its chip, moves nothing between chips."""
  cfg, shapes = _tiny_model_and_shapes()
  rows = {r["name"]: r for r in v5p_doc["programs"]}
  grow, compact = rows["rollout_grow"], rows["rollout_compact"]
  array_bytes = shapes.rollout_rows * cfg.num_kv_heads * cfg.head_dim * shapes.cache * 2  # bf16, whole batch
  assert grow["collectives"] == {} and grow["copies"]["max_bytes"] < array_bytes / 64, grow
  assert grow["shapes"] == f"{shapes.rollout_rows} rows, cache {shapes.cache // 2} -> {shapes.cache}"
  moved = sum(c["bytes"] for c in compact["collectives"].values())
  assert moved <= 1.05 * 2 * cfg.num_layers * array_bytes / 2, compact["collectives"]  # the new (half) cache
  assert compact["temp_bytes"] <= 1.5 * array_bytes / 2, compact["temp_bytes"]
  local = rows["rollout_compact_local"]  # each chip gathers from its own rows
  assert local["collectives"] == {} and local["temp_bytes"] < array_bytes / 64, local


def test_loop_copies_are_those_the_loop_body_runs():
  hlo = """HloModule m
%fused_computation.1 (p: f32[8]) -> f32[8] {
  ROOT %copy.9 = f32[8]{0} copy(%p)
}
%body.2 (p: (s32[], f32[64,64])) -> (s32[], f32[64,64]) {
  %copy.1 = f32[64,64]{0,1} copy(%x)
  %f = f32[8]{0} fusion(%y), kind=kLoop, calls=%fused_computation.1
  %while.5 = (s32[]) while(%t), condition=%cond.3, body=%inner.4
}
%inner.4 (p: (s32[])) -> (s32[]) {
  %copy.2 = s32[16]{0} copy(%z)
}
%cond.3 (p: (s32[])) -> pred[] {
}
ENTRY %main (a: f32[64,64]) -> f32[64,64] {
  %copy.0 = f32[64,64]{0,1} copy(%a)
  %while.1 = (s32[], f32[64,64]) while(%t), condition=%cond.3, body=%body.2
}
"""
  assert aot.copies(hlo) == {"count": 4, "bytes": 2 * 64 * 64 * 4 + 64 + 32, "max_bytes": 64 * 64 * 4}
  assert aot.loop_copies(hlo) == {"count": 2, "bytes": 64 * 64 * 4 + 64, "max_bytes": 64 * 64 * 4}


def test_estimates_and_the_readme_row(v5p_doc):
  """The per-step and per-rollout estimates combine the programs' roofline seconds as the trainer runs them."""
  config = tiny_config()
  est = {r["name"]: r["est_step_s"] for r in v5p_doc["programs"]}
  updates = 8 // 4  # prompts_per_step / mini_batch_prompts, one PPO epoch
  recompute = est["grpo_logprobs"] if config.grpo.old_logprobs == "recompute" else 0.0
  assert np.isclose(v5p_doc["estimates"]["grpo_step_s"], updates * est["grpo_step"] + recompute)
  waves, turns, chunks = 1, config.protocol.max_turns + 1, 32 // 8  # 40 rows in one bucket; 32 tokens, chunks of 8
  assert config.rollout.schedule == "sync"  # a session per wave: its shared prompts fan out shard-locally
  want = waves * (est["rollout_prefill"] + est["rollout_fanout_local"] + turns * chunks * est["rollout_decode"]
                  + (turns - 1) * est["rollout_extend"])
  assert np.isclose(v5p_doc["estimates"]["rollout_s"], want)
  row = aot.summary_row(v5p_doc, "search_e1 3b")
  big = max(v5p_doc["programs"], key=lambda r: r["peak_bytes"])
  assert row.startswith(f"| search_e1 3b | v5p-8 | {big['name']} | ") and "| yes |" in row
  assert aot_compile._config_name(["x", "--config", "configs/search_e1.py:model=7b,mesh=v5e-16"]) == "search_e1 7b"
  assert aot_compile._config_name(["x", "--config=configs/demo.py:smoke"]) == "demo"
