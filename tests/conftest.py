"""Test-wide setup. Runs before any test module imports jax.

Every test process sees 8 fake CPU devices, so sharded tests (fsdp x tensor meshes) run
in-process; single-device code simply uses device 0. XLA compiles CPU code fast rather than well (tests/testenv.py).
"""
import os

import testenv

os.environ.setdefault("XLA_FLAGS", testenv.xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# The longest files (pytest --durations on 2 cores: ~600 s, ~110 s, ~80 s, ~65 s) start first, so the workers of a
# parallel run (`make test`: pytest-xdist, one file per worker at a time, in this order) finish together instead of
# waiting on them.
START_FIRST = ("test_resume.py", "test_demo.py", "test_notebooks.py", "test_compare.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(START_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(START_FIRST)))  # stable: the rest keep their order
