"""The trajectory record of one multi-turn rollout, its JSONL form, and the train-step batch built from many.

Token layout of `ids` (never re-tokenized: exactly what the sampler produced or the rollout spliced in):

  prompt | turn 1 (policy) | observation 1 | turn 2 (policy) | observation 2 | ... | last turn (policy)

`policy_mask[t]` is 1 on tokens the policy sampled and 0 on the prompt, retrieved passages, the invalid-action
message, retrieval-error text and any other glue; `logprobs[t]` is the sampler's log-prob (temperature 1) of
`ids[t]` where the mask is 1, else 0. Spans are half-open `[start, end)` token offsets into `ids`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Sequence

import numpy as np

# Observation kinds (what was spliced in after a turn).
OBS_INFORMATION = "information"  # formatted retrieved passages
OBS_INVALID = "invalid"  # the invalid-action message
OBS_ERROR = "error"  # retrieval failed after all retries: the error text
OBS_KINDS = (OBS_INFORMATION, OBS_INVALID, OBS_ERROR)

# Why a trajectory ended.
STOP_ANSWER = "answer"  # a turn produced a complete answer
STOP_MAX_TURNS = "max_turns"  # the final (non-searching) turn produced no answer
STOP_LENGTH = "length"  # the total length limit (protocol.max_prompt_length) was reached
STOP_REASONS = (STOP_ANSWER, STOP_MAX_TURNS, STOP_LENGTH)


@dataclasses.dataclass
class Trajectory:
  """One rollout of one question.

  Arrays (length L = len(ids)): ids int32, policy_mask int8 (0/1), logprobs float32.
  policy_spans: one [start, end) per turn, the policy's tokens of that turn (len = number of turns).
  obs_spans / obs_kinds: one [start, end) and kind per observation spliced in (len = number of observations).
  turn_actions: per turn 'search' | 'answer' | 'invalid' (see agent.actions).
  queries: the executed search queries in order (after stripping / truncation).
  num_searches: searches executed (sent to the retriever, failed ones included); a search in the final turn is
    not executed and not counted (Search-R1 runs it with do_search=False).
  answer: the answer text of the answering turn, None if the trajectory ended without one.
  stop_reason: one of STOP_REASONS.
  reward: the scalar reward (EM by default); None until scored.
  sample_index: which of the G group samples of this question (0-based).
  """
  question_id: str
  question: str
  golden_answers: list[str]
  prompt_ids: np.ndarray
  ids: np.ndarray
  policy_mask: np.ndarray
  logprobs: np.ndarray
  policy_spans: list[tuple[int, int]] = dataclasses.field(default_factory=list)
  obs_spans: list[tuple[int, int]] = dataclasses.field(default_factory=list)
  obs_kinds: list[str] = dataclasses.field(default_factory=list)
  turn_actions: list[str] = dataclasses.field(default_factory=list)
  queries: list[str] = dataclasses.field(default_factory=list)
  num_searches: int = 0
  answer: str | None = None
  stop_reason: str = ""
  policy_version: int = 0
  reward: float | None = None
  sample_index: int = 0
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self.prompt_ids = np.asarray(self.prompt_ids, dtype=np.int32).reshape(-1)
    self.ids = np.asarray(self.ids, dtype=np.int32).reshape(-1)
    self.policy_mask = np.asarray(self.policy_mask, dtype=np.int8).reshape(-1)
    self.logprobs = np.asarray(self.logprobs, dtype=np.float32).reshape(-1)
    self.policy_spans = [tuple(int(x) for x in s) for s in self.policy_spans]
    self.obs_spans = [tuple(int(x) for x in s) for s in self.obs_spans]
    self.validate()

  def validate(self) -> None:
    """Raises ValueError naming the question and the field when the record is inconsistent."""
    where = f"Trajectory(question_id={self.question_id!r}, sample_index={self.sample_index})"
    n = self.ids.shape[0]
    for name in ("policy_mask", "logprobs"):
      if getattr(self, name).shape[0] != n:
        raise ValueError(f"{where}: {name} has length {getattr(self, name).shape[0]}, ids has {n}")
    p = self.prompt_ids.shape[0]
    if p > n or not np.array_equal(self.ids[:p], self.prompt_ids):
      raise ValueError(f"{where}: ids does not start with prompt_ids")
    if np.any(self.policy_mask[:p]):
      raise ValueError(f"{where}: policy_mask is nonzero on the prompt")
    if not np.all((self.policy_mask == 0) | (self.policy_mask == 1)):
      raise ValueError(f"{where}: policy_mask must be 0/1")
    if np.any(self.logprobs[self.policy_mask == 0] != 0):
      raise ValueError(f"{where}: logprobs must be 0 where policy_mask is 0")
    if len(self.obs_kinds) != len(self.obs_spans):
      raise ValueError(f"{where}: {len(self.obs_kinds)} obs_kinds for {len(self.obs_spans)} obs_spans")
    for kind in self.obs_kinds:
      if kind not in OBS_KINDS:
        raise ValueError(f"{where}: obs_kinds has {kind!r}, expected one of {OBS_KINDS}")
    if self.stop_reason and self.stop_reason not in STOP_REASONS:
      raise ValueError(f"{where}: stop_reason={self.stop_reason!r}, expected one of {STOP_REASONS}")
    for name in ("policy_spans", "obs_spans"):
      for s, e in getattr(self, name):
        if not p <= s <= e <= n:
          raise ValueError(f"{where}: {name} has span [{s}, {e}) outside the response [{p}, {n})")

  # Derived views.
  @property
  def response_ids(self) -> np.ndarray:
    return self.ids[self.prompt_ids.shape[0]:]

  @property
  def num_policy_tokens(self) -> int:
    return int(self.policy_mask.sum())

  @property
  def num_turns(self) -> int:
    return len(self.policy_spans)

  @property
  def num_invalid(self) -> int:
    return sum(a == "invalid" for a in self.turn_actions)

  # JSONL.
  def to_json(self, decode: Callable[[Sequence[int]], str] | None = None) -> dict[str, Any]:
    """A JSON-able dict. With `decode` (token ids -> text), adds 'prompt_text', 'response_text' and per-turn
    'turn_texts' / 'obs_texts' for inspection; `from_json` ignores them (ids are the record)."""
    d = {
        "question_id": self.question_id, "question": self.question, "golden_answers": list(self.golden_answers),
        "sample_index": self.sample_index, "policy_version": self.policy_version,
        "prompt_ids": self.prompt_ids.tolist(), "ids": self.ids.tolist(),
        "policy_mask": self.policy_mask.tolist(), "logprobs": self.logprobs.tolist(),
        "policy_spans": [list(s) for s in self.policy_spans], "obs_spans": [list(s) for s in self.obs_spans],
        "obs_kinds": list(self.obs_kinds), "turn_actions": list(self.turn_actions), "queries": list(self.queries),
        "num_searches": self.num_searches, "answer": self.answer, "stop_reason": self.stop_reason,
        "reward": self.reward, "metadata": self.metadata,
    }
    if decode is not None:
      d["prompt_text"] = decode(self.prompt_ids.tolist())
      d["response_text"] = decode(self.response_ids.tolist())
      d["turn_texts"] = [decode(self.ids[s:e].tolist()) for s, e in self.policy_spans]
      d["obs_texts"] = [decode(self.ids[s:e].tolist()) for s, e in self.obs_spans]
    return d

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "Trajectory":
    fields = {f.name for f in dataclasses.fields(cls)}
    missing = sorted(f for f in ("question_id", "prompt_ids", "ids", "policy_mask", "logprobs") if f not in d)
    if missing:
      raise ValueError(f"trajectory record is missing field(s) {missing}")
    return cls(**{k: v for k, v in d.items() if k in fields})


def save_jsonl(trajs: Iterable[Trajectory], path: str, decode: Callable[[Sequence[int]], str] | None = None,
               append: bool = False) -> int:
  """Writes one JSON object per line (see `Trajectory.to_json`). Returns the number written."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  n = 0
  with open(path, "a" if append else "w", encoding="utf-8") as f:
    for t in trajs:
      f.write(json.dumps(t.to_json(decode), ensure_ascii=False) + "\n")
      n += 1
  return n


