"""Writes the notebooks of this folder from the cell sources below (outputs cleared, deterministic JSON).

  .venv/bin/python notebooks/_make.py          # rewrite grpo_loss.ipynb, ofsd_kl.ipynb, rollout_inspector.ipynb
  .venv/bin/python notebooks/_make.py --check  # exit 1 if a committed notebook differs from what this writes

Edit the cells here, not in the .ipynb files (tests/test_notebooks.py checks that both agree). Each notebook:
a setup cell (Colab: clone + `pip install -e .`), a `parameters` cell (tests inject overrides right after it,
papermill style), then the exploration. Everything they compute goes through the package's public functions.
"""
from __future__ import annotations

import os
import sys

import nbformat
from nbformat import v4

HERE = os.path.dirname(os.path.abspath(__file__))

# The URL the Colab cell clones: a placeholder until the repository is published (docs/notebooks_and_tests.md).
REPO_URL = "https://github.com/YOUR_ORG/searche1_jax.git"
COLAB_URL = "https://colab.research.google.com/github/YOUR_ORG/searche1_jax/blob/main/notebooks/{name}"

SETUP = f'''\
# Setup. In Colab this clones the repository and installs the package (`pip install -e .`); set REPO_URL to
# your clone's URL (docs/notebooks_and_tests.md). Elsewhere, open the notebook from a checkout (notebooks/ or the
# repository root) in an environment with the package's dependencies (`pip install -e .`).
import os
import subprocess
import sys

REPO_URL = "{REPO_URL}"  # placeholder
if "google.colab" in sys.modules:
  if not os.path.exists("setup.py"):
    if not os.path.isdir("searche1_jax_repo"):
      subprocess.run(["git", "clone", "--depth", "1", REPO_URL, "searche1_jax_repo"], check=True)
    os.chdir("searche1_jax_repo")
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "."], check=True)
if not os.path.exists("setup.py") and os.path.exists(os.path.join("..", "setup.py")):
  os.chdir("..")  # opened from notebooks/: work from the repository root
if not os.path.isdir("searche1_jax"):
  raise FileNotFoundError(f"run this notebook from a searche1_jax checkout (cwd is {{os.getcwd()}})")
sys.path.insert(0, os.getcwd())  # configs/ and launch/ live next to the package, not inside it
'''


def md(text: str):
  return v4.new_markdown_cell(text.strip("\n"))


def code(text: str, tags: tuple[str, ...] = ()):
  cell = v4.new_code_cell(text.strip("\n"))
  if tags:
    cell.metadata["tags"] = list(tags)
  return cell


def notebook(name: str, cells: list) -> nbformat.NotebookNode:
  nb = v4.new_notebook()
  nb.cells = cells
  nb.metadata = {
      "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
      "language_info": {"name": "python"},
      "colab": {"name": name, "provenance": []},
      "accelerator": "None",
  }
  # Stable cell ids: small diffs when a cell changes.
  for i, cell in enumerate(nb.cells):
    cell["id"] = f"{os.path.splitext(name)[0]}-{i:02d}"
  return nb


def colab_badge(name: str) -> str:
  return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
          f"({COLAB_URL.format(name=name)})")


# ===================================================================================================== GRPO

