"""Optimizer block: AdamW, linear warmup then constant or cosine, global-norm gradient clipping.

Consumed by `searche1_jax.train.optim.make_optimizer(block, total_steps)`. Defaults follow the Search-R1 GRPO
runs (docs/reference.md: lr 1e-6, warmup ratio 0.285, grad clip 1.0) and the veRL actor optimizer they use
(torch AdamW, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 on every parameter, constant LR after warmup).
"""
import ml_collections


def get() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.learning_rate = 1e-6  # peak learning rate (docs/reference.md: Search-R1 GRPO lr 1e-6)
  c.b1 = 0.9  # Adam first-moment decay (veRL default)
  c.b2 = 0.999  # Adam second-moment decay (veRL default)
  c.eps = 1e-8  # Adam epsilon, added to sqrt(second moment)
  c.weight_decay = 0.01  # decoupled (AdamW) weight decay, multiplied by the scheduled LR (veRL default 1e-2)
  # Parameter-path substrings excluded from weight decay, e.g. ('bias', 'norm'); () decays every parameter,
  # as torch AdamW does in veRL. A path is the '/'-joined dict keys, e.g. 'layers/attn/q/bias'.
  c.no_decay = ()
  c.warmup_ratio = 0.285  # linear warmup from 0 over int(warmup_ratio * total_steps) steps (docs/reference.md)
  c.warmup_steps = -1  # >= 0: absolute number of warmup steps; overrides warmup_ratio
  c.schedule = "constant"  # after warmup: 'constant' (veRL 'constant') | 'cosine' (decay to min_lr_ratio)
  c.min_lr_ratio = 0.0  # cosine only: final LR as a fraction of the peak
  c.grad_clip_norm = 1.0  # clip gradients to this global L2 norm before Adam (docs/reference.md: 1.0); <= 0: off
  c.mu_dtype = ""  # dtype of Adam's first moment ('' = the parameter dtype; 'bfloat16' halves its memory)
  return c
