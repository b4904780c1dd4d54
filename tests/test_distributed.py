"""searche1_jax.distributed: env detection, host shards, and a real two-process jax.distributed run on loopback.

The two-process test starts this file twice as a worker (`python tests/test_distributed.py --worker ...`), each
process with ONE CPU device, joined by jax.distributed over 127.0.0.1 into a 2-device global mesh. Both build
a global batch from their own rows (host_shard + global_batch), run a jitted sharded sum, a shard_map psum and a
tiny Qwen2 forward, and write what they see; the test checks that both agree with each other and with plain
numpy / a single-process forward.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import testenv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_ITEMS = 10  # questions; 2 processes -> 5 each
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


def _tokens_for(items):
  """Deterministic token rows [len(items), 8] from item ids (what a host would tokenize for its questions)."""
  return np.stack([(np.arange(8) * 7 + 3 * i) % TINY["vocab_size"] for i in items]).astype(np.int32)


# ---------------------------------------------------------------------------------------------------- unit

def test_multihost_environment_detection():
  from searche1_jax.distributed import multihost_environment
  assert multihost_environment({}) is None
  assert multihost_environment({"TPU_WORKER_HOSTNAMES": "10.0.0.2"}) is None  # one host: not multi-host
  assert "TPU" in multihost_environment({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"})
  assert multihost_environment({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}) == "JAX_COORDINATOR_ADDRESS"
  assert multihost_environment({"SLURM_NTASKS": "4"}) == "SLURM"
  assert multihost_environment({"SLURM_NTASKS": "1"}) is None
  assert multihost_environment({"OMPI_COMM_WORLD_SIZE": "2"}) == "Open MPI"


def test_host_shard_partitions_deterministically():
  from searche1_jax.distributed import host_shard
  items = list(range(11))
  shards = [host_shard(items, i, 3) for i in range(3)]
  assert shards == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
  assert sum(shards, []) == items  # concatenated in process order: the whole list, nothing twice
  even = [host_shard(items, i, 3, drop_remainder=True) for i in range(3)]
  assert even == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
  assert host_shard(items, 0, 1) == items
  with pytest.raises(ValueError, match="process_index=3"):
    host_shard(items, 3, 3)


def test_initialize_kwargs_and_modes():
  import ml_collections
  from searche1_jax import distributed
  block = ml_collections.ConfigDict(dict(mode="off", coordinator_address="127.0.0.1:1234", num_processes=2,
                                         process_id=1, local_device_ids="0, 1", initialization_timeout_s=30))
  assert distributed.initialize_kwargs(block) == dict(coordinator_address="127.0.0.1:1234", num_processes=2,
                                                      process_id=1, local_device_ids=[0, 1],
                                                      initialization_timeout=30)
  assert distributed.maybe_initialize(block) is False  # 'off': nothing happens
  with pytest.raises(ValueError, match="distributed.mode='sometimes'"):
    distributed.maybe_initialize({"mode": "sometimes"})
  with pytest.raises(ValueError, match="local_device_ids='a,b'"):
    distributed.initialize_kwargs({"local_device_ids": "a,b"})


def test_global_batch_single_process_matches_device_put():
  import jax
  from searche1_jax import distributed, sharding
  mesh = sharding.make_mesh(data=2, fsdp=4)
  x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  g = distributed.global_batch({"x": x, "m": x > 5}, mesh)
  assert g["x"].shape == (8, 3) and g["x"].sharding.is_equivalent_to(sharding.batch_sharding(mesh, 2), 2)
  np.testing.assert_array_equal(np.asarray(g["x"]), x)
  np.testing.assert_array_equal(np.asarray(g["m"]), x > 5)
  assert len(g["x"].addressable_shards) == 8 and g["x"].addressable_shards[0].data.shape == (1, 3)
  assert float(jax.jit(lambda a: a.sum())(g["x"])) == float(x.sum())


# ------------------------------------------------------------------------------------------ two processes

def _sample(params, cfg, mesh) -> dict:
  """A sampler session over `mesh` on every question: prefill, a sampled decode, an extend (as an observation
  would be), a second decode. Every process steers every row; the decode batch is one program over the mesh."""
  from searche1_jax import sampling

  prompts = [list(map(int, row[:3 + i % 5])) for i, row in enumerate(_tokens_for(range(NUM_ITEMS)))]
  sess = sampling.Session(params, cfg, prompts, max_len=48, temperature=1.0, seed=11, mesh=mesh)
  first = sess.decode(10, eos_ids=[1])
  sess.extend({i: [5, 6, 7] for i in sess.live})
  second = sess.decode(6)
  return dict(tokens=[sess.tokens(i) for i in range(NUM_ITEMS)],
              logprobs=[np.asarray(sess.logprobs(i)).tolist() for i in range(NUM_ITEMS)],
              reasons=[first.stop_reason, second.stop_reason])


class _EchoRetriever:
  """Passages named after their query; records the queries it was asked; fails on the query 'boom'."""

  def __init__(self):
    self.calls = []

  def retrieve(self, queries, topk):
    from searche1_jax.retrieval.passage import Passage
    self.calls.append(list(queries))
    if "boom" in queries:
      raise ValueError("boom")
    return [[Passage(id=f"{q}/{k}", title=q.upper(), text=f"{q} text", score=float(k)) for k in range(topk)]
            for q in queries]


def _retrieve_sharded() -> dict:
  """HostShardedRetriever over two processes: each searches its share; both return every query's passages."""
  from searche1_jax.retrieval.retriever import HostShardedRetriever
  inner = _EchoRetriever()
  r = HostShardedRetriever(inner)
  got = r.retrieve([f"q{i}" for i in range(5)], 2)
  try:
    r.retrieve(["a", "boom", "c"], 1)
    error = None
  except RuntimeError as e:
    error = str(e)
  return dict(ids=[[p.id for p in row] for row in got], titles=[row[0].title for row in got], calls=inner.calls,
              error=error)


