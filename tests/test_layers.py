"""The package's import graph points one way: base (sharding, rewards, fingerprint, schema) -> models -> sampling /
retrieval / data -> agent -> rl -> config_utils -> train -> demo (README, "Layout"). Read from the source (ast),
so a lazy import inside a function counts as much as one at the top."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "searche1_jax"

# A module may import another package module only of a strictly lower rank (or its own subpackage).
RANK = {"sharding": 0, "rewards": 0, "fingerprint": 0, "schema": 0, "distributed": 1, "models": 1, "sampling": 2,
        "retrieval": 2, "data": 2, "agent": 3, "rl": 4, "config_utils": 5, "train": 6, "demo": 7}


def unit_of(path: pathlib.Path) -> str:
  """'models' for searche1_jax/models/qwen2.py, 'sharding' for searche1_jax/sharding.py."""
  return path.relative_to(PACKAGE).with_suffix("").parts[0]


def imported_units(tree: ast.AST) -> list[tuple[int, str]]:
  """(line, unit) of every `searche1_jax.<unit>` import in a module, at any depth."""
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "searche1_jax":
      parts = node.module.split(".")
      units = [a.name for a in node.names] if len(parts) == 1 else [parts[1]]
      out += [(node.lineno, u) for u in units]
    elif isinstance(node, ast.Import):
      out += [(node.lineno, a.name.split(".")[1]) for a in node.names
              if a.name.startswith("searche1_jax.")]
  return out


def modules():
  return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_unit_has_a_rank():
  units = {unit_of(p) for p in modules()}
  assert units == set(RANK), f"ranked {sorted(RANK)} but the package has {sorted(units)}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
  src = unit_of(path)
  bad = [f"{path.relative_to(PACKAGE.parent)}:{line} imports searche1_jax.{u} (rank {RANK.get(u)} >= {RANK[src]})"
         for line, u in imported_units(ast.parse(path.read_text())) if u != src and RANK.get(u, 99) >= RANK[src]]
  assert not bad, "\n".join(bad)


def test_rank_check_catches_an_upward_import():
  tree = ast.parse("from searche1_jax.train import steps\nimport searche1_jax.demo.tokenizer\n")
  assert [u for _, u in imported_units(tree)] == ["train", "demo"]
  assert all(RANK[u] > RANK["rl"] for _, u in imported_units(tree))