def load_jsonl(path: str) -> list[Trajectory]:
  """Reads `save_jsonl` output; a malformed line is an error naming path:line."""
  out = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        out.append(Trajectory.from_json(json.loads(line)))
      except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}:{lineno}: bad trajectory record: {e}") from e
  return out


# Train-step batch.
def bucket_length(n: int, pad_to: int | Sequence[int] | None = None) -> int:
  """The padded length for a longest sequence of n tokens.

  pad_to: None -> the next power of two >= n; an int -> exactly that (must be >= n); a list -> its smallest entry
  >= n. Bounded choices keep the number of train-step compilations bounded.
  """
  if n < 1:
    raise ValueError(f"bucket_length: n must be >= 1, got {n}")
  if pad_to is None:
    return 1 << (n - 1).bit_length()
  if isinstance(pad_to, (int, np.integer)):
    if pad_to < n:
      raise ValueError(f"to_batch: pad_to={pad_to} is shorter than the longest trajectory ({n} tokens)")
    return int(pad_to)
  fits = sorted(int(b) for b in pad_to if int(b) >= n)
  if not fits:
    raise ValueError(f"to_batch: no bucket in pad_to={list(pad_to)} holds the longest trajectory ({n} tokens)")
  return fits[0]


def packed_targets(loss_mask: np.ndarray, minimum: int = 64) -> dict[str, np.ndarray]:
  """Host side: the scored target positions of a train batch, packed to the left of each row.

  loss_mask: [B, T] aligned with tokens (the targets are tokens[:, 1:] under loss_mask[:, 1:]).
  Returns target_index [B, K] int32 (positions in [0, T-1) where loss_mask[:, 1:] is 1, in order, then 0s)
  and target_valid [B, K] int32 (1 on real entries); K = the most in any row, rounded up to a power of two
  >= `minimum` (few compiled shapes). Passing both to `rl.logprobs.token_logprobs` (the train steps read them
  from the batch) gives the same log-probs as without, while projecting only K instead of T - 1 positions per
  row.
  """
  m = np.asarray(loss_mask)[:, 1:] != 0
  counts = m.sum(axis=1)
  k = max(1 << max(int(counts.max(initial=0)) - 1, 0).bit_length(), minimum)
  index = np.zeros((m.shape[0], k), np.int32)
  valid = np.zeros((m.shape[0], k), np.int32)
  for r in range(m.shape[0]):
    pos = np.flatnonzero(m[r])
    index[r, :len(pos)] = pos
    valid[r, :len(pos)] = 1
  return {"target_index": index, "target_valid": valid}


