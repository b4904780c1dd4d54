"""Config system: argument strings, overrides, semantic validation, resume checks, every experiment config, and the
launch/train.py command line up to the round loop."""
import glob
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from configs import common
from searche1_jax import config_utils as cu
from searche1_jax.config_utils import ConfigError

import testenv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = ("search_r1_grpo", "search_e1", "sd_search")


def load(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  return cu.load_config(os.path.join(ROOT, "configs", f"{name}.py") + (f":{arg}" if arg is not None else ""))


# ------------------------------------------------------------------------------------------ argument strings

def test_parse_arg_types_flags_and_defaults():
  a = cu.parse_arg("smoke, seed=3,lr=0.5,model=7b", smoke=False, seed=0, lr=1.0, model="3b", mesh="v4-8")
  assert (a.smoke, a.seed, a.lr, a.model, a.mesh) == (True, 3, 0.5, "7b", "v4-8")
  assert isinstance(a.seed, int) and isinstance(a.lr, float)
  assert cu.parse_arg("smoke=false", smoke=True).smoke is False
  assert cu.parse_arg(None, seed=1).seed == 1 and cu.parse_arg("", seed=1).seed == 1
  lazy = cu.parse_arg("x=3,name=abc,flag", lazy=True)
  assert (lazy.x, lazy.name, lazy.flag) == (3, "abc", True)


@pytest.mark.parametrize("arg,match", [
    ("sed=3", r"unknown argument 'sed'; known: \['mesh', 'seed', 'smoke'\]"),
    ("seed=three", r"seed='three' is not an integer"),
    ("smoke=maybe", r"smoke='maybe' is not a boolean"),
    ("mesh", r"argument 'mesh' needs a value"),
    ("9lives=1", r"'9lives' is not a valid argument name"),
])
def test_parse_arg_errors_name_the_argument(arg, match):
  with pytest.raises(ConfigError, match=match):
    cu.parse_arg(arg, seed=0, smoke=False, mesh="cpu")


def test_split_and_load_config_with_argument():
  assert cu.split_config_string("configs/demo.py:smoke,seed=3") == ("configs/demo.py", "smoke,seed=3")
  assert cu.split_config_string("configs/demo.py") == ("configs/demo.py", None)
  c = load("search_e1", "model=7b,mesh=v5e-16,root=/data")
  assert c.model.preset == "qwen2.5-7b" and c.model.hf_dir == "/data/models/Qwen2.5-7B"
  assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == (1, 8, 2)
  assert c.rollout.decode_slots == 128 and c.sampling.gather_weights is False  # no room for a 7B copy per chip
  assert load("search_e1", "model=3b,mesh=v5p-8").sampling.gather_weights is True
  assert c.data.tfds_dir == "/data/tfds" and c.retrieval.index_dir == "/data/index/e5_wiki18"
  with pytest.raises(ConfigError, match=r"search_e1.py:mesh=v9-8: mesh='v9-8': unknown mesh preset"):
    load("search_e1", "mesh=v9-8")
  with pytest.raises(ConfigError, match=r"config file .*nope.py' does not exist"):
    cu.load_config(os.path.join(ROOT, "configs", "nope.py"))


# -------------------------------------------------------------------------------------------------- overrides

def test_apply_overrides_typed_like_the_field():
  c = load("search_e1")
  cu.apply_overrides(c, ["ofsd.kind=jsd", "ofsd.beta=0.25", "train.num_rounds=9", "ofsd.enabled=false",
                         "ofsd.top_k=32", "optim.no_decay=('bias', 'norm')"])
  assert (c.ofsd.kind, c.ofsd.beta, c.train.num_rounds, c.ofsd.enabled, c.ofsd.top_k) == ("jsd", 0.25, 9, False, 32)
  assert c.optim.no_decay == ("bias", "norm")
  with pytest.raises(ConfigError, match=r"train.num_rounds='many' is not an integer"):
    cu.apply_overrides(c, ["train.num_rounds=many"])


def test_unknown_override_field_is_one_clear_error():
  c = load("search_e1")
  with pytest.raises(ConfigError) as e:
    cu.apply_overrides(c, ["ofsd.kindd=jsd"])
  msg = str(e.value)
  assert "unknown config field 'ofsd.kindd'" in msg and "did you mean 'ofsd.kind'" in msg
  argv = ["train.py", "--config=x.py", "--config.grpo.kl_coef=0.1", "--config.grop.kl_coef=0.1",
          "--noconfig.ofsd.enabled", "--config.ofsd.kind.sub=1"]
  assert [p for p, _ in cu.override_paths(argv)] == ["grpo.kl_coef", "grop.kl_coef", "ofsd.enabled", "ofsd.kind.sub"]
  with pytest.raises(ConfigError) as e:
    cu.check_override_paths(c, argv)
  lines = str(e.value).splitlines()
  assert len(lines) == 2
  assert lines[0].startswith("--config.grop.kl_coef=0.1: unknown config field 'grop.kl_coef'")
  assert "'ofsd.kind' is a value, not a block" in lines[1]
  assert cu.config_string_from_argv(["t", "--config", "a.py:x=1"]) == "a.py:x=1"
  assert cu.config_string_from_argv(["t", "--config=a.py"]) == "a.py"


# ------------------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.parametrize("model", ["3b", "7b"])
@pytest.mark.parametrize("mesh,devices", [("v4-8", 4), ("v5p-8", 4), ("v5e-16", 16), ("cpu", 8)])
def test_experiment_configs_build_and_validate(name, model, mesh, devices):
  c = load(name, f"model={model},mesh={mesh}")
  cu.validate_config(c, num_devices=devices)
  assert c.name == f"{name}_{model}"
  if mesh == "cpu":  # fsdp=-1 takes whatever there is
    cu.validate_config(c, num_devices=3)
  else:
    with pytest.raises(ConfigError, match="must use them all"):
      cu.validate_config(c, num_devices=devices * 2)


def test_experiment_configs_hold_the_published_recipes():
  r1 = load("search_r1_grpo")
  assert (r1.train.prompts_per_step, r1.grpo.group_size, r1.grpo.temperature) == (512, 5, 1.0)
  assert (r1.protocol.max_prompt_length, r1.protocol.max_response_length, r1.protocol.max_start_length,
          r1.protocol.max_obs_length) == (4096, 500, 2048, 500)
  assert (r1.optim.learning_rate, r1.optim.warmup_ratio, r1.optim.grad_clip_norm) == (1e-6, 0.285, 1.0)
  assert (r1.grpo.kl_coef, r1.grpo.kl_estimator, r1.grpo.clip_eps) == (0.001, "k3", 0.2)
  assert r1.train.mini_batch_prompts * r1.grpo.group_size == 1280  # trajectories per update (ppo_mini_batch 256)
  # Micro-batches are a memory setting of the host type (configs/common.LEARNER), not part of the recipe.
  for mesh in ("v4-8", "v5p-8", "v5e-16"):
    for model in ("3b", "7b"):
      c = load("search_r1_grpo", f"model={model},mesh={mesh}")
      for k, v in common.LEARNER[mesh][model].items():
        node = c
        for part in k.split("."):
          node = node[part]
        assert node == v, (mesh, model, k)
  assert (r1.train.grpo_steps_per_round * r1.train.num_rounds, r1.protocol.max_turns, r1.protocol.topk) == (1005, 4, 3)
  assert r1.rollout.eval.temperature == 0.0 and r1.ofsd.enabled is False
  e1 = load("search_e1")
  assert e1.ofsd.enabled and (e1.ofsd.mode, e1.ofsd.kind, e1.ofsd.spans) == ("offline", "forward_kl", "policy")
  assert e1.ofsd.efficiency == "searches_then_tokens" and e1.ofsd.top_k == 64
  assert e1.grpo.kl_coef == 0.001 and e1.train.num_rounds > 1
  sd = load("sd_search")
  assert (sd.ofsd.mode, sd.ofsd.kind, sd.ofsd.spans, sd.ofsd.top_k) == ("on_policy", "jsd", "query", 50)
  assert (sd.ofsd.alpha, sd.ofsd.warmup_steps, sd.ofsd.context_format) == (1e-3, 50, "actions")


OTHER_CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                       if os.path.basename(p) not in ("__init__.py", "common.py"))


