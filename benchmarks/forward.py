"""Forward-pass throughput of the Qwen2 decoder vs this machine's float32 matmul peak, measured in the same run.

Baseline (the peak): the best FLOP/s of a jitted [n, n] x [n, n] float32 matmul. Model: a ~48M-parameter
Qwen2-shaped config (hidden 512, 8 layers, 8 heads / 4 kv heads, MLP 2048, tied 32k vocab), batch 8 x 512 tokens,
float32, full logits (`qwen2.forward`). Achieved FLOP/s uses `Qwen2Config.flops_per_token` (2 x matmul params
incl. the head + causal attention scores/values; blocked-away or masked work is not counted). Also timed side by
side: `hidden_states` (no vocabulary projection) and `forward` with `attention_block=0` (unblocked attention).

Baseline and model calls are interleaved, the baseline is timed over as many back-to-back matmuls as last about
one forward, and the best of `--repeats` rounds is kept, so a shared machine affects both alike; the 1-minute load average is printed. `*_cpu_fraction` repeats the comparison with process CPU time
instead of wall time (less sensitive to other jobs on the cores).

  .venv/bin/python -m benchmarks.forward [--batch 8] [--seq 512] [--repeats 5]

Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import time


import jax
import jax.numpy as jnp

from searche1_jax.models import qwen2

BENCH_CONFIG = qwen2.Qwen2Config(vocab_size=32000, hidden_size=512, intermediate_size=2048, num_layers=8,
                                 num_heads=8, num_kv_heads=4, tie_word_embeddings=True, rope_theta=10000.0)


def timed(fn) -> tuple[float, float]:
  """(wall seconds, process CPU seconds) of one blocking call."""
  w, c = time.perf_counter(), time.process_time()
  jax.block_until_ready(fn())
  return time.perf_counter() - w, time.process_time() - c


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--matmul_n", type=int, default=2048)
  args = p.parse_args(argv)

  cfg = BENCH_CONFIG
  cfg_unblocked = cfg.replace(attention_block=0)
  params = qwen2.init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(2), (args.batch, args.seq), 0, cfg.vocab_size)
  a = jax.random.normal(jax.random.key(3), (args.matmul_n, args.matmul_n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)

  cases = {
      "matmul": lambda: matmul(a),
      "forward": lambda: qwen2.forward(params, cfg, tokens),
      "hidden_states": lambda: qwen2.hidden_states(params, cfg, tokens),
      "forward_unblocked": lambda: qwen2.forward(params, cfg_unblocked, tokens),
  }
  compile_s = {name: round(timed(fn)[0], 2) for name, fn in cases.items()}  # first call compiles
  # Time the baseline over a run as long as one forward, so a busy machine hits both alike.
  one_mm, one_fwd = min(timed(cases["matmul"])[0] for _ in range(3)), timed(cases["forward"])[0]
  mm_calls = max(1, round(one_fwd / one_mm))
  cases["matmul"] = lambda: [matmul(a) for _ in range(mm_calls)]
  wall = {name: [] for name in cases}
  cpu = {name: [] for name in cases}
  for _ in range(args.repeats):  # interleaved: every case sees the same machine load
    for name, fn in cases.items():
      w, c = timed(fn)
      wall[name].append(w)
      cpu[name].append(c)
  best = {name: min(ts) for name, ts in wall.items()}
  best_cpu = {name: min(ts) for name, ts in cpu.items()}

  n_tok = args.batch * args.seq
  flops = {"matmul": 2.0 * args.matmul_n ** 3 * mm_calls, "forward": cfg.flops_per_token(args.seq) * n_tok}
  flops["forward_unblocked"] = flops["forward"]
  flops["hidden_states"] = flops["forward"] - 2.0 * cfg.hidden_size * cfg.vocab_size * n_tok
  rate = {name: flops[name] / best[name] for name in cases}
  cpu_rate = {name: flops[name] / best_cpu[name] for name in cases}
  out = {
      "benchmark": "forward",
      "model_params": cfg.num_params,
      "config": {"hidden": cfg.hidden_size, "mlp": cfg.intermediate_size, "layers": cfg.num_layers,
                 "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "vocab": cfg.vocab_size, "dtype": cfg.dtype,
                 "attention_block": cfg.attention_block},
      "batch": args.batch, "seq": args.seq,
      "tokens_per_s": round(n_tok / best["forward"], 1),
      "forward_s": round(best["forward"], 4),
      "forward_tflops": round(rate["forward"] / 1e12, 4),
      "matmul_peak_tflops": round(rate["matmul"] / 1e12, 4),
      "fraction_of_matmul_peak": round(rate["forward"] / rate["matmul"], 3),
      "hidden_states_fraction_of_peak": round(rate["hidden_states"] / rate["matmul"], 3),
      "unblocked_attention_fraction_of_peak": round(rate["forward_unblocked"] / rate["matmul"], 3),
      "speedup_vs_unblocked_attention": round(best["forward_unblocked"] / best["forward"], 3),
      "matmul_calls_per_timing": mm_calls,
      "fraction_of_matmul_peak_cpu_time": round(cpu_rate["forward"] / cpu_rate["matmul"], 3),
      "wall_s_all": {name: [round(t, 3) for t in ts] for name, ts in wall.items()},
      "compile_s": compile_s,
      "devices": f"{jax.devices()[0].platform} x{jax.device_count()}",
      "cpu_count": os.cpu_count(),
      "load_avg_1m": round(os.getloadavg()[0], 2),
  }
  print(json.dumps(out))


if __name__ == "__main__":
  main()
