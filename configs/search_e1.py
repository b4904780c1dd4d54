"""Search-E1: Search-R1 GRPO rounds interleaved with offline self-distillation (OFSD), Qwen2.5-3B or 7B.

Each round: `train.grpo_steps_per_round` GRPO steps with the Search-R1 recipe (configs/search_r1_grpo.py), then
an OFSD phase: the round's policy (teacher snapshot) rolls out 5 samples on 512 of its own training questions;
reference = the correct sibling with the fewest searches (ties: fewest policy tokens); students = the wrong and
the less efficient correct siblings; the teacher sees the question plus the reference trajectory and scores the
student's tokens; targets are stored offline as the teacher's top-64 log-probs (+ tail bucket); then 2 epochs of
forward KL(teacher || student) on all policy tokens, plain context. Only "forward KL, privileged efficient
sibling, dense token-level, offline after each GRPO round" comes from the paper (arXiv 2605.22511); the round
length, phase size, top-k, epochs and learning rate are our documented defaults (docs/design.md).

5 rounds x 200 GRPO steps = 1000 GRPO steps, matching Search-R1's 1005-step budget plus the OFSD phases.

Published average EM over the seven benchmarks (docs/reference.md):

  | method                                   | Qwen2.5-3B    | Qwen2.5-7B    |
  |------------------------------------------|---------------|---------------|
  | Search-R1 GRPO (base / instruct)         | 0.312 / 0.336 | 0.350 / 0.396 |
  | AutoRefine (base)                        | 0.405         | 0.455         |
  | SD-Search (base / instruct)              | 0.428 / 0.427 | 0.471 / 0.476 |
  | Search-E1                                | 0.440         | not public    |
  | LLDS (base / instruct); GSPO+LLDS instr. | 0.440 / 0.441; 0.451 | 0.480 / 0.483 |

Arguments (`--config configs/search_e1.py:model=7b,mesh=v5e-16,root=/mnt/disks/persist`):
  model  '3b' | '7b';  mesh  'v4-8' | 'v5p-8' | 'v5e-16' | 'cpu';  root  data/model directory (see docs/tpu.md)

The mesh preset also sets the rollout waves, the learner's memory layout and the attention kernel, as for
configs/search_r1_grpo.py (its docstring lists them; sized with `python -m launch.aot_compile`, docs/tpu.md).
"""
from configs import common
from configs import search_r1_grpo


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, model="3b", mesh="v4-8", root="/mnt/disks/persist")
  config = common.base_config(name=f"search_e1_{arg.model}")
  common.apply_model(config, arg.model, arg.root)
  common.apply_mesh_preset(config, arg.mesh, arg.model)
  common.apply_search_r1_data(config, arg.root)
  common.set_fields(config, search_r1_grpo.search_r1_grpo_fields())
  common.set_fields(config, {
      "train.num_rounds": 5, "train.grpo_steps_per_round": 200, "train.eval_every_rounds": 1,
      "train.eval_every_steps": 0,
      "ofsd.enabled": True, "ofsd.mode": "offline", "ofsd.kind": "forward_kl", "ofsd.top_k": 64,
      "ofsd.temperature": 1.0, "ofsd.spans": "policy", "ofsd.efficiency": "searches_then_tokens",
      "ofsd.include_correct_students": True, "ofsd.context_siblings": "reference",
      "ofsd.context_format": "full", "ofsd.context_passages": True, "ofsd.context_answer": True,
      "ofsd.context_position": "after_question",
      "ofsd.group_size": 5, "ofsd.rollout_temperature": 1.0, "ofsd.questions_per_phase": 512,
      "ofsd.epochs": 2, "ofsd.batch_size": 64, "ofsd.storage": "host",
      "ofsd.optim.learning_rate": 1e-6, "ofsd.optim.warmup_steps": 0, "ofsd.optim.schedule": "constant",
      "ofsd.optim.grad_clip_norm": 1.0,
  })
  return config