@pytest.mark.parametrize("path", OTHER_CONFIGS, ids=os.path.basename)
def test_every_config_file_builds_and_validates(path):
  with open(path) as f:
    if "def get_config" not in f.read():
      pytest.skip("not an experiment config")
  cu.validate_config(cu.load_config(path))


def _errors(config) -> list[str]:
  with pytest.raises(ConfigError) as e:
    cu.validate_config(config)
  lines = str(e.value).splitlines()
  assert lines[0] == "invalid config:"
  return [l.strip() for l in lines[1:]]


@pytest.mark.parametrize("overrides,expected", [
    ({"grpo.group_size": 1}, "grpo.group_size=1: GRPO needs groups of >= 2"),
    ({"ofsd.kind": "fkl"}, "ofsd.kind='fkl': must be one of ('forward_kl', 'reverse_kl', 'jsd')"),
    ({"ofsd.mode": "online"}, "ofsd.mode='online': must be one of ('offline', 'on_policy')"),
    ({"ofsd.beta": 1.5}, "ofsd.beta=1.5: must be <= 1.0"),
    ({"ofsd.top_k": -3}, "ofsd.top_k=-3: must be >= 0"),
    ({"ofsd.spans": "search"}, "ofsd.spans='search': must be one of ('policy', 'query', 'query_answer')"),
    ({"ofsd.storage": "gpu"}, "ofsd.storage='gpu': must be one of ('host', 'disk')"),
    ({"ofsd.batch_size": 62}, "ofsd.num_microbatches=4: must divide ofsd.batch_size=62"),
    ({"ofsd.context_format": "actions"}, "ofsd.context_passages=True: the 'actions' context format"),
    ({"ofsd.mode": "on_policy", "ofsd.alpha": 0.0}, "ofsd.alpha=0.0: on-policy OFSD adds alpha"),
    ({"ofsd.mode": "on_policy", "ofsd.group_size": 8}, "ofsd.group_size=8: in on_policy mode"),
    ({"ofsd.optim.learning_rate": 0.0}, "ofsd.optim.learning_rate=0.0: must be > 0.0"),
    ({"grpo.kl_estimator": "k4"}, "grpo.kl_estimator='k4': must be one of ('k1', 'k2', 'k3')"),
    ({"grpo.clip_eps": 1.0}, "grpo.clip_eps=1.0: must be < 1.0"),
    ({"sampling.temperature": 0.7}, "grpo.temperature=1.0 and sampling.temperature=0.7 must be equal"),
    ({"sampling.top_p": 0.0}, "sampling.top_p=0.0: must be > 0.0"),
    ({"grpo.tis_cap": 2.0, "grpo.old_logprobs": "sampler"}, "grpo.tis_cap=2.0: needs grpo.old_logprobs='recompute'"),
    ({"grpo.old_logprobs": "current"}, "grpo.old_logprobs='current' takes the learner's own log-probs"),
    ({"grpo.tis_cap": 0.5}, "grpo.tis_cap=0.5: must be 0 (off) or >= 1"),
    ({"train.length_buckets": (512, 256, 4096)}, "train.length_buckets=(512, 256, 4096): must be increasing"),
    ({"train.length_buckets": (0, 4096)}, "train.length_buckets=(0, 4096): entries must each be >= 1"),
    ({"train.length_buckets": (256, 384, 512)}, "train.length_buckets=(256, 384, 512): the largest must hold a "
     "trajectory of protocol.max_prompt_length=4096 tokens"),
    ({"grpo.temperature": 0.7, "sampling.temperature": 0.7, "grpo.old_logprobs": "sampler"},
     "grpo.old_logprobs='sampler': compares sampler log-probs (recorded at temperature 1) with the learner's at "
     "grpo.temperature=0.7"),
    ({"grpo.temperature": 0.7, "sampling.temperature": 0.7, "grpo.tis_cap": 2.0}, "grpo.tis_cap=2.0: compares"),
    ({"grpo.ref_on_host": True, "grpo.ref_logprobs": "in_step"},
     "grpo.ref_on_host=True: needs grpo.ref_logprobs='precompute'"),
    ({"sampling.decode_chunk": 0}, "sampling.decode_chunk=0: must be >= 1"),
    ({"sampling.length_buckets": (16, 32)}, "sampling.max_extend=512: exceeds the largest of"),
    ({"ofsd.efficiency": "fast"}, "ofsd.efficiency='fast': must be one of"),
    ({"rollout.decode_slots": 3}, "rollout.decode_slots=3: must be 0 or >= grpo.group_size=5"),
    ({"rollout.decode_slots": -1}, "rollout.decode_slots=-1: must be >= 0"),
    ({"grpo.num_microbatches": 7}, "grpo.num_microbatches=7 must divide the trajectories per update"),
    ({"train.mini_batch_prompts": 300}, "train.mini_batch_prompts=300 must divide train.prompts_per_step=512"),
    ({"optim.warmup_ratio": 1.5}, "optim.warmup_ratio=1.5: must be <= 1.0"),
    ({"optim.schedule": "linear"}, "optim.schedule='linear': must be one of ('constant', 'cosine')"),
    ({"model.preset": "qwen9-1b", "model.hf_dir": ""}, "model.preset='qwen9-1b': unknown preset"),
    ({"model.dtype": "float8"}, "model.dtype='float8': must be one of"),
    ({"protocol.max_turns": -1}, "protocol.max_turns=-1: must be >= 0"),
    ({"protocol.template": "no placeholder"}, "protocol.template has no '{question}' placeholder"),
    ({"retrieval.topk": 5}, "retrieval.topk=5 and protocol.topk=3 must be equal"),
    ({"retrieval.miss_rate": 1.0}, "retrieval.miss_rate=1.0: must be < 1.0"),
    ({"data.train_dataset": "squad"}, "data.train_dataset='squad': must be one of"),
    ({"distributed.mode": "maybe"}, "distributed.mode='maybe': must be one of ('auto', 'on', 'off')"),
    ({"distributed.num_processes": 2, "distributed.process_id": 2}, "distributed.process_id=2 must be <"),
    ({"mesh.fsdp": 0}, "mesh.fsdp=0: must be a positive integer or -1"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, "mesh.(data, fsdp, tensor)=(-1, -1, 1): at most one axis may be -1"),
    ({"seed": -1}, "seed=-1: must be >= 0"),
])
def test_bad_values_are_named(overrides, expected):
  c = load("search_e1")
  cu.apply_overrides(c, overrides)
  errors = _errors(c)
  assert any(e.startswith(expected) for e in errors), errors