GRPO = [
    md(f"""
# GRPO loss, piece by piece

{colab_badge("grpo_loss.ipynb")}

What `searche1_jax/rl/grpo.py` computes, on small examples you can change:

1. **Group advantages** for each estimator (`grpo`, `drgrpo`, `rloo`) on example reward groups.
2. **The PPO-clipped surrogate** and its gradient as functions of the ratio, for a positive and a negative
   advantage.
3. **The k1 / k2 / k3 KL estimators**: bias and variance by Monte Carlo against the exact KL.
4. **The aggregation modes**: how `token-mean`, `seq-mean-token-mean` and `seq-mean-token-sum` weight short and
   long responses, and why (sum, denominator) makes micro-batching exact.

Every number below comes from the package's functions (`group_advantages`, `policy_loss`, `kl_penalty`); the
`assert`s check them against plain numpy, so the notebook fails loudly if the math changes. Runs on a CPU in
about a minute.
"""),
    code(SETUP),
    code("""
# Parameters (tests override them in a cell inserted below this one).
SEED = 0
GROUP_SIZE = 5  # G: samples per question in the advantage examples
NUM_SAMPLES = 200_000  # Monte Carlo samples per KL estimate
VOCAB = 64  # support of the toy policy / reference distributions
""", tags=("parameters",)),
    code("""
import html

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import HTML, display

from searche1_jax.rl import grpo

print(f"jax {jax.__version__} on {jax.default_backend()}; estimators {grpo.ESTIMATORS}, "
      f"KL estimators {grpo.KL_ESTIMATORS}, aggregation modes {grpo.AGG_MODES}")


def table(header, rows, fmt="{:+.3f}"):
  \"\"\"A small HTML table (no pandas needed).\"\"\"
  cell = lambda v: html.escape(fmt.format(v) if isinstance(v, (float, np.floating)) else str(v))
  head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
  body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
  return HTML(f"<table><tr>{head}</tr>{body}</table>")
"""),
    md("""
## 1. Group advantages

Rewards are laid out group-contiguously: the `G` samples of one question are consecutive. With binary EM
rewards, `grpo` divides the centred reward by the group's std (ddof = 1, as veRL / Search-R1), `drgrpo`
(Dr. GRPO) keeps the centred reward, and `rloo` subtracts the mean of the *other* `G - 1` samples.
"""),
    code("""
groups = {
    "1 of 5 correct": [1, 0, 0, 0, 0],
    "2 of 5 correct": [1, 1, 0, 0, 0],
    "4 of 5 correct": [1, 1, 1, 1, 0],
    "all correct": [1, 1, 1, 1, 1],
    "graded (F1-like)": [0.9, 0.5, 0.5, 0.1, 0.0],
}
assert all(len(g) == GROUP_SIZE for g in groups.values()), "the example groups have 5 samples"
rewards = jnp.asarray(np.concatenate(list(groups.values())), jnp.float32)
adv = {est: np.asarray(grpo.group_advantages(rewards, GROUP_SIZE, est)).reshape(-1, GROUP_SIZE)
       for est in grpo.ESTIMATORS}

rows = []
for gi, (name, r) in enumerate(groups.items()):
  for est in grpo.ESTIMATORS:
    rows.append([name if est == grpo.ESTIMATORS[0] else "", est, *adv[est][gi]])
display(table(["group", "estimator"] + [f"sample {i}" for i in range(GROUP_SIZE)], rows))
print("fraction of groups with zero std (no learning signal):",
      float(grpo.zero_std_group_fraction(rewards, GROUP_SIZE)))

# Independent numpy versions of the three estimators.
r = np.asarray(rewards, np.float64).reshape(-1, GROUP_SIZE)
mean = r.mean(axis=1, keepdims=True)
np.testing.assert_allclose(adv["drgrpo"], r - mean, atol=1e-6)
others = (r.sum(axis=1, keepdims=True) - r) / (GROUP_SIZE - 1)
np.testing.assert_allclose(adv["rloo"], r - others, atol=1e-6)
np.testing.assert_allclose(adv["grpo"], (r - mean) / (r.std(axis=1, ddof=1, keepdims=True) + 1e-6), atol=1e-5)
"""),
    md("""
With binary rewards, the advantage of a correct sample depends only on how many of the `G` siblings are
correct. `grpo` gives a rare success (1 of 5) a large push and a common one (4 of 5) a small one, in units
of the group's std; `drgrpo` and `rloo` stay in reward units (`rloo = G / (G - 1) * drgrpo`).
"""),
    code("""
ks = np.arange(1, GROUP_SIZE)
fig, ax = plt.subplots(figsize=(6.5, 3.5))
for j, (est, style) in enumerate(zip(grpo.ESTIMATORS, ("o-", "s--", "^:"))):
  a_right, a_wrong = [], []
  for k in ks:
    group = jnp.asarray([1.0] * k + [0.0] * (GROUP_SIZE - k))
    a = np.asarray(grpo.group_advantages(group, GROUP_SIZE, est))
    a_right.append(a[0])
    a_wrong.append(a[-1])
  ax.plot(ks, a_right, style, color=f"C{j}", label=f"{est}: a correct sample")
  ax.plot(ks, a_wrong, style, color=f"C{j}", alpha=0.4, label=f"{est}: a wrong sample")
ax.axhline(0, color="k", lw=0.5)
ax.set_xlabel(f"correct samples in the group (of G={GROUP_SIZE})")
ax.set_ylabel("advantage")
ax.set_xticks(ks)
ax.legend(fontsize=7, ncol=2)
ax.set_title("binary rewards: advantage vs. group success rate")
plt.tight_layout()
plt.show()
"""),
    md("""
## 2. The clipped surrogate and its gradient

Per token, with `ratio = exp(logp - old_logp)` and advantage `A`,
`loss = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high))`. Below, `policy_loss` is evaluated on one
token at a time (so `loss_sum / denominator` is that token's loss) and differentiated with `jax.grad` with
respect to the ratio. The dotted line is the unclipped surrogate `-A * ratio`; the dashed one uses a higher
upper clip (`clip_eps_high = 0.28`, DAPO's clip-higher).
"""),
    code("""
CLIP = 0.2
ratios = np.linspace(0.5, 1.6, 440).astype(np.float32)


def token_loss(ratio, advantage, clip_eps_high=None):
  \"\"\"policy_loss of a single token with the given ratio (old log-prob 0, so logp = log ratio).\"\"\"
  logp = jnp.log(ratio).reshape(1, 1)
  s, d, _ = grpo.policy_loss(logp, jnp.zeros((1, 1)), jnp.reshape(advantage, (1,)), jnp.ones((1, 1)),
                             clip_eps=CLIP, clip_eps_high=clip_eps_high)
  return s / d


curves = {}
for a in (1.0, -1.0):
  for hi in (None, 0.28):
    f = lambda r, a=a, hi=hi: token_loss(r, jnp.float32(a), hi)
    curves[a, hi] = (np.asarray(jax.vmap(f)(ratios)), np.asarray(jax.vmap(jax.grad(f))(ratios)))

fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex=True)
for col, a in enumerate((1.0, -1.0)):
  loss, grad = curves[a, None]
  loss_hi, grad_hi = curves[a, 0.28]
  axes[0, col].plot(ratios, -a * ratios, ":", color="gray", label="unclipped  -A*ratio")
  axes[0, col].plot(ratios, loss, lw=2, label=f"clip [{1 - CLIP:.1f}, {1 + CLIP:.1f}]")
  axes[0, col].plot(ratios, loss_hi, "--", label="clip_eps_high = 0.28")
  axes[1, col].plot(ratios, grad, lw=2, label=f"clip [{1 - CLIP:.1f}, {1 + CLIP:.1f}]")
  axes[1, col].plot(ratios, grad_hi, "--", label="clip_eps_high = 0.28")
  zero = grad == 0
  axes[1, col].fill_between(ratios, -1.2, 1.2, where=zero, color="red", alpha=0.08, label="no gradient (clipped)")
  axes[0, col].set_title(f"A = {a:+.0f}: loss")
  axes[1, col].set_title(f"A = {a:+.0f}: d loss / d ratio")
  axes[1, col].set_xlabel("ratio = pi / pi_old")
  axes[1, col].set_ylim(-1.2, 1.2)
  for ax in axes[:, col]:
    ax.axvline(1.0, color="k", lw=0.5)
    ax.legend(fontsize=7)
plt.tight_layout()
plt.show()

# The gradient is -A where the unclipped branch is active and exactly 0 where the clip binds.
# (Exactly at a clip boundary the two branches tie and the subgradient is split: those points are skipped.)
g_pos, g_neg = curves[1.0, None][1], curves[-1.0, None][1]
away = (np.abs(ratios - (1 + CLIP)) > 1e-3) & (np.abs(ratios - (1 - CLIP)) > 1e-3)
np.testing.assert_allclose(g_pos[away], np.where(ratios[away] < 1 + CLIP, -1.0, 0.0), atol=1e-5)
np.testing.assert_allclose(g_neg[away], np.where(ratios[away] > 1 - CLIP, 1.0, 0.0), atol=1e-5)
"""),
    md("""
Reading the plots: with `A > 0` the loss stops rewarding the token once its ratio exceeds `1 + eps` (no
gradient, the update is "trusted" no further); with `A < 0` it stops pushing the token down once the ratio is
below `1 - eps`. The clip never cuts the *pessimistic* side: a bad token whose probability has grown
(`A < 0`, ratio > 1) keeps its full gradient. `policy_loss` reports how often each clip binds
(`clip_frac_low`, `clip_frac_high`).
"""),
    code("""
# The clip metrics on a batch of 6 tokens: 2 tokens bind the high clip (A > 0), 1 the low clip (A < 0).
logp = jnp.log(jnp.asarray([[1.3, 1.25, 1.0, 0.7, 0.9, 1.1]], jnp.float32))
adv_tok = jnp.asarray([[1.0, 1.0, 1.0, -1.0, -1.0, -1.0]], jnp.float32)
_, _, m = grpo.policy_loss(logp, jnp.zeros_like(logp), adv_tok, jnp.ones_like(logp), clip_eps=CLIP)
print({k: round(float(m[k]), 4) for k in ("clip_low_count", "clip_high_count", "clip_frac_low", "clip_frac_high",
                                          "ratio_min", "ratio_max", "approx_kl_old")})
assert float(m["clip_high_count"]) == 2 and float(m["clip_low_count"]) == 1
"""),
    md("""
## 3. KL-to-reference estimators: bias and variance

The loss adds `kl_coef * KL_est(logp, ref_logp)` per token, an estimate of `KL(pi || pi_ref)` from tokens
*sampled from the policy*. Per sampled token, with `d = logp - ref_logp`:
`k1 = d` (unbiased, can be negative, high variance), `k2 = d^2 / 2` (biased, low variance),
`k3 = exp(-d) + d - 1` (unbiased and always >= 0; Search-R1's `low_var_kl`).

Below: a toy policy over `VOCAB` tokens and references at growing distance. For each we draw `NUM_SAMPLES`
tokens from the policy and compare the estimators' mean and spread with the exact KL.
"""),
    code("""
rng = np.random.default_rng(SEED)
base = rng.normal(0.0, 1.5, VOCAB)
noise = rng.normal(0.0, 1.0, VOCAB)
scales = [0.05, 0.1, 0.2, 0.4, 0.8, 1.6]
key = jax.random.PRNGKey(SEED)

results = {est: [] for est in grpo.KL_ESTIMATORS}
exact = []
for i, s in enumerate(scales):
  logp_all = jax.nn.log_softmax(jnp.asarray(base, jnp.float32))
  ref_all = jax.nn.log_softmax(jnp.asarray(base + s * noise, jnp.float32))
  p = np.exp(np.asarray(logp_all, np.float64))
  kl = float(np.sum(p * (np.asarray(logp_all, np.float64) - np.asarray(ref_all, np.float64))))
  exact.append(kl)
  tokens = jax.random.categorical(jax.random.fold_in(key, i), logp_all, shape=(NUM_SAMPLES,))
  for est in grpo.KL_ESTIMATORS:
    v = np.asarray(grpo.kl_penalty(logp_all[tokens], ref_all[tokens], est), np.float64)
    results[est].append((v.mean(), v.std(), v.std() / np.sqrt(NUM_SAMPLES), v.min()))
exact = np.asarray(exact)

rows = []
for i, kl in enumerate(exact):
  for est in grpo.KL_ESTIMATORS:
    mean, std, se, vmin = results[est][i]
    rows.append([f"{kl:.4f}" if est == "k1" else "", est, mean, (mean - kl) / kl, std / kl, vmin])
display(table(["exact KL", "estimator", "MC mean", "relative bias", "per-sample std / KL", "min"], rows,
              fmt="{:+.4f}"))
"""),
    code("""
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for est, style in zip(grpo.KL_ESTIMATORS, ("o-", "s-", "^-")):
  mean, std, se, _ = (np.asarray(x) for x in zip(*results[est]))
  axes[0].errorbar(exact, (mean - exact) / exact, yerr=2 * se / exact, fmt=style, capsize=3, label=est)
  axes[1].loglog(exact, std / exact, style, label=est)
axes[0].axhline(0, color="k", lw=0.5)
axes[0].set_xscale("log")
axes[0].set_xlabel("exact KL(pi || pi_ref) (nats)")
axes[0].set_ylabel("relative bias (MC mean - KL) / KL")
axes[0].set_title("bias (error bars: 2 standard errors)")
axes[1].set_xlabel("exact KL(pi || pi_ref) (nats)")
axes[1].set_ylabel("per-sample std / KL")
axes[1].set_title("spread of one token's estimate")
for ax in axes:
  ax.legend()
plt.tight_layout()
plt.show()

# k1 and k3 are unbiased (within 5 standard errors); k3 is never negative; for small KL its per-sample
# spread is far below k1's; k2's bias is second order (small for small KL, large for large KL).
for i, kl in enumerate(exact):
  for est in ("k1", "k3"):
    mean, _, se, _ = results[est][i]
    assert abs(mean - kl) < 5 * se, (est, kl, mean, se)
  assert results["k3"][i][3] >= 0.0
  if kl < 0.05:
    assert results["k3"][i][1] < 0.5 * results["k1"][i][1]
assert abs(results["k2"][0][0] - exact[0]) / exact[0] < 0.1
assert abs(results["k2"][-1][0] - exact[-1]) / exact[-1] > 0.1
"""),
    md("""
## 4. Aggregation modes: who gets how much weight

The loss is returned as `(loss_sum, denominator)` and the step divides their batch totals. The mode decides
both. Differentiating the aggregated loss with respect to each token's log-prob (all ratios 1, all advantages
`+1`) gives each token's weight in the update:

| mode | per-token weight | a response of length `L` in total |
|---|---|---|
| `token-mean` | `1 / (all tokens in the batch)` | grows with `L` |
| `seq-mean-token-mean` (GRPO paper) | `1 / (B * L)` | `1 / B` whatever `L` |
| `seq-mean-token-sum` (Dr. GRPO-style constant normalizer) | `1 / B` | `L / B` |
"""),
    code("""
lengths = np.array([4, 16, 64])
B, T = len(lengths), int(lengths.max())
mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
ones = jnp.ones((B,), jnp.float32)


def aggregated(logp, agg, advantages=ones, mask=jnp.asarray(mask)):
  s, d, _ = grpo.policy_loss(logp, jnp.zeros((B, T)), advantages, mask, agg=agg)
  return s / d


weights = {agg: -np.asarray(jax.grad(aggregated)(jnp.zeros((B, T)), agg)) for agg in grpo.AGG_MODES}

fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
x = np.arange(B)
for j, agg in enumerate(grpo.AGG_MODES):
  w = weights[agg]
  axes[0].bar(x + (j - 1) * 0.27, w[:, 0], width=0.27, label=agg)
  axes[1].bar(x + (j - 1) * 0.27, w.sum(axis=1), width=0.27, label=agg)
for ax, title in zip(axes, ("weight of one token", "total weight of the response")):
  ax.set_xticks(x, [f"L = {n}" for n in lengths])
  ax.set_yscale("log")
  ax.set_title(title)
fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", ncol=3, fontsize=9)
plt.tight_layout(rect=(0, 0, 1, 0.9))
plt.show()

n_tok = lengths.sum()
np.testing.assert_allclose(weights["token-mean"], mask / n_tok, rtol=1e-5)
np.testing.assert_allclose(weights["seq-mean-token-mean"], mask / (B * lengths[:, None]), rtol=1e-5)
np.testing.assert_allclose(weights["seq-mean-token-sum"], mask / B, rtol=1e-5)
"""),
    md("""
**Why it matters (length bias).** Take a short correct response (`A > 0`) and a long wrong one (`A < 0`).
With `seq-mean-token-mean` each response gets the same total weight, so each token of the long wrong answer is
pushed down `L_long / L_short` times less than each token of the short right one is pushed up: long wrong
answers are penalised little per token, which lets responses grow (the Dr. GRPO observation). `token-mean`
(Search-R1's default) and `seq-mean-token-sum` weight every token alike.
"""),
    code("""
adv2 = jnp.asarray([1.0, -1.0])
mask2 = (np.arange(64)[None, :] < np.array([[8], [64]])).astype(np.float32)
rows = []


def two_response_loss(logp, agg):
  s, d, _ = grpo.policy_loss(logp, jnp.zeros((2, 64)), adv2, jnp.asarray(mask2), agg=agg)
  return s / d


for agg in grpo.AGG_MODES:
  g = np.asarray(jax.grad(two_response_loss)(jnp.zeros((2, 64)), agg))
  up, down = -g[0, 0], g[1, 0]
  rows.append([agg, up, down, up / down])
display(table(["mode", "push up per token (short, correct)", "push down per token (long, wrong)", "ratio"], rows,
              fmt="{:.4f}"))
"""),
    md("""
**Micro-batches.** Because each micro-batch returns `(loss_sum, denominator)`, summing both over micro-batches
and dividing once gives exactly the full-batch loss, for every mode. A mean of micro-batch means would not,
when the micro-batches hold different numbers of tokens or sequences (here 1 and 3 sequences):
"""),
    code("""
rng = np.random.default_rng(SEED + 1)
B4, T4 = 4, 32
logp4 = jnp.asarray(rng.normal(-1.0, 0.3, (B4, T4)), jnp.float32)
old4 = logp4 + jnp.asarray(rng.normal(0.0, 0.2, (B4, T4)), jnp.float32)
adv4 = jnp.asarray(rng.normal(0.0, 1.0, B4), jnp.float32)
mask4 = jnp.asarray(np.arange(T4)[None, :] < np.array([[3], [30], [12], [32]]), jnp.float32)
for agg in grpo.AGG_MODES:
  s, d, _ = grpo.policy_loss(logp4, old4, adv4, mask4, agg=agg)
  parts = [grpo.policy_loss(logp4[a:b], old4[a:b], adv4[a:b], mask4[a:b], agg=agg) for a, b in ((0, 1), (1, 4))]
  acc = sum(p[0] for p in parts) / sum(p[1] for p in parts)
  naive = np.mean([float(p[0] / p[1]) for p in parts])
  print(f"{agg:22s} full batch {float(s / d):+.6f}  accumulated {float(acc):+.6f}  mean of means {naive:+.6f}")
  np.testing.assert_allclose(float(acc), float(s / d), rtol=1e-5)
"""),
]


