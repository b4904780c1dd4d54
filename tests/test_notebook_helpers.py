"""The package functions the notebooks call: a tiny world with its tokenizer, a transcript as a Trajectory, and
loading a run's newest checkpoint with its config."""
import dataclasses
import json

import jax
import ml_collections
import numpy as np
import pytest

from configs.parts import protocol as protocol_part
from configs.parts import world as world_part
from searche1_jax.demo import tiny_world
from searche1_jax.demo import transcripts as transcripts_lib
from searche1_jax.models import qwen2
from searche1_jax.train import checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  proto = protocol_part.get()
  block = world_part.get()
  wcfg, world, world_dir, tok = tiny_world.build_tiny_world(str(tmp_path_factory.mktemp("tiny")), block, proto)
  return proto, block, wcfg, world, world_dir, tok


def test_tiny_world_has_the_stated_sizes_and_leaves_the_block_alone(tiny):
  proto, block, wcfg, world, world_dir, tok = tiny
  assert block.num_people == world_part.get().num_people  # the caller's block is not resized
  assert wcfg.num_people == 40 and len(world.train_questions) == 24 and len(world.test_questions) == 8
  assert len(tok) <= tiny_world.VOCAB_SIZE + 16
  assert all(len(tok.encode(t, add_special_tokens=False)) == 1 for t in ("<search>", "</answer>"))


def test_transcript_trajectory_rebuilds_the_transcript_token_by_token(tiny):
  proto, _, wcfg, world, _, tok = tiny
  q = world.train_questions[0]
  record = transcripts_lib.make_transcript_records(world, [q], np.random.default_rng(0), wcfg.transcripts, proto)[0]
  traj = transcripts_lib.transcript_trajectory(record, q, tok, proto.template, sample_index=3)
  traj.validate()
  assert tok.decode(traj.ids, skip_special_tokens=False) == "".join(text for text, _ in record.segments)
  policy = "".join(tok.decode(traj.ids[a:b], skip_special_tokens=False) for a, b in traj.policy_spans)
  assert policy == "".join(text for text, trainable in record.segments if trainable)
  assert int(np.sum(traj.policy_mask)) == sum(b - a for a, b in traj.policy_spans)
  assert traj.sample_index == 3 and traj.queries == list(record.searches)
  assert traj.reward in (0.0, 1.0)
  with pytest.raises(ValueError, match="prompt text differs"):
    transcripts_lib.transcript_trajectory(record, q, tok, "Q: {question}\n")


def test_load_run_returns_config_and_newest_checkpoint(tmp_path):
  assert checkpoint.load_run(str(tmp_path)) is None  # nothing there yet
  cfg = qwen2.Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                          num_kv_heads=1)
  (tmp_path / "config.json").write_text(json.dumps({"seed": 3, "model": {"hf_dir": "x"}}))
  assert checkpoint.load_run(str(tmp_path)) is None  # a config but no checkpoint
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  for step, key in ((1, 1), (4, 2)):
    params = qwen2.init_params(cfg, jax.random.key(key))
    ckpt.save(step, {"params": params, "step": np.int32(step)},
              {"model_config": dataclasses.asdict(cfg), "cursor": {"round": step}})
  ckpt.close()
  config, meta, got_cfg, got = checkpoint.load_run(str(tmp_path))
  assert isinstance(config, ml_collections.ConfigDict) and config.seed == 3 and config.model.hf_dir == "x"
  assert got_cfg == cfg and meta["cursor"]["round"] == 4
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
