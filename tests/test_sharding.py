"""Mesh + logical-axis rules on 8 fake CPU devices (tests/conftest.py): fsdp=4 x tensor=2."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from searche1_jax import sharding
from searche1_jax.models import hf, qwen2
from model_testlib import random_params

# kv_heads=2 and heads=4 divide tensor=2; hidden 32 and vocab 64 divide fsdp=4.
CFG = qwen2.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                        num_kv_heads=2, rope_theta=10000.0, initializer_range=0.2,
                        attention_block=4)  # sharded causal attention blocks are exercised too


def expected_spec(names, shape, mesh_shape):
  """Independent restatement of the default rules: which mesh axis each logical axis goes to."""
  table = {"batch": ("data", "fsdp"), "embed": "fsdp", "vocab": "tensor", "heads": "tensor", "kv_heads": "tensor",
           "mlp": "tensor"}
  out = []
  for n, dim in zip(names, shape):
    axes = table.get(n)
    size = np.prod([mesh_shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ())])
    out.append(axes if axes is not None and dim % size == 0 else None)
  return P(*out)


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "tests/conftest.py must give 8 fake CPU devices"
  return sharding.make_mesh(data=1, fsdp=4, tensor=2)


def _leaves_with_names(tree, is_leaf=None):
  return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)]


def test_make_mesh_sizes_and_errors():
  m = sharding.make_mesh(data=2, fsdp=-1, tensor=2)
  assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(sharding.make_mesh().shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  with pytest.raises(ValueError, match="needs 16 devices, have 8"):
    sharding.make_mesh(data=2, fsdp=4, tensor=2)
  with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
    sharding.make_mesh(data=-1, fsdp=-1)
  with pytest.raises(ValueError, match="8 devices do not divide into"):
    sharding.make_mesh(data=3, fsdp=-1)


def test_logical_to_mesh_and_shape_fallback(mesh):
  assert sharding.logical_to_mesh(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)  # fsdp used once
  assert sharding.logical_to_mesh(("embed", "mlp")) == P("fsdp", "tensor")
  # A dim the mesh axis does not divide is replicated instead of failing.
  assert sharding.spec_for_shape((6, 3), ("embed", "kv_heads"), mesh) == P(None, None)
  assert sharding.spec_for_shape((8, 4), ("embed", "kv_heads"), mesh) == P("fsdp", "tensor")


def test_rules_from_config_validates():
  rules = sharding.rules_from_config([("batch", ["data", "fsdp"]), ("embed", None), ("mlp", "tensor")])
  assert rules == (("batch", ("data", "fsdp")), ("embed", None), ("mlp", "tensor"))
  with pytest.raises(ValueError, match=r"sharding rule for 'mlp' names unknown mesh axes \['model'\]"):
    sharding.rules_from_config([("mlp", "model")])
  with pytest.raises(ValueError, match="sharding rule #0 must be a"):
    sharding.rules_from_config([("mlp",)])


def test_params_carry_rule_shardings(mesh):
  params = qwen2.shard_params(random_params(CFG), CFG, mesh)
  axes = qwen2.param_logical_axes(CFG)
  named_axes = dict(_leaves_with_names(axes, is_leaf=lambda n: isinstance(n, tuple)))
  for name, x in _leaves_with_names(params):
    names = tuple(named_axes[name])
    assert x.sharding.spec == expected_spec(names, x.shape, dict(mesh.shape)), name
  # Spot checks, literally: Megatron-style heads/mlp over tensor, ZeRO-3 embed over fsdp.
  layers = params["layers"]
  assert layers["attn"]["q"]["kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
  assert layers["attn"]["o"]["kernel"].sharding.spec == P(None, "tensor", None, "fsdp")
  assert layers["mlp"]["down"]["kernel"].sharding.spec == P(None, "tensor", "fsdp")
  assert params["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
  assert params["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")
  assert layers["input_norm"]["scale"].sharding.spec == P(None, None)
  # Each device holds 1/8 of the q kernel: [L, D/4, H/2, hd].
  shard_shapes = {s.data.shape for s in layers["attn"]["q"]["kernel"].addressable_shards}
  assert shard_shapes == {(2, 8, 2, 8)}


def test_sharded_forward_equals_single_device(mesh):
  params = random_params(CFG, seed=1)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, CFG.vocab_size, (8, 12)))
  mask = jnp.asarray(np.arange(12)[None, :] >= np.array([0, 3, 0, 5, 0, 0, 1, 11])[:, None])
  ref = np.asarray(qwen2.forward(params, CFG, tokens, attention_mask=mask))
  sp = qwen2.shard_params(params, CFG, mesh)
  st = jax.device_put(tokens, sharding.batch_sharding(mesh, 2))
  sm = jax.device_put(mask, sharding.batch_sharding(mesh, 2))
  assert st.sharding.spec == P(("data", "fsdp"), None)
  out = jax.jit(qwen2.forward, static_argnums=1)(sp, CFG, st, attention_mask=sm)
  assert len(out.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)


def test_sharded_grad_equals_single_device(mesh):
  params = random_params(CFG, seed=2)
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, CFG.vocab_size, (4, 10)))

  def loss(p, t):
    logp = jax.nn.log_softmax(qwen2.forward(p, CFG, t[:, :-1]))
    return -jnp.mean(jnp.take_along_axis(logp, t[:, 1:, None], -1))

  ref = jax.jit(jax.grad(loss))(params, tokens)
  shardings = qwen2.param_shardings(CFG, mesh)
  got = jax.jit(jax.grad(loss), out_shardings=shardings)(qwen2.shard_params(params, CFG, mesh),
                                                          jax.device_put(tokens, sharding.batch_sharding(mesh, 2)))
  for (name, g), r in zip(_leaves_with_names(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-6, rtol=1e-5, err_msg=name)


def test_init_sharded_params_matches_init_params(mesh):
  got = qwen2.init_sharded_params(CFG, jax.random.key(3), mesh)
  ref = qwen2.init_params(CFG, jax.random.key(3))
  want = qwen2.param_shardings(CFG, mesh)
  for (name, g), r, s in zip(_leaves_with_names(got), jax.tree.leaves(ref), jax.tree.leaves(want)):
    assert g.sharding == s, name
    # Same random stream; only float rounding of the fused sharded program may differ (1 ulp).
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("tie", [False, True])
def test_load_hf_with_mesh_gives_same_sharded_arrays(tmp_path, mesh, tie):
  cfg = CFG.replace(tie_word_embeddings=tie)
  params = random_params(cfg, seed=4)
  hf.save_hf(params, cfg, tmp_path, max_shard_bytes=20_000)  # several shard files + index
  want = qwen2.shard_params(params, cfg, mesh)
  cfg2, got = hf.load_hf(tmp_path, mesh=mesh)
  assert cfg2 == cfg.replace(attention_block=cfg2.attention_block)  # a speed knob, not stored in config.json
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (name, g), w in zip(_leaves_with_names(got), jax.tree.leaves(want)):
    assert g.sharding == w.sharding, name
    for gs, ws in zip(g.addressable_shards, w.addressable_shards):
      assert gs.device == ws.device and gs.index == ws.index
      np.testing.assert_array_equal(np.asarray(gs.data), np.asarray(ws.data), err_msg=name)


def test_load_hf_with_mesh_reads_only_device_slices(tmp_path, mesh, monkeypatch):
  """Every safetensors read is one device's slice of one layer, never a whole tensor (fsdp=4 x tensor=2)."""
  params = random_params(CFG, seed=6)
  hf.save_hf(params, CFG, tmp_path)
  sizes = {}
  original = hf._Reader.read

  def recording_read(self, name, region):
    block = original(self, name, region)
    sizes.setdefault(name, []).append(block.size)
    return block
  monkeypatch.setattr(hf._Reader, "read", recording_read)
  hf.load_hf(tmp_path, mesh=mesh)
  d, v, f, hd = CFG.hidden_size, CFG.vocab_size, CFG.intermediate_size, CFG.head_dim
  assert max(sizes["model.embed_tokens.weight"]) == (v // 2) * (d // 4)
  assert max(sizes["model.layers.1.self_attn.q_proj.weight"]) == (CFG.num_heads // 2) * hd * (d // 4)
  assert max(sizes["model.layers.0.mlp.down_proj.weight"]) == (d // 4) * (f // 2)
  assert max(sizes["model.norm.weight"]) == d  # replicated: each device reads it whole (it is tiny)


def test_load_hf_with_custom_rules_and_head_dim_split(tmp_path):
  """Rules that shard head_dim (a factor of the HF row dim) still read the right sub-blocks."""
  mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
  rules = sharding.rules_from_config([("embed", "fsdp"), ("head_dim", "tensor"), ("mlp", "tensor"),
                                      ("vocab", None), ("heads", None), ("kv_heads", None)])
  params = random_params(CFG, seed=5)
  hf.save_hf(params, CFG, tmp_path)
  _, got = hf.load_hf(tmp_path, mesh=mesh, rules=rules)
  q = got["layers"]["attn"]["q"]["kernel"]
  assert q.sharding.spec == P(None, "fsdp", None, "tensor")
  assert {s.data.shape for s in q.addressable_shards} == {(2, 16, 4, 2)}
  for (name, g), r in zip(_leaves_with_names(got), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(r), err_msg=name)


def test_mesh_and_rules_from_config_block():
  from configs.parts import mesh as mesh_part
  block = mesh_part.get()
  assert sharding.rules_from_config(block.rules) == sharding.DEFAULT_RULES
  block.fsdp, block.tensor = 4, 2
  m = sharding.mesh_from_config(block)
  assert dict(m.shape) == {"data": 1, "fsdp": 4, "tensor": 2}


def test_mesh_and_rules_of_an_experiment_config():
  import ml_collections
  from configs.parts import mesh as mesh_part
  assert sharding.mesh_and_rules(ml_collections.ConfigDict({})) == (None, sharding.DEFAULT_RULES)
  block = mesh_part.get()
  block.data, block.fsdp, block.tensor = 1, 1, 1
  assert sharding.mesh_and_rules(ml_collections.ConfigDict({"mesh": block}))[0] is None  # one device: unsharded
  block.fsdp, block.tensor = 2, 4
  block.rules = [("batch", ["data", "fsdp"]), ("mlp", None)]
  mesh, rules = sharding.mesh_and_rules(ml_collections.ConfigDict({"mesh": block}))
  assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 4}
  assert rules == (("batch", ("data", "fsdp")), ("mlp", None))
  bad = ml_collections.ConfigDict({"mesh": {"data": 1, "fsdp": 2, "tensor": 4.0}})
  with pytest.raises(ValueError, match="mesh.tensor must be an int"):
    sharding.mesh_and_rules(bad)
