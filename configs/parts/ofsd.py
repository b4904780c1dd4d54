"""OFSD block (offline self-distillation, and its on-policy variant): `config.ofsd = parts.ofsd.get()`.

The paper (Search-E1, arXiv 2605.22511) fixes only: after each GRPO round the policy rolls out on its own training
questions, and a token-level forward KL aligns its plain-context distribution to its own distribution under a
privileged context exposing a more efficient sibling trajectory. Every other value below is a documented default
of ours (docs/design.md, "OFSD: what the paper says and our documented defaults"), switchable here.

Two regimes (`mode`):
  'offline'   (Search-E1): after each GRPO round, snapshot the policy (the teacher), roll out `group_size`
              samples on `questions_per_phase` training questions, pick pairs (reference, student), compute the
              teacher's targets once (top-k log-probs, or the snapshot kept for full-vocabulary recomputation),
              then run `epochs` passes of student updates with their own optimizer (`optim`).
  'on_policy' (SD-Search style): no separate phase; every GRPO step adds `alpha * L_SD` on the GRPO groups
              after `warmup_steps` steps, the teacher being the current policy under stop-gradient.
"""
import ml_collections
from ml_collections import config_dict

from configs.parts import optim as optim_part


def get() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.enabled = True  # False: GRPO only (the Search-R1 baseline)
  c.mode = "offline"  # 'offline' (a phase after each GRPO round) | 'on_policy' (L_GRPO + alpha * L_SD every step)

  # -- divergence (searche1_jax/rl/ofsd.py)
  c.kind = "forward_kl"  # 'forward_kl' KL(T||S) (Search-E1) | 'reverse_kl' KL(S||T) | 'jsd' (generalized, beta)
  c.beta = 0.5  # jsd only: M = beta pT + (1 - beta) pS; 0 -> forward KL, 1 -> reverse KL (GKD convention)
  # Teacher support per token: None or 0 = the full vocabulary (in offline mode the teacher snapshot is kept and
  # its logits recomputed on the fly); k >= 1 = the teacher's top-k tokens plus a tail bucket (offline mode
  # stores the k ids + log-probs per student token). 0 exists because a command line cannot set None.
  c.top_k = config_dict.placeholder(int)
  c.temperature = 1.0  # divides teacher and student logits before the divergence
  c.chunk_size = 128  # time steps per chunk of the chunked divergence (no [B, T, V] array is ever built)
  # Tokens that carry the loss: 'policy' = every token the policy wrote (Search-E1 default) | 'query' = only the
  # search-query tokens inside <search>...</search> (SD-Search's best) | 'query_answer' = query + answer tokens.
  c.spans = "policy"

  # -- pairs (searche1_jax/rl/pairs.py)
  # Reference = the correct sibling with the lowest cost; cost 'searches_then_tokens' (fewest searches, ties by
  # fewest policy tokens) | 'searches' | 'tokens' | 'searches_plus_tokens'. Questions with no correct sibling
  # are skipped.
  c.efficiency = "searches_then_tokens"
  c.max_pairs_per_question = config_dict.placeholder(int)  # None = every student of the group; k = at most k
  c.include_correct_students = True  # correct but strictly less efficient siblings are students too (not only wrong)

  # -- privileged context shown to the teacher (searche1_jax/rl/privileged.py)
  # Which siblings the block shows: 'reference' (the chosen efficient sibling, Search-E1) | 'all' (every sibling
  # of the group, each labelled CORRECT / INCORRECT: SD-Search's hindsight block; every sibling is a student).
  c.context_siblings = "reference"
  c.context_format = "full"  # 'full' = the trajectory's text | 'actions' = only its searches and answer
  c.context_passages = True  # 'full' only: keep the retrieved <information> blocks in the shown trajectory
  c.context_answer = True  # show the reference's final answer
  c.context_position = "after_question"  # 'before_question' | 'after_question' | 'system' (a system turn)

  # -- offline phase: rollouts, buffer, student updates
  c.group_size = 5  # samples per question in the OFSD rollouts (pairs come from these siblings)
  c.rollout_temperature = 1.0  # sampling temperature of the OFSD rollouts
  c.questions_per_phase = 512  # training questions rolled out per phase (continuing the data stream)
  c.epochs = 2  # passes over the phase's pairs
  c.batch_size = 64  # (student, teacher-target) pairs per optimizer step
  c.num_microbatches = 4  # gradient accumulation inside a step; must divide batch_size
  c.storage = "host"  # offline targets live in host RAM ('host') or in WORKDIR/ofsd/ files ('disk')
  # The student's own optimizer: AdamW like GRPO's (configs/parts/optim.py), no warmup, constant LR.
  c.optim = optim_part.get()
  c.optim.learning_rate = 1e-6
  c.optim.warmup_ratio = 0.0
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"

  # -- on-policy variant (mode='on_policy')
  c.alpha = 1e-3  # weight of L_SD in L_GRPO + alpha * L_SD (SD-Search: 1e-3)
  c.warmup_steps = 50  # GRPO steps before L_SD is switched on (SD-Search: 50)
  c.post_phase_rollouts = True  # offline: after the phase, greedy rollouts on the phase's questions measure how the
  #                               student's behaviour changed (searches, tokens, EM vs the phase's own rollouts)
  return c
