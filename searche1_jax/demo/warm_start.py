"""Warm start: the stage that stands in for the pretrained base model of a real run.

A real Search-E1 run starts GRPO from a pretrained Qwen2.5 checkpoint that already reads, writes and follows the
Search-R1 format. The CPU demo has no such checkpoint, so this stage makes one: a tiny Qwen2 policy, randomly
initialized, trained by language modelling (`logprobs.lm_loss_fn` through the real jitted train step) on the imperfect
scripted transcripts of the synthetic world's TRAINING questions (`demo/transcripts.py`). Only the policy's own
turns are targets: the prompt and the `<information>` passages are context (loss mask 0), exactly the mask the
rollout gives a trajectory. Test questions are never used.

Tokenization follows the rollout token for token: the prompt is encoded as `agent.rollout.build_prompt_ids` does,
each policy turn and each observation is encoded on its own (the sampler's tokens and the spliced observation are
separate in a trajectory), and the tokenizer's EOS ends the last (trainable) turn.

The result is an HF directory (`models.save_hf` + the tokenizer files + `warm_start.json`) that the round loop starts
from (`config.model.init_dir`). It is cached: `run(...)` does nothing when the directory exists and its
`warm_start.json` holds the same fingerprint (a hash of the warm-start block, the transcript and protocol settings,
the tokenizer and the world's training questions and corpus).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
import types
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np

from searche1_jax import fingerprint as fp_lib
from searche1_jax import sharding as shd
from searche1_jax.agent import protocol
from searche1_jax.agent import trajectory
from searche1_jax.demo import synthetic_world as sw
from searche1_jax.demo import transcripts as transcripts_lib
from searche1_jax.models import hf
from searche1_jax.models import qwen2
from searche1_jax.rl import logprobs
from searche1_jax.rl import privileged
from searche1_jax.train import optim, steps

FINGERPRINT_FILE = "warm_start.json"
FORMAT_VERSION = 1
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "rope_theta", "tie_word_embeddings")


# ------------------------------------------------------------------------------------------------ tokenization

def tokenize_segments(segments: Sequence[tuple[str, bool]], tokenizer, *, add_eos: bool = True,
                      prompt_ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """One transcript's `(text, trainable)` segments -> (ids int32 [L], loss_mask int32 [L]).

  The first segment is the prompt (never trainable; `prompt_ids`, when given, replace its encoding); every later
  segment is encoded on its own without special tokens. loss_mask is 1 on the tokens of trainable segments (the
  policy's turns) and on the appended EOS (when add_eos and the last segment is trainable), 0 elsewhere.
  """
  if not segments:
    raise ValueError("tokenize_segments: a transcript needs at least the prompt segment")
  if segments[0][1]:
    raise ValueError("tokenize_segments: the first segment is the prompt and must not be trainable")
  prompt = protocol.encode_prompt(tokenizer, segments[0][0]) if prompt_ids is None else prompt_ids
  ids, mask, _ = transcripts_lib.encode_segments(segments, tokenizer, prompt)
  if add_eos:
    if tokenizer.eos_token_id is None:
      raise ValueError("tokenize_segments: the tokenizer has no eos_token; pass add_eos=False or set one")
    ids.append(int(tokenizer.eos_token_id))
    mask.append(1 if segments[-1][1] else 0)
  return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def padded_length(n: int, pad_multiple: int) -> int:
  """n rounded up to a multiple of pad_multiple (bounds the number of compiled train-step shapes)."""
  return -(-n // pad_multiple) * pad_multiple


def make_batches(examples: Sequence[tuple[np.ndarray, np.ndarray]], batch_size: int, pad_multiple: int,
                 pad_id: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
  """One epoch of LM batches: examples grouped by padded length, B rows each, batches in random order.

  Each batch: tokens [B, T] int32 (right-padded with pad_id), attention_mask [B, T] (1 on real tokens), loss_mask
  [B, T] (the examples' masks, 0 on padding), T = padded_length(longest, pad_multiple), and the packed scored
  positions (target_index / target_valid, agent.trajectory.packed_targets: only those get the vocab
  projection). A bucket's last batch is filled with all-padding rows (loss 0, excluded from the denominator),
  so every batch has B rows.
  """
  by_len: dict[int, list[int]] = {}
  for i in rng.permutation(len(examples)):
    by_len.setdefault(padded_length(len(examples[int(i)][0]), pad_multiple), []).append(int(i))
  batches = []
  for t_len in sorted(by_len):
    idx = by_len[t_len]
    for start in range(0, len(idx), batch_size):
      rows = idx[start:start + batch_size]
      tokens = np.full((batch_size, t_len), pad_id, np.int32)
      attn = np.zeros((batch_size, t_len), np.int32)
      loss = np.zeros((batch_size, t_len), np.int32)
      for r, i in enumerate(rows):
        ids, mask = examples[i]
        tokens[r, :len(ids)] = ids
        attn[r, :len(ids)] = 1
        loss[r, :len(ids)] = mask
      batches.append({"tokens": tokens, "attention_mask": attn, "loss_mask": loss,
                      **trajectory.packed_targets(loss)})
  order = rng.permutation(len(batches))
  return [batches[int(i)] for i in order]


# ------------------------------------------------------------------------------------------------ the model

def model_config(model_block, vocab_size: int):
  """The policy's `Qwen2Config`: the `model` block (a preset plus shape overrides, configs/parts/model.py) with
  vocab_size = the tokenizer's size when the block leaves it unset (None)."""
  block = model_block.copy_and_resolve_references() if hasattr(model_block, "copy_and_resolve_references") else \
      dict(model_block)
  if block["vocab_size"] is None:
    block["vocab_size"] = int(vocab_size)
  elif int(block["vocab_size"]) < int(vocab_size):
    raise ValueError(f"model.vocab_size={block['vocab_size']} is smaller than the tokenizer's {vocab_size} tokens")
  return qwen2.config_from_block(block)


# ------------------------------------------------------------------------------------------------ caching

def fingerprint(block, model_block, transcripts_cfg, protocol_cfg, tokenizer_dir: str, world_dir: str,
                hint_context=None) -> str:
  """Hash of everything the warm-start result depends on (the `out_dir` field excluded)."""
  ws = fp_lib.plain(block)
  ws.pop("out_dir", None)
  files = {}
  for name in ("tokenizer.json", "tokenizer_config.json"):
    path = os.path.join(tokenizer_dir, name)
    files[name] = fp_lib.sha256_file(path) if os.path.isfile(path) else None
  for name in (sw.TRAIN_FILE, sw.CORPUS_FILE):
    files[name] = fp_lib.sha256_file(os.path.join(world_dir, name))
  proto = {k: fp_lib.plain(protocol_cfg[k]) for k in ("template", "topk", "max_turns", "obs_keep_title_quotes",
                                                "obs_strip_docs")} if protocol_cfg is not None else None
  model = {k: fp_lib.plain(model_block[k]) for k in ("preset", "param_dtype", "dtype") + _SHAPE_FIELDS if k in model_block}
  payload = {"version": FORMAT_VERSION, "warm_start": ws, "model": model, "transcripts": fp_lib.plain(transcripts_cfg),
             "protocol": proto, "files": files}
  if float(block.get("hint_fraction", 0.0)) > 0 and hint_context is not None:
    payload["hint_context"] = dataclasses.asdict(hint_context)
  return fp_lib.digest(payload)


def read_info(out_dir: str) -> dict | None:
  """The `warm_start.json` of a finished warm start (None when absent or unreadable)."""
  return fp_lib.read_json(os.path.join(out_dir, FINGERPRINT_FILE))


def is_cached(out_dir: str, fp: str) -> bool:
  info = read_info(out_dir)
  return info is not None and info.get("fingerprint") == fp


# ------------------------------------------------------------------------------------------------ the stage

def check_block(block) -> None:
  """Clear errors for bad warm-start fields (named `warm_start.<field>`)."""
  problems = []
  for f in ("steps", "batch_size", "pad_multiple", "max_length", "log_every"):
    v = block[f]
    if isinstance(v, bool) or not isinstance(v, int) or v < (0 if f == "steps" else 1):
      problems.append(f"warm_start.{f}={v!r} must be an integer >= {0 if f == 'steps' else 1}")
  if not isinstance(block.num_questions, int) or block.num_questions < 0:
    problems.append(f"warm_start.num_questions={block.num_questions!r} must be an integer >= 0 (0 = all)")
  if not block.out_dir:
    problems.append("warm_start.out_dir is empty: set the directory the warm-started HF checkpoint goes to")
  hint = block.get("hint_fraction", 0.0)
  if isinstance(hint, bool) or not isinstance(hint, (int, float)) or not 0.0 <= hint <= 1.0:
    problems.append(f"warm_start.hint_fraction={hint!r} must be a number in [0, 1]")
  if problems:
    raise ValueError("invalid warm-start config:\n  " + "\n  ".join(problems))


def hint_examples(world, questions, tokenizer, rng, transcripts_cfg, protocol_cfg, hint_context) -> list:
  """Hinted transcripts: for each question, an efficient scripted transcript whose prompt is the OFSD teacher's
  prompt (`rl.privileged.teacher_prompt_ids`) showing that same transcript's searches (and answer, per
  `hint_context.context_answer`). Returns a list of (prompt_ids, Transcript)."""
  if hint_context.context_format != "actions" or hint_context.context_siblings != "reference":
    raise ValueError("warm_start.hint_fraction > 0 shows scripted transcripts as the OFSD teacher would: it needs "
                     "ofsd.context_format='actions' and ofsd.context_siblings='reference' (got "
                     f"{hint_context.context_format!r}, {hint_context.context_siblings!r})")
  efficient = ml_collections.ConfigDict(transcripts_cfg.to_dict())
  efficient.per_question = 1
  efficient.rates = {k: (1.0 if k == "efficient" else 0.0) for k in transcripts_cfg.rates}
  records = transcripts_lib.make_transcript_records(world, questions, rng, efficient, protocol_cfg)
  out = []
  for q, rec in zip(questions, records):
    shown = types.SimpleNamespace(queries=rec.searches, answer=rec.answer)  # all an 'actions' block reads
    block_text = privileged.context_block([shown], tokenizer, hint_context)
    out.append((privileged.teacher_prompt_ids(tokenizer, q["question"], block_text, hint_context), rec))
  return out


def build_examples(world, tokenizer, block, transcripts_cfg, protocol_cfg,
                   hint_context=None) -> tuple[list, dict]:
  """Transcripts of the training questions -> tokenized (ids, loss_mask) examples, plus counts by kind.

  With block.hint_fraction > 0 (and `hint_context`, the OFSD `privileged.ContextOptions`), that fraction of the
  questions also gets a hinted example (`hint_examples`, kind 'hinted'): the stand-in for a pretrained model's
  ability to follow a worked solution shown in its context, which OFSD's teacher relies on.
  """
  questions = list(world.train_questions)
  if block.num_questions:
    questions = questions[:int(block.num_questions)]
  rng = np.random.default_rng(int(block.seed))
  records = transcripts_lib.make_transcript_records(world, questions, rng, transcripts_cfg, protocol_cfg)
  jobs = [(None, rec) for rec in records]
  n_hint = int(round(float(block.get("hint_fraction", 0.0)) * len(questions)))
  if n_hint:
    if hint_context is None:
      raise ValueError("warm_start.hint_fraction > 0 needs the OFSD context options (pass hint_context)")
    picked = [questions[int(i)] for i in np.sort(rng.choice(len(questions), n_hint, replace=False))]
    jobs += [(ids, dataclasses.replace(rec, kind="hinted"))
             for ids, rec in hint_examples(world, picked, tokenizer, rng, transcripts_cfg, protocol_cfg,
                                           hint_context)]
  examples, kinds, dropped = [], {}, 0
  for prompt_ids, rec in jobs:
    ids, mask = tokenize_segments(rec.segments, tokenizer, prompt_ids=prompt_ids)
    if len(ids) > int(block.max_length):
      dropped += 1
      continue
    examples.append((ids, mask))
    kinds[rec.kind] = kinds.get(rec.kind, 0) + 1
  if not examples:
    raise ValueError(f"warm start: every transcript is longer than warm_start.max_length={block.max_length}")
  return examples, {"kinds": kinds, "dropped_too_long": dropped, "questions": len(questions)}


def train(examples, model_cfg, block, *, log: Callable[[int, dict], None] | None = None):
  """LM training of a fresh policy on `examples` for block.steps steps; returns (params, last metrics)."""
  mesh = shd.make_mesh(1, 1, 1)
  total = max(int(block.steps), 1)
  tx = optim.make_optimizer(block.optim, total)
  schedule = optim.make_schedule(block.optim, total)
  step = steps.model_train_step(model_cfg, logprobs.lm_loss_fn(model_cfg, int(block.chunk_size)), tx, mesh,
                                lr_schedule=schedule)
  params = qwen2.init_params(model_cfg, jax.random.key(int(block.seed)))
  state = step.init_state(params)
  del params
  rng = np.random.default_rng(int(block.seed) + 1)
  pad_id = int(block.pad_id)
  batches: list = []
  metrics: dict = {}
  for i in range(int(block.steps)):
    if not batches:
      batches = make_batches(examples, int(block.batch_size), int(block.pad_multiple), pad_id, rng)
    state, m = step(state, batches.pop())
    if (i + 1) % int(block.log_every) == 0 or i + 1 == int(block.steps):
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      metrics = {"nll": m["nll"], "tokens": m["tokens"], "grad_norm": m["grad_norm"],
                 "learning_rate": m.get("learning_rate", 0.0)}
      if log is not None:
        log(i + 1, metrics)
  return state.params, metrics


def run(block, model_block, world, world_dir: str, tokenizer_dir: str, transcripts_cfg, protocol_cfg, *,
        log: Callable[[int, dict], None] | None = None, hint_context=None) -> dict:
  """Warm-starts the policy into block.out_dir unless a matching one is there already.

  Args:
    block: the warm-start block (configs/demo.py `warm_start`).
    model_block: the `model` block (configs/parts/model.py): preset + shape overrides of the tiny policy.
    world: the synthetic `World` (its training questions make the transcripts); world_dir: its directory.
    tokenizer_dir: the demo tokenizer (saved next to the weights).
    transcripts_cfg, protocol_cfg: `config.world.transcripts` and `config.protocol`.
    log: called as log(step, metrics) every block.log_every steps.
    hint_context: the OFSD `privileged.ContextOptions`, needed when block.hint_fraction > 0 (see build_examples).
  Returns:
    The `warm_start.json` contents plus 'status': 'cached' or 'trained'.
  """
  from transformers import AutoTokenizer  # deferred: importing transformers takes ~4 s

  check_block(block)
  out_dir = str(block.out_dir)
  fp = fingerprint(block, model_block, transcripts_cfg, protocol_cfg, tokenizer_dir, world_dir, hint_context)
  if is_cached(out_dir, fp):
    return {**read_info(out_dir), "status": "cached"}

  t0 = time.perf_counter()
  tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
  examples, counts = build_examples(world, tokenizer, block, transcripts_cfg, protocol_cfg, hint_context)
  model_cfg = model_config(model_block, len(tokenizer))
  logging.info("warm start: %d transcripts (%s), policy of %d parameters, %d steps of %d", len(examples),
               counts["kinds"], model_cfg.num_params, block.steps, block.batch_size)
  params, metrics = train(examples, model_cfg, block, log=log)

  tmp = out_dir.rstrip("/") + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  extra = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
  hf.save_hf(params, model_cfg, tmp, extra_config=extra)
  tokenizer.save_pretrained(tmp)
  info = {"fingerprint": fp, "num_params": int(model_cfg.num_params), "steps": int(block.steps),
          "examples": len(examples), **counts, "final": metrics, "seconds": time.perf_counter() - t0}
  with open(os.path.join(tmp, FINGERPRINT_FILE), "w") as f:
    json.dump(info, f, indent=2, sort_keys=True)
  shutil.rmtree(out_dir, ignore_errors=True)
  os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
  os.replace(tmp, out_dir)
  return {**info, "status": "trained"}