def _worker(process_id: int, port: int, out_path: str) -> None:
  import jax
  import ml_collections
  from jax.sharding import PartitionSpec as P

  from searche1_jax import distributed, sharding
  from searche1_jax.models import qwen2

  block = ml_collections.ConfigDict(dict(mode="on", coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                                         process_id=process_id, local_device_ids="", initialization_timeout_s=60))
  assert distributed.maybe_initialize(block) is True
  assert distributed.maybe_initialize(block) is True  # idempotent
  mesh = sharding.make_mesh(data=-1)  # spans both processes: 2 devices
  mine = distributed.host_shard(list(range(NUM_ITEMS)))
  local = np.asarray(mine, np.float32)[:, None] * np.array([[1.0, 10.0, 100.0]], np.float32)  # [5, 3]
  x = distributed.global_batch(local, mesh)

  total = jax.jit(lambda a: a.sum(axis=0), out_shardings=sharding.replicated(mesh))(x)
  psum = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a.sum(axis=0, keepdims=True), ("data", "fsdp")), mesh=mesh,
                               in_specs=P(("data", "fsdp")), out_specs=P()))(x)

  cfg = qwen2.Qwen2Config(**TINY)
  params = jax.tree.map(np.asarray, qwen2.init_params(cfg, jax.random.key(0)))  # same seed: same on both hosts
  params = jax.tree.map(lambda p: jax.make_array_from_process_local_data(sharding.replicated(mesh), p), params)
  tokens = distributed.global_batch(_tokens_for(mine), mesh)
  logits = jax.jit(qwen2.forward, static_argnums=1)(params, cfg, tokens)
  sampled = _sample(params, cfg, mesh)
  retrieved = _retrieve_sharded()
  result = dict(process_index=jax.process_index(), process_count=jax.process_count(),
                device_count=jax.device_count(), local_device_count=jax.local_device_count(), mine=mine,
                global_shape=list(x.shape), total=np.asarray(total).tolist(),
                psum=np.asarray(distributed.process_allgather(psum)).tolist(),
                logits=np.asarray(distributed.process_allgather(logits)).tolist(), sampled=sampled,
                retrieved=retrieved)
  with open(out_path, "w") as f:
    json.dump(result, f)
  jax.distributed.shutdown()