# ===================================================================================================== shared glue

LOAD_RUN = '''
import json

import ml_collections

from searche1_jax.models import qwen2
from searche1_jax.train import checkpoint as checkpoint_lib


def load_demo_run(workdir):
  """The newest checkpoint of a demo / trainer workdir as (config, meta, Qwen2Config, params); None if it has none.

  Reads WORKDIR/config.json (written by launch/train.py and launch/demo.py) and the latest checkpoint in
  WORKDIR/checkpoints (searche1_jax/train/checkpoint.py), whose arrays are restored as saved.
  """
  config_path = os.path.join(workdir, "config.json")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not (os.path.isfile(config_path) and os.path.isdir(ckpt_dir)):
    return None
  ckpt = checkpoint_lib.Checkpointer(ckpt_dir)
  try:
    step = ckpt.latest_step()
    if step is None:
      return None
    state, meta, _ = ckpt.restore(step, None)  # no target: the arrays come back as they were saved
  finally:
    ckpt.close()
  with open(config_path, encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  model_cfg = qwen2.Qwen2Config(**meta["model_config"])
  cursor = meta["cursor"]
  print(f"{workdir}: checkpoint {step} (round {cursor['round']}, phase {cursor['phase']!r}, global step "
        f"{cursor['global_step']}), a {model_cfg.num_params:,}-parameter policy")
  return config, meta, model_cfg, state["params"]
'''

TINY_WORLD = '''
import warnings

from transformers import AutoTokenizer

from configs.parts import world as world_part
from searche1_jax.demo import synthetic_world as sw
from searche1_jax.demo import tokenizer as tokenizer_lib
from searche1_jax.demo import transcripts as transcripts_lib


def tiny_world(out_dir, protocol_cfg, seed=0):
  """A small synthetic world (the sizes of configs/demo.py:smoke) and its demo BPE tokenizer, written to out_dir.

  Returns (world block, World, world directory, tokenizer).
  """
  warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's widget bars: text bars are fine
  wcfg = world_part.get()
  wcfg.seed = seed
  wcfg.num_countries, wcfg.cities_per_country, wcfg.num_people, wcfg.num_companies = 3, 2, 40, 8
  wcfg.test_fraction, wcfg.num_train_questions, wcfg.num_test_questions = 0.25, 24, 8
  wcfg.tokenizer.vocab_size = 400
  world_dir = os.path.join(out_dir, "world")
  world = sw.write_world(world_dir, wcfg)
  texts = transcripts_lib.make_transcripts(world, world.train_questions, np.random.default_rng(seed),
                                           wcfg.transcripts, protocol_cfg)
  tokenizer_dir = os.path.join(out_dir, "tokenizer")
  tokenizer_lib.build_demo_tokenizer(world, texts, tokenizer_dir, wcfg.tokenizer)
  return wcfg, world, world_dir, AutoTokenizer.from_pretrained(tokenizer_dir)
'''

