"""searche1_jax/fingerprint.py: digests of config blocks, whole-file hashes, and atomic JSON stamps."""
import hashlib
import json
import os

import ml_collections

from searche1_jax import fingerprint as fp


def test_digest_is_the_sha256_of_sorted_json_and_ignores_key_order_and_configdict():
  obj = {"b": [1, 2.5, "x"], "a": {"z": None, "y": True}}
  expected = hashlib.sha256(b'{"a": {"y": true, "z": null}, "b": [1, 2.5, "x"]}').hexdigest()[:16]
  assert fp.digest(obj) == expected
  assert fp.digest({"a": {"z": None, "y": True}, "b": [1, 2.5, "x"]}) == expected
  assert fp.digest(ml_collections.ConfigDict(obj)) == expected
  assert fp.digest({**obj, "c": 0}) != expected


def test_sha256_file_reads_the_whole_file(tmp_path):
  path = tmp_path / "f.bin"
  data = os.urandom(3 * (1 << 20) + 17)  # more than one read block
  path.write_bytes(data)
  assert fp.sha256_file(str(path)) == hashlib.sha256(data).hexdigest()


def test_json_stamps_round_trip_atomically_and_missing_or_broken_read_as_none(tmp_path):
  path = str(tmp_path / "stamp.json")
  assert fp.read_json(path) is None
  fp.write_json_atomic(path, {"fingerprint": "abc", "n": 3})
  assert fp.read_json(path) == {"fingerprint": "abc", "n": 3}
  assert os.listdir(tmp_path) == ["stamp.json"]  # the .tmp was renamed, not left behind
  with open(path, "w") as f:
    f.write('{"fingerprint": ')  # a half-written stamp (not from write_json_atomic)
  assert fp.read_json(path) is None
  assert json.loads(json.dumps(fp.plain(ml_collections.ConfigDict({"a": (1, 2)})))) == {"a": [1, 2]}
