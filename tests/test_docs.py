"""Every repository file that the docs, docstrings, configs and notebooks cite exists (a clone has nothing else)."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOP = ("searche1_jax", "configs", "launch", "tests", "benchmarks", "notebooks", "docs")
CITED = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*\w\.(?:py|md|ipynb))" % "|".join(TOP))
OUTSIDE = re.compile(r"(?<![\w/.-])(DESIGN|REFERENCE)\.md")


def sources():
  for top in TOP + (".",):
    base = ROOT / top
    pattern = "*" if top == "." else "**/*"
    for p in base.glob(pattern):
      if p.is_file() and p.suffix in (".py", ".md", ".ipynb") and ".venv" not in p.parts:
        yield p


def test_cited_paths_exist():
  missing = []
  for p in sources():
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
      for path in CITED.findall(line):
        if not (ROOT / path).exists() and "*" not in path:
          missing.append(f"{p.relative_to(ROOT)}:{n} cites {path}")
  assert not missing, "\n".join(missing)


def test_no_citation_of_files_outside_the_repository():
  hits = [f"{p.relative_to(ROOT)}:{n}" for p in sources() if p.name != "test_docs.py"
          for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if OUTSIDE.search(line)]
  assert not hits, "cites DESIGN.md / REFERENCE.md (not in a clone; use docs/design.md, docs/reference.md):\n" + \
      "\n".join(hits)


def test_the_citation_pattern_sees_a_path():
  assert CITED.findall("see `searche1_jax/rl/grpo.py` and docs/reference.md.") == ["searche1_jax/rl/grpo.py",
                                                                                  "docs/reference.md"]
  assert OUTSIDE.search("(REFERENCE.md)") and not OUTSIDE.search("docs/reference.md")


def test_no_sys_path_edits():
  """Tools run from the repository root (`python -m launch.train`, `python -m benchmarks.round`, pytest, notebooks
  opened in the checkout): no module rewrites sys.path to find configs/ or the package."""
  edits = re.compile(r"sys\.path\.(insert|append)\(")
  hits = [f"{p.relative_to(ROOT)}:{n}" for p in sources() if p.name != "test_docs.py" and "tests" not in p.parts
          for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if edits.search(line)]
  assert not hits, "\n".join(hits)