def test_learner_temperature_below_one_is_fine_with_recomputed_old_logprobs():
  c = load("search_e1")
  cu.apply_overrides(c, {"grpo.temperature": 0.7, "sampling.temperature": 0.7})
  assert cu.validate_config(c) is c  # old_logprobs='recompute', tis_cap 0: both sides at grpo.temperature


def test_current_old_logprobs_need_one_update_per_rollout_batch():
  c = load("search_e1")
  cu.apply_overrides(c, {"grpo.old_logprobs": "current", "train.mini_batch_prompts": 512, "train.ppo_epochs": 2})
  assert any("(got 512, 512, 2)" in e for e in _errors(c)), _errors(c)  # several PPO epochs
  cu.apply_overrides(c, {"train.ppo_epochs": 1})
  assert cu.validate_config(c) is c  # one update per rollout batch, at any temperature
  cu.apply_overrides(c, {"grpo.temperature": 0.7, "sampling.temperature": 0.7})
  assert cu.validate_config(c) is c


def test_demo_transcripts_must_script_the_retrievers_misses():
  c = load("demo")
  cu.apply_overrides(c, {"retrieval.miss_rate": 0.25})
  assert any(e.startswith("world.transcripts.miss_rate=0.0 and retrieval.miss_rate=0.25 must be equal")
             for e in _errors(c))
  cu.apply_overrides(c, {"world.transcripts.miss_rate": 0.25})
  cu.validate_config(c)


