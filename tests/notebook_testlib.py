"""Runs a notebook of notebooks/ top to bottom in a real Jupyter kernel (nbclient), papermill style: overrides
are injected right after its `parameters` cell. Shared by tests/test_notebooks.py and the smoke-demo test in
tests/test_demo.py (which runs the notebooks on its finished demo run instead of making a second one)."""
import os
import sys
import time

import nbclient
import nbformat

import testenv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB_DIR = os.path.join(REPO, "notebooks")
NOTEBOOKS = ("grpo_loss.ipynb", "ofsd_kl.ipynb", "rollout_inspector.ipynb")


def read(name):
  return nbformat.read(os.path.join(NB_DIR, name), as_version=4)


def execute(name, **params):
  """Runs notebook `name` with `params` overriding its parameters cell; returns (executed notebook, seconds).
  Fails on any error output."""
  nb = read(name)
  idx = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(idx) == 1, f"{name}: expected exactly one cell tagged 'parameters', found {len(idx)}"
  lines = ["import sys", f"assert sys.prefix == {sys.prefix!r}, f'kernel runs {{sys.executable}}, not the test venv'"]
  lines += [f"{k} = {v!r}" for k, v in params.items()]
  cell = nbformat.v4.new_code_cell("\n".join(lines))
  cell.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(idx[0] + 1, cell)
  client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=900, startup_timeout=300,
                                   resources={"metadata": {"path": NB_DIR}})
  # The kernel sees one CPU device, as in a notebook session (not conftest's 8 fake test devices).
  env = dict(os.environ, XLA_FLAGS=testenv.xla_flags(1))
  env["JAX_PLATFORMS"] = "cpu"
  t0 = time.perf_counter()
  client.execute(env=env)  # raises CellExecutionError at the first cell that raises
  seconds = time.perf_counter() - t0
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
  assert not errors, errors
  print(f"{name}: {seconds:.1f}s")
  return nb, seconds


def outputs(nb, mime):
  return [o["data"][mime] for c in nb.cells if c.cell_type == "code" for o in c.outputs
          if o.output_type in ("display_data", "execute_result") and mime in o.get("data", {})]


def stdout_text(nb):
  return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                 if o.output_type == "stream" and o.get("name") == "stdout")