TRANSCRIPT_TRAJECTORY = '''
from searche1_jax.agent import rollout as rollout_lib
from searche1_jax.agent import trajectory as trajectory_lib


def transcript_trajectory(record, question, tokenizer, template, sample_index=0):
  """A Trajectory record from a scripted transcript (demo/transcripts.py): the prompt as the rollout builds it,
  then each segment encoded on its own, exactly as the rollout splices observations (policy turns: mask 1)."""
  prompt = rollout_lib.build_prompt_ids(tokenizer, question["question"], template)
  assert tokenizer.decode(prompt, skip_special_tokens=False) == record.segments[0][0], "prompt text differs"
  ids, mask, policy_spans, obs_spans = list(prompt), [0] * len(prompt), [], []
  for text, trainable in record.segments[1:]:
    piece = tokenizer.encode(text, add_special_tokens=False)
    (policy_spans if trainable else obs_spans).append((len(ids), len(ids) + len(piece)))
    ids += piece
    mask += [int(trainable)] * len(piece)
  traj = trajectory_lib.Trajectory(
      question_id=question["id"], question=question["question"], golden_answers=question["golden_answers"],
      prompt_ids=prompt, ids=ids, policy_mask=mask, logprobs=np.zeros(len(ids), np.float32),
      policy_spans=policy_spans, obs_spans=obs_spans, obs_kinds=[trajectory_lib.OBS_INFORMATION] * len(obs_spans),
      turn_actions=["search"] * len(record.searches) + ["answer"], queries=list(record.searches),
      num_searches=len(record.searches), answer=record.answer, stop_reason=trajectory_lib.STOP_ANSWER,
      sample_index=sample_index, metadata={"scripted_kind": record.kind})
  traj.reward = rollout_lib.default_reward(traj)
  return traj
'''

# ===================================================================================================== OFSD

