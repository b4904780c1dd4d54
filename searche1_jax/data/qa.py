"""QA datasets as TFDS builds (array_record files, no TensorFlow needed).

Sources, read from a local directory (`data_dir`):

* FlashRAG JSONL (`RUC-NLPIR/FlashRAG_datasets` on Hugging Face): `<data_dir>/<dataset>/<split>.jsonl`,
  one `{"id", "question", "golden_answers", ["metadata"]}` object per line;
* or Search-R1 parquet (`scripts/data_process/qa_search_{train,test}_merge.py`):
  `<data_dir>/train.parquet` (NQ + HotpotQA train) and `<data_dir>/test.parquet` (the seven test
  sets, told apart by their `data_source` column); used for a dataset whose JSONL is absent;
* the synthetic world (`synthetic_world.write_world`): `<data_dir>/{train,test}.jsonl`, where
  `data_dir` is the world directory itself.

Splits follow Search-R1: `nq_hotpotqa_train` has `train` (NQ train + HotpotQA train); each of the
seven benchmarks has `test`, built from the FlashRAG test file where the dataset has one and from
dev otherwise (as `qa_search_test_merge.py` does): see `EVAL_SOURCE_SPLIT`.

Builds land in `<tfds_dir>/searche1_qa/<dataset>/<VERSION>/`, one TFDS builder config per dataset,
in source order (shuffling disabled). A `sources.json` next to them records the SHA-256 of the
files they came from, so a changed source is rebuilt instead of silently read stale.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from typing import Any, Iterator, Mapping, Sequence

from etils import epath
import numpy as np

from searche1_jax import fingerprint as fp_lib

# Search-R1 test sets and the FlashRAG split each is evaluated on (test where it exists, else
# dev), with the published sizes: NQ 3,610; TriviaQA 11,313; PopQA 14,267; HotpotQA 7,405;
# 2Wiki 12,576; MuSiQue 2,417; Bamboogle 125.
EVAL_SOURCE_SPLIT = {
    "nq": "test",
    "triviaqa": "test",
    "popqa": "test",
    "hotpotqa": "dev",
    "2wikimultihopqa": "dev",
    "musique": "dev",
    "bamboogle": "test",
}
BENCHMARKS = tuple(EVAL_SOURCE_SPLIT)
TRAIN_MIX = ("nq", "hotpotqa")  # Search-R1 training data: NQ train + HotpotQA train
TRAIN_NAME = "nq_hotpotqa_train"
WORLD_NAME = "synthetic_world"

BUILDER_NAME = "searche1_qa"
VERSION = "1.0.0"
SOURCES_FILE = "sources.json"

FLASHRAG_REPO = "RUC-NLPIR/FlashRAG_datasets"  # https://huggingface.co/datasets/RUC-NLPIR/FlashRAG_datasets
SEARCH_R1_HINT = ("or Search-R1 parquet files: `python scripts/data_process/qa_search_train_merge.py "
                  "--local_dir <data_dir> --data_sources nq,hotpotqa` and `python "
                  "scripts/data_process/qa_search_test_merge.py --local_dir <data_dir> "
                  "--data_sources nq,triviaqa,popqa,hotpotqa,2wikimultihopqa,musique,bamboogle` "
                  "in a PeterGriffinJin/Search-R1 checkout")
WORLD_HINT = ("synthetic world: `python -m launch.prepare_data --datasets synthetic_world "
              "--generate_world --world_dir <dir> ...` or "
              "searche1_jax.demo.synthetic_world.write_world(<dir>, cfg)")


@dataclasses.dataclass(frozen=True)
class Source:
  """One input of a split: a JSONL file, or else rows of a parquet file for `data_source`."""
  data_source: str
  jsonl: str  # path relative to data_dir
  parquet: str | None = None  # Search-R1 alternative, relative to data_dir


def _splits_table() -> dict[str, dict[str, tuple[Source, ...]]]:
  table = {name: {"test": (Source(name, f"{name}/{split}.jsonl", "test.parquet"),)}
           for name, split in EVAL_SOURCE_SPLIT.items()}
  table[TRAIN_NAME] = {"train": tuple(Source(n, f"{n}/train.jsonl", "train.parquet")
                                      for n in TRAIN_MIX)}
  table[WORLD_NAME] = {s: (Source(WORLD_NAME, f"{s}.jsonl"),) for s in ("train", "test")}
  return table


SPLITS = _splits_table()
DATASETS = tuple(SPLITS)


class MissingDataError(FileNotFoundError):
  """Source files are missing; the message names every expected file and where to get it."""


def _check_name(name: str) -> None:
  if name not in SPLITS:
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def resolve_sources(name: str, data_dir: str) -> dict[str, list[tuple[Source, str, str]]]:
  """Maps each split of `name` to `[(source, path, 'jsonl' | 'parquet'), ...]`.

  Raises MissingDataError naming every missing file (with its alternative) and where to get it.
  """
  missing = _missing(name, data_dir)
  if missing:
    raise MissingDataError(_missing_message(missing))
  out = {}
  for split, sources in SPLITS[name].items():
    out[split] = []
    for src in sources:
      jsonl = os.path.join(data_dir, src.jsonl)
      if os.path.isfile(jsonl):
        out[split].append((src, jsonl, "jsonl"))
      else:
        out[split].append((src, os.path.join(data_dir, src.parquet), "parquet"))
  return out


def _missing(name: str, data_dir: str) -> list[tuple[str, str, str, Source]]:
  """`(dataset, split, data_dir, source)` for each source that has neither file."""
  _check_name(name)
  missing = []
  for split, sources in SPLITS[name].items():
    for src in sources:
      if os.path.isfile(os.path.join(data_dir, src.jsonl)):
        continue
      if src.parquet and os.path.isfile(os.path.join(data_dir, src.parquet)):
        continue
      missing.append((name, split, data_dir, src))
  return missing


def _missing_message(missing: Sequence[tuple[str, str, str, Source]]) -> str:
  lines = ["missing QA source files:"]
  for name, split, data_dir, src in missing:
    alt = (f" (or {os.path.join(data_dir, src.parquet)} with data_source == '{src.data_source}')"
           if src.parquet else "")
    lines.append(f"  {name} {split}: {os.path.join(data_dir, src.jsonl)}{alt}")
  lines.append("get them with:")
  flashrag: dict[str, list[str]] = {}
  for name, _, data_dir, src in missing:
    if name == WORLD_NAME:
      continue
    flashrag.setdefault(data_dir, [])
    if src.jsonl not in flashrag[data_dir]:
      flashrag[data_dir].append(src.jsonl)
  for data_dir, files in flashrag.items():
    lines.append(f"  FlashRAG JSONL: hf download {FLASHRAG_REPO} {' '.join(files)} --repo-type dataset "
                 f"--local-dir {data_dir}")
  if flashrag:
    lines.append(f"  {SEARCH_R1_HINT}")
  if any(name == WORLD_NAME for name, *_ in missing):
    lines.append(f"  {WORLD_HINT}")
  return "\n".join(lines)


def check_sources(data_dirs: Mapping[str, str]) -> None:
  """Checks all datasets at once (`{name: data_dir}`); one MissingDataError for all that lack."""
  missing = [m for n, d in data_dirs.items() for m in _missing(n, d)]
  if missing:
    raise MissingDataError(_missing_message(missing))


# --------------------------------------------------------------------------------------------
# Reading source rows
# --------------------------------------------------------------------------------------------

_HOPS_IN_ID = re.compile(r"^(\d+)hop")


def _metadata(meta: Any, qid: str) -> dict:
  meta = meta if isinstance(meta, Mapping) else {}
  hops = meta.get("hops")
  if not isinstance(hops, (int, np.integer)) or isinstance(hops, bool):
    m = _HOPS_IN_ID.match(qid)  # MuSiQue ids: "2hop__...", "3hop1__..."
    hops = int(m.group(1)) if m else -1
  entities = meta.get("entities")
  if not (isinstance(entities, (list, tuple, np.ndarray))
          and all(isinstance(e, str) for e in entities)):
    entities = []
  typ, rel = meta.get("type"), meta.get("relation")
  return {"type": typ if isinstance(typ, str) else "", "hops": int(hops),
          "entities": [str(e) for e in entities], "relation": rel if isinstance(rel, str) else ""}


def _answers(value: Any, where: str) -> list[str]:
  if isinstance(value, str):
    return [value]
  if isinstance(value, (list, tuple, np.ndarray)):
    out = []
    for a in value:
      if isinstance(a, str):
        out.append(a)
      elif isinstance(a, (int, float, np.integer, np.floating)) and not isinstance(a, bool):
        out.append(str(a))
      else:
        raise ValueError(f"{where}: field 'golden_answers' must hold strings, got "
                         f"{type(a).__name__} {a!r:.80}")
    return out
  raise ValueError(f"{where}: field 'golden_answers' must be a list of strings, got "
                   f"{type(value).__name__}")


_QUESTION_MARK = "Question: "  # the Search-R1 template ends with "Question: {question}\n"


def example_from_row(row: Any, where: str, data_source: str) -> dict:
  """One source row -> the feature dict. `where` ("file:line") prefixes every error.

  Accepts FlashRAG rows (`id`, `question`, `golden_answers`, optional `metadata`) and
  Search-R1 parquet rows, which may carry the question only inside `prompt` and the answers
  only in `reward_model.ground_truth.target`.
  """
  if not isinstance(row, Mapping):
    raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
  question = row.get("question")
  if question is None and isinstance(row.get("prompt"), (list, tuple, np.ndarray)):
    try:
      content = row["prompt"][-1]["content"]
      at = content.rfind(_QUESTION_MARK)
      question = content[at + len(_QUESTION_MARK):].rstrip("\n") if at >= 0 else None
    except (KeyError, IndexError, TypeError):
      question = None
  if not isinstance(question, str) or not question.strip():
    raise ValueError(f"{where}: field 'question' is missing or empty")
  answers = row.get("golden_answers")
  if answers is None:
    try:
      answers = row["reward_model"]["ground_truth"]["target"]
    except (KeyError, TypeError):
      raise ValueError(f"{where}: field 'golden_answers' is missing") from None
  qid = row.get("id")
  if qid is None:
    info = row.get("extra_info") or {}
    if "index" not in info:
      raise ValueError(f"{where}: field 'id' is missing")
    qid = f"{data_source}_{info.get('split', 'row')}_{info['index']}"
  if not isinstance(qid, (str, int, np.integer)):
    raise ValueError(f"{where}: field 'id' must be a string, got {type(qid).__name__}")
  qid = str(qid)
  return {"id": qid, "question": question, "golden_answers": _answers(answers, where),
          "data_source": str(row.get("data_source") or data_source),
          "metadata": _metadata(row.get("metadata"), qid)}


def read_jsonl(path: str, data_source: str) -> Iterator[dict]:
  """Yields feature dicts of a FlashRAG JSONL file; errors name `path:line`."""
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      where = f"{path}:{lineno}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 ({e.reason})") from None
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
      yield example_from_row(row, where, data_source)


def read_parquet(path: str, data_source: str) -> Iterator[dict]:
  """Yields feature dicts of the rows of a Search-R1 parquet file whose data_source matches."""
  import pyarrow.parquet as pq  # deferred: comes with tensorflow-datasets; only parquet input needs it

  try:
    table = pq.read_table(path)
  except Exception as e:  # pyarrow raises several types for a corrupt file
    raise ValueError(f"{path}: not a readable parquet file ({e})") from None
  if "data_source" not in table.column_names:
    raise ValueError(f"{path}: no 'data_source' column; is this a Search-R1 parquet file?")
  for i, row in enumerate(table.to_pylist()):
    if row.get("data_source") == data_source:
      yield example_from_row(row, f"{path} row {i}", data_source)


def read_split(name: str, split: str, data_dir: str) -> Iterator[dict]:
  """Yields the examples of one split straight from the source files, in source order."""
  sources = resolve_sources(name, data_dir)
  if split not in sources:
    raise ValueError(f"dataset {name!r} has no split {split!r}; it has {sorted(sources)}")
  for src, path, fmt in sources[split]:
    reader = read_jsonl if fmt == "jsonl" else read_parquet
    yield from reader(path, src.data_source)


# --------------------------------------------------------------------------------------------
# TFDS
# --------------------------------------------------------------------------------------------

_BUILDER_CLS = None


def _builder_cls():
  """The TFDS builder class, defined on first use so importing this module stays light."""
  global _BUILDER_CLS
  if _BUILDER_CLS is not None:
    return _BUILDER_CLS
  import tensorflow_datasets as tfds  # deferred: importing TFDS (TensorFlow) takes seconds
  from tensorflow_datasets.core import utils as tfds_utils

  class Searche1Qa(tfds.core.GeneratorBasedBuilder):
    """QA questions with golden answers; one builder config per dataset."""

    # TFDS's default resolves this through the `importlib_resources` backport, which is not
    # installed (and not needed on Python >= 3.9); the answer is simply this file.
    @tfds_utils.classproperty
    @classmethod
    def code_path(cls):
      return epath.Path(__file__)

    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n, description=f"{n}: "
                                               f"{', '.join(SPLITS[n])}") for n in DATASETS]

    def __init__(self, *, source_dir: str | None = None, **kwargs):
      self._source_dir = source_dir
      super().__init__(**kwargs)

    def _info(self):
      text = tfds.features.Text()
      return tfds.core.DatasetInfo(
          builder=self,
          description="Search-R1 style QA: question, golden answers, data source.",
          features=tfds.features.FeaturesDict({
              "id": text,
              "question": text,
              "golden_answers": tfds.features.Sequence(text),
              "data_source": text,
              "metadata": {
                  "type": text,  # e.g. comparison / compositional; '' if unknown
                  "hops": np.int32,  # -1 if unknown
                  "entities": tfds.features.Sequence(text),
                  "relation": text,
              },
          }),
          disable_shuffling=True,  # keep source order
          homepage="https://huggingface.co/datasets/RUC-NLPIR/FlashRAG_datasets",
      )

    def _split_generators(self, dl_manager):
      if self._source_dir is None:
        raise ValueError("building needs source_dir (the raw data directory)")
      name = self.builder_config.name
      return {split: self._generate_examples(name, split) for split in SPLITS[name]}

    def _generate_examples(self, name, split):
      for i, ex in enumerate(read_split(name, split, self._source_dir)):
        yield i, ex

  _BUILDER_CLS = Searche1Qa
  return _BUILDER_CLS


def build_dir(name: str, tfds_dir: str) -> str:
  """Where the TFDS build of `name` lives."""
  _check_name(name)
  return os.path.join(tfds_dir, BUILDER_NAME, name, VERSION)


def _fingerprint(name: str, data_dir: str) -> dict:
  files = {}
  for split, items in resolve_sources(name, data_dir).items():
    for _, path, _ in items:
      if path in files:
        continue
      files[os.path.abspath(path)] = fp_lib.sha256_file(path)
  return {"dataset": name, "version": VERSION, "files": files}


def _read_fingerprint(path: str) -> dict | None:
  return fp_lib.read_json(os.path.join(path, SOURCES_FILE))


def is_built(name: str, tfds_dir: str) -> bool:
  return os.path.isfile(os.path.join(build_dir(name, tfds_dir), "dataset_info.json"))


def build(name: str, data_dir: str, tfds_dir: str, overwrite: bool = False) -> str:
  """Builds (or reuses) the TFDS dataset `name` from the files under `data_dir`.

  Reuses an existing build when its recorded source hashes match; rebuilds otherwise or with
  `overwrite`. Returns the build directory.
  """
  out = build_dir(name, tfds_dir)
  fingerprint = _fingerprint(name, data_dir)  # raises MissingDataError first
  if not overwrite and is_built(name, tfds_dir) and _read_fingerprint(out) == fingerprint:
    return out
  if os.path.exists(out):
    logging.info("rebuilding %s (sources changed or overwrite requested)", out)
    shutil.rmtree(out)
  builder = _builder_cls()(config=name, data_dir=tfds_dir, file_format="array_record",
                           source_dir=data_dir)
  builder.download_and_prepare()
  fp_lib.write_json_atomic(os.path.join(out, SOURCES_FILE), fingerprint, indent=1)
  return out


def _decode(ex: Mapping[str, Any]) -> dict:
  def s(x):
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)

  meta = ex["metadata"]
  return {
      "id": s(ex["id"]),
      "question": s(ex["question"]),
      "golden_answers": [s(a) for a in ex["golden_answers"]],
      "data_source": s(ex["data_source"]),
      "metadata": {"type": s(meta["type"]), "hops": int(meta["hops"]),
                   "entities": [s(e) for e in meta["entities"]],
                   "relation": s(meta["relation"])},
  }


def load_split(name: str, split: str, data_dir: str | None, tfds_dir: str,
               limit: int | None = None) -> list[dict]:
  """The examples of one split, in source order, as plain dicts.

  Each dict: `id`, `question`, `golden_answers` (list of str), `data_source`, `metadata`
  (`type`, `hops` (-1 unknown), `entities`, `relation`). Reads the TFDS build under
  `tfds_dir`; with `data_dir`, builds it first if absent or stale. `limit` (> 0) keeps the
  first `limit` examples; None or 0 keeps all.
  """
  import tensorflow_datasets as tfds  # deferred: importing TFDS (TensorFlow) takes seconds

  _check_name(name)
  if split not in SPLITS[name]:
    raise ValueError(f"dataset {name!r} has no split {split!r}; it has {sorted(SPLITS[name])}")
  if data_dir is not None:
    try:
      build(name, data_dir, tfds_dir)
    except MissingDataError:
      if not is_built(name, tfds_dir):
        raise
      logging.warning("sources of %s are missing under %s; reading the existing build %s",
                      name, data_dir, build_dir(name, tfds_dir))
  elif not is_built(name, tfds_dir):
    raise FileNotFoundError(
        f"{name} is not built under {tfds_dir} (expected {build_dir(name, tfds_dir)}); run "
        f"`python -m launch.prepare_data --raw_dir <dir> --tfds_dir {tfds_dir} "
        f"--datasets {name}` or pass data_dir")
  source = tfds.builder_from_directory(build_dir(name, tfds_dir)).as_data_source(split=split)
  n = len(source)
  if limit:
    n = min(n, int(limit))
  out = []
  for start in range(0, n, 4096):
    out.extend(_decode(ex) for ex in source.__getitems__(range(start, min(n, start + 4096))))
  return out


def split_sizes(name: str, tfds_dir: str) -> dict[str, int]:
  """Examples per split of a TFDS build (read from its dataset_info)."""
  import tensorflow_datasets as tfds  # deferred: importing TFDS (TensorFlow) takes seconds

  info = tfds.builder_from_directory(build_dir(name, tfds_dir)).info
  return {s: int(info.splits[s].num_examples) for s in info.splits}


def source_dir(name: str, data_cfg) -> str:
  """The directory holding `name`'s source files, from a `configs/parts/data.py` block."""
  _check_name(name)
  return data_cfg.world_dir if name == WORLD_NAME else data_cfg.raw_dir


def eval_limit(name: str, data_cfg) -> int | None:
  """Questions evaluated for benchmark `name` (None = all), from a data block."""
  return int(data_cfg.eval_limit.get(name, 0) or 0) or None
