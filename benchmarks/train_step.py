"""Throughput of one full GRPO train step vs the machine's float32 matmul peak, measured in the same run.

The step: policy log-probs (chunked), in-step reference log-probs (stop-gradient), backward, global-norm clip,
AdamW update; sharded jit with the state donated (on one device here). Model: a ~51M-parameter Qwen2-shaped
decoder (float32) on 8 sequences x 512 scored tokens.

Model FLOPs per step (the MFU convention: rematerialized work is not counted):
  F = N * (3 + 1) * f,   f = 2 * P_mm + 4 * L * H * hd * S / 2
N = scored tokens, P_mm = matmul parameters (all but the input embedding table, a gather; the LM head counts),
S = sequence length, L layers, H query heads, hd head dim; 3 f = policy forward + backward, 1 f = reference
forward; the attention term is causal (half the keys on average). I.e. 6 P N + 2 P N + attention.
Peak: the best float32 [n, n] @ [n, n] matmul rate (2 n^3 FLOPs) over a few sizes, same process, same threads.
Also reported: the same ratio per second of process CPU time (less sensitive to other load on the machine).
Memory: the compiled step's memory_analysis (arguments + outputs - aliased + temporaries) and the process max RSS.

Prints one JSON line. Run on an otherwise idle machine (the JSON records the load average before and after).
  .venv/bin/python -m benchmarks.train_step [--steps 3] [--num_microbatches 1] [--remat none]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time


import jax
import jax.numpy as jnp
import numpy as np

from configs.parts import grpo as grpo_part
from configs.parts import optim as optim_part
from searche1_jax import sharding as shd
from searche1_jax.models import qwen2
from searche1_jax.rl import grpo_loss
from searche1_jax.train import optim, steps


def matmul_peak(sizes=(1024, 2048, 3072), reps=5) -> dict:
  """Best float32 matmul FLOP/s over sizes (each: best of reps after a warm-up)."""
  best = {}
  for n in sizes:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    times, cpu = [], []
    for _ in range(reps):
      t, c = time.perf_counter(), time.process_time()
      f(a, b).block_until_ready()
      times.append(time.perf_counter() - t)
      cpu.append(time.process_time() - c)
    best[n] = (2.0 * n ** 3 / min(times), 2.0 * n ** 3 / min(cpu))
  return {"flops": max(v[0] for v in best.values()), "flops_per_cpu_s": max(v[1] for v in best.values()),
          "by_size": {str(k): v[0] for k, v in best.items()}}


def make_batch(cfg, batch, seq, seed=0):
  """tokens [B, seq + 1]: a 64-token prompt, policy tokens, one 48-token retrieved passage (mask 0)."""
  rng = np.random.default_rng(seed)
  t = seq + 1
  tokens = rng.integers(0, cfg.vocab_size, (batch, t)).astype(np.int32)
  loss_mask = np.zeros((batch, t), np.int32)
  loss_mask[:, 64:] = 1
  loss_mask[:, 200:248] = 0
  old = np.where(loss_mask == 1, -np.log(cfg.vocab_size) + 0.1 * rng.normal(size=(batch, t)), 0.0)
  return dict(tokens=tokens, attention_mask=np.ones((batch, t), np.int32), loss_mask=loss_mask,
              old_logprobs=old.astype(np.float32), advantages=rng.normal(size=batch).astype(np.float32))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=512, help="scored tokens per sequence (the step sees seq + 1)")
  ap.add_argument("--num_microbatches", type=int, default=1)
  ap.add_argument("--remat", default="none", choices=["none", "full", "dots"])
  ap.add_argument("--chunk", type=int, default=128, help="grpo.logprob_chunk_size")
  args = ap.parse_args()
  load_before = os.getloadavg()

  cfg = qwen2.Qwen2Config(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_layers=6, num_heads=8,
                          num_kv_heads=2, remat=args.remat)
  g = grpo_part.get()
  g.old_logprobs = "sampler"  # the timed work is the step itself: policy + reference + backward + optimizer
  g.num_microbatches = args.num_microbatches
  g.logprob_chunk_size = args.chunk
  o = optim_part.get()
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  gs = steps.make_grpo_step(cfg, grpo_loss.GRPOOptions.from_config(g), optim.make_optimizer(o, 1000), mesh)
  params = qwen2.init_params(cfg, jax.random.key(0))
  state = gs.init_state(params)
  del params
  batch = gs.prepare_batch(state, make_batch(cfg, args.batch, args.seq))

  t = time.perf_counter()
  compiled = gs.train.step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  state, m = compiled(state, batch)  # warm-up
  jax.block_until_ready(m)
  times, cpu = [], []
  for _ in range(args.steps):
    t, c = time.perf_counter(), time.process_time()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  step_s = float(np.median(times))
  step_cpu_s = float(np.median(cpu))

  peak = matmul_peak()
  n_tokens = args.batch * args.seq
  p_mm = cfg.num_params - cfg.vocab_size * cfg.hidden_size * (0 if cfg.tie_word_embeddings else 1)
  f_tok = cfg.flops_per_token(args.seq)
  flops = n_tokens * 4 * f_tok
  achieved = flops / step_s
  compiled_peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                   + mem.temp_size_in_bytes)
  print(json.dumps({
      "benchmark": "train_step",
      "what": "full GRPO step (policy + in-step reference log-probs, backward, clip, AdamW), float32",
      "device": str(jax.devices()[0].device_kind), "cpu_count": os.cpu_count(),
      "model": {"params": cfg.num_params, "matmul_params": p_mm, "layers": cfg.num_layers,
                "hidden": cfg.hidden_size, "vocab": cfg.vocab_size, "remat": cfg.remat},
      "batch": args.batch, "seq": args.seq, "tokens_per_step": n_tokens,
      "num_microbatches": args.num_microbatches, "logprob_chunk_size": args.chunk,
      "flops_per_step": flops, "flops_formula": "N*(3+1)*(2*P_mm + 2*L*H*hd*S)",
      "step_s": step_s, "step_s_all": times, "compile_s": compile_s,
      "tokens_per_s": n_tokens / step_s, "achieved_flops": achieved,
      "matmul_peak_flops": peak["flops"], "matmul_peak_by_size": peak["by_size"],
      "fraction_of_peak": achieved / peak["flops"], "target_fraction": 0.30,
      # Less sensitive to other processes on the machine: FLOPs per second of process CPU time, step vs matmul.
      "step_cpu_s": step_cpu_s, "fraction_of_peak_cpu_time": (flops / step_cpu_s) / peak["flops_per_cpu_s"],
      "memory": {"compiled_peak_bytes": int(compiled_peak), "temp_bytes": int(mem.temp_size_in_bytes),
                 "argument_bytes": int(mem.argument_size_in_bytes), "alias_bytes": int(mem.alias_size_in_bytes),
                 "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024},
      "loss": float(m["loss"]), "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
  }))


if __name__ == "__main__":
  main()