@pytest.mark.slow
def test_two_processes_agree_over_loopback(tmp_path):
  port = testenv.free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=testenv.xla_flags(1),
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  for k in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    env.pop(k, None)
  outs = [str(tmp_path / f"p{i}.json") for i in range(2)]
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(i), str(port), outs[i]],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=240)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("distributed workers timed out:\n" + "\n".join(logs))
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"worker {i} failed:\n{logs[i][-4000:]}"
  r = [json.load(open(o)) for o in outs]

  assert [x["process_index"] for x in r] == [0, 1]
  for x in r:
    assert x["process_count"] == 2 and x["device_count"] == 2 and x["local_device_count"] == 1
    assert x["global_shape"] == [NUM_ITEMS, 3]
  assert r[0]["mine"] + r[1]["mine"] == list(range(NUM_ITEMS))  # disjoint shares covering every question

  expected_total = np.arange(NUM_ITEMS, dtype=np.float64).sum() * np.array([1.0, 10.0, 100.0])
  for x in r:
    np.testing.assert_allclose(x["total"], expected_total, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(x["psum"]).reshape(-1), expected_total, rtol=1e-6)

  # The tiny forward on the global batch: both processes see the same logits, equal to one process doing it all.
  import jax
  from searche1_jax.models import qwen2
  cfg = qwen2.Qwen2Config(**TINY)
  params = qwen2.init_params(cfg, jax.random.key(0))
  want = np.asarray(qwen2.forward(params, cfg, _tokens_for(range(NUM_ITEMS))))
  got0, got1 = np.asarray(r[0]["logits"]), np.asarray(r[1]["logits"])
  assert got0.shape == want.shape == (NUM_ITEMS, 8, TINY["vocab_size"])
  np.testing.assert_array_equal(got0, got1)
  np.testing.assert_allclose(got0, want, atol=1e-5, rtol=1e-5)

  # The sampler over the two-process mesh: both processes hold the same trajectories, and they equal one process
  # running the same programs on a 2-device mesh (same partitioning: bit-equal tokens and log-probs).
  from searche1_jax import sharding
  assert r[0]["sampled"] == r[1]["sampled"]
  one = _sample(qwen2.shard_params(params, cfg, sharding.make_mesh(data=-1, devices=jax.devices()[:2])), cfg,
                sharding.make_mesh(data=-1, devices=jax.devices()[:2]))
  assert r[0]["sampled"]["tokens"] == one["tokens"] and r[0]["sampled"]["reasons"] == one["reasons"]
  np.testing.assert_array_equal(np.concatenate(r[0]["sampled"]["logprobs"]), np.concatenate(one["logprobs"]))
  assert any(len(t) > 3 + 5 for t in one["tokens"])  # something was decoded

  # Host-sharded retrieval: each process searched only its contiguous share; both hold every query's passages.
  want_ids = [[f"q{i}/0", f"q{i}/1"] for i in range(5)]
  for x in r:
    assert x["retrieved"]["ids"] == want_ids and x["retrieved"]["titles"] == [f"Q{i}" for i in range(5)]
  assert r[0]["retrieved"]["calls"][0] == ["q0", "q1", "q2"] and r[1]["retrieved"]["calls"][0] == ["q3", "q4"]
  # A failure on one process fails the call on both, naming where it happened.
  assert r[0]["retrieved"]["calls"][1] == ["a", "boom"] and r[1]["retrieved"]["calls"][1] == ["c"]
  for x in r:
    assert x["retrieved"]["error"] == "process 0: ValueError: boom"


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--worker":
  _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
