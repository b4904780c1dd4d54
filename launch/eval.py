r"""Evaluate a policy checkpoint on the benchmark splits: greedy Search-R1 rollouts, EM per benchmark.

  python -m launch.eval --config configs/search_r1_grpo.py:model=3b,mesh=v4-8,root=/mnt/disks/persist \
      --checkpoint /mnt/disks/persist/models/Qwen2.5-3B --workdir /tmp/eval_3b [--limit 100]

Loads, from the config (searche1_jax.train.evaluation.evaluate_from_config): `model` (hf_dir, dtype, param_dtype;
--checkpoint overrides hf_dir; optional tokenizer_dir, default the checkpoint directory), `mesh` (data/fsdp/tensor
sizes, optional rules), `sampling` (engine options), `retrieval` (make_retriever), `data` (eval_datasets,
eval_split, per-benchmark eval_limit; questions through searche1_jax.data.qa), `protocol` and `rollout`.
Writes results.json, results.md and trajectories.jsonl into --workdir (searche1_jax/train/evaluation.py) and prints the
table. --limit N evaluates the first N questions of every benchmark.
"""
from __future__ import annotations

from absl import app
from absl import flags
from ml_collections import config_flags

from searche1_jax.train import evaluation

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/<name>.py[:args]).",
                                          lock_config=False)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Policy to evaluate: an HF checkpoint directory (config.json "
                                  "+ safetensors). Default: config.model.hf_dir.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (results.json, results.md, trajectories.jsonl).")
_LIMIT = flags.DEFINE_integer("limit", None, "Questions per benchmark (the first N); overrides data.eval_limit.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required (e.g. --config configs/eval_tiny.py:root=DIR)")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  results = evaluation.evaluate_from_config(_CONFIG.value, _WORKDIR.value, checkpoint=_CHECKPOINT.value,
                                            limit=_LIMIT.value, progress=_PROGRESS.value)
  print(results["markdown"])


if __name__ == "__main__":
  app.run(main)