def test_all_problems_in_one_error_and_no_checks_for_absent_blocks():
  c = load("search_e1")
  cu.apply_overrides(c, {"ofsd.kind": "kl", "grpo.group_size": 1, "optim.learning_rate": -1.0})
  errors = _errors(c)
  assert len(errors) == 4  # group_size, num_microbatches vs group size, ofsd.kind, lr
  minimal = ml_collections.ConfigDict({"seed": 0, "train": {"num_rounds": 2}})
  assert cu.validate_config(minimal, num_devices=3) is minimal


def test_ofsd_block_defaults_validate_and_top_k_none():
  from configs.parts import ofsd
  b = ofsd.get()
  assert b.top_k is None and b.kind == "forward_kl" and b.mode == "offline" and b.spans == "policy"
  assert b.efficiency == "searches_then_tokens" and b.optim.warmup_steps == 0
  cu.validate_config(ml_collections.ConfigDict({"ofsd": b}))


# ------------------------------------------------------------------------------------------------ resume check

def test_config_diff_ignores_fields_that_may_change():
  saved = {"a": {"b": 1, "c": [1, 2]}, "mesh": {"fsdp": 4}, "train": {"num_rounds": 5}}
  now = {"a": {"b": 2, "c": [1, 2], "new": True}, "mesh": {"fsdp": 8}, "train": {"num_rounds": 7}}
  diff = cu.config_diff(saved, now, ignore=("mesh", "train.num_rounds"))
  assert diff == [("a.b", 1, 2), ("a.new", "<absent>", True)]
  assert "a.b: saved 1 -> now 2" in cu.format_diff(diff)


