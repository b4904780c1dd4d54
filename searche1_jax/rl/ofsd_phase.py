"""The OFSD phase: pairs -> privileged layouts -> teacher targets (once) -> student epochs; resumable.

After a GRPO round the trainer (train/ofsd_runner.py) does:

  trajs  = rollouts of the round's policy on its training questions, ofsd.group_size per question
  buffer = build_buffer(teacher_params, cfg, group_by_question(trajs), tokenizer, opts, ...)
           per question group: pick the reference and its students (rl/pairs.py; groups without a correct sibling
           are skipped), build the teacher / student layouts (rl/privileged.py), and with ofsd.top_k >= 1 run ONE
           jitted teacher pass over all pairs (length-bucketed batches) keeping, for every distilled student
           token, the teacher's top-k next-token ids and log-probs.
  for epoch: for batch in iterate_batches(buffer, epoch, ofsd.batch_size, seed): state = train_step(state, batch)
  phase_metrics(buffer, divergence before / after, post-phase rollouts)

Storage of the targets: per DISTILLED token only (not per position), ids int32 [N, k] and log-probs float32
[N, k], in host RAM (ofsd.storage='host') or as .npy memmaps under WORKDIR/ofsd/NAME/ ('disk'). float32, not
float16, because the tail bucket log(1 - sum_k p) is a difference of nearly equal numbers when the top-k mass is
close to 1: float16's ~5e-4 relative error per probability exceeds tails below ~1e-3 and would turn them into
the clamp value. The cost is modest: 64 ids + 64 log-probs = 512 B per distilled token (about 0.5 GB for 1 M
policy tokens, e.g. 512 questions x 4 students x 500 tokens); pass logprob_dtype=np.float16 to halve the
log-prob part. With the full vocabulary (top_k None / 0) nothing is stored: the teacher snapshot is the train
state's ref_params and the loss recomputes it (rl/ofsd_loss.py).

Resuming: `OfsdBuffer.to_numpy()` is a flat dict of numpy arrays for the checkpoint's 'extra' item and
`OfsdBuffer.from_numpy` rebuilds it, so a resumed phase trains on the very same targets; `iterate_batches` is a
pure function of (buffer, epoch, batch_size, seed), so (epoch, batch index) in the checkpoint's meta is enough to
continue with the same order (`start` skips the batches already done).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from searche1_jax import rewards
from searche1_jax import schema
from searche1_jax import sharding as shd
from searche1_jax.agent import protocol
from searche1_jax.agent import trajectory as trajectory_lib
from searche1_jax.models import qwen2
from searche1_jax.rl import ofsd
from searche1_jax.rl import ofsd_loss
from searche1_jax.rl import pairs as pairs_lib
from searche1_jax.rl import privileged

Trajectory = trajectory_lib.Trajectory
STORAGE = ("host", "disk")


@dataclasses.dataclass(frozen=True)
class PhaseOptions:
  """The pair-selection, batching and storage part of the `ofsd` block (configs/parts/ofsd.py), declared once
  (searche1_jax/schema.py)."""
  efficiency: str = schema.option("str", "searches_then_tokens", choices=pairs_lib.EFFICIENCY)
  max_pairs_per_question: int | None = schema.option("int", None, lo=1, none_ok=True)
  include_correct_students: bool = schema.option("bool", True)
  context_siblings: str = schema.option("str", "reference", choices=privileged.SIBLINGS)
  epochs: int = schema.option("int", 2, lo=1)
  batch_size: int = schema.option("int", 64, lo=1)
  num_microbatches: int = schema.option("int", 4, lo=1)
  storage: str = schema.option("str", "host", choices=STORAGE)

  def __post_init__(self):
    schema.check(self, "ofsd")

  @classmethod
  def _cross_problems(cls, v: dict) -> list[tuple[str, str]]:
    if v["batch_size"] % v["num_microbatches"]:
      return [("num_microbatches", f"must divide ofsd.batch_size={v['batch_size']!r}")]
    return []

  @property
  def micro_batch_size(self) -> int:
    return self.batch_size // self.num_microbatches

  @classmethod
  def from_config(cls, block) -> "PhaseOptions":
    return schema.build(cls, block, "ofsd", "configs/parts/ofsd.py")


@dataclasses.dataclass(frozen=True)
class OfsdOptions:
  """The `ofsd` block typed, built once at start-up (`from_config`) and passed to everything below.

  optim: the student optimizer's sub-block, read by train.optim when the phase's step is built.
  """
  phase: PhaseOptions
  divergence: ofsd_loss.DivergenceOptions
  context: privileged.ContextOptions
  group_size: int
  questions_per_phase: int
  optim: Any = None

  @classmethod
  def from_config(cls, ofsd_block, template: str = protocol.SEARCH_R1_TEMPLATE) -> "OfsdOptions":
    return cls(phase=PhaseOptions.from_config(ofsd_block),
               divergence=ofsd_loss.DivergenceOptions.from_config(ofsd_block),
               context=privileged.ContextOptions.from_config(ofsd_block, template),
               group_size=int(ofsd_block.group_size), questions_per_phase=int(ofsd_block.questions_per_phase),
               optim=ofsd_block.get("optim"))


# ----------------------------------------------------------------------------------------------- pairs


def is_correct(traj: Trajectory) -> bool:
  """EM = 1 of the trajectory's answer (independent of the reward function used for GRPO)."""
  return bool(rewards.exact_match(traj.answer, traj.golden_answers))