OFSD = [
    md(f"""
# OFSD divergences: forward KL, reverse KL, JSD and top-k

{colab_badge("ofsd_kl.ipynb")}

What `searche1_jax/rl/ofsd.py` computes and how the teacher / student pair of `searche1_jax/rl/privileged.py`
is scored:

1. **Forward vs reverse KL vs JSD on a toy problem**: fit a unimodal student to a bimodal teacher by gradient
   descent on each divergence (mode covering vs mode seeking).
2. **The top-k approximation** (teacher's top-k tokens + one tail bucket) and its error against k.
3. **A demo trajectory pair** scored by the teacher (privileged context: the prompt plus a more efficient
   sibling) and by the student (plain prompt), with a per-token divergence heat map over the decoded text.

Forward KL here is `KL(teacher || student) = sum_v pT (log pT - log pS)`, the Search-E1 default; the teacher is
always under stop-gradient. Runs on a CPU in about a minute.
"""),
    code(SETUP),
    code("""
# Parameters (tests override them in a cell inserted below this one).
SEED = 0
STEPS = 400  # gradient steps of each toy fit
LEARNING_RATE = 0.05  # Adam, toy fits
VOCAB = 2048  # vocabulary of the top-k experiment
POSITIONS = 32  # token positions averaged in the top-k experiment
ZIPF = 1.5  # teacher logits ~ -ZIPF * log(rank): a peaked head and a long tail, like an LM
STUDENT_NOISE = 0.7  # student logits = teacher logits + N(0, STUDENT_NOISE^2)
KIND = "forward_kl"  # divergence of the heat map: 'forward_kl' | 'reverse_kl' | 'jsd'
WORKDIR = "workdirs/demo_smoke"  # a demo run (launch/demo.py); its latest checkpoint scores the pair if present
WORK_DIR = ""  # where the inline world and tokenizer go when WORKDIR has no checkpoint; '' = a temporary dir
""", tags=("parameters",)),
    code("""
import html
import tempfile

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from IPython.display import HTML, display

from searche1_jax.rl import ofsd

print(f"jax {jax.__version__} on {jax.default_backend()}; divergences {ofsd.KINDS}")
"""),
    md("""
## 1. Mode covering vs mode seeking

The teacher is a bimodal distribution over 121 bins; the student is a discretized Gaussian with two parameters
(mean, log std). Each fit minimises one divergence with Adam, calling `ofsd.token_divergence` on `[1, 1, V]`
logits (one "token"). Forward KL penalises the student wherever the *teacher* has mass the student misses, so it
spreads over both modes; reverse KL penalises student mass where the teacher has little, so it picks one mode.
JSD (beta = 0.5) is symmetric and bounded by log 2; where it lands depends on the teacher (with these settings it
covers both modes, like forward KL).
"""),
    code("""
x = np.linspace(-6.0, 6.0, 121)
MODES = [(-2.5, 0.6, 0.4), (2.5, 0.6, 0.6)]  # (mean, std, weight)
teacher_p = sum(w * np.exp(-0.5 * ((x - m) / s) ** 2) / s for m, s, w in MODES)
teacher_p /= teacher_p.sum()
teacher_logits = jnp.asarray(np.log(teacher_p), jnp.float32)[None, None]  # [B=1, T=1, V]
xj = jnp.asarray(x, jnp.float32)
one = jnp.ones((1, 1))


def student_logits(theta):
  mu, log_sigma = theta[0], theta[1]
  return (-0.5 * ((xj - mu) / jnp.exp(log_sigma)) ** 2)[None, None]


def divergence(theta, kind, beta=0.5):
  return ofsd.token_divergence(teacher_logits, student_logits(theta), one, kind=kind, beta=beta)[0, 0]


def fit(kind, beta=0.5):
  \"\"\"Adam on (mean, log std), from mean 0.5 (just right of the valley) and std 1; returns the final parameters
  and the loss curve. (From exactly 0, reverse KL can stall on the symmetric saddle between the modes.)\"\"\"
  opt = optax.adam(LEARNING_RATE)

  def step(carry, _):
    theta, state = carry
    loss, grad = jax.value_and_grad(divergence)(theta, kind, beta)
    updates, state = opt.update(grad, state)
    return (optax.apply_updates(theta, updates), state), loss

  theta0 = jnp.asarray([0.5, 0.0], jnp.float32)
  (theta, _), losses = jax.lax.scan(step, (theta0, opt.init(theta0)), None, length=STEPS)
  return theta, losses


fits = {kind: tuple(np.asarray(a) for a in jax.jit(fit, static_argnums=0)(kind)) for kind in ofsd.KINDS}

fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [2, 1]})
axes[0].bar(x, teacher_p, width=x[1] - x[0], color="lightgray", label="teacher (bimodal)")
for kind, (theta, losses) in fits.items():
  q = np.asarray(jax.nn.softmax(student_logits(jnp.asarray(theta))[0, 0]))
  label = f"{kind}{' (beta 0.5)' if kind == 'jsd' else ''}: mean {theta[0]:+.2f}, std {np.exp(theta[1]):.2f}"
  axes[0].plot(x, q, lw=2, label=label)
  axes[1].semilogy(losses, label=kind)
axes[0].set_xlabel("x (bin)")
axes[0].set_ylabel("probability")
axes[0].set_title("student fitted to the teacher with each divergence")
axes[0].legend(fontsize=8)
axes[1].set_xlabel("Adam step")
axes[1].set_title("divergence during the fit (nats)")
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()

rows = []
for kind, (theta, _) in fits.items():
  vals = [float(divergence(jnp.asarray(theta), k)) for k in ofsd.KINDS]
  rows.append(f"<tr><td>fit by {kind}</td><td>{theta[0]:+.2f}</td><td>{np.exp(theta[1]):.2f}</td>"
              + "".join(f"<td>{v:.3f}</td>" for v in vals) + "</tr>")
head = "".join(f"<th>{k} at the fit</th>" for k in ofsd.KINDS)
display(HTML(f"<table><tr><th>student</th><th>mean</th><th>std</th>{head}</tr>{''.join(rows)}</table>"))

mix_mean = sum(w * m for m, _, w in MODES)
(mu_f, ls_f), (mu_r, ls_r) = fits["forward_kl"][0], fits["reverse_kl"][0]
assert abs(mu_f - mix_mean) < 0.25 and np.exp(ls_f) > 2.0, "forward KL should cover both modes"
assert abs(mu_r - 2.5) < 0.25 and np.exp(ls_r) < 1.0, "reverse KL should sit on the heavier mode"
for k in ("forward_kl", "reverse_kl"):  # each is the best of the three students under its own objective
  own = float(divergence(jnp.asarray(fits[k][0]), k))
  assert all(own <= float(divergence(jnp.asarray(fits[o][0]), k)) + 1e-3 for o in ofsd.KINDS), k
"""),
    md("""
Look at the JSD column: from this start JSD descends to a covering student, yet its value is *lower* at the
reverse-KL (mode-seeking) student. The landscapes over the student's two parameters show why: forward and
reverse KL have one basin each, JSD has both a covering and a seeking one.
"""),
    code("""
mus = np.linspace(-4.0, 4.0, 81)
log_sigmas = np.linspace(np.log(0.3), np.log(4.0), 50)
grid = jnp.asarray(np.stack(np.meshgrid(mus, log_sigmas), axis=-1).reshape(-1, 2), jnp.float32)
fig, axes = plt.subplots(1, 3, figsize=(14, 3.6), sharey=True)
for ax, kind in zip(axes, ofsd.KINDS):
  z = np.asarray(jax.vmap(lambda th, kind=kind: divergence(th, kind))(grid)).reshape(len(log_sigmas), len(mus))
  cs = ax.contourf(mus, np.exp(log_sigmas), np.log10(z), levels=20, cmap="viridis_r")
  fig.colorbar(cs, ax=ax, label="log10 nats")
  for other, (theta, _) in fits.items():
    ax.plot(theta[0], np.exp(theta[1]), "o" if other == kind else "x", color="red" if other == kind else "white",
            ms=8, label=f"fit by {other}")
  ax.set_yscale("log")
  ax.set_xlabel("student mean")
  ax.set_title(f"{kind} landscape")
axes[0].set_ylabel("student std")
axes[0].legend(fontsize=7, loc="upper left")
plt.tight_layout()
plt.show()
"""),
    md("""
For distillation this is the choice between a student that keeps *all* the teacher's plausible continuations
(forward KL, the Search-E1 default: dense supervision on every token, never zero where the teacher is not) and
one that commits to the teacher's dominant behaviour (reverse KL; SD-Search found JSD best on search-query tokens,
docs/reference.md).

## 2. Top-k with a tail bucket

Storing the teacher's full distribution per token is impossible at Qwen's 151,936-token vocabulary, so the
offline phase keeps the teacher's top-k log-probs. The divergence then runs over k + 1 outcomes: the teacher's
top-k tokens and one bucket holding everything else (`log(1 - sum p_topk)`), for both distributions. Merging
outcomes can only lose information, so the top-k value is a **lower bound** that grows with k and is exact at
k = V. Below, teachers with Zipf-like logits and students that are noisy copies of them:
"""),
    code("""
rng = np.random.default_rng(SEED)
ranks = np.arange(1, VOCAB + 1)
t_logits = np.stack([rng.permutation(-ZIPF * np.log(ranks)) for _ in range(POSITIONS)])
s_logits = t_logits + rng.normal(0.0, STUDENT_NOISE, t_logits.shape)
t_logits = jnp.asarray(t_logits, jnp.float32)[None]  # [1, T, V]
s_logits = jnp.asarray(s_logits, jnp.float32)[None]
mask = jnp.ones((1, POSITIONS))
ks = [k for k in (1, 3, 10, 50, 200, 1000) if k < VOCAB] + [VOCAB]  # each k is a new shape: a new compile

full = {kind: float(ofsd.token_divergence(t_logits, s_logits, mask, kind=kind).mean()) for kind in ofsd.KINDS}
approx = {kind: np.array([float(ofsd.token_divergence(t_logits, s_logits, mask, kind=kind, top_k=k).mean())
                          for k in ks]) for kind in ofsd.KINDS}
top_p = np.sort(np.asarray(jax.nn.softmax(t_logits[0], axis=-1)), axis=-1)[:, ::-1]
coverage = np.array([top_p[:, :k].sum(axis=1).mean() for k in ks])

fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
for kind in ofsd.KINDS:
  axes[0].semilogx(ks, 1.0 - approx[kind] / full[kind], "o-", label=f"{kind} (full: {full[kind]:.3f} nats)")
axes[0].set_xlabel("k (teacher's top-k tokens + 1 tail bucket)")
axes[0].set_ylabel("relative underestimate  1 - topk / full")
axes[0].set_title(f"top-k error (V = {VOCAB}, mean over {POSITIONS} positions)")
axes[0].axvline(50, color="gray", ls=":", lw=1)
axes[0].legend(fontsize=8)
axes[1].semilogx(ks, coverage, "o-", color="k")
axes[1].set_xlabel("k")
axes[1].set_ylabel("teacher probability mass in the top-k")
axes[1].set_title("what the top-k keeps (dotted: k = 50, SD-Search / OPSD)")
axes[1].axvline(50, color="gray", ls=":", lw=1)
plt.tight_layout()
plt.show()
i50 = ks.index(50)
print("at k = 50: " + ", ".join(f"{kind} {approx[kind][i50]:.4f} of {full[kind]:.4f} nats "
                                 f"({100 * (1 - approx[kind][i50] / full[kind]):.1f}% low)" for kind in ofsd.KINDS)
      + f"; the top-50 hold {100 * coverage[i50]:.1f}% of the teacher's mass")

for kind in ofsd.KINDS:
  assert np.all(approx[kind] <= full[kind] * (1 + 1e-4) + 1e-6), f"{kind}: top-k must be a lower bound"
  assert np.all(np.diff(approx[kind]) >= -1e-4 * full[kind]), f"{kind}: top-k must not decrease with k"
  np.testing.assert_allclose(approx[kind][-1], full[kind], rtol=1e-4)
"""),
    md("""
The offline OFSD phase stores exactly these top-k ids and log-probs per student token
(`ofsd.chunked_teacher_topk`) and later scores the student against them (`ofsd.token_divergence_from_topk`); the
stored path gives the same numbers as computing top-k on the fly:
"""),
    code("""
top_lp, top_ids = jax.lax.top_k(jax.nn.log_softmax(t_logits, axis=-1), 50)
for kind in ofsd.KINDS:
  stored = ofsd.token_divergence_from_topk(top_ids, top_lp, s_logits, mask, kind=kind)
  on_the_fly = ofsd.token_divergence(t_logits, s_logits, mask, kind=kind, top_k=50)
  np.testing.assert_allclose(np.asarray(stored), np.asarray(on_the_fly), rtol=1e-5, atol=1e-6)
print("stored top-50 targets == on-the-fly top-50 for", ", ".join(ofsd.KINDS))
"""),
    md("""
## 3. A demo pair, scored token by token

Now the real layout. We take one training question of the synthetic world and three scripted sibling
trajectories (`demo/transcripts.py`: an *efficient* one, a *vague* one that wastes a search on a look-alike, and
a *wrong* one), pick the reference and the students with `rl.pairs.select_pairs` (the correct sibling with the
fewest searches teaches the others), and build each pair with `rl.privileged.build_pair`: the teacher sees the
prompt **plus a block showing the reference trajectory**, the student sees the plain prompt, and both score the
student's own response tokens.

The model: the latest checkpoint of the demo run in `WORKDIR` when there is one (run
`python -m launch.demo --config configs/demo.py:smoke --workdir workdirs/demo_smoke` first), otherwise a
**freshly initialised tiny Qwen2** over a tiny world and demo tokenizer built here. The cell below says which.
A random model barely depends on its context, so its divergences are tiny; the heat map scale adapts.
"""),
    code(LOAD_RUN),
    code(TINY_WORLD),
    code(TRANSCRIPT_TRAJECTORY),
    code("""
from configs.parts import protocol as protocol_part
from searche1_jax.rl import pairs
from searche1_jax.rl import privileged

run = load_demo_run(WORKDIR) if WORKDIR else None
if run is not None:
  config, meta, model_cfg, params = run
  protocol_cfg, transcripts_cfg = config.protocol, config.world.transcripts
  world = sw.load_world(config.demo.world_dir)
  tokenizer = AutoTokenizer.from_pretrained(meta["tokenizer_dir"])
  MODEL_KIND = "demo checkpoint"
  MODEL_SOURCE = f"the demo run's latest checkpoint in {WORKDIR}"
else:
  work = WORK_DIR or tempfile.mkdtemp(prefix="ofsd_kl_")
  protocol_cfg = protocol_part.get()
  wcfg, world, _, tokenizer = tiny_world(work, protocol_cfg, SEED)
  transcripts_cfg = wcfg.transcripts
  model_cfg = qwen2.Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_layers=2,
                                num_heads=4, num_kv_heads=2, tie_word_embeddings=True)
  params = qwen2.init_params(model_cfg, jax.random.PRNGKey(SEED))
  MODEL_KIND = "freshly initialised tiny model"
  MODEL_SOURCE = (f"a freshly initialised tiny Qwen2 ({model_cfg.num_params:,} parameters; no checkpoint in "
                  f"{WORKDIR!r}) with a demo tokenizer built in {work}")
print("model:", MODEL_SOURCE)
print(f"tokenizer: {len(tokenizer)} tokens; world: {len(world.passages)} passages, "
      f"{len(world.train_questions)} training questions")
"""),
    code("""
# One two-hop training question and three scripted siblings of it.
question = next(q for q in world.train_questions if q["metadata"]["type"] == "compositional")
tcfg = ml_collections.ConfigDict(transcripts_cfg.to_dict())
tcfg.per_question = 3
tcfg.rates = ml_collections.ConfigDict(dict(efficient=1.0, vague=1.0, wrong=1.0, redundant=0.0, premature=0.0))
records = transcripts_lib.make_transcript_records(world, [question], np.random.default_rng(SEED), tcfg, protocol_cfg)
records.sort(key=lambda r: ("efficient", "vague", "wrong").index(r.kind))
siblings = [transcript_trajectory(r, question, tokenizer, protocol_cfg.template, i) for i, r in enumerate(records)]

correct = [t.reward > 0 for t in siblings]
ref, students = pairs.select_pairs(correct, [t.num_searches for t in siblings], [t.num_policy_tokens for t in siblings])
print("question:", question["question"], "| gold:", question["golden_answers"])
for i, t in enumerate(siblings):
  role = "REFERENCE" if i == ref else ("student" if i in students else "-")
  print(f"  sibling {i} ({t.metadata['scripted_kind']:9s}) reward {t.reward:.0f}, {t.num_searches} searches "
        f"{t.queries}, answer {t.answer!r} -> {role}")
assert ref is not None and siblings[ref].metadata["scripted_kind"] == "efficient"

opts = privileged.ContextOptions(template=protocol_cfg.template)
pair_list = [(i, privileged.build_pair(siblings[i], siblings[ref], tokenizer, opts)) for i in students]
print("\\nthe teacher's privileged block (placed after the question):\\n")
print(pair_list[0][1].block_text)
"""),
    code("""
def score_pairs(layouts, kind=KIND, beta=0.5):
  \"\"\"Per pair and student token t: the divergence between the teacher's and the student's distributions of
  token t (predicted from position t - 1), over the full vocabulary; 0 where the distill mask is 0.

  All teacher and student sequences go through the model as one right-padded batch (causal attention: padding
  after a token never changes it), so there is one compile. Returns one [Ls] array per pair.
  \"\"\"
  n = len(layouts)
  length = max(max(len(p.teacher_ids), len(p.student_ids)) for p in layouts)
  tokens = np.full((2 * n, length), tokenizer.pad_token_id, np.int32)
  for j, p in enumerate(layouts):
    tokens[j, :len(p.teacher_ids)] = p.teacher_ids
    tokens[n + j, :len(p.student_ids)] = p.student_ids
  h = jax.jit(qwen2.hidden_states, static_argnums=1)(params, model_cfg, jnp.asarray(tokens))
  # Student position t - 1 predicts token t; the teacher's aligned position is teacher_pos[t - 1].
  ls = max(len(p.student_ids) for p in layouts)
  t_idx = np.zeros((n, ls - 1), np.int32)
  mask = np.zeros((n, ls - 1), np.int32)
  for j, p in enumerate(layouts):
    t_idx[j, :len(p.student_ids) - 1] = np.maximum(p.teacher_pos[:-1], 0)
    mask[j, :len(p.student_ids) - 1] = p.distill_mask[1:]
  th = h[:n][np.arange(n)[:, None], t_idx]
  sh = h[n:, :ls - 1]
  div = ofsd.token_divergence(qwen2.logits_from_hidden(params, model_cfg, th),
                              qwen2.logits_from_hidden(params, model_cfg, sh), jnp.asarray(mask), kind=kind,
                              beta=beta)
  # The training path computes the same from hidden states in time chunks, never holding [B, T, V].
  chunked = ofsd.chunked_token_divergence(th, sh, qwen2.head_kernel(params, model_cfg), jnp.asarray(mask),
                                          chunk_size=128, kind=kind, beta=beta)
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(div), rtol=1e-4, atol=1e-7)
  div = np.asarray(div)
  return [np.concatenate([[0.0], div[j, :len(p.student_ids) - 1]]) for j, p in enumerate(layouts)]


scores = dict(zip([i for i, _ in pair_list], score_pairs([p for _, p in pair_list])))
for i, p in pair_list:
  n = int(p.distill_mask.sum())
  resp = slice(p.student_prompt_len, None)
  assert (p.teacher_ids[p.teacher_pos[resp]] == p.student_ids[resp]).all(), "teacher scores the same tokens"
  print(f"student {i} ({siblings[i].metadata['scripted_kind']}): {n} distilled tokens, mean {KIND} "
        f"{scores[i].sum() / n:.3g} nats, max {scores[i].max():.3g}; teacher prompt {p.teacher_prompt_len} vs "
        f"student prompt {p.student_prompt_len} tokens")
"""),
    md("""
### Heat map

Each response token of the student, coloured by the divergence on it (darker red = the teacher, who has seen
the efficient sibling, disagrees more with the student). Grey text is mask 0 (retrieved passages: never
distilled); underlined tokens are the search-query tokens (`ofsd.spans = 'query'` would distill only those).
Hover a token for its value.
"""),
    code("""
def heat_map(traj, pair, div, tokenizer):
  query = privileged.distill_mask(traj, tokenizer, "query")
  vmax = max(float(div.max()), 1e-12)
  out = []
  for t in range(pair.student_prompt_len, len(pair.student_ids)):
    text = html.escape(tokenizer.decode([int(pair.student_ids[t])], skip_special_tokens=False))
    text = text.replace("\\n", "&#8629;<br>")
    if pair.distill_mask[t]:
      style = f"background: rgba(220, 38, 38, {0.08 + 0.85 * div[t] / vmax:.3f});"
      if query[t]:
        style += " text-decoration: underline;"
      out.append(f'<span style="{style}" title="token {t}: {div[t]:.4g} nats">{text}</span>')
    else:
      out.append(f'<span style="color: #9ca3af;">{text}</span>')
  return ('<div style="font-family: monospace; font-size: 12px; line-height: 1.7; white-space: pre-wrap; '
          'border: 1px solid #ddd; padding: 8px;">' + "".join(out) + "</div>")


for i, p in pair_list:
  t = siblings[i]
  display(HTML(f"<h4>student {i} ({html.escape(t.metadata['scripted_kind'])}, reward {t.reward:.0f}, "
               f"{t.num_searches} searches) vs. the teacher that saw sibling {ref}: {KIND} per token, "
               f"max {scores[i].max():.3g} nats</h4>" + heat_map(t, p, scores[i], tokenizer)))
"""),
    code("""
fig, ax = plt.subplots(figsize=(12, 3))
for i, p in pair_list:
  pos = np.arange(len(p.student_ids)) - p.student_prompt_len
  keep = p.distill_mask == 1
  ax.plot(pos[keep], scores[i][keep], ".", ms=3, color=f"C{i % 10}",
          label=f"student {i} ({siblings[i].metadata['scripted_kind']})")
  for s, e in siblings[i].obs_spans:
    ax.axvspan(s - p.student_prompt_len, e - p.student_prompt_len, color=f"C{i % 10}", alpha=0.06)
ax.set_xlabel("response token (shaded: retrieved passages, mask 0)")
ax.set_ylabel(f"{KIND} (nats)")
ax.set_title(f"per-token divergence along each student's response ({MODEL_KIND})")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
"""),
]

