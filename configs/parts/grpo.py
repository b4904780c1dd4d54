"""GRPO block: advantages, the clipped policy loss, the KL to the reference, and how the train step runs.

Consumed by `searche1_jax.rl.grpo` (the loss math) and `searche1_jax.train.steps` (grpo_loss_fn,
make_grpo_step). Defaults reproduce Search-R1's GRPO settings (docs/reference.md, scripts/nq_hotpotqa/v0.2/
train_grpo.sh and the veRL defaults it runs on) unless a comment says otherwise.
"""
import ml_collections


def get() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Advantages.
  c.group_size = 5  # rollouts per question (docs/reference.md: n = 5)
  c.estimator = "grpo"  # 'grpo' (r - mean) / (std + eps) | 'drgrpo' r - mean | 'rloo' leave-one-out
  c.adv_eps = 1e-6  # added to the group std ('grpo' estimator; veRL epsilon 1e-6)
  # Policy loss.
  c.clip_eps = 0.2  # PPO clip, lower side: ratio >= 1 - clip_eps (docs/reference.md: clip ratio 0.2)
  c.clip_eps_high = 0.2  # PPO clip, upper side: ratio <= 1 + clip_eps_high (0.2 = symmetric; DAPO uses 0.28)
  # Safety rails veRL added after the version Search-R1 ran (0 = off, Search-R1's numbers): dual_clip c > 1 bounds a
  # negative-advantage token's loss at -A * c (veRL clip_ratio_c: 3.0); log_ratio_clamp clamps logp - old_logp
  # before exp (veRL: 20). The k3 KL estimate is always clamped at 10 nats, as in both (rl/grpo.py kl_penalty).
  c.dual_clip = 0.0
  c.log_ratio_clamp = 0.0
  c.agg = "token-mean"  # loss aggregation: 'token-mean' (veRL of Search-R1) | 'seq-mean-token-mean' |
  #                       'seq-mean-token-sum'
  c.temperature = 1.0  # logits / temperature when scoring, must equal the sampling temperature (docs/reference.md: 1)
  # KL to the frozen reference policy, inside the loss.
  c.kl_coef = 0.001  # weight of the per-token KL estimate (docs/reference.md: 0.001); 0 = no reference at all
  c.kl_estimator = "k3"  # 'k1' | 'k2' | 'k3' (docs/reference.md: low-variance k3)
  c.ref_logprobs = "in_step"  # 'in_step': ref params in the TrainState, scored inside the step (stop-gradient)
  #                             'precompute': a separate jitted pass before the step (Search-R1's ref worker)
  c.ref_on_host = False  # 'precompute' only: keep ref params in host memory, put on device only for that pass
  # Old (behaviour-policy) log-probs.
  c.old_logprobs = "recompute"  # 'recompute': no-grad pass with the current params before the update (veRL /
  #                               Search-R1 do this); 'sampler': trust the sampler's log-probs as they are
  #                               (recorded at temperature 1: 'sampler' and tis_cap > 0 need temperature 1);
  #                               'current': the learner's own log-probs, detached (equal to 'recompute' with
  #                               one update per rollout batch, without its pass; refused with several)
  c.tis_cap = 0.0  # truncated importance sampling: weight min(exp(recomputed - sampler), tis_cap) on the
  #                  policy-gradient term; 0 = off; needs old_logprobs 'recompute' or 'current' (e.g. 2.0)
  # Step execution.
  c.num_microbatches = 1  # gradient accumulation: the step batch runs as this many micro-batches (exact)
  c.logprob_chunk_size = 128  # time steps projected to the vocabulary at once in the chunked log-prob path
  # Without a KL term (kl_coef 0), rows with advantage 0 add nothing to the loss or its gradient: the learner
  # leaves them out and still counts them in the denominator (same update, less compute). Applies with one
  # mini-batch per rollout batch on one process; the step metrics then cover the rows the learner saw.
  c.skip_zero_advantage_rows = True
  c.log_entropy = False  # also log the policy entropy (one more softmax reduction per chunk)
  return c
