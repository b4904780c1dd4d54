"""Checkpointer round trip, keep-N, and metrics.jsonl truncation on resume."""
import os

import jax
import jax.numpy as jnp
import numpy as np

from searche1_jax.train import checkpoint, metrics


def _state(seed):
  k = jax.random.key(seed)
  return {"params": {"w": jax.random.normal(k, (4, 3))}, "opt_state": (jnp.arange(3.0), jnp.int32(seed)),
          "rng": jax.random.key_data(k)}


def test_round_trip_keeps_last_n(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=2)
  for step in range(4):
    extra = {"ids": np.full((step + 1, 2), step, np.int32)}  # a different shape every save
    ckpt.save(step, _state(step), {"round": step, "phase": "grpo"}, extra)
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3]
  state, meta, extra = ckpt.restore(3, checkpoint.abstract_like(_state(0)))
  want = _state(3)
  np.testing.assert_array_equal(state["params"]["w"], want["params"]["w"])
  np.testing.assert_array_equal(state["rng"], want["rng"])
  assert int(state["opt_state"][1]) == 3
  assert meta == {"round": 3, "phase": "grpo"}
  np.testing.assert_array_equal(extra["ids"], np.full((4, 2), 3, np.int32))
  assert ckpt.restore_meta(2)["round"] == 2
  ckpt.close()
  # A fresh manager over the same directory sees the same checkpoints (resume after a restart).
  assert checkpoint.Checkpointer(str(tmp_path / "ckpt")).latest_step() == 3


def test_without_extra_and_params_only(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=2)
  ckpt.save(0, _state(5), {"phase": "grpo"})  # no extra: must still save
  ckpt.wait()
  state, meta, extra = ckpt.restore(0, checkpoint.abstract_like(_state(0)))
  assert extra is None and meta == {"phase": "grpo"}
  params = ckpt.restore_params(0, checkpoint.abstract_like(_state(0)["params"]))
  np.testing.assert_array_equal(params["w"], _state(5)["params"]["w"])
  ckpt.close()


def test_metrics_truncated_on_resume(tmp_path):
  w = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
  for s in range(5):
    w.write(s, "grpo", {"loss": float(s), "arr": np.float32(s)})
  w.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "pha')  # a line cut by a crash
  w = metrics.MetricsWriter(str(tmp_path), resume_step=2, tensorboard=True)
  w.write(3, "grpo", {"loss": 30.0})
  w.close()
  rows = metrics.read_metrics(str(tmp_path))
  assert [r["step"] for r in rows] == [0, 1, 2, 3]
  assert rows[3]["loss"] == 30.0 and rows[1] == {"step": 1, "phase": "grpo", "loss": 1.0, "arr": 1.0}
  assert os.listdir(tmp_path / "tensorboard")


def test_load_policy_from_trainer_checkpoint(tmp_path):
  from searche1_jax import models, sharding
  from searche1_jax.models import qwen2
  from searche1_jax.train import evaluation
  cfg = models.Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                           num_kv_heads=1)
  params = models.init_params(cfg, jax.random.key(1))
  import dataclasses
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
  ckpt.save(0, {"params": params, "opt_state": {"mu": params}, "step": jnp.int32(3)},
            {"model_config": dataclasses.asdict(cfg)})
  ckpt.close()
  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  got_cfg, got, _, step = checkpoint.load_policy(str(tmp_path), mesh=mesh)
  assert step == 0
  assert got_cfg == cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)
  assert got["layers"]["mlp"]["up"]["kernel"].sharding.spec == qwen2.param_shardings(cfg, mesh)["layers"]["mlp"][
      "up"]["kernel"].spec
  cfg2, got2 = evaluation.load_trainer_checkpoint(str(tmp_path / "checkpoints"), None, None, None)
  np.testing.assert_array_equal(got2["embed"]["embedding"], params["embed"]["embedding"])


def test_metrics_keep_exact_row_count(tmp_path):
  """Rows written after the checkpoint at the SAME step (e.g. a phase-boundary row) are dropped too."""
  w = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
  w.write(1, "grpo", {"loss": 1.0})
  w.write(2, "grpo", {"loss": 2.0})
  rows_at_checkpoint = w.rows
  w.write(2, "ofsd_buffer", {"pairs": 3.0})  # written, then the process is killed before the next save
  w.close()
  w = metrics.MetricsWriter(str(tmp_path), resume_step=2, keep_rows=rows_at_checkpoint, tensorboard=False)
  assert w.rows == 2
  w.write(2, "ofsd_buffer", {"pairs": 3.0})
  w.close()
  assert [r["phase"] for r in metrics.read_metrics(str(tmp_path))] == ["grpo", "grpo", "ofsd_buffer"]
