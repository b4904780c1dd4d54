"""SD-Search style on-policy self-distillation: L = L_GRPO + 1e-3 * L_SD after 50 warm-up steps.

SD-Search (arXiv 2605.18299, docs/reference.md): the teacher is the same policy with a hindsight block of all G sibling
rollouts, actions only (search spans), each labelled CORRECT / INCORRECT; the loss is JSD on the search-query
tokens, top-k 50; `L = L_GRPO + 1e-3 * L_SD` switched on after 50 warm-up steps. Its 3B ablation of the
divergence: JSD .428 > forward KL .418 > reverse KL .414. The GRPO part is the Search-R1 recipe
(configs/search_r1_grpo.py). Here via `ofsd.mode = 'on_policy'`; our JSD uses beta = 0.5.

Published average EM over the seven benchmarks (docs/reference.md):

  | method                           | Qwen2.5-3B    | Qwen2.5-7B    |
  |----------------------------------|---------------|---------------|
  | Search-R1 GRPO (base / instruct) | 0.312 / 0.336 | 0.350 / 0.396 |
  | SD-Search (base / instruct)      | 0.428 / 0.427 | 0.471 / 0.476 |
  | Search-E1                        | 0.440         | not public    |

Arguments (`--config configs/sd_search.py:model=7b,mesh=v5e-16,root=/mnt/disks/persist`):
  model  '3b' | '7b';  mesh  'v4-8' | 'v5p-8' | 'v5e-16' | 'cpu';  root  data/model directory (see docs/training.md)

The mesh preset also sets rollout.decode_slots (configs/common.DECODE_SLOTS): the sampler holds at most that many
sequences at once (waves under rollout.schedule 'sync', slots refilled as trajectories end under 'continuous'), because 512 x 5 sequences at 4096 tokens do not fit in HBM at once
(python -m launch.aot_compile; docs/tpu.md).
"""
from configs import common
from configs import search_r1_grpo


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, model="3b", mesh="v4-8", root="/mnt/disks/persist")
  config = common.base_config(name=f"sd_search_{arg.model}")
  common.apply_model(config, arg.model, arg.root)
  common.apply_mesh_preset(config, arg.mesh, arg.model)
  common.apply_search_r1_data(config, arg.root)
  common.set_fields(config, search_r1_grpo.search_r1_grpo_fields())
  common.set_fields(config, {
      "ofsd.enabled": True, "ofsd.mode": "on_policy", "ofsd.alpha": 1e-3, "ofsd.warmup_steps": 50,
      "ofsd.kind": "jsd", "ofsd.beta": 0.5, "ofsd.top_k": 50, "ofsd.spans": "query",
      "ofsd.context_siblings": "all", "ofsd.context_format": "actions", "ofsd.context_passages": False,
      "ofsd.context_answer": True, "ofsd.include_correct_students": True,
      "ofsd.group_size": 5,  # on-policy: the GRPO groups themselves
  })
  return config