def test_sync_config_file_new_same_changed(tmp_path):
  from launch import train
  wd = str(tmp_path / "run")
  c = load("search_e1", "mesh=cpu")
  assert train.sync_config_file(wd, c) == "new"
  saved = json.load(open(os.path.join(wd, "config.json")))
  assert saved["ofsd"]["kind"] == "forward_kl" and saved["ofsd"]["top_k"] == 64
  assert train.sync_config_file(wd, c) == "same"
  c2 = load("search_e1", "mesh=v4-8")
  cu.apply_overrides(c2, {"train.num_rounds": 9, "checkpoint.keep": 1})  # where / how long: allowed
  assert train.sync_config_file(wd, c2) == "same"
  cu.apply_overrides(c2, {"ofsd.kind": "jsd", "grpo.kl_coef": 0.01})
  with pytest.raises(ConfigError) as e:
    train.sync_config_file(wd, c2)
  msg = str(e.value)
  assert "refusing to resume" in msg and "grpo.kl_coef: saved 0.001 -> now 0.01" in msg
  assert "ofsd.kind: saved 'forward_kl' -> now 'jsd'" in msg and "num_rounds" not in msg
  assert train.sync_config_file(wd, c2, allow_change=True) == "changed"
  assert json.load(open(os.path.join(wd, "config.json")))["ofsd"]["kind"] == "jsd"
  assert json.load(open(os.path.join(wd, "config.prev.json")))["ofsd"]["kind"] == "forward_kl"