# ===================================================================================================== inspector

INSPECTOR = [
    md(f"""
# Rollout inspector

{colab_badge("rollout_inspector.ipynb")}

Runs the multi-turn Search-R1 rollout loop (`searche1_jax/agent/rollout.py`: the sampler on the device, the
retriever on the host between turns) on chosen held-out questions (`QUESTIONS`), `GROUP_SIZE` siblings each, and shows every
trajectory: its turns, searches, retrieved passages and policy mask, with the reward, GRPO advantage and OFSD
role of each sibling.

**Where the policy comes from** (`SOURCE`):
- `checkpoint`: the latest checkpoint of a demo run in `WORKDIR`
  (`python -m launch.demo --config configs/demo.py:smoke --workdir workdirs/demo_smoke`, or the full demo);
- `smoke`: run the smoke demo into `WORKDIR` first (one to two minutes on a CPU), then as above;
- `inline`: no run needed: a tiny synthetic world, the demo tokenizer, a real MiniLM exact index and a
  **randomly initialised** tiny Qwen2 built right here. A random policy almost never writes a well-formed
  search, so expect invalid-action turns; a scripted transcript at the end shows what a good trajectory looks like.
- `auto` (default): `checkpoint` if `WORKDIR` has one, else `smoke` when the demo's modules are present, else
  `inline`.
"""),
    code(SETUP),
    code("""
# Parameters (tests override them in a cell inserted below this one).
SOURCE = "auto"  # 'auto' | 'checkpoint' | 'smoke' | 'inline' (see above)
WORKDIR = "workdirs/demo_smoke"  # the demo run to inspect (or to create with SOURCE='smoke')
SMOKE_CONFIG = "configs/demo.py:smoke"  # what SOURCE='smoke' runs (artifact cache: configs/demo.py `cache=`)
WORK_DIR = ""  # SOURCE='inline': where the world, tokenizer and index go; '' = a temporary directory
QUESTIONS = [0, 1]  # which held-out (test) questions to roll out (indices)
GROUP_SIZE = 4  # siblings per question (one GRPO / OFSD group)
TEMPERATURE = 1.0  # sampling temperature; 0 = greedy (all siblings identical)
SEED = 0
""", tags=("parameters",)),
    code("""
import html
import importlib.util
import re
import tempfile

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import HTML, display

from searche1_jax.models import hf
from searche1_jax.train import evaluation
from searche1_jax.agent import rollout as rollout_lib
from searche1_jax.retrieval import make_retriever
from searche1_jax.rl import grpo
from searche1_jax.rl import pairs

print(f"jax {jax.__version__} on {jax.default_backend()}")
"""),
    code(LOAD_RUN),
    code(TINY_WORLD),
    code("""
def demo_available():
  \"\"\"True when the demo's pieces are importable: launch/demo.py, the round loop and the OFSD runner it uses.\"\"\"
  return all(importlib.util.find_spec(m) is not None
             for m in ("launch.demo", "searche1_jax.train.loop", "searche1_jax.train.ofsd_runner"))


if SOURCE not in ("auto", "checkpoint", "smoke", "inline"):
  raise ValueError(f"SOURCE={SOURCE!r}: expected 'auto', 'checkpoint', 'smoke' or 'inline'")
run = load_demo_run(WORKDIR) if SOURCE in ("auto", "checkpoint") else None
if SOURCE == "checkpoint" and run is None:
  raise FileNotFoundError(f"SOURCE='checkpoint': no config.json + checkpoints/ with a checkpoint in {WORKDIR!r}")
if run is None and (SOURCE == "smoke" or (SOURCE == "auto" and demo_available())):
  from launch import demo as demo_launch
  from launch import train as train_launch
  from searche1_jax import config_utils
  smoke_config = train_launch.prepare(config_utils.load_config(SMOKE_CONFIG), WORKDIR, distributed=False)
  demo_launch.run_demo(smoke_config, WORKDIR)
  run = load_demo_run(WORKDIR)
  if run is None:
    raise RuntimeError(f"the smoke demo finished but left no checkpoint in {WORKDIR}/checkpoints")

if run is not None:
  SOURCE_USED = f"checkpoint of the demo run in {WORKDIR}"
  config, meta, model_cfg, params = run
  tokenizer = AutoTokenizer.from_pretrained(meta["tokenizer_dir"])
  protocol_cfg, rollout_cfg = config.protocol, config.rollout
  retriever = make_retriever(config.retrieval)
  world = sw.load_world(config.demo.world_dir) if "demo" in config else None
  transcripts_cfg = config.world.transcripts if "world" in config else None
  if world is not None:
    pool = world.test_questions
  else:  # a non-demo run: the first evaluation benchmark
    pool = next(iter(evaluation.load_benchmarks(config.data, limit=max(QUESTIONS) + 1).values()))
  eos_ids = hf.eos_ids_for(tokenizer, meta["hf_dir"])
else:
  from configs.parts import protocol as protocol_part
  from configs.parts import retrieval as retrieval_part
  from configs.parts import rollout as rollout_part
  from searche1_jax.retrieval.build import build_index
  from searche1_jax.retrieval.encoder import Encoder
  from searche1_jax.retrieval.retriever import load_index_retriever

  work = WORK_DIR or tempfile.mkdtemp(prefix="rollout_inspector_")
  wcfg, world, world_dir, tokenizer = tiny_world(work, protocol_part.get(), SEED)
  transcripts_cfg = wcfg.transcripts
  # Protocol: Search-R1's, with short turns and two searching turns (a random policy rambles).
  protocol_cfg = protocol_part.get()
  protocol_cfg.max_turns, protocol_cfg.max_response_length, protocol_cfg.max_obs_length = 2, 24, 128
  protocol_cfg.max_start_length, protocol_cfg.max_prompt_length = 256, 768
  rollout_cfg = rollout_part.get()
  # Retrieval: the real MiniLM encoder over the world's passages, exact (brute-force) search.
  r_cfg = retrieval_part.get()
  r_cfg.backend, r_cfg.index_dir, r_cfg.encoder = "exact", os.path.join(work, "index"), "minilm"
  r_cfg.encoding.num_devices, r_cfg.encoding.batch_size = 1, 64
  encoder = Encoder.from_config("minilm", r_cfg.encoding)
  build_index(os.path.join(world_dir, sw.CORPUS_FILE), encoder, r_cfg.index_dir, "exact", r_cfg, progress=False)
  retriever = load_index_retriever(r_cfg, encoder=encoder)
  model_cfg = qwen2.Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_layers=2,
                                num_heads=4, num_kv_heads=2, tie_word_embeddings=True)
  params = qwen2.init_params(model_cfg, jax.random.PRNGKey(SEED))
  pool = world.test_questions
  eos_ids = hf.eos_ids_for(tokenizer, "")
  SOURCE_USED = f"inline: random tiny Qwen2 ({model_cfg.num_params:,} parameters), world + index in {work}"
questions = [pool[i] for i in QUESTIONS]
print("policy:", SOURCE_USED)
print(f"{len(questions)} questions x {GROUP_SIZE} siblings; max_turns {protocol_cfg.max_turns}, "
      f"{protocol_cfg.max_response_length} tokens per turn, top-{protocol_cfg.topk} passages")
"""),
    md("""
## Rollouts

One call of `run_rollouts`: the prompts are replicated `GROUP_SIZE` times (siblings are group-contiguous), every
live trajectory decodes until `</search>`, `</answer>`, EOS or the turn limit, all searches of a turn go to the
retriever in one batch, and the observations are spliced into the KV cache without recomputing the prefix.
"""),
    code("""
make_session = rollout_lib.sampler_session_factory(params, model_cfg, temperature=TEMPERATURE, eos_ids=eos_ids,
                                                   seed=SEED)
result = rollout_lib.run_rollouts(make_session, tokenizer, retriever, questions, protocol_cfg, rollout_cfg,
                                  group_size=GROUP_SIZE)
trajs = result.trajectories
st = result.stats
print(f"{st.num_trajectories} trajectories, {st.num_turns} decode turns, {st.num_queries} searches in "
      f"{st.retrieval_calls} retriever calls, {st.num_invalid_turns} invalid turns; "
      f"{st.total_s:.1f}s total (decode {st.decode_s:.1f}s, splice {st.extend_s:.1f}s, retrieval {st.retrieval_s:.1f}s)")

# The records are consistent: policy spans are exactly the mask-1 tokens, observations are mask 0.
for t in trajs:
  assert sum(e - s for s, e in t.policy_spans) == t.num_policy_tokens
  assert all(t.policy_mask[s:e].all() for s, e in t.policy_spans)
  assert not any(t.policy_mask[s:e].any() for s, e in t.obs_spans)
"""),
    md("""
## Siblings: reward, advantage, OFSD role

Per question: the EM reward of each sibling, its GRPO advantage (`rl.grpo.group_advantages`), and which sibling
the OFSD phase would use as the reference (the correct one with the fewest searches, `rl.pairs.select_pairs`) and
which ones it would teach. A group where every sibling has the same reward carries no GRPO signal.
"""),
    code("""
rewards = np.asarray([t.reward for t in trajs], np.float32)
advantages = np.asarray(grpo.group_advantages(jnp.asarray(rewards), GROUP_SIZE, "grpo")) if GROUP_SIZE > 1 \\
    else np.zeros_like(rewards)
groups = [trajs[q * GROUP_SIZE:(q + 1) * GROUP_SIZE] for q in range(len(questions))]
roles = []
for group in groups:
  ref, students = pairs.select_pairs([t.reward > 0 for t in group], [t.num_searches for t in group],
                                     [t.num_policy_tokens for t in group])
  roles.append({i: ("reference" if i == ref else "student" if i in students else "-") for i in range(len(group))})

rows = []
for q, group in enumerate(groups):
  for i, t in enumerate(group):
    cells = [t.question if i == 0 else "", i, f"{t.reward:.0f}", f"{advantages[q * GROUP_SIZE + i]:+.2f}",
             t.num_searches, "; ".join(t.queries) or "-", t.num_policy_tokens, len(t.response_ids), t.stop_reason,
             repr(t.answer), roles[q][i]]
    rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
head = ["question", "sibling", "reward", "advantage", "searches", "queries", "policy tokens", "response tokens",
        "stop", "answer", "OFSD role"]
display(HTML("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>"))
print("mean reward", rewards.mean(), "| groups with zero reward std:",
      float(grpo.zero_std_group_fraction(jnp.asarray(rewards), GROUP_SIZE)))
"""),
    md("""
## Each trajectory

Blue: tokens the policy sampled (mask 1; darker = less likely under the sampler, hover for the log-prob).
Yellow: retrieved passages (`<information>`), red: the invalid-action message or a retrieval error; both are
mask 0 and never trained on. The prompt is folded.
"""),
    code("""
OBS_STYLE = {"information": "background: #fef9c3; color: #57534e;", "invalid": "background: #fee2e2; color: #991b1b;",
             "error": "background: #fecaca; color: #7f1d1d;", "gap": "color: #9ca3af;"}


def decode(ids):
  return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def segments(traj):
  \"\"\"The response cut into (start, end, kind) pieces in order: 'policy', an observation kind, or 'gap'.\"\"\"
  marks = sorted([(s, e, "policy") for s, e in traj.policy_spans] +
                 [(s, e, k) for (s, e), k in zip(traj.obs_spans, traj.obs_kinds)])
  out, pos = [], len(traj.prompt_ids)
  for s, e, kind in marks:
    if s > pos:
      out.append((pos, s, "gap"))
    out.append((s, e, kind))
    pos = e
  if pos < len(traj.ids):
    out.append((pos, len(traj.ids), "gap"))
  return out


def render(traj, title=""):
  esc = lambda text: html.escape(text).replace("\\n", "&#8629;\\n")
  body = []
  for s, e, kind in segments(traj):
    if kind == "policy":
      for t in range(s, e):
        p = float(np.exp(traj.logprobs[t]))
        body.append(f'<span style="background: rgba(37, 99, 235, {0.12 + 0.5 * (1 - p):.2f});" '
                    f'title="token {t}: log-prob {traj.logprobs[t]:.2f}">{esc(decode(traj.ids[t:t + 1]))}</span>')
    else:
      body.append(f'<span style="{OBS_STYLE.get(kind, "")}" title="{kind}, tokens {s}-{e}, mask 0">'
                  f'{esc(decode(traj.ids[s:e]))}</span>')
  searches = []
  for i, (query, (s, e), kind) in enumerate(zip(traj.queries, traj.obs_spans, traj.obs_kinds)):
    titles = re.findall(r"Doc \\d+\\(Title: (.*?)\\)", decode(traj.ids[s:e])) if kind == "information" else [kind]
    searches.append(f"<li>search {i + 1}: <b>{html.escape(query)}</b> &rarr; {html.escape(', '.join(titles))}</li>")
  facts = [f"reward {traj.reward:.0f}", f"answer {traj.answer!r} (gold {traj.golden_answers})",
           f"{traj.num_searches} searches", f"{traj.num_turns} turns {traj.turn_actions}",
           f"stop: {traj.stop_reason}", f"{traj.num_policy_tokens} policy / {len(traj.response_ids)} response tokens"]
  header = f"<h4>{html.escape(title)}</h4><div>{html.escape(', '.join(facts))}</div>"
  prompt = (f"<details><summary>prompt ({len(traj.prompt_ids)} tokens)</summary><pre style='white-space: pre-wrap;'>"
            f"{html.escape(decode(traj.prompt_ids))}</pre></details>")
  return (header + (f"<ul>{''.join(searches)}</ul>" if searches else "") + prompt +
          '<div style="font-family: monospace; font-size: 12px; line-height: 1.6; white-space: pre-wrap; '
          'border: 1px solid #ddd; padding: 6px; margin-bottom: 14px;">' + "".join(body) + "</div>")


for q, group in enumerate(groups):
  display(HTML(f"<h3>Test question {QUESTIONS[q]}: {html.escape(group[0].question)}</h3>"))
  for i, t in enumerate(group):
    display(HTML(render(t, f"sibling {i} (advantage {advantages[q * GROUP_SIZE + i]:+.2f}, OFSD role: "
                           f"{roles[q][i]})")))
"""),
    md("""
## The mask at a glance

One row per sibling, one column per token: what the train step will and will not learn from.
"""),
    code("""
CODES = {"prompt": 0, "policy": 1, "information": 2, "invalid": 3, "error": 4, "gap": 5}
COLORS = ["#e5e7eb", "#2563eb", "#facc15", "#f87171", "#7f1d1d", "#9ca3af"]
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

length = max(len(t.ids) for t in trajs)
fig, axes = plt.subplots(len(groups), 1, figsize=(12, 0.45 * GROUP_SIZE * len(groups) + 1.2), squeeze=False)
for ax, group in zip(axes[:, 0], groups):
  img = np.full((len(group), length), np.nan)
  for i, t in enumerate(group):
    img[i, :len(t.prompt_ids)] = CODES["prompt"]
    for s, e, kind in segments(t):
      img[i, s:e] = CODES[kind]
  ax.imshow(img, aspect="auto", interpolation="nearest", cmap=ListedColormap(COLORS), vmin=-0.5, vmax=5.5)
  ax.set_yticks(range(len(group)), [f"sibling {i} (r={t.reward:.0f})" for i, t in enumerate(group)])
  ax.set_title(group[0].question, fontsize=9)
axes[-1, 0].set_xlabel("token position")
fig.legend(handles=[Patch(color=c, label=k) for k, c in zip(CODES, COLORS)], ncol=6, loc="lower center", fontsize=8)
plt.tight_layout(rect=(0, 0.06, 1, 1))
plt.show()
"""),
    md("""
## For comparison: a scripted policy through the real loop

The warm start (`demo/warm_start.py`) trains on scripted transcripts of the *training* questions
(`demo/transcripts.py`). Below, a stand-in policy replays the turns of one efficient transcript through the
same `run_rollouts` loop (any object with the `DecodeSession` methods can be the policy): its searches go to the
real retriever above, the real passages are spliced in, the answer is parsed and scored. This is what a policy
that follows the protocol produces; the passages may differ from the transcript's simulated ones.
"""),
    code("""
import types


class ReplaySession:
  \"\"\"A DecodeSession (agent/rollout.py) that emits fixed turn texts: each decode call gives every live
  sequence its next turn (then EOS). Nothing is sampled, so the recorded log-probs are 0.\"\"\"

  def __init__(self, turns_per_sequence):
    self.turns = [[list(tokenizer.encode(t, add_special_tokens=False)) for t in turns]
                  for turns in turns_per_sequence]
    self.done_turns = [0] * len(self.turns)
    self.live = set(range(len(self.turns)))

  def decode(self, max_new_tokens, stop_sequences=()):
    n = len(self.turns)
    out = types.SimpleNamespace(tokens=[[] for _ in range(n)], logprobs=[[] for _ in range(n)],
                                stop_reason=[""] * n)
    for i in sorted(self.live):
      k = self.done_turns[i]
      toks = self.turns[i][k] if k < len(self.turns[i]) else [tokenizer.eos_token_id]
      self.done_turns[i] += 1
      out.tokens[i], out.logprobs[i], out.stop_reason[i] = toks[:max_new_tokens], [0.0] * len(toks), "stop"
    return out

  def extend(self, tokens):
    pass  # the replayed turns do not depend on what was spliced in

  def finish(self, indices):
    self.live -= set(indices)


if world is None or transcripts_cfg is None:
  print("no synthetic world in this run's config: skipped")
else:
  tcfg = ml_collections.ConfigDict(transcripts_cfg.to_dict())
  tcfg.rates = ml_collections.ConfigDict(dict(efficient=1.0, redundant=0.0, vague=0.0, premature=0.0, wrong=0.0))
  tcfg.per_question = 1
  replay_protocol = ml_collections.ConfigDict(protocol_cfg.to_dict())  # room for the transcript's turns
  replay_protocol.max_turns = max(protocol_cfg.max_turns, tcfg.max_searches)
  replay_protocol.max_response_length = max(protocol_cfg.max_response_length, 256)
  replay_protocol.max_obs_length = max(protocol_cfg.max_obs_length, 256)
  replay_protocol.max_prompt_length = max(protocol_cfg.max_prompt_length, 2048)
  q = next(q for q in world.train_questions if q["metadata"]["type"] == "compositional")
  record = transcripts_lib.make_transcript_records(world, [q], np.random.default_rng(SEED), tcfg,
                                                   replay_protocol)[0]
  turns = [text for text, trainable in record.segments if trainable]
  replay = rollout_lib.run_rollouts(lambda prompts, max_len: ReplaySession([turns] * len(prompts)), tokenizer,
                                    retriever, [q], replay_protocol, rollout_cfg, group_size=1)
  replayed = replay.trajectories[0]
  display(HTML(render(replayed, "scripted policy replaying an efficient transcript (training question)")))
  assert replayed.queries == record.searches and replayed.turn_actions == ["search"] * len(turns[:-1]) + ["answer"]
  assert replayed.answer == record.answer and replayed.reward == 1.0
  assert replayed.obs_kinds == ["information"] * len(record.searches)
"""),
]

NOTEBOOKS = {"grpo_loss.ipynb": GRPO, "ofsd_kl.ipynb": OFSD, "rollout_inspector.ipynb": INSPECTOR}


def build(name: str) -> str:
  return nbformat.writes(notebook(name, NOTEBOOKS[name]), version=4) + ""


def main(argv) -> int:
  check = "--check" in argv
  stale = []
  for name in NOTEBOOKS:
    if not NOTEBOOKS[name]:
      continue
    text = build(name)
    path = os.path.join(HERE, name)
    if check:
      with open(path, encoding="utf-8") as f:
        if f.read() != text:
          stale.append(path)
    else:
      with open(path, "w", encoding="utf-8") as f:
        f.write(text)
      print("wrote", path)
  if stale:
    print("out of date (run notebooks/_make.py):", ", ".join(stale))
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
