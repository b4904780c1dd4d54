"""Search-R1 GRPO baseline: Qwen2.5 base + GRPO with a search engine, no self-distillation.

Settings follow PeterGriffinJin/Search-R1 `scripts/nq_hotpotqa/v0.2/train_grpo.sh` (docs/reference.md):
train / val batch 512 / 256 prompts, n = 5 at temperature 1, max prompt / response / start / obs length
4096 / 500 / 2048 / 500 tokens, lr 1e-6 with warmup ratio 0.285, KL in the loss (coef 0.001, k3), clip 0.2,
grad clip 1.0, 1 PPO epoch, mini-batch 256 prompts, micro-batch 64 trajectories (here a per-host memory setting,
below), 1005 steps, 4 search turns, top-3 passages of intfloat/e5-base-v2 over wiki-18, greedy validation.

Published average EM over NQ, TriviaQA, PopQA, HotpotQA, 2Wiki, MuSiQue, Bamboogle (docs/reference.md):

  | method                           | Qwen2.5-3B    | Qwen2.5-7B    |
  |----------------------------------|---------------|---------------|
  | RAG                              | 0.270         | 0.304         |
  | Search-R1 GRPO (base / instruct) | 0.312 / 0.336 | 0.350 / 0.396 |
  | Search-R1 PPO (base / instruct)  | 0.303 / 0.325 | 0.431 / 0.385 |

  Search-R1 3B instruct GRPO per benchmark: NQ .397, TriviaQA .565, PopQA .391, HotpotQA .331, 2Wiki .310,
  MuSiQue .124, Bamboogle .232.

Arguments (`--config configs/search_r1_grpo.py:model=7b,mesh=v5e-16,root=/mnt/disks/persist`):
  model  '3b' | '7b'                                  (Qwen2.5 base; weights in ROOT/models/Qwen2.5-{3B,7B})
  mesh   'v4-8' | 'v5p-8' | 'v5e-16' | 'cpu'          (configs/common.py MESH_PRESETS)
  root   directory with models/, raw/, tfds/, index/   (docs/tpu.md)

The mesh preset also sets what memory decides, measured with `python -m launch.aot_compile` (docs/tpu.md):
  - rollout.decode_slots (configs/common.DECODE_SLOTS): the sampler holds at most that many sequences at once,
    because 512 x 5 sequences at 4096 tokens do not fit in HBM at once;
  - the learner layout (configs/common.LEARNER): GRPO micro-batches (exact accumulation; Search-R1's 64
    trajectories on v5p-8 3B, 16 on v4-8 3B, 32 on v5p-8 7B, 8 on v5e-16 7B), and on v4-8 3B and v5e-16 7B
    the reference scored in its own pass with its weights in host memory (grpo.ref_logprobs='precompute',
    ref_on_host; Search-R1's separate reference worker), plus a bfloat16 first Adam moment on v5e-16 7B;
  - model.attention='auto': the splash-attention kernel on TPU (no [T, T] scores in HBM).
"""
from configs import common


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, model="3b", mesh="v4-8", root="/mnt/disks/persist")
  config = common.base_config(name=f"search_r1_grpo_{arg.model}")
  common.apply_model(config, arg.model, arg.root)
  common.apply_mesh_preset(config, arg.mesh, arg.model)
  common.apply_search_r1_data(config, arg.root)
  common.set_fields(config, search_r1_grpo_fields())
  return config


def search_r1_grpo_fields() -> dict:
  """The Search-R1 GRPO recipe as field values (shared by the Search-E1 and SD-Search configs)."""
  return {
      # schedule: 1005 rollout batches of 512 questions; 2 optimizer updates of 256 questions each
      "train.num_rounds": 1, "train.grpo_steps_per_round": 1005, "train.prompts_per_step": 512,
      "train.mini_batch_prompts": 256, "train.ppo_epochs": 1, "train.eval_every_steps": 100,
      # rollouts: n = 5 at temperature 1, no top-p / top-k; greedy validation, batches of 256
      "sampling.temperature": 1.0, "sampling.top_p": 1.0, "sampling.top_k": 0,
      "rollout.eval.temperature": 0.0, "rollout.eval.batch_size": 256,
      # protocol: 4 searching turns, top-3, lengths 4096 / 500 / 2048 / 500
      "protocol.max_turns": 4, "protocol.topk": 3, "protocol.max_prompt_length": 4096,
      "protocol.max_response_length": 500, "protocol.max_start_length": 2048, "protocol.max_obs_length": 500,
      # loss: GRPO advantages, clip 0.2, KL 0.001 (k3) in the loss. (Micro-batches, Search-R1's 64 of the 1280
      # trajectories, are a memory setting: configs/common.LEARNER sets them per host type.)
      "grpo.estimator": "grpo", "grpo.group_size": 5, "grpo.temperature": 1.0, "grpo.clip_eps": 0.2,
      "grpo.clip_eps_high": 0.2, "grpo.kl_coef": 0.001,
      "grpo.kl_estimator": "k3",
      # optimizer: lr 1e-6, warmup ratio 0.285, constant after, grad clip 1.0
      "optim.learning_rate": 1e-6, "optim.warmup_ratio": 0.285, "optim.schedule": "constant",
      "optim.grad_clip_norm": 1.0,
      "ofsd.enabled": False,
  }
