r"""Train: validate the config, start jax.distributed if multi-host, save / check WORKDIR/config.json, run the rounds.

  python -m launch.train --config configs/search_e1.py:model=3b,mesh=v4-8,root=/mnt/disks/persist \
      --workdir /mnt/disks/persist/runs/search_e1_3b [--config.ofsd.kind=jsd ...] [--distributed]

Steps, in order:
  1. The config is loaded (`get_config(arg)` of the file; `arg` is the text after ':') and every
     `--config.<field>=<value>` override is applied; an unknown field is an error naming the flag and the
     closest fields, a value of the wrong type an error naming the flag (ml_collections config_flags).
  2. `validate_config`: ranges, enumerations, cross-field rules; all bad fields in one error.
  3. `jax.distributed.initialize()` when a multi-host environment is detected, `distributed.mode='on'`, or
     --distributed (searche1_jax/distributed.py); then the mesh is checked against the global device count.
  4. WORKDIR/config.json: written on a fresh workdir; on an existing one (a resume) the saved config must equal
     this one except in `config.resume.may_change` fields, else the differing fields are printed and the run
     refuses to start (--allow_config_change accepts them and keeps the old file as config.prev.json).
  5. `searche1_jax.train.loop.run(config, workdir)`, which resumes from WORKDIR/checkpoints when there are any.
--validate_only stops after step 4 (a cheap check of a config on any machine).
"""
from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
from ml_collections import config_flags

from searche1_jax import config_utils
from searche1_jax import distributed as distributed_lib
from searche1_jax.train import loop

CONFIG_FILE = "config.json"
PREVIOUS_CONFIG_FILE = "config.prev.json"


def _fail(message: str) -> None:
  print(f"launch/train.py: {message}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a clear message (not a traceback) for a config that fails to load or an override
  naming a field that does not exist."""
  config_string = config_utils.config_string_from_argv(argv)
  if config_string is not None:
    try:
      config_utils.check_override_paths(config_utils.load_config(config_string), argv)
    except config_utils.ConfigError as e:
      _fail(str(e))
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f"{e}\nPass --helpshort for the flags.")


def sync_config_file(workdir: str, config, *, allow_change: bool = False, write: bool = True) -> str:
  """Write WORKDIR/config.json, or check the saved one against `config` (a resume).

  Returns 'new', 'same' or 'changed'. Differences outside `config.resume.may_change` raise ConfigError listing
  each field with its saved and current value, unless allow_change (then the old file becomes config.prev.json).
  write=False (processes other than 0) only checks.
  """
  wd = epath.Path(workdir)
  path = wd / CONFIG_FILE
  current = config_utils.to_json_dict(config)
  status = "new"
  if path.exists():
    try:
      saved = json.loads(path.read_text())
    except ValueError as e:
      raise config_utils.ConfigError(f"{path}: not valid JSON ({e}); move it away to start a fresh run") from None
    may_change = tuple(config.get("resume", {}).get("may_change", ()))
    diff = config_utils.config_diff(saved, current, ignore=may_change)
    if not diff:
      status = "same"
    elif not allow_change:
      raise config_utils.ConfigError(
          f"{path}: this workdir was started with a different config; refusing to resume. Differing fields "
          f"(saved -> now):\n{config_utils.format_diff(diff)}\nUse the saved values, a new --workdir, or "
          "--allow_config_change.")
    else:
      logging.warning("resuming with a changed config:\n%s", config_utils.format_diff(diff))
      status = "changed"
      if write:
        (wd / PREVIOUS_CONFIG_FILE).write_text(path.read_text())
  if write and status != "same":
    wd.mkdir(parents=True, exist_ok=True)
    tmp = wd / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
  return status


def prepare(config, workdir: str, *, distributed: bool | None = None, allow_config_change: bool = False):
  """Steps 2-4 of the module docstring. Returns the config (validated)."""
  config_utils.check_workdir(workdir)
  config_utils.validate_config(config)
  distributed_lib.maybe_initialize(config, force=distributed)
  config_utils.validate_config(config, num_devices=jax.device_count())
  status = sync_config_file(workdir, config, allow_change=allow_config_change, write=jax.process_index() == 0)
  logging.info("workdir %s (%s config); process %d of %d, %d devices", workdir, status, jax.process_index(),
               jax.process_count(), jax.device_count())
  return config


def define_flags() -> None:
  """Defined only when run as a program, so importing this module (tests, notebooks) defines no global flags."""
  global _CONFIG, _WORKDIR, _DISTRIBUTED, _ALLOW_CHANGE, _VALIDATE_ONLY
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config: configs/<name>.py[:args].",
                                            lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: config.json, checkpoints/, metrics.jsonl, "
                                 "results.json, tensorboard/. Re-running with the same workdir resumes.")
  _DISTRIBUTED = flags.DEFINE_bool("distributed", None, "Force jax.distributed.initialize() on (or off with "
                                   "--nodistributed); default: config.distributed.mode.")
  _ALLOW_CHANGE = flags.DEFINE_bool("allow_config_change", False, "Resume even if the saved config differs in "
                                    "fields that matter (the old one is kept as config.prev.json).")
  _VALIDATE_ONLY = flags.DEFINE_bool("validate_only", False, "Validate the config and write/check config.json, "
                                     "then exit without training.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config configs/search_e1.py:model=3b,mesh=v4-8")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  try:
    config = prepare(_CONFIG.value, _WORKDIR.value, distributed=_DISTRIBUTED.value,
                     allow_config_change=_ALLOW_CHANGE.value)
  except config_utils.ConfigError as e:
    _fail(str(e))
  if _VALIDATE_ONLY.value:
    print(f"config OK; {os.path.join(_WORKDIR.value, CONFIG_FILE)} written/checked")
    return
  loop.run(config, _WORKDIR.value)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
