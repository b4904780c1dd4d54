"""Corpus reader: both JSONL formats, file:line errors, skipping, byte-offset random access, fingerprints."""
import json

import numpy as np
import pytest

from fixtures.retrieval.helpers import WIKI_PASSAGES
from searche1_jax.retrieval import Corpus, CorpusFormatError, Passage, iter_passages, scan_corpus
from searche1_jax.fingerprint import file_fingerprint, fingerprint_mismatch


def _write(path, lines):
  path.write_text("".join(l + "\n" for l in lines), encoding="utf-8")
  return str(path)


def test_wiki18_contents_round_trip():
  p = Passage.from_contents("7", '"Ada Lovelace"\nShe wrote the first program.\nSecond line.')
  assert (p.id, p.title, p.text) == ("7", "Ada Lovelace", "She wrote the first program.\nSecond line.")
  assert p.contents == '"Ada Lovelace"\nShe wrote the first program.\nSecond line.'
  assert Passage.from_contents(3, "no newline").title == "no newline"
  assert Passage.from_contents("1", '"Quoted "inner" title"\nx').title == 'Quoted "inner" title'


def test_both_formats_and_blank_lines(tmp_path):
  path = _write(tmp_path / "c.jsonl", [
      json.dumps({"id": "a", "contents": '"T1"\ntext one'}),
      "",
      json.dumps({"id": 5, "title": "T2", "text": "text two"}),
      json.dumps({"id": "c", "contents": '"Ünïcode"\nçà'}, ensure_ascii=False),
  ])
  ps = list(iter_passages(path))
  assert [(p.id, p.title, p.text) for p in ps] == [("a", "T1", "text one"), ("5", "T2", "text two"),
                                                    ("c", "Ünïcode", "çà")]
  assert ps[1].contents == '"T2"\ntext two'


@pytest.mark.parametrize("bad,reason", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"contents": '"T"\nx'}), "'id'"),
    (json.dumps({"id": "1", "title": "T"}), "'contents'"),
    (json.dumps({"id": "1", "contents": 3}), "'contents'"),
    (json.dumps({"id": True, "contents": "x"}), "'id'"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad, reason):
  good = json.dumps({"id": "0", "contents": '"T"\nx'})
  path = _write(tmp_path / "c.jsonl", [good, "", good, bad, good])
  with pytest.raises(CorpusFormatError) as e:
    list(iter_passages(path))
  assert str(e.value).startswith(f"{path}:4:"), str(e.value)
  assert reason in str(e.value)
  with pytest.raises(CorpusFormatError, match=f"{path}:4:"):
    scan_corpus(path)


def test_skip_malformed_counts_and_keeps_order(tmp_path):
  lines = [json.dumps({"id": str(i), "contents": f'"T{i}"\nbody {i}'}) for i in range(6)]
  lines[1] = "garbage"
  lines[4] = json.dumps({"id": "4"})
  path = _write(tmp_path / "c.jsonl", lines)
  scan = scan_corpus(path, skip_malformed=True)
  assert scan.num_skipped == 2 and scan.skipped_lines == (2, 5)
  assert [p.id for p in iter_passages(path, skip_malformed=True)] == ["0", "2", "3", "5"]
  corpus = Corpus(path, scan.offsets)
  assert len(corpus) == 4 and corpus[2].id == "3" and corpus[2].text == "body 3"


def test_offsets_random_access_equals_streaming():
  scan = scan_corpus(WIKI_PASSAGES)
  streamed = list(iter_passages(WIKI_PASSAGES))
  corpus = Corpus(WIKI_PASSAGES, scan.offsets)
  assert scan.offsets.dtype == np.int64 and scan.offsets.shape == (len(streamed), 2)
  assert len(corpus) == len(streamed) == 47
  order = [46, 0, 17, 17, 3]
  assert corpus.get_many(order) == [streamed[i] for i in order]
  assert corpus.slice(40, 100) == streamed[40:]
  with pytest.raises(IndexError, match="out of range"):
    corpus[47]


def test_empty_and_missing_corpus(tmp_path):
  with pytest.raises(CorpusFormatError, match="no valid passages"):
    scan_corpus(_write(tmp_path / "e.jsonl", [""]))
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    scan_corpus(str(tmp_path / "nope.jsonl"))


def test_fingerprint_detects_edits(tmp_path):
  lines = [json.dumps({"id": str(i), "contents": f'"T"\n{i}'}) for i in range(50)]
  path = _write(tmp_path / "c.jsonl", lines)
  fp = file_fingerprint(path, edge_bytes=64)
  assert fp["num_lines"] == 50 and fp["size"] == sum(len(l) + 1 for l in lines)
  assert fingerprint_mismatch(fp, file_fingerprint(path, edge_bytes=64)) == []
  # a newline in the middle (outside both 64-byte edges) becomes a space: same size, only the line count sees it
  data = bytearray(open(path, "rb").read())
  mid = data.index(b"\n", len(data) // 2)
  data[mid] = ord(" ")
  open(path, "wb").write(bytes(data))
  assert fingerprint_mismatch(fp, file_fingerprint(path, edge_bytes=64)) == ["num_lines"]
  _write(tmp_path / "c.jsonl", lines[:-1] + ['{"id": "x", "contents": "changed"}'])
  assert "tail_sha256" in fingerprint_mismatch(fp, file_fingerprint(path, edge_bytes=64))
