"""End to end: a tiny random policy trained with GRPO (the real sampler, advantages, step and optimizer) on a toy
reward learns to emit a target token."""
import jax
import numpy as np
import pytest

from configs.parts import grpo as grpo_part
from configs.parts import optim as optim_part
from searche1_jax import sharding as shd
from searche1_jax.models import qwen2
from searche1_jax.rl import grpo, grpo_loss
from searche1_jax.sampling import generate
from searche1_jax.train import optim, steps

CFG = qwen2.Qwen2Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2)
TARGET = 7  # the rewarded token
NEW = 6  # tokens generated per rollout
QUESTIONS = 8
STEPS = 20


def rollout_batch(params, group_size, seed):
  """QUESTIONS prompts x group_size samples at temperature 1; reward = fraction of generated tokens == TARGET."""
  prompts = [[10 + q, 3] for q in range(QUESTIONS) for _ in range(group_size)]
  out = generate(params, CFG, prompts, max_new_tokens=NEW, temperature=1.0, seed=seed)
  assert all(len(t) == NEW for t in out.tokens)  # no EOS configured: every rollout has NEW tokens
  tokens = np.array([p + t for p, t in zip(prompts, out.tokens)], np.int32)
  n, t = tokens.shape
  loss_mask = np.zeros((n, t), np.int32)
  loss_mask[:, 2:] = 1
  old = np.zeros((n, t), np.float32)
  old[:, 2:] = np.stack(out.logprobs)
  rewards = (tokens[:, 2:] == TARGET).mean(axis=1).astype(np.float32)
  adv = np.asarray(grpo.group_advantages(rewards, group_size, "grpo", 1e-6))
  batch = dict(tokens=tokens, attention_mask=np.ones((n, t), np.int32), loss_mask=loss_mask, old_logprobs=old,
               advantages=adv)
  return batch, float(rewards.mean())


@pytest.mark.slow
def test_grpo_raises_reward_on_toy_task():
  g = grpo_part.get()  # Search-R1 defaults: k3 KL 0.001 in-step, recomputed old log-probs, token-mean
  g.group_size = 4
  g.num_microbatches = 2
  g.logprob_chunk_size = 4
  o = optim_part.get()
  o.learning_rate, o.warmup_steps, o.weight_decay = 1e-2, 2, 0.0
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  gs = steps.make_grpo_step(CFG, grpo_loss.GRPOOptions.from_config(g), optim.make_optimizer(o, STEPS), mesh, lr_schedule=optim.make_schedule(o, STEPS))
  state = gs.init_state(jax.device_get(qwen2.init_params(CFG, jax.random.key(0))))
  rewards, mismatch, kls = [], [], []
  for step in range(STEPS):
    batch, reward = rollout_batch(jax.device_get(state.params), g.group_size, seed=step)
    state, m = gs(state, batch)
    rewards.append(reward)
    mismatch.append(float(m["sampler_abs_diff"]))
    kls.append(float(m["kl_ref"]))
  first, last = np.mean(rewards[:3]), np.mean(rewards[-5:])
  assert first < 0.15, rewards  # ~1/32 at random init
  assert last > 0.7 and last > first + 0.6, rewards
  # The sampler (KV cache, temperature 1) and the trainer (chunked log-probs) score the same tokens alike.
  assert max(mismatch) < 1e-4, mismatch
  assert kls[0] < 1e-6 < kls[-1]  # the policy moved away from the frozen reference