def to_batch(trajs: Sequence[Trajectory], advantages, pad_to: int | Sequence[int] | None = None,
             pad_id: int = 0) -> dict[str, np.ndarray]:
  """The train-step batch (see searche1_jax/train/steps.py), all aligned with `tokens`:

    tokens         [B, T] int32   prompt + response, right-padded with pad_id
    attention_mask [B, T] int32   1 on real tokens
    loss_mask      [B, T] int32   policy_mask (1 on policy tokens), 0 on padding
    old_logprobs   [B, T] float32 sampler log-prob of tokens[b, t], 0 where loss_mask is 0
    advantages     [B]    float32
    target_index, target_valid [B, K] int32  the scored positions (packed_targets)
  The step scores targets tokens[:, 1:] from inputs tokens[:, :-1] with loss_mask[:, 1:]. T = bucket_length.
  """
  if not trajs:
    raise ValueError("to_batch: no trajectories")
  adv = np.asarray(advantages, dtype=np.float32).reshape(-1)
  if adv.shape[0] != len(trajs):
    raise ValueError(f"to_batch: {adv.shape[0]} advantages for {len(trajs)} trajectories")
  t_len = bucket_length(max(t.ids.shape[0] for t in trajs), pad_to)
  b = len(trajs)
  tokens = np.full((b, t_len), pad_id, dtype=np.int32)
  attention_mask = np.zeros((b, t_len), dtype=np.int32)
  loss_mask = np.zeros((b, t_len), dtype=np.int32)
  old_logprobs = np.zeros((b, t_len), dtype=np.float32)
  for i, t in enumerate(trajs):
    n = t.ids.shape[0]
    tokens[i, :n] = t.ids
    attention_mask[i, :n] = 1
    loss_mask[i, :n] = t.policy_mask
    old_logprobs[i, :n] = np.where(t.policy_mask == 1, t.logprobs, 0.0)
  return {"tokens": tokens, "attention_mask": attention_mask, "loss_mask": loss_mask,
          "old_logprobs": old_logprobs, "advantages": adv, **packed_targets(loss_mask)}
