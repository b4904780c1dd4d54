r"""Compile every jitted program of a run for a TPU topology on this machine (no TPU needed), and size it.

  python -m launch.aot_compile --config configs/search_e1.py:model=3b,mesh=v5p-8 --topology v5p-8 \
      [--json OUT.json] [--only grpo_step,rollout_decode] [--config.F=V ...]

Needs the tpu extra (`pip install -e '.[tpu]'`: libtpu, ~700 MB), which compiles for a topology description
without the chips. Builds the config's mesh over the topology's devices (a mesh that does not match is an
error), then lowers and compiles, from abstract sharded inputs at the config's largest shapes (nothing is
allocated), every program the run executes (searche1_jax/train/aot.py lists them). Prints one table row per
program: per-chip argument / output / temporary / aliased (donated) / peak GiB, the chip's HBM, fits, a
roofline estimate of its seconds (analytic FLOPs and minimal HBM bytes; an estimate, not a measurement),
compile seconds and the collectives in the compiled HLO. --json writes the same rows with the chip's
specification. Exit status 1 when a program does not fit, 2 for a bad config or topology.
"""
from __future__ import annotations

import json
import os
import sys

# The tool compiles for a described topology; this process itself never needs an accelerator backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app
from absl import flags
from ml_collections import config_flags

from launch import train as train_launch
from searche1_jax import config_utils
from searche1_jax.train import aot

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/<exp>.py[:args]).")
_TOPOLOGY = flags.DEFINE_string("topology", None, f"Topology name: one of {sorted(aot.TOPOLOGIES)}.")
_JSON = flags.DEFINE_string("json", None, "Write the table as JSON to this path.")
_ONLY = flags.DEFINE_list("only", [], "Compile only these programs (names as in the table).")


def _fail(message: str) -> None:
  print(f"launch/aot_compile.py: {message}", file=sys.stderr)
  sys.exit(2)


def compile_run(config, topology_name: str, only=()) -> dict:
  """The JSON document of the tool: topology, chip and one row per compiled program. The config is validated
  against the topology's device count first (all bad fields in one ConfigError)."""
  topo = aot.topology(topology_name)
  config = config_utils.validate_config(config, num_devices=len(topo.devices))
  mesh, rules = aot.run_mesh(config, topo.devices)
  shapes = aot.RunShapes.from_config(config, mesh)
  programs = aot.run_programs(config, mesh, rules, shapes)
  if only:
    unknown = sorted(set(only) - {p.name for p in programs})
    if unknown:
      raise ValueError(f"--only {unknown}: not programs of this run; known: {[p.name for p in programs]}")
    programs = [p for p in programs if p.name in only]
  rows = []
  for p in programs:
    rows.append(aot.compile_program(p, topo.chip))
    r = rows[-1]
    verdict = f"does NOT fit: XLA needs >= {r['peak_bytes'] / aot.GIB:.1f} GiB" if "error" in r else "compiled"
    print(f"{p.name} ({p.shapes}): {verdict} in {r['compile_s']:.1f} s", file=sys.stderr, flush=True)
  return {"topology": topo.name, "devices": len(topo.devices), "processes": topo.num_processes,
          "mesh": dict(mesh.shape), "chip": topo.chip.as_dict(), "programs": rows,
          "estimates": aot.run_estimates(config, shapes, rows)}


def _config_name(argv) -> str:
  """'search_e1 3b' from the command line's --config configs/search_e1.py:model=3b,... (for the README row)."""
  arg = next((a.split("=", 1)[1] if "=" in a else argv[i + 1] for i, a in enumerate(argv)
              if a.split("=", 1)[0] in ("--config", "-config") and ("=" in a or i + 1 < len(argv))), "")
  path, _, args = arg.partition(":")
  model = next((kv.split("=", 1)[1] for kv in args.split(",") if kv.startswith("model=")), "")
  return f"{os.path.splitext(os.path.basename(path))[0]} {model}".strip()


def main(argv) -> None:
  del argv
  if _CONFIG.value is None or _TOPOLOGY.value is None:
    _fail("--config and --topology are required")
  try:
    doc = compile_run(_CONFIG.value, _TOPOLOGY.value, tuple(_ONLY.value))
  except (config_utils.ConfigError, ValueError, RuntimeError) as e:
    _fail(str(e))
  print(f"{doc['topology']}: {doc['devices']} chips ({doc['chip']['name']}, "
        f"{doc['chip']['hbm_bytes'] / aot.GIB:.1f} GiB HBM each), {doc['processes']} process(es), mesh {doc['mesh']}")
  print(aot.format_table(doc["programs"]))
  e = doc["estimates"]
  print("roofline ESTIMATES, not measurements: GRPO learner step "
        + ("-" if e["grpo_step_s"] is None else f"{e['grpo_step_s']:.1f} s")
        + ", GRPO rollout (upper bound: every turn to max_response_length) "
        + ("-" if e["rollout_s"] is None else f"{e['rollout_s']:.1f} s"))
  for r in doc["programs"]:
    if "step_bytes_xla" in r:
      print(f"{r['name']}: HBM bytes per decode step, XLA cost analysis {r['step_bytes_xla'] / aot.GIB:.2f} GiB vs "
            f"minimum (weights + cache bucket once) {r['step_bytes_min'] / aot.GIB:.2f} GiB: "
            f"{r['step_bytes_xla'] / r['step_bytes_min']:.2f}x")
  print("README row:", aot.summary_row(doc, _config_name(sys.argv)))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(doc, f, indent=2)
  if not all(r["fits"] for r in doc["programs"]):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=train_launch.parse_flags)
