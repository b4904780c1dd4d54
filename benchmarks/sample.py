"""Decode throughput of the KV-cache sampler vs transformers' PyTorch `generate`, side by side in one run.

Model: a ~20M-parameter Qwen2-shaped config (vocab 32000, hidden 256, 12 layers, 4 heads / 2 KV heads of 64,
MLP 1024, tied embeddings; float32), random weights. The SAME weights go to transformers through
`searche1_jax.models.save_hf` + `Qwen2ForCausalLM.from_pretrained`.
Workload per batch size: random 32-token prompts, 128 new tokens, greedy, no EOS (all 128 tokens forced on
both sides: no eos ids here, `min_new_tokens=128` there). Time = one whole `generate` call (prefill + 128
decode steps), best of --repeats interleaved calls after an untimed warm-up call (compile time excluded on our
side). tokens/s = batch * 128 / time. torch is timed with `torch.set_num_threads(os.cpu_count())` and with
1 thread (OMP_WAIT_POLICY=PASSIVE unless set); the FASTER torch setting is the baseline of the ratio. XLA
uses its default CPU thread pool. Greedy outputs of the two are compared too (random weights give near-tied
logits, so a sequence may diverge late by float rounding).

Also timed, interleaved with both: the *dense floor*, 128 steps of only the model's weight matmuls for B rows
(no attention, cache or sampling), jitted with XLA. Its tokens/s bounds what any XLA decoder can reach on this
machine, and `max_ratio_at_floor` = floor / transformers bounds the ratio.

Also measured: a two-turn session where 3/4 of the sequences finish after turn 1, with and without compaction
of the live rows into a smaller batch bucket (`SamplerOptions.compact`).

  .venv/bin/python -m benchmarks.sample [--batches 1,8,32,64] [--repeats 2]

Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from searche1_jax.models import save_hf

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a shared machine, spinning
# threads make all-core torch up to 10x slower than 1 thread (measured here); this keeps the baseline fair.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import functools

import jax
import jax.numpy as jnp
import numpy as np

from searche1_jax.models import qwen2
from searche1_jax.sampling import SamplerOptions, Session, generate

BENCH_CONFIG = qwen2.Qwen2Config(vocab_size=32000, hidden_size=256, intermediate_size=1024, num_layers=12,
                                 num_heads=4, num_kv_heads=2, head_dim=64, tie_word_embeddings=True,
                                 rope_theta=10000.0)


def timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


@functools.partial(jax.jit, static_argnames=("cfg", "steps"))
def dense_floor(params, cfg, x, *, steps):
  """`steps` decode steps of only the weight matmuls (q, k, v, o, MLP per layer, then the vocab projection) for
  x [B, D], no attention, cache, norms' scales or sampling: a lower bound on any XLA decoder's step time here."""
  head = qwen2.head_kernel(params, cfg)

  def step(_, x):
    for l in range(cfg.num_layers):
      a = jax.tree.map(lambda t: t[l], params["layers"])
      qkv = [jnp.einsum("bd,dhe->bhe", x, a["attn"][n]["kernel"]) for n in "qkv"]
      q = qkv[0].reshape(x.shape[0], cfg.num_kv_heads, -1, cfg.head_dim) + (qkv[1] + qkv[2])[:, :, None]
      x = x + jnp.einsum("bhe,hed->bd", q.reshape(x.shape[0], cfg.num_heads, cfg.head_dim), a["attn"]["o"]["kernel"])
      m = a["mlp"]
      x = x + (jax.nn.silu(x @ m["gate"]["kernel"]) * (x @ m["up"]["kernel"])) @ m["down"]["kernel"]
      x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
    return x + 1e-3 * (x @ head)[:, :cfg.hidden_size]  # the logits feed the next step: nothing is hoisted

  return jax.lax.fori_loop(0, steps, step, x)


def torch_model(params, cfg):
  import torch  # deferred: torch is the baseline only, a test extra
  from transformers import Qwen2ForCausalLM
  with tempfile.TemporaryDirectory() as d:
    save_hf(params, cfg, d)
    model = Qwen2ForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  return model


def session_turns(params, cfg, prompts, compact: bool, turn_tokens: int, obs: list[int]) -> dict:
  """Turn 1: all decode. Then 3/4 finish, the rest get an observation appended; turn 2: they decode again."""
  opts = SamplerOptions(compact=compact)
  sess = Session(params, cfg, prompts, max_len=512, options=opts)
  sess.decode(turn_tokens)
  n = len(prompts)
  sess.finish(range(n // 4, n))
  t0 = time.perf_counter()
  sess.extend({i: obs for i in range(n // 4)})
  out = sess.decode(turn_tokens)
  return dict(seconds=time.perf_counter() - t0, batch_rows=sess.batch_size,
              tokens=[out.tokens[i] for i in range(n // 4)])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batches", default="1,8,32,64")
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--new_tokens", type=int, default=128)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--session_batch", type=int, default=64)
  p.add_argument("--hf_threads", default="cpu_count,1",
                 help="torch thread counts to time; the fastest is the baseline (cpu_count = all cores)")
  args = p.parse_args(argv)

  import torch  # deferred: torch is the baseline only, a test extra
  cfg = BENCH_CONFIG
  params = jax.jit(qwen2.init_params, static_argnums=0)(cfg, jax.random.key(0))
  model = torch_model(params, cfg)
  rng = np.random.default_rng(0)
  n_new = args.new_tokens
  load_before = os.getloadavg()[0]

  thread_counts = sorted({int(t) for t in args.hf_threads.replace("cpu_count", str(os.cpu_count())).split(",")},
                         reverse=True)
  rows = []
  for b in [int(x) for x in args.batches.split(",")]:
    prompts = rng.integers(0, cfg.vocab_size, (b, args.prompt_len))
    ours = lambda: generate(params, cfg, prompts.tolist(), max_new_tokens=n_new)
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def theirs(threads, n=n_new):
      torch.set_num_threads(threads)
      with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    x0 = jnp.ones((b, cfg.hidden_size), cfg.dtype)
    floor = lambda: jax.block_until_ready(dense_floor(params, cfg, x0, steps=n_new))
    floor()  # compile
    t0 = time.perf_counter()
    res = ours()  # warm-up: compiles this batch bucket's programs
    compile_s = time.perf_counter() - t0
    for th in thread_counts:
      theirs(th, 2)  # warm-up
    # Interleaved repeats, best of each, so both sides see the same (possibly shared) machine.
    t_ours, t_floor, t_hf = [], [], {th: [] for th in thread_counts}
    for _ in range(args.repeats):
      t_ours.append(timed(ours)[0])
      t_floor.append(timed(floor)[0])
      for th in thread_counts:
        dt, out = timed(lambda: theirs(th))
        t_hf[th].append(dt)
    hf_out = out[:, args.prompt_len:].numpy()
    assert all(len(t) == n_new for t in res.tokens) and hf_out.shape == (b, n_new)
    same = float(np.mean([t == h.tolist() for t, h in zip(res.tokens, hf_out)]))
    best_ours = min(t_ours)
    hf_best = {th: min(v) for th, v in t_hf.items()}
    baseline = min(hf_best.values())  # the faster torch thread setting is the baseline
    rows.append(dict(batch=b, ours_tok_s=round(b * n_new / best_ours, 1),
                     hf_tok_s=round(b * n_new / baseline, 1), ratio=round(baseline / best_ours, 2),
                     hf_tok_s_by_threads={str(th): round(b * n_new / t, 1) for th, t in hf_best.items()},
                     ours_s=round(best_ours, 3), first_call_s=round(compile_s, 2), identical_greedy_frac=same,
                     dense_floor_tok_s=round(b * n_new / min(t_floor), 1),
                     ours_frac_of_floor=round(min(t_floor) / best_ours, 2),
                     max_ratio_at_floor=round(baseline / min(t_floor), 2)))
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

  # Multi-turn: compaction after 3/4 of the sequences finished.
  sb = args.session_batch
  prompts = rng.integers(0, cfg.vocab_size, (sb, args.prompt_len)).tolist()
  obs = rng.integers(0, cfg.vocab_size, 64).tolist()
  sess_rows = {}
  for compact in (True, False):
    session_turns(params, cfg, prompts, compact, 64, obs)  # warm-up (compiles)
    runs = [session_turns(params, cfg, prompts, compact, 64, obs) for _ in range(args.repeats)]
    sess_rows[compact] = min(runs, key=lambda r: r["seconds"])
  assert sess_rows[True]["tokens"] == sess_rows[False]["tokens"]
  turn2 = dict(sequences=sb, live_in_turn2=sb // 4, turn_tokens=64, obs_tokens=64,
               compact_s=round(sess_rows[True]["seconds"], 3), compact_rows=sess_rows[True]["batch_rows"],
               no_compact_s=round(sess_rows[False]["seconds"], 3), no_compact_rows=sess_rows[False]["batch_rows"],
               speedup=round(sess_rows[False]["seconds"] / sess_rows[True]["seconds"], 2))

  print(json.dumps(dict(
      benchmark="sample", config=dict(vocab=cfg.vocab_size, hidden=cfg.hidden_size, layers=cfg.num_layers,
                                      heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, mlp=cfg.intermediate_size,
                                      tied=cfg.tie_word_embeddings, params_m=round(cfg.num_params / 1e6, 1),
                                      dtype=cfg.dtype),
      prompt_len=args.prompt_len, new_tokens=n_new, greedy=True, compile_excluded=True,
      timing=f"best of {args.repeats} interleaved calls after a warm-up call", decode=rows, session_turn2=turn2,
      cpu_count=os.cpu_count(), omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"), jax=jax.__version__,
      torch=torch.__version__, loadavg_before=round(load_before, 2), loadavg_after=round(os.getloadavg()[0], 2))))


if __name__ == "__main__":
  main()
