r"""Export a training checkpoint's policy as a Hugging Face model directory.

  python -m launch.export_hf --workdir /mnt/disks/persist/runs/search_e1_3b --out /tmp/search_e1_3b_hf \
      [--step N] [--dtype bfloat16] [--tokenizer_dir DIR]

Reads WORKDIR/checkpoints/<step> (the latest when --step is not given): the model shape from meta["model_config"]
and only the `params` of the saved state (optimizer state and RNG are not read), restored into host memory.
Writes config.json + safetensors with `searche1_jax.models.save_hf` (loadable by
`transformers.AutoModelForCausalLM.from_pretrained(OUT)`), copies the tokenizer files from --tokenizer_dir, else
meta["tokenizer_dir"], else WORKDIR/tokenizer, and records where the weights came from in OUT/searche1_export.json.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys

from absl import app
from absl import flags

from searche1_jax.models import hf
from searche1_jax.train import checkpoint

# Files of a transformers tokenizer (and generation defaults); model weights and config.json are never copied.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "tokenizer.model", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
_TOKENIZER_CORE = ("tokenizer.json", "vocab.json", "tokenizer.model")
INFO_FILE = "searche1_export.json"


class ExportError(ValueError):
  """The workdir / checkpoint / tokenizer cannot be exported; the message names the path."""


def _token_id(tokenizer_dir: str, token) -> int | None:
  """Id of a special token string in tokenizer.json (added tokens first, then the model vocab)."""
  if isinstance(token, dict):
    token = token.get("content")
  path = os.path.join(tokenizer_dir, "tokenizer.json")
  if not isinstance(token, str) or not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    tok = json.load(f)
  for added in tok.get("added_tokens", []):
    if added.get("content") == token:
      return int(added["id"])
  vocab = (tok.get("model") or {}).get("vocab")
  return int(vocab[token]) if isinstance(vocab, dict) and token in vocab else None


def special_token_ids(tokenizer_dir: str) -> dict[str, int]:
  """{'bos_token_id', 'eos_token_id', 'pad_token_id'} found via tokenizer_config.json + tokenizer.json."""
  path = os.path.join(tokenizer_dir, "tokenizer_config.json")
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    conf = json.load(f)
  out = {}
  for name in ("bos", "eos", "pad"):
    i = _token_id(tokenizer_dir, conf.get(f"{name}_token"))
    if i is not None:
      out[f"{name}_token_id"] = i
  return out


def resolve_tokenizer_dir(workdir: str, meta: dict, override: str | None) -> str:
  candidates = [override] if override else [meta.get("tokenizer_dir"), os.path.join(workdir, "tokenizer")]
  tried = []
  for d in candidates:
    if not d:
      continue
    tried.append(d)
    if any(os.path.isfile(os.path.join(d, f)) for f in _TOKENIZER_CORE):
      return d
  raise ExportError(f"no tokenizer found (looked for {' / '.join(_TOKENIZER_CORE)} in: "
                    f"{', '.join(tried) or 'nothing: meta has no tokenizer_dir'}); pass --tokenizer_dir")


def copy_tokenizer(src: str, out: str) -> list[str]:
  copied = []
  for name in TOKENIZER_FILES:
    path = os.path.join(src, name)
    if os.path.isfile(path):
      shutil.copy2(path, os.path.join(out, name))
      copied.append(name)
  return copied


def restore_params(workdir: str, step: int | None = None):
  """(step, meta, cfg, params as host numpy) of a checkpoint; only the params of the saved state are read."""
  try:
    cfg, params, meta, step = checkpoint.load_policy(workdir, step, host=True)
  except (FileNotFoundError, ValueError) as e:
    raise ExportError(str(e)) from None
  return step, meta, cfg, params


def export(workdir: str, out: str, *, step: int | None = None, dtype: str | None = None,
           tokenizer_dir: str | None = None) -> dict:
  """Write OUT as an HF model directory; returns the export record (also written to OUT/searche1_export.json)."""
  step, meta, cfg, params = restore_params(workdir, step)
  tok_dir = resolve_tokenizer_dir(workdir, meta, tokenizer_dir)
  os.makedirs(out, exist_ok=True)
  hf.save_hf(params, cfg, out, dtype=dtype, extra_config=special_token_ids(tok_dir))
  copied = copy_tokenizer(tok_dir, out)
  info = {"workdir": os.path.abspath(workdir), "step": int(step), "tokenizer_dir": tok_dir,
          "tokenizer_files": copied, "dtype": dtype or cfg.param_dtype, "model_config": dataclasses.asdict(cfg),
          **{k: meta[k] for k in ("global_step", "round", "phase", "phase_step", "policy_version") if k in meta}}
  with open(os.path.join(out, INFO_FILE), "w", encoding="utf-8") as f:
    json.dump(info, f, indent=2, sort_keys=True)
  return info


def define_flags() -> None:
  """Defined only when run as a program, so importing this module defines no global flags."""
  global _WORKDIR, _OUT, _STEP, _DTYPE, _TOKENIZER_DIR
  _WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (holds checkpoints/).")
  _OUT = flags.DEFINE_string("out", None, "Output HF model directory.")
  _STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
  _DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                             "Storage dtype of the exported weights (default: the model's param_dtype).")
  _TOKENIZER_DIR = flags.DEFINE_string("tokenizer_dir", None, "Tokenizer to copy (default: meta['tokenizer_dir'], "
                                       "then WORKDIR/tokenizer).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value or not _OUT.value:
    raise app.UsageError("--workdir and --out are required")
  try:
    info = export(_WORKDIR.value, _OUT.value, step=_STEP.value, dtype=_DTYPE.value,
                  tokenizer_dir=_TOKENIZER_DIR.value)
  except ExportError as e:
    print(f"launch/export_hf.py: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"exported step {info['step']} of {info['workdir']} to {_OUT.value} "
        f"(dtype {info['dtype']}, tokenizer from {info['tokenizer_dir']})")


if __name__ == "__main__":
  define_flags()
  app.run(main)
