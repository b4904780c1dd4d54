"""Resume after SIGKILL: a run killed at every kill point in turn (a GRPO step's rollouts, its update before the
checkpoint, on entering the OFSD phase before its buffer exists, after the buffer and teacher targets, between two
student updates, after the evaluation, in the middle of a checkpoint write), restarted after each in the same
workdir, and finished from a corrupted latest checkpoint (the restart falls back to the one before, with a warning
naming it), writes exactly the metrics and results of an uninterrupted run (same rollouts, same updates, same OFSD
pairs and targets, same evaluation).

The runs go through `launch/train.py` in subprocesses on the smoke demo config with a checkpoint after every
update. The smoke policy is made a little bigger and warm-started long enough to reproduce some training
answers, and the OFSD rollouts sample at temperature 0.3, so the OFSD phase finds pairs and makes several
updates (asserted below) for the second kill to land between them.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from launch import export_hf
from searche1_jax.models import hf
from searche1_jax.train import faults

import testenv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = [
    "--config.train.grpo_steps_per_round=3", "--config.checkpoint.every_steps=1",
    "--config.checkpoint.async_save=True",
    # Weight decay moves the params on every update even when no rollout earns reward (zero policy gradient), so
    # resuming must restore params, optimizer step, data and RNG exactly; small enough to keep the policy's answers.
    "--config.optim.weight_decay=1.0", "--config.optim.learning_rate=0.0001",
    # A policy that answers some training questions: OFSD needs a correct sibling in a group to form pairs.
    "--config.warm_start.steps=200", "--config.warm_start.hint_fraction=0.0", "--config.warm_start.pad_multiple=128",
    "--config.model.hidden_size=64",
    "--config.model.intermediate_size=128", "--config.model.num_layers=2", "--config.model.num_heads=4",
    "--config.model.num_kv_heads=2", "--config.protocol.max_response_length=32",
    "--config.ofsd.questions_per_phase=8", "--config.ofsd.group_size=4", "--config.ofsd.rollout_temperature=0.3",
    # One evaluation, at the round's end (the 'eval' kill point's): the others would only repeat it in every life.
    "--config.train.eval_at_start=False", "--config.train.eval_after_grpo=False",
]
# Wall-clock measurements differ between runs; everything else must be identical.
TIMING_KEYS = ("time_", "timings")


def _config_arg(cache):
  return f"configs/demo.py:smoke,cache={cache}"


def _env(cache=None):
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = testenv.xla_flags(1)  # one CPU device, as the demo runs
  if cache:  # the runs share JAX's persistent compilation cache: later lives load what the first one compiled,
    # every program, however fast it compiles (measured: a cached life 27.4 s with a 0.5 s threshold, 26.0 s with 0)
    env.update(JAX_COMPILATION_CACHE_DIR=os.path.join(cache, "jax_compilation_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


def _train_cmd(cache, workdir):
  return [sys.executable, "-m", "launch.train", "--config", _config_arg(cache), "--workdir", workdir] + OVERRIDES


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """World, tokenizer, index and warm start, built once (launch/demo.py stages)."""
  cache = str(tmp_path_factory.mktemp("cache"))
  code = ("import sys; sys.argv=['x']; from launch import demo; from searche1_jax import config_utils;"
          f"c = config_utils.load_config({_config_arg(cache)!r});"
          f"config_utils.apply_overrides(c, {[o[len('--config.'):] for o in OVERRIDES]!r});"
          "log = demo.Log(); w = demo.stage_world(c, log); demo.stage_tokenizer(c, w, log);"
          "demo.stage_index(c, log); demo.stage_warm_start(c, w, log)")
  # The warm start's 200 steps run optimized code (no -O0): about twice as fast per step, which more than pays for
  # its five slower compiles (measured: ~20 s less); the runs under test keep the fast-compile flags.
  env = dict(_env(), XLA_FLAGS=testenv.xla_flags(1, fast_compile=False))
  subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=900)
  return cache


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if not k.startswith(TIMING_KEYS)} for r in rows]


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    rounds = json.load(f)["rounds"]
  return [{k: v for k, v in e.items() if not k.startswith(TIMING_KEYS)} for e in rounds]


def _run_killed_at(cmd, env, point) -> str:
  """Run cmd until it SIGKILLs itself at a fault point (searche1_jax/train/faults.py); returns its stderr."""
  proc = subprocess.run(cmd, cwd=REPO, env=dict(env, **{faults.ENV: point}), timeout=600,
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  assert proc.returncode == -signal.SIGKILL, f"not killed at {point} ({proc.returncode}):\n{proc.stderr[-3000:]}"
  return proc.stderr


def _corrupt_latest_checkpoint(workdir) -> int:
  """Truncates every file of the newest checkpoint's state item (as a kill mid-write on a filesystem without
  atomic renames leaves it). Returns its step."""
  root = os.path.join(workdir, "checkpoints")
  step = max(int(d) for d in os.listdir(root) if d.isdigit())
  for base, _, files in os.walk(os.path.join(root, str(step), "state")):
    for name in files:
      open(os.path.join(base, name), "wb").close()
  return step


def _run_until(cmd, workdir, predicate, env, timeout=600, stderr=None):
  """Start cmd; SIGKILL it as soon as predicate(metrics rows) holds. Returns True if it was killed."""
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr or subprocess.DEVNULL)
  deadline = time.time() + timeout
  path = os.path.join(workdir, "metrics.jsonl")
  try:
    while proc.poll() is None and time.time() < deadline:
      if os.path.exists(path):
        with open(path) as f:
          rows = [json.loads(line) for line in f if line.endswith("\n")]
        if predicate(rows):
          proc.send_signal(signal.SIGKILL)
          proc.wait()
          return True
      time.sleep(0.05)
    assert proc.poll() is not None, "the run did not finish in time"
    assert proc.returncode == 0, f"the run failed with exit code {proc.returncode}"
    return False
  finally:
    if proc.poll() is None:
      proc.kill()


@pytest.mark.slow
def test_sigkill_at_every_kill_point_resumes_identically(cache, tmp_path):
  ref_dir = str(tmp_path / "uninterrupted")
  env = _env(cache)
  subprocess.run(_train_cmd(cache, ref_dir), cwd=REPO, env=env, check=True, timeout=900,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  want = _rows(ref_dir)
  assert [r["phase"] for r in want].count("grpo") == 3
  grpo = [r for r in want if r["phase"] == "grpo"]
  norms = [r["param_norm"] for r in grpo]
  assert all(a > b for a, b in zip(norms, norms[1:])), f"every update must move the params: {norms}"
  assert len({(r["policy_tokens"], r["response_tokens"]) for r in grpo}) > 1, "rollouts must differ between steps"
  ofsd = [r for r in want if r["phase"] == "ofsd"]
  assert len(ofsd) >= 2 and all(r["loss"] > 0 for r in ofsd), f"the OFSD phase must make >= 2 updates: {ofsd}"

  work = str(tmp_path / "killed")
  cmd = _train_cmd(cache, work)
  # One life per kill point (searche1_jax/train/faults.py), in the order the run reaches them; each restart resumes
  # from what the previous life left, and never needs to skip a checkpoint.
  def phases():
    return [r["phase"] for r in _rows(work)]

  lives = [
      ("grpo_rollout:2", lambda: phases() == ["grpo"]),  # step 2's rollouts done, its update not
      ("grpo_update:1", lambda: phases() == ["grpo"]),  # step 2's update done, its checkpoint not
      ("ofsd_enter", lambda: "ofsd_buffer" not in phases() and phases().count("grpo") == 3),  # no buffer yet
      ("ofsd_targets", lambda: "ofsd" not in phases()),  # buffer and targets built, not checkpointed
      ("ofsd_update:2", lambda: phases().count("ofsd") == 1),  # between two student updates
      ("eval", lambda: "ofsd_end" in phases()),  # the round's evaluation ran, its results are not written
      # The evaluation's results are written, its checkpoint is being written (a partial directory).
      ("checkpoint_write:1", lambda: len(_results(work)) == len(_results(ref_dir))),
  ]
  for point, check in lives:
    log = _run_killed_at(cmd, env, point)
    assert "cannot restore" not in log, (point, log[-3000:])
    assert check(), (point, phases())
  # Last life: the newest checkpoint is unreadable; the run goes back one and warns once, naming it.
  bad = _corrupt_latest_checkpoint(work)
  log = tmp_path / "last_life.log"
  with open(log, "w") as f:
    _run_until(cmd, work, lambda rows: False, env, stderr=f)
  warnings = [line for line in log.read_text().splitlines() if "cannot restore checkpoint" in line]
  assert len(warnings) == 1 and f"checkpoint {bad} " in warnings[0], warnings

  assert _rows(work) == want
  assert _results(work) == _results(ref_dir)


# ----------------------------------------------------------------------------------------- pod rehearsal

# The same run on 8 CPU devices (fsdp 8) with two GRPO steps and batches every data-parallel shard divides.
POD = ["--config.mesh.fsdp=8", "--config.train.grpo_steps_per_round=2", "--config.train.prompts_per_step=4",
       "--config.train.mini_batch_prompts=4",
       "--config.ofsd.batch_size=8"]


def _pod_env(cache, devices):
  env = _env(cache)
  env["XLA_FLAGS"] = testenv.xla_flags(devices)
  # The processes of a pod share the compilation cache too: only process 0 writes it, and a read that meets an
  # entry being written is a warning and a compile (jax/_src/compiler.py, _cache_read).
  return env


def _pod_cmds(cache, workdir, port):
  """Two processes x 4 CPU devices joined by jax.distributed over loopback into one 8-device mesh."""
  dist = ["--config.distributed.mode=on", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
          "--config.distributed.num_processes=2", "--config.distributed.initialization_timeout_s=120"]
  return [_train_cmd(cache, workdir) + POD + dist + [f"--config.distributed.process_id={i}"] for i in range(2)]


def _run_pod(cache, workdir, kill_when=None, timeout=900):
  """Run both processes; with kill_when(rows), SIGKILL process 1 once it holds, then process 0 (a pod whose host
  died is restarted as a whole: the survivor would wait on its peer). Returns True if killed."""
  env = _pod_env(cache, 4)
  procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for c in _pod_cmds(cache, workdir, testenv.free_port())]
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  try:
    while any(p.poll() is None for p in procs) and time.time() < deadline:
      if kill_when is not None and os.path.exists(path):
        with open(path) as f:
          rows = [json.loads(line) for line in f if line.endswith("\n")]
        if kill_when(rows):
          procs[1].send_signal(signal.SIGKILL)
          procs[1].wait()
          procs[0].send_signal(signal.SIGKILL)
          procs[0].wait()
          return True
      time.sleep(0.05)
    for i, p in enumerate(procs):
      assert p.poll() is not None, f"process {i} did not finish in time"
      assert p.returncode == 0, f"process {i} failed ({p.returncode}):\n{p.stderr.read()[-3000:]}"
    return False
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


def _assert_close(got, want, path="rows"):
  """Equal structure and exact non-floats; floats within 1e-5 relative (1e-7 absolute)."""
  if isinstance(want, float):
    assert isinstance(got, float) and np.isclose(got, want, rtol=1e-5, atol=1e-7), (path, got, want)
  elif isinstance(want, dict):
    assert isinstance(got, dict) and set(got) == set(want), (path, sorted(set(got) ^ set(want)))
    for k in want:
      _assert_close(got[k], want[k], f"{path}.{k}")
  elif isinstance(want, list):
    assert isinstance(got, list) and len(got) == len(want), (path, got, want)
    for i, (g, w) in enumerate(zip(got, want)):
      _assert_close(g, w, f"{path}[{i}]")
  else:
    assert got == want, (path, got, want)


@pytest.mark.slow
def test_pod_rehearsal_two_processes_killed_and_resumed_equal_one_process(cache, tmp_path):
  """The smoke loop as 2 processes x 4 CPU devices over loopback (every process steers every row of the global
  rollout and learner batches; the programs span the 8-device mesh): a SIGKILL mid-round, a restart of both,
  and the metrics and results equal one process running the same programs on 8 devices (floats to float32
  rounding); so does the policy exported from the two-process checkpoint."""
  ref_dir = str(tmp_path / "one_process")
  subprocess.run(_train_cmd(cache, ref_dir) + POD, cwd=REPO, env=_pod_env(cache, 8), check=True, timeout=900,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  want = _rows(ref_dir)
  assert [r["phase"] for r in want].count("grpo") == 2 and any(r["phase"] == "ofsd" for r in want)

  work = str(tmp_path / "two_processes")
  assert _run_pod(cache, work, kill_when=lambda rows: any(r["phase"] == "grpo" and r["step"] == 1 for r in rows))
  assert len(_rows(work)) < len(want)
  assert not _run_pod(cache, work)
  # Rollouts, rewards, token counts and every other non-float are exact; float metrics agree to float32 rounding
  # (measured: <= 1e-6 relative). The same programs run on the same mesh, but a cross-process all-reduce (Gloo on
  # CPU) adds its operands in another order than the in-process one. (A two-process run without the kill gave the
  # same rows as the killed one, bit for bit: the resume itself is exact.)
  _assert_close(_rows(work), want)
  _assert_close(_results(work), _results(ref_dir))

  outs = [str(tmp_path / (os.path.basename(w) + "_hf")) for w in (ref_dir, work)]
  for w, out in zip((ref_dir, work), outs):  # measured: params within 3e-6 relative after the OFSD update
    export_hf.export(w, out)
  (_, a), (_, b) = (hf.load_hf(o) for o in outs)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