def test_prepare_validates_against_the_devices(tmp_path):
  import jax
  from launch import train
  assert jax.device_count() == 8
  c = load("search_e1", "mesh=cpu")
  assert train.prepare(c, str(tmp_path / "a")) is c
  with pytest.raises(ConfigError, match=r"spans 4 devices but 8 are available"):
    train.prepare(load("search_e1", "mesh=v4-8"), str(tmp_path / "b"))
  assert not os.path.exists(tmp_path / "b" / "config.json")  # nothing written for a config that cannot run


# --------------------------------------------------------------------------------------------- the command line

def _train(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=testenv.xla_flags(4))
  return subprocess.run([sys.executable, "-m", "launch.train", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)


@pytest.mark.slow
def test_train_cli_validates_saves_and_refuses_changed_resume(tmp_path):
  wd = str(tmp_path / "run")
  r = _train("--config=configs/search_e1.py:mesh=v4-8", f"--workdir={wd}", "--validate_only",
             "--config.ofsd.top_k=32")
  assert r.returncode == 0, r.stderr
  saved = json.load(open(os.path.join(wd, "config.json")))
  assert saved["ofsd"]["top_k"] == 32 and saved["mesh"]["fsdp"] == 4

  r = _train("--config=configs/search_e1.py:mesh=v4-8", f"--workdir={wd}", "--validate_only",
             "--config.ofsd.kind=jsd")
  assert r.returncode == 2
  assert "refusing to resume" in r.stderr and "ofsd.kind: saved 'forward_kl' -> now 'jsd'" in r.stderr
  assert "ofsd.top_k: saved 32 -> now 64" in r.stderr

  r = _train("--config=configs/search_e1.py:mesh=v4-8", f"--workdir={wd}", "--validate_only",
             "--config.ofsd.kindd=jsd")
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert "--config.ofsd.kindd=jsd: unknown config field 'ofsd.kindd'" in r.stderr
  assert "did you mean 'ofsd.kind'" in r.stderr

  r = _train("--config=configs/search_e1.py:mesh=v4-8", "--workdir=gs://bucket/run", "--validate_only")
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert "--workdir=gs://bucket/run: a URL is not supported; mount the bucket" in r.stderr
  assert not os.path.exists("gs:")

  r = _train("--config=configs/search_e1.py:mesh=v4-8", f"--workdir={tmp_path}/other", "--validate_only",
             "--config.ofsd.kind=fkl", "--config.grpo.group_size=1")
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert "ofsd.kind='fkl': must be one of" in r.stderr and "grpo.group_size=1: GRPO needs groups" in r.stderr

  r = _train("--config=configs/search_e1.py:mesh=v5e-16", f"--workdir={tmp_path}/other", "--validate_only")
  assert r.returncode == 2 and "spans 16 devices but 4 are available" in r.stderr
  r = _train("--config=configs/search_e1.py:msh=cpu", f"--workdir={tmp_path}/other", "--validate_only")
  assert r.returncode == 2 and "unknown argument 'msh'" in r.stderr and "Traceback" not in r.stderr
  assert not os.path.exists(tmp_path / "other" / "config.json")


def test_every_part_has_its_file_and_an_unknown_part_is_an_error():
  from configs import common
  for name in common.PARTS:
    block = common.part(name)
    assert isinstance(block, ml_collections.ConfigDict) and len(block) > 0, name
  with pytest.raises(ModuleNotFoundError, match="no_such_part"):
    common.part("no_such_part")


def test_config_outside_the_repository_root_names_the_fix(tmp_path):
  """Loaded from another directory, a config's `from configs import ...` fails with the way to run it."""
  code = ("from searche1_jax import config_utils\n"
          f"config_utils.load_config({os.path.join(ROOT, 'configs', 'demo.py')!r})")
  r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert r.returncode != 0 and "run from the repository root" in r.stderr and "configs" in r.stderr, r.stderr