def group_by_question(trajectories: Sequence[Trajectory]) -> dict[str, list[Trajectory]]:
  """{question_id: siblings sorted by sample_index}, questions in order of first appearance."""
  groups: dict[str, list[Trajectory]] = {}
  for t in trajectories:
    groups.setdefault(t.question_id, []).append(t)
  return {q: sorted(g, key=lambda t: t.sample_index) for q, g in groups.items()}


def _as_groups(trajectories_by_question) -> list[tuple[str, list[Trajectory]]]:
  if isinstance(trajectories_by_question, Mapping):
    items = list(trajectories_by_question.items())
  else:
    items = []
    for i, g in enumerate(trajectories_by_question):
      g = list(g)
      if not g:
        raise ValueError(f"trajectories_by_question: group #{i} is empty")
      items.append((g[0].question_id, g))
  for qid, g in items:
    for t in g:
      if t.question_id != qid:
        raise ValueError(f"trajectories_by_question: group {qid!r} holds a trajectory of question "
                         f"{t.question_id!r}")
  return items


def select_group(group: Sequence[Trajectory], opts: PhaseOptions) -> tuple[int | None, list[int], list[bool]]:
  """(reference index or None, student indices, correct flags) of one question group.

  context_siblings 'reference': rl/pairs.select_pairs (students: wrong siblings, then correct but costlier ones
  if include_correct_students; deterministic cap). 'all': every sibling is a student (wrong first, correct ones
  only if include_correct_students), capped; the reference index is None. No correct sibling -> no students.
  """
  correct = [is_correct(t) for t in group]
  if opts.context_siblings == "reference":
    ref, students = pairs_lib.select_pairs(
        correct, [t.num_searches for t in group], [t.num_policy_tokens for t in group],
        efficiency=opts.efficiency, max_pairs=opts.max_pairs_per_question,
        include_correct_students=opts.include_correct_students)
    return ref, students, correct
  if not any(correct):
    return None, [], correct
  students = [i for i, ok in enumerate(correct) if not ok]
  if opts.include_correct_students:
    students += [i for i, ok in enumerate(correct) if ok]
  if opts.max_pairs_per_question is not None:
    students = students[:opts.max_pairs_per_question]
  return None, students, correct


# ----------------------------------------------------------------------------------------------- strings


