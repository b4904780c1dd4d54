"""Executes every notebook in notebooks/ top to bottom in a real Jupyter kernel (nbclient) and fails on any error.

Each notebook runs from its own folder (as Jupyter opens it) with overrides injected right after its `parameters`
cell, papermill style: every output goes to tmp_path, and an existing local demo run (workdirs/demo_smoke) cannot
change what is tested. The injected cell also asserts that the kernel runs this test's interpreter (the venv):
the `python3` kernel spec's argv[0] is "python", which jupyter_client replaces with sys.executable. The kernel
gets one CPU device, like a notebook session (and the suite's fast-compile XLA flag, tests/testenv.py).

Besides "no error cell" (the notebooks assert their numbers against plain numpy as they go), each test checks
that the expected plots and renders were produced. Both notebooks on a real demo checkpoint (SOURCE='smoke'):
tests/test_demo.py::test_smoke_demo_end_to_end, which has that run already.
"""
import nbformat
import pytest

from notebook_testlib import NOTEBOOKS, execute, outputs, read, stdout_text


# --------------------------------------------------------------------------------------------- the committed files

@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_clean_and_opens_in_colab(name):
  nb = read(name)
  nbformat.validate(nb)
  assert nb.metadata["kernelspec"]["name"] == "python3"
  code = [c for c in nb.cells if c.cell_type == "code"]
  # Outputs are cleared in the committed files (small diffs).
  assert all(not c.outputs and c.execution_count is None for c in code), f"{name}: outputs are not cleared"
  # The first code cell installs the package when it runs in Colab.
  assert '"google.colab" in sys.modules' in code[0].source and "pip" in code[0].source
  assert "colab-badge" in nb.cells[0].source
  # One parameters cell (the tests inject overrides after it); every cell has an id (nbformat 4.5).
  assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1
  assert len({c.get("id") for c in nb.cells}) == len(nb.cells)


# --------------------------------------------------------------------------------------------- execution

@pytest.mark.slow  # ~25-55 s: kernel start, jax import, a few small compiles
def test_grpo_loss_notebook():
  nb, _ = execute("grpo_loss.ipynb")
  assert len(outputs(nb, "image/png")) == 4  # advantages, clipped surrogate, KL estimators, aggregation
  tables = outputs(nb, "text/html")
  assert any("rloo" in t and "drgrpo" in t for t in tables)
  assert any("k3" in t and "relative bias" in t for t in tables)
  assert stdout_text(nb).count("accumulated") == 3  # one line per aggregation mode


@pytest.mark.slow  # ~40-85 s: toy fits, top-k sweep, tiny world + tokenizer, one model forward
def test_ofsd_kl_notebook(tmp_path):
  nb, _ = execute("ofsd_kl.ipynb", WORKDIR=str(tmp_path / "no_demo_run"), WORK_DIR=str(tmp_path / "work"))
  out = stdout_text(nb)
  assert "model: a freshly initialised tiny Qwen2" in out  # no checkpoint: the notebook says so
  assert "-> REFERENCE" in out and "stored top-50 targets == on-the-fly top-50" in out
  assert len(outputs(nb, "image/png")) == 4  # fit, landscapes, top-k error, per-token divergence
  heat = [h for h in outputs(nb, "text/html") if "per token, max" in h]
  assert len(heat) == 2 and all('title="token ' in h for h in heat)  # one heat map per student


@pytest.mark.slow  # ~40-75 s: tiny world, MiniLM exact index, sampler compiles, rollouts
def test_rollout_inspector_notebook_inline(tmp_path):
  nb, _ = execute("rollout_inspector.ipynb", SOURCE="inline", WORKDIR=str(tmp_path / "no_demo_run"),
                  WORK_DIR=str(tmp_path / "work"), QUESTIONS=[1, 3], GROUP_SIZE=3)
  assert "policy: inline: random tiny Qwen2" in stdout_text(nb)
  html = outputs(nb, "text/html")
  assert sum(h.startswith("<h4>sibling ") for h in html) == 2 * 3  # every trajectory is rendered
  replay = [h for h in html if "scripted policy replaying" in h]
  assert len(replay) == 1
  # The replay went through the real retriever: its passages are spliced in (yellow, mask 0) and listed.
  assert "search 1: <b>" in replay[0] and "Doc 1(Title: " in replay[0] and "#fef9c3" in replay[0]
  assert len(outputs(nb, "image/png")) == 1  # the mask overview