def _pack_strings(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  data = [s.encode("utf-8") for s in strings]
  offsets = np.zeros(len(data) + 1, np.int64)
  offsets[1:] = np.cumsum([len(d) for d in data])
  return np.frombuffer(b"".join(data), np.uint8).copy(), offsets


def _unpack_strings(data: np.ndarray, offsets: np.ndarray) -> list[str]:
  raw = np.asarray(data, np.uint8).tobytes()
  return [raw[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]


def _offsets(lengths) -> np.ndarray:
  out = np.zeros(len(lengths) + 1, np.int64)
  out[1:] = np.cumsum(np.asarray(lengths, np.int64))
  return out


# ----------------------------------------------------------------------------------------------- buffer


@dataclasses.dataclass
class OfsdBuffer:
  """Every (student, teacher) pair of one phase and its stored teacher targets, as flat numpy arrays.

  Pair i: student ids `student_ids[student_offsets[i]:student_offsets[i+1]]` (prompt length
  student_prompt_len[i]), distill mask over them in `distill_mask` (same offsets), teacher ids in
  `teacher_ids[teacher_offsets[i]:...]` (prompt length teacher_prompt_len[i]); its distilled tokens, in position
  order, own rows target_offsets[i]:target_offsets[i+1] of target_ids / target_logprobs [N, k] (top_k >= 1 only).
  Rollout statistics per trajectory (traj_*) and per pair (pair_*: indices into the traj_* arrays, reference -1
  for context_siblings='all') feed `phase_metrics`.
  """
  top_k: int  # 0 = full vocabulary (no stored targets)
  temperature: float
  student_ids: np.ndarray
  student_offsets: np.ndarray
  student_prompt_len: np.ndarray
  distill_mask: np.ndarray
  teacher_ids: np.ndarray
  teacher_offsets: np.ndarray
  teacher_prompt_len: np.ndarray
  target_offsets: np.ndarray
  target_ids: np.ndarray | None
  target_logprobs: np.ndarray | None
  pair_reference: np.ndarray
  pair_student: np.ndarray
  traj_group: np.ndarray
  traj_searches: np.ndarray
  traj_policy_tokens: np.ndarray
  traj_correct: np.ndarray
  question_ids: list[str]
  targets_dir: str = ""  # storage='disk': where target_*.npy live

  # Views.
  @property
  def num_pairs(self) -> int:
    return int(self.student_prompt_len.shape[0])

  @property
  def num_questions(self) -> int:
    return len(self.question_ids)

  def student(self, i: int) -> np.ndarray:
    return self.student_ids[self.student_offsets[i]:self.student_offsets[i + 1]]

  def mask(self, i: int) -> np.ndarray:
    return self.distill_mask[self.student_offsets[i]:self.student_offsets[i + 1]]

  def teacher(self, i: int) -> np.ndarray:
    return self.teacher_ids[self.teacher_offsets[i]:self.teacher_offsets[i + 1]]

  def teacher_pos(self, i: int) -> np.ndarray:
    """[Ls] the aligned teacher index of each student index (-1 before the last prompt token)."""
    n, p_s = self.student(i).shape[0], int(self.student_prompt_len[i])
    out = np.full(n, -1, np.int32)
    out[p_s - 1:] = np.arange(p_s - 1, n) + int(self.teacher_prompt_len[i]) - p_s
    return out

  def targets(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n_i, k] int32, log-probs [n_i, k] float32) of pair i's distilled tokens in position order."""
    if not self.top_k:
      raise ValueError("OfsdBuffer.targets: this buffer has no stored targets (full-vocabulary mode)")
    s, e = self.target_offsets[i], self.target_offsets[i + 1]
    return np.asarray(self.target_ids[s:e]), np.asarray(self.target_logprobs[s:e], np.float32)

  # Checkpointing.
  _ARRAYS = ("student_ids", "student_offsets", "student_prompt_len", "distill_mask", "teacher_ids",
             "teacher_offsets", "teacher_prompt_len", "target_offsets", "pair_reference", "pair_student",
             "traj_group", "traj_searches", "traj_policy_tokens", "traj_correct")

  def to_numpy(self) -> dict[str, np.ndarray]:
    """A flat dict of numpy arrays (the checkpoint's 'extra' item). With storage='disk' the targets stay in their
    files and only their directory is recorded."""
    out = {name: np.asarray(getattr(self, name)) for name in self._ARRAYS}
    out["top_k"] = np.asarray(self.top_k, np.int64)
    out["temperature"] = np.asarray(self.temperature, np.float64)
    out["question_ids_data"], out["question_ids_offsets"] = _pack_strings(self.question_ids)
    out["targets_dir"] = _pack_strings([self.targets_dir])[0]
    if self.top_k and not self.targets_dir:
      out["target_ids"] = np.asarray(self.target_ids)
      out["target_logprobs"] = np.asarray(self.target_logprobs)
    return _encode_empty(out)

  @classmethod
  def from_numpy(cls, d: Mapping[str, Any]) -> "OfsdBuffer":
    """Inverse of to_numpy (reopens the memmaps of a storage='disk' buffer)."""
    d = _decode_empty(d)
    missing = [k for k in cls._ARRAYS + ("top_k", "temperature", "question_ids_data", "question_ids_offsets",
                                          "targets_dir") if k not in d]
    if missing:
      raise ValueError(f"OfsdBuffer.from_numpy: missing arrays {missing} (not a saved OFSD buffer?)")
    kw = {name: np.asarray(d[name]) for name in cls._ARRAYS}
    top_k = int(np.asarray(d["top_k"]))
    targets_dir = np.asarray(d["targets_dir"], np.uint8).tobytes().decode("utf-8")
    ids = lps = None
    n_targets = int(kw["target_offsets"][-1])
    if top_k and targets_dir:
      ids, lps = _open_targets(targets_dir, n_targets, top_k)
    elif top_k:
      if "target_ids" not in d or "target_logprobs" not in d:
        raise ValueError("OfsdBuffer.from_numpy: a top-k buffer without target_ids / target_logprobs")
      ids, lps = np.asarray(d["target_ids"]), np.asarray(d["target_logprobs"])
      if ids.shape != (n_targets, top_k) or lps.shape != (n_targets, top_k):
        raise ValueError(f"OfsdBuffer.from_numpy: targets have shapes {ids.shape}, {lps.shape}; expected "
                         f"({n_targets}, {top_k})")
    return cls(top_k=top_k, temperature=float(np.asarray(d["temperature"])), target_ids=ids, target_logprobs=lps,
               question_ids=_unpack_strings(d["question_ids_data"], d["question_ids_offsets"]),
               targets_dir=targets_dir, **kw)


_EMPTY_SHAPE, _EMPTY_DTYPE = "__empty_shape", "__empty_dtype"


def _encode_empty(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Orbax cannot save zero-size arrays: replace each by its shape and dtype (both non-empty arrays)."""
  out = {}
  for k, v in d.items():
    if v.size == 0:
      out[k + _EMPTY_SHAPE] = np.asarray(v.shape, np.int64)
      out[k + _EMPTY_DTYPE] = np.frombuffer(v.dtype.str.encode("ascii"), np.uint8).copy()
    else:
      out[k] = v
  return out


def _decode_empty(d: Mapping[str, Any]) -> dict[str, Any]:
  out = {k: v for k, v in d.items() if not k.endswith((_EMPTY_SHAPE, _EMPTY_DTYPE))}
  for k, v in d.items():
    if k.endswith(_EMPTY_SHAPE):
      name = k[:-len(_EMPTY_SHAPE)]
      dtype = np.dtype(np.asarray(d[name + _EMPTY_DTYPE], np.uint8).tobytes().decode("ascii"))
      out[name] = np.zeros(tuple(int(x) for x in np.asarray(v)), dtype)
  return out


def _open_targets(directory: str, n: int, k: int):
  paths = [os.path.join(directory, f) for f in ("target_ids.npy", "target_logprobs.npy")]
  for p in paths:
    if not os.path.exists(p):
      raise FileNotFoundError(f"OFSD buffer: target file {p} is missing (storage='disk' keeps the targets under "
                              "WORKDIR/ofsd/; was the work directory moved or cleaned?)")
  ids, lps = (np.load(p, mmap_mode="r") for p in paths)
  if ids.shape != (n, k) or lps.shape != (n, k):
    raise ValueError(f"OFSD buffer: {paths[0]} / {paths[1]} have shapes {ids.shape} / {lps.shape}, expected "
                     f"({n}, {k})")
  return ids, lps


# ----------------------------------------------------------------------------------------------- teacher pass


@functools.partial(jax.jit, static_argnames=("cfg", "k", "chunk_size", "temperature", "mesh", "rules"))
def teacher_topk(params, cfg: qwen2.Qwen2Config, teacher_tokens, teacher_attention_mask, gather_idx, gather_mask,
                 *, k: int, chunk_size: int, temperature: float, mesh=None, rules=shd.DEFAULT_RULES):
  """The teacher's top-k next-token ids / log-probs at selected positions of its own sequences.

  Args:
    teacher_tokens, teacher_attention_mask: [B, Tt]; gather_idx [B, N] int: teacher positions whose next-token
    distribution is wanted; gather_mask [B, N].
    mesh, rules: the mesh the inputs are sharded over (None: one device); the model's activations are laid out
      by it (sharding.activation_mesh), which the splash-attention kernel needs to run per shard.
  Returns:
    ids [B, N, k] int32, logprobs [B, N, k] float32 (0 where gather_mask is 0). Chunked: no [B, N, V] array.
  """
  with shd.activation_mesh(mesh, rules):
    h = qwen2.hidden_states(params, cfg, teacher_tokens, attention_mask=teacher_attention_mask)
    h = jnp.take_along_axis(h, gather_idx[..., None].astype(jnp.int32), axis=1)
    return ofsd.chunked_teacher_topk(h, qwen2.head_kernel(params, cfg), gather_mask, k, chunk_size,
                                     temperature=temperature)


def data_parallel_rows(rows: int, mesh, rules=shd.DEFAULT_RULES) -> int:
  """`rows` rounded up to a multiple of the mesh's data-parallel size (the axes the 'batch' axis maps to)."""
  if mesh is None:
    return rows
  spec = shd.logical_to_mesh(("batch",), rules)[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  dp = math.prod(mesh.shape[a] for a in axes)
  return -(-rows // dp) * dp


def _row_batches(order: Sequence[int], rows: int) -> list[list[int]]:
  return [list(order[i:i + rows]) for i in range(0, len(order), rows)]


def compute_teacher_targets(teacher_params, cfg: qwen2.Qwen2Config, layouts: Sequence[privileged.PairLayout], *,
                            k: int, temperature: float, chunk_size: int, rows: int, out_ids: np.ndarray,
                            out_logprobs: np.ndarray, target_offsets: np.ndarray,
                            pad_to: int | Sequence[int] | None = None, mesh=None,
                            rules=shd.DEFAULT_RULES) -> None:
  """Fill out_ids / out_logprobs [N, k] (rows target_offsets[i]:... for pair i) with one teacher pass.

  Pairs are sorted by teacher length and run `rows` at a time; the teacher length and the number of distilled
  tokens are padded to bucket lengths (powers of two, or `pad_to`), so compilations stay few. Short batches are
  filled with copies of their first row, masked out. With a mesh the rows are sharded over its batch axes.
  """
  batch_sharding = None if mesh is None else shd.batch_sharding(mesh, 1, rules)
  order = sorted(range(len(layouts)), key=lambda i: (layouts[i].teacher_ids.shape[0], i))
  for chunk in _row_batches(order, rows):
    t_len = trajectory_lib.bucket_length(max(layouts[i].teacher_ids.shape[0] for i in chunk), pad_to)
    positions = [np.nonzero(layouts[i].distill_mask)[0] for i in chunk]
    n_len = trajectory_lib.bucket_length(max(1, max(p.shape[0] for p in positions)))
    toks = np.zeros((rows, t_len), np.int32)
    att = np.zeros((rows, t_len), np.int32)
    idx = np.zeros((rows, n_len), np.int32)
    gmask = np.zeros((rows, n_len), bool)
    for r in range(rows):
      j = r if r < len(chunk) else 0
      lay = layouts[chunk[j]]
      toks[r, :lay.teacher_ids.shape[0]] = lay.teacher_ids
      att[r, :lay.teacher_ids.shape[0]] = 1
      if r < len(chunk):
        pos = positions[j]
        idx[r, :pos.shape[0]] = lay.teacher_pos[pos] - 1  # the teacher position that predicts the token
        gmask[r, :pos.shape[0]] = True
    batch = (toks, att, idx, gmask)
    if batch_sharding is not None:
      batch = jax.device_put(batch, batch_sharding)
    ids, lps = teacher_topk(teacher_params, cfg, *batch, k=k, chunk_size=chunk_size, temperature=temperature,
                            mesh=mesh, rules=tuple(rules))
    ids, lps = np.asarray(ids), np.asarray(lps)
    for j, i in enumerate(chunk):
      s, e = target_offsets[i], target_offsets[i + 1]
      out_ids[s:e] = ids[j, :e - s]
      out_logprobs[s:e] = lps[j, :e - s]


def build_buffer(teacher_params, cfg: qwen2.Qwen2Config, trajectories_by_question, tokenizer, opts: OfsdOptions,
                 *, workdir: str | None = None, name: str = "phase",
                 logprob_dtype=np.float32, pad_to: int | Sequence[int] | None = None, mesh=None,
                 rules=shd.DEFAULT_RULES, check_prompt: bool = True) -> OfsdBuffer:
  """Select pairs, build their layouts and (top_k >= 1) compute the teacher targets once.

  Args:
    teacher_params: the round's policy snapshot (only read here).
    cfg: the model config. trajectories_by_question: {question_id: siblings} (see group_by_question) or a list
      of sibling lists.
    tokenizer: the rollout tokenizer. opts: the typed `ofsd` block (OfsdOptions.from_config(config.ofsd,
      config.protocol.template)).
    workdir, name: storage='disk' writes WORKDIR/ofsd/NAME/target_{ids,logprobs}.npy.
    logprob_dtype: dtype of the stored log-probs (float32 default; see the module doc).
    pad_to: teacher-length buckets (None = powers of two). mesh / rules: shard the teacher batches over the
      data axes (the micro-batch size, ofsd.batch_size / ofsd.num_microbatches, must divide over them).
  Returns:
    the OfsdBuffer (possibly with 0 pairs).
  """
  popts, dopts, copts = opts.phase, opts.divergence, opts.context
  groups = _as_groups(trajectories_by_question)

  layouts: list[privileged.PairLayout] = []
  pair_reference, pair_student = [], []
  traj_group, traj_searches, traj_tokens, traj_correct = [], [], [], []
  question_ids = []
  for gi, (qid, group) in enumerate(groups):
    base = len(traj_group)
    question_ids.append(qid)
    for t in group:
      traj_group.append(gi)
      traj_searches.append(t.num_searches)
      traj_tokens.append(t.num_policy_tokens)
    ref, students, correct = select_group(group, popts)
    traj_correct.extend(correct)
    if not students:
      continue
    shown = [group[ref]] if ref is not None else list(group)
    block = privileged.context_block(shown, tokenizer, copts, None if ref is not None else correct)
    t_prompt = privileged.teacher_prompt_ids(tokenizer, group[students[0]].question, block, copts)
    for s in students:
      layouts.append(privileged.layout(group[s], t_prompt, tokenizer, copts, block, check_prompt))
      pair_reference.append(-1 if ref is None else base + ref)
      pair_student.append(base + s)

  counts = [int(lay.distill_mask.sum()) for lay in layouts]
  target_offsets = _offsets(counts)
  n_targets, k = int(target_offsets[-1]), int(dopts.top_k or 0)
  ids = lps = None
  targets_dir = ""
  if k:
    if popts.storage == "disk":
      if not workdir:
        raise ValueError("ofsd.storage='disk' needs a work directory (build_buffer(workdir=...))")
      targets_dir = os.path.abspath(os.path.join(workdir, "ofsd", name))
      os.makedirs(targets_dir, exist_ok=True)
      tmp = [os.path.join(targets_dir, f"{f}.npy.tmp") for f in ("target_ids", "target_logprobs")]
      ids = np.lib.format.open_memmap(tmp[0], mode="w+", dtype=np.int32, shape=(n_targets, k))
      lps = np.lib.format.open_memmap(tmp[1], mode="w+", dtype=logprob_dtype, shape=(n_targets, k))
    else:
      ids = np.zeros((n_targets, k), np.int32)
      lps = np.zeros((n_targets, k), logprob_dtype)
    if layouts:
      compute_teacher_targets(teacher_params, cfg, layouts, k=k, temperature=dopts.temperature,
                              chunk_size=dopts.chunk_size,
                              rows=data_parallel_rows(popts.micro_batch_size, mesh, rules), out_ids=ids,
                              out_logprobs=lps, target_offsets=target_offsets, pad_to=pad_to, mesh=mesh,
                              rules=rules)
    if popts.storage == "disk":
      ids.flush()
      lps.flush()
      del ids, lps
      for t in tmp:
        os.replace(t, t[:-len(".tmp")])
      ids, lps = _open_targets(targets_dir, n_targets, k)

  def cat(arrays, dtype):
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros((0,), dtype)

  return OfsdBuffer(
      top_k=k, temperature=dopts.temperature,
      student_ids=cat([lay.student_ids for lay in layouts], np.int32),
      student_offsets=_offsets([lay.student_ids.shape[0] for lay in layouts]),
      student_prompt_len=np.asarray([lay.student_prompt_len for lay in layouts], np.int32),
      distill_mask=cat([lay.distill_mask for lay in layouts], np.int8),
      teacher_ids=cat([lay.teacher_ids for lay in layouts], np.int32),
      teacher_offsets=_offsets([lay.teacher_ids.shape[0] for lay in layouts]),
      teacher_prompt_len=np.asarray([lay.teacher_prompt_len for lay in layouts], np.int32),
      target_offsets=target_offsets, target_ids=ids, target_logprobs=lps,
      pair_reference=np.asarray(pair_reference, np.int32), pair_student=np.asarray(pair_student, np.int32),
      traj_group=np.asarray(traj_group, np.int32), traj_searches=np.asarray(traj_searches, np.int32),
      traj_policy_tokens=np.asarray(traj_tokens, np.int32), traj_correct=np.asarray(traj_correct, np.int8),
      question_ids=question_ids, targets_dir=targets_dir)


# ----------------------------------------------------------------------------------------------- batches


def make_batch(buffer: OfsdBuffer, indices: Sequence[int], rows: int,
               pad_to: int | Sequence[int] | None = None) -> dict[str, np.ndarray]:
  """The train-step batch of the given pairs (rl/ofsd_loss.py format), `rows` rows.

  Rows past len(indices) repeat the first pair with an all-zero distill mask (real tokens, no loss). Top-k
  buffers give teacher_topk_ids / teacher_topk_logprobs [rows, T, k] aligned with the student tokens;
  full-vocabulary buffers give teacher_tokens / teacher_attention_mask [rows, Tt] and teacher_pos [rows, T].
  target_index / target_valid [rows, K] name the distilled positions (packed_targets), so the losses project
  only those. T and Tt are bucket lengths (powers of two, or pad_to).
  """
  indices = [int(i) for i in indices]
  if not indices or len(indices) > rows:
    raise ValueError(f"make_batch: need 1..{rows} pair indices, got {len(indices)}")
  src = indices + [indices[0]] * (rows - len(indices))
  t_len = trajectory_lib.bucket_length(max(buffer.student(i).shape[0] for i in indices), pad_to)
  tokens = np.zeros((rows, t_len), np.int32)
  att = np.zeros((rows, t_len), np.int32)
  dmask = np.zeros((rows, t_len), np.int32)
  batch = {"tokens": tokens, "attention_mask": att, "distill_mask": dmask}
  if buffer.top_k:
    tk_ids = np.zeros((rows, t_len, buffer.top_k), np.int32)
    tk_lps = np.zeros((rows, t_len, buffer.top_k), np.float32)
    batch.update(teacher_topk_ids=tk_ids, teacher_topk_logprobs=tk_lps)
  else:
    tt_len = trajectory_lib.bucket_length(max(buffer.teacher(i).shape[0] for i in indices), pad_to)
    t_tokens = np.zeros((rows, tt_len), np.int32)
    t_att = np.zeros((rows, tt_len), np.int32)
    t_pos = np.zeros((rows, t_len), np.int32)
    batch.update(teacher_tokens=t_tokens, teacher_attention_mask=t_att, teacher_pos=t_pos)
  for r, i in enumerate(src):
    ids = buffer.student(i)
    n = ids.shape[0]
    tokens[r, :n] = ids
    att[r, :n] = 1
    if r < len(indices):
      dmask[r, :n] = buffer.mask(i)
    if buffer.top_k:
      if r < len(indices):
        pos = np.nonzero(buffer.mask(i))[0]
        ti, tl = buffer.targets(i)
        tk_ids[r, pos] = ti
        tk_lps[r, pos] = tl
    else:
      tid = buffer.teacher(i)
      t_tokens[r, :tid.shape[0]] = tid
      t_att[r, :tid.shape[0]] = 1
      t_pos[r, :n] = np.maximum(buffer.teacher_pos(i), 0)
  batch.update(trajectory_lib.packed_targets(dmask))
  return batch


def num_batches(buffer: OfsdBuffer, batch_size: int) -> int:
  return -(-buffer.num_pairs // batch_size)


def epoch_order(num_pairs: int, epoch: int, seed: int) -> np.ndarray:
  """The pair order of one epoch: a permutation that depends only on (seed, epoch)."""
  return np.random.default_rng([int(seed), int(epoch)]).permutation(num_pairs)


def phase_batch(buffer: OfsdBuffer, index: int, batch_size: int, seed: int, *,
                pad_to: int | Sequence[int] | None = None) -> tuple[int, dict[str, np.ndarray]]:
  """(epoch, batch) of update `index` of a phase: epoch = index // num_batches, then that batch of the epoch's
  order (the last one padded, see make_batch). A pure function of its arguments: a resumed phase continues from
  the saved update index with the very same batches."""
  nb = num_batches(buffer, batch_size)
  epoch, b = divmod(index, nb)
  order = epoch_order(buffer.num_pairs, epoch, seed)
  return epoch, make_batch(buffer, order[b * batch_size:(b + 1) * batch_size], batch_size, pad_to)


def iterate_batches(buffer: OfsdBuffer, epoch: int, batch_size: int, seed: int, *, start: int = 0,
                    pad_to: int | Sequence[int] | None = None) -> Iterator[dict[str, np.ndarray]]:
  """The epoch's batches (`phase_batch` for its updates), from batch `start` on."""
  nb = num_batches(buffer, batch_size)
  for b in range(start, nb):
    yield phase_batch(buffer, epoch * nb + b, batch_size, seed, pad_to=pad_to)[1]


def make_eval_fn(loss_fn) -> Callable:
  """jit(params, batch, ref_params) -> (loss_sum, denominator) of an OFSD loss fn (no gradient)."""
  return jax.jit(lambda p, b, r: loss_fn(p, b, r)[:2])


def mean_divergence(params, buffer: OfsdBuffer, eval_fn: Callable, rows: int, *, ref_params=None,
                    pad_to: int | Sequence[int] | None = None, shard_batch: Callable | None = None) -> float:
  """Mean per-token divergence (nats) over every distilled token of the buffer (pairs in length order, `rows`
  at a time, e.g. the micro-batch size). NaN for an empty buffer."""
  if buffer.num_pairs == 0:
    return float("nan")
  order = sorted(range(buffer.num_pairs), key=lambda i: (buffer.student(i).shape[0], i))
  total = count = 0.0
  for chunk in _row_batches(order, rows):
    batch = make_batch(buffer, chunk, rows, pad_to)
    if shard_batch is not None:
      batch = shard_batch(batch)
    s, n = eval_fn(params, batch, ref_params)
    total += float(s)
    count += float(n)
  return total / count if count else float("nan")


# ----------------------------------------------------------------------------------------------- metrics


def _mean(x) -> float:
  x = np.asarray(x, np.float64)
  return float(x.mean()) if x.size else float("nan")


def phase_metrics(buffer: OfsdBuffer, *, divergence_before: float | None = None,
                  divergence_after: float | None = None,
                  post_trajectories: Sequence[Trajectory] | None = None) -> dict[str, float]:
  """Scalars describing one phase.

  questions, questions_with_correct (a usable reference exists), questions_with_pairs, pairs, distill_tokens,
  divergence_before / _after / _change (mean nats per distilled token, evaluated over the whole buffer before
  the first and after the last update), reference_searches / reference_policy_tokens (mean over the distinct
  references), student_searches / student_policy_tokens / student_correct (mean over pairs), rollout_searches /
  rollout_policy_tokens / rollout_em (all phase rollouts). With post_trajectories (rollouts of the updated policy
  on the same questions): post_searches / post_policy_tokens / post_em and *_change against the phase rollouts
  of the same questions.
  """
  b = buffer
  ref = b.pair_reference[b.pair_reference >= 0]
  refs = np.unique(ref)
  groups_with_pairs = np.unique(b.traj_group[b.pair_student]) if b.num_pairs else np.zeros((0,), np.int32)
  correct_groups = np.unique(b.traj_group[b.traj_correct == 1])
  m = {
      "questions": float(b.num_questions),
      "questions_with_correct": float(correct_groups.shape[0]),
      "questions_with_pairs": float(groups_with_pairs.shape[0]),
      "pairs": float(b.num_pairs),
      "distill_tokens": float(b.target_offsets[-1]),
      "reference_searches": _mean(b.traj_searches[refs]),
      "reference_policy_tokens": _mean(b.traj_policy_tokens[refs]),
      "student_searches": _mean(b.traj_searches[b.pair_student]),
      "student_policy_tokens": _mean(b.traj_policy_tokens[b.pair_student]),
      "student_correct": _mean(b.traj_correct[b.pair_student]),
      "rollout_searches": _mean(b.traj_searches),
      "rollout_policy_tokens": _mean(b.traj_policy_tokens),
      "rollout_em": _mean(b.traj_correct),
  }
  if divergence_before is not None:
    m["divergence_before"] = float(divergence_before)
  if divergence_after is not None:
    m["divergence_after"] = float(divergence_after)
  if divergence_before is not None and divergence_after is not None:
    m["divergence_change"] = float(divergence_after) - float(divergence_before)
  if post_trajectories is not None:
    index = {q: i for i, q in enumerate(b.question_ids)}
    post = [t for t in post_trajectories if t.question_id in index]
    groups = sorted({index[t.question_id] for t in post})
    pre = np.isin(b.traj_group, groups)
    m["post_questions"] = float(len(groups))
    m["post_searches"] = _mean([t.num_searches for t in post])
    m["post_policy_tokens"] = _mean([t.num_policy_tokens for t in post])
    m["post_em"] = _mean([is_correct(t) for t in post])
    m["searches_change"] = m["post_searches"] - _mean(b.traj_searches[pre])
    m["policy_tokens_change"] = m["post_policy_tokens"] - _mean(b.traj_policy_tokens[pre])
    m["em_change"] = m["post_em"] - _mean(b.traj_correct[pre])
  return m


# ----------------------------------------------------------------------------------------------- steps


def max_updates_per_phase(opts: OfsdOptions) -> int:
  """An upper bound on the optimizer updates of one phase (for the student optimizer's schedule length)."""
  popts = opts.phase
  students = opts.group_size - (1 if popts.context_siblings == "reference" else 0)
  if popts.max_pairs_per_question is not None:
    students = min(students, popts.max_pairs_per_question)
  pairs = opts.questions_per_phase * max(students, 1)
  return popts.epochs * max(1, math.ceil(pairs / popts.batch_size))



def on_policy_sd_fields(trajectories: Sequence[Trajectory], batch: Mapping[str, np.ndarray], tokenizer,
                        opts: OfsdOptions, *, step: int, agg: str, pad_to: int | Sequence[int] | None = None,
                        check_prompt: bool = True) -> dict[str, np.ndarray]:
  """The SD fields of a GRPO batch (rows = `trajectories` in the order of trajectory.to_batch).

  Per question group of the batch: reference and students as in the offline phase; a student row gets the
  teacher layout with the group's context, others get their own ids (teacher_pos = identity) and no distilled
  tokens. sd_weight = ofsd_loss.sd_weights(...) on student rows once step >= ofsd.warmup_steps, else 0.
  Returns teacher_tokens, teacher_attention_mask [B, Tt], teacher_pos, distill_mask [B, T], sd_weight [B].
  """
  popts, dopts, copts = opts.phase, opts.divergence, opts.context
  b, t_len = np.shape(batch["tokens"])
  if len(trajectories) != b:
    raise ValueError(f"on_policy_sd_fields: {len(trajectories)} trajectories for a batch of {b} rows")
  teacher = [t.ids for t in trajectories]
  shifts = [0] * b
  dmask = np.zeros((b, t_len), np.int32)
  active = np.zeros(b, bool)
  rows_of: dict[str, list[int]] = {}
  for r, t in enumerate(trajectories):
    rows_of.setdefault(t.question_id, []).append(r)
  on = step >= dopts.warmup_steps
  for qid, rows in rows_of.items():
    rows = sorted(rows, key=lambda r: trajectories[r].sample_index)
    group = [trajectories[r] for r in rows]
    ref, students, correct = select_group(group, popts)
    if not students:
      continue
    shown = [group[ref]] if ref is not None else group
    block = privileged.context_block(shown, tokenizer, copts, None if ref is not None else correct)
    t_prompt = privileged.teacher_prompt_ids(tokenizer, group[0].question, block, copts)
    for s in students:
      lay = privileged.layout(group[s], t_prompt, tokenizer, copts, block, check_prompt)
      r = rows[s]
      teacher[r] = lay.teacher_ids
      shifts[r] = lay.shift
      dmask[r, :lay.distill_mask.shape[0]] = lay.distill_mask
      active[r] = on
  tt_len = trajectory_lib.bucket_length(max(x.shape[0] for x in teacher), pad_to)
  t_tokens = np.zeros((b, tt_len), np.int32)
  t_att = np.zeros((b, tt_len), np.int32)
  t_pos = np.zeros((b, t_len), np.int32)
  for r, ids in enumerate(teacher):
    t_tokens[r, :ids.shape[0]] = ids
    t_att[r, :ids.shape[0]] = 1
    n = trajectories[r].ids.shape[0]
    p_s = trajectories[r].prompt_ids.shape[0]
    t_pos[r, p_s - 1:n] = np.arange(p_s - 1, n) + shifts[r]
  return {"teacher_tokens": t_tokens, "teacher_attention_mask": t_att, "teacher_pos": t_pos,
          "distill_mask": dmask, "sd_weight": ofsd_loss.sd_weights(batch["loss_mask"], dmask, active, agg)}


def minibatch_sd_weight(batch: Mapping[str, np.ndarray], rows: np.ndarray, agg: str) -> np.ndarray:
  """sd_weight [len(rows)] for one update over `rows` of an on-policy GRPO batch (host arrays loss_mask,
  distill_mask, sd_weight as on_policy_sd_fields gave them for the whole batch).

  Each update divides its GRPO sum by its own rows' denominator, so the SD coefficient of that update is alpha
  only if its sd_weight is N_grpo / N_sd over the same rows; the whole batch's weights would scale it by the
  update's share of distilled tokens over its share of GRPO tokens.
  """
  rows = np.asarray(rows)
  return ofsd_loss.sd_weights(np.asarray(batch["loss_mask"])[rows], np.asarray(batch["distill_mask"])[rows],
                              np.asarray(batch["sd_weight"])[rows] > 0, agg)

