"""OFSD privileged context: the teacher's and the student's token layouts of one (student, reference) pair.

Pure host-side code (numpy + the tokenizer). For a student trajectory and the trajectory (or siblings) shown to
the teacher:

  STUDENT input = the student's own ids, unchanged:      prompt_ids | response (policy turns + observations)
  TEACHER input = a NEW prompt, tokenized from text:      prompt text + privileged block | the SAME response ids

The response ids are copied, never re-tokenized, so both sides score the same tokens. The teacher prompt is the
plain prompt text with a block that shows the reference trajectory, placed by `context_position`:

  'before_question': user text = block + "\\n" + prompt text
  'after_question':  user text = prompt text + "\\n" + block      (the prompt text ends with "\\n")
  'system':          a system message holding the block, then the plain prompt as the user turn (needs a
                     tokenizer with a chat template)

and, with a chat template, the user text becomes the user turn (generation prompt added), exactly as the rollout
builds the plain prompt (`agent.rollout.build_prompt_ids`). The block is `header + "\\n" + body + "\\n"`, body =

  context_format 'full':    the reference's response as text (thinking, searches, answer); its retrieved
                            <information> observations are kept (context_passages=True) or each replaced by
                            `elided_passages`; invalid-action / error observations are kept.
  context_format 'actions': one line per executed search, `<search> q </search>`, then `<answer> a </answer>`.
  context_answer=False:     no answer: 'actions' drops the answer line, 'full' cuts the answering turn at its
                            last `<answer>` tag.
  context_siblings 'all':   every sibling of the group, `Attempt i (CORRECT|INCORRECT):` + its body, under
                            `header_all` (SD-Search's hindsight block).
Special tokens other than the protocol tags (EOS, chat markers) are dropped from the shown text.

Alignment: `teacher_pos[t]` is the teacher index of student index t for t >= P_s - 1 (P_s / P_t = student /
teacher prompt lengths): t + (P_t - P_s); the last prompt token maps to the last teacher prompt token (both
predict the first response token), every response token to the identical teacher token; -1 before that.

Distill mask (per student token, 0/1, always a subset of the policy mask, so retrieved passages never carry loss):
  'policy':       every policy token;
  'query':        the tokens of each search query: tokens overlapping the query text strictly between
                  `<search>` and `</search>` (surrounding whitespace excluded), found per policy turn from char
                  offsets of the decoded turn (works whether or not the tags are single tokens);
  'query_answer': query tokens plus the answer text between `<answer>` and `</answer>`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from searche1_jax import schema
from searche1_jax.agent import actions
from searche1_jax.agent import protocol
from searche1_jax.agent import trajectory as trajectory_lib

Trajectory = trajectory_lib.Trajectory

FORMATS = ("full", "actions")
POSITIONS = ("before_question", "after_question", "system")
SPANS = ("policy", "query", "query_answer")
SIBLINGS = ("reference", "all")

# Default texts of the block (ContextOptions fields; override per experiment).
HEADER_REFERENCE = "A more efficient solution to this question, found earlier:"
HEADER_ALL = "Earlier attempts at this question, each marked CORRECT or INCORRECT:"
ELIDED_PASSAGES = "\n\n<information> [retrieved passages omitted] </information>\n\n"
LABEL_CORRECT, LABEL_INCORRECT = "CORRECT", "INCORRECT"

_NO_QUERY_LIMIT = 1 << 30  # parse_action truncates queries; here only their positions matter


@dataclasses.dataclass(frozen=True)
class ContextOptions:
  """How the teacher's privileged context is built and which student tokens are distilled: the context part of
  the `ofsd` block (configs/parts/ofsd.py), declared once (searche1_jax/schema.py). The text fields are optional
  in a block (context_header, context_header_all, context_elided_passages; default: this module's texts);
  `template` is the protocol template the rollouts used (protocol.template), needed to rebuild the prompt text.
  """
  context_format: str = schema.option("str", "full", choices=FORMATS)
  context_passages: bool = schema.option("bool", True)
  context_answer: bool = schema.option("bool", True)
  context_position: str = schema.option("str", "after_question", choices=POSITIONS)
  context_siblings: str = schema.option("str", "reference", choices=SIBLINGS)
  spans: str = schema.option("str", "policy", choices=SPANS)
  header: str = schema.option("str", HEADER_REFERENCE, optional=True, key="context_header")
  header_all: str = schema.option("str", HEADER_ALL, optional=True, key="context_header_all")
  elided_passages: str = schema.option("str", ELIDED_PASSAGES, optional=True, key="context_elided_passages")
  template: str = protocol.SEARCH_R1_TEMPLATE

  def __post_init__(self):
    schema.check(self, "ofsd")
    if "{question}" not in self.template:
      raise ValueError("ContextOptions.template has no '{question}' placeholder (pass protocol.template)")

  @classmethod
  def from_config(cls, ofsd_block, template: str = protocol.SEARCH_R1_TEMPLATE) -> "ContextOptions":
    return schema.build(cls, ofsd_block, "ofsd", "configs/parts/ofsd.py", template=template)


@dataclasses.dataclass
class PairLayout:
  """Token layout of one distillation pair.

  teacher_ids [Lt] int32: teacher prompt (with the block) + the student's response ids.
  student_ids [Ls] int32: the student's ids (its own prompt + response).
  teacher_pos [Ls] int32: aligned teacher index per student index (-1 before the last prompt token).
  distill_mask [Ls] int8: 1 on student tokens that carry the loss.
  """
  teacher_ids: np.ndarray
  student_ids: np.ndarray
  teacher_pos: np.ndarray
  distill_mask: np.ndarray
  teacher_prompt_len: int
  student_prompt_len: int
  block_text: str

  @property
  def shift(self) -> int:
    """P_t - P_s: the teacher index of a response token minus its student index."""
    return self.teacher_prompt_len - self.student_prompt_len


# ----------------------------------------------------------------------------------------------- text


def _drop_ids(tokenizer) -> set[int]:
  """Special token ids that are not protocol tags (EOS, PAD, chat markers): never shown in a block."""
  special = set(int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []))
  tags = set()
  for tag in protocol.TAGS:
    ids = tokenizer.encode(tag, add_special_tokens=False)
    if len(ids) == 1:
      tags.add(int(ids[0]))
  return special - tags


def decode(tokenizer, ids: Sequence[int]) -> str:
  """Token ids -> text, special tokens kept (tags may be special), no clean-up (exact for byte-level BPE)."""
  return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _decode_shown(tokenizer, ids: Sequence[int], drop: set[int]) -> str:
  return decode(tokenizer, [int(i) for i in ids if int(i) not in drop])


def _response_segments(traj: Trajectory) -> list[tuple[int, int, str, int]]:
  """The response cut at every span boundary: (start, end, 'policy'|'obs'|'gap', span index) in order."""
  p, n = traj.prompt_ids.shape[0], traj.ids.shape[0]
  marks = [(s, e, "policy", i) for i, (s, e) in enumerate(traj.policy_spans) if e > s]
  marks += [(s, e, "obs", i) for i, (s, e) in enumerate(traj.obs_spans) if e > s]
  marks.sort()
  out, pos = [], p
  for s, e, kind, i in marks:
    if s < pos:
      raise ValueError(f"Trajectory(question_id={traj.question_id!r}, sample_index={traj.sample_index}): "
                       f"policy/observation spans overlap at token {s}")
    if s > pos:
      out.append((pos, s, "gap", -1))
    out.append((s, e, kind, i))
    pos = e
  if pos < n:
    out.append((pos, n, "gap", -1))
  return out


def _answer_turn(traj: Trajectory, tokenizer) -> int:
  """Index of the last policy turn whose action is an answer, or -1."""
  for i in range(len(traj.policy_spans) - 1, -1, -1):
    s, e = traj.policy_spans[i]
    if actions.parse_action(decode(tokenizer, traj.ids[s:e]), _NO_QUERY_LIMIT).kind == actions.ANSWER:
      return i
  return -1


def trajectory_body(traj: Trajectory, tokenizer, opts: ContextOptions) -> str:
  """The text shown for one trajectory (module doc: 'full' or 'actions'), stripped of outer whitespace."""
  if opts.context_format == "actions":
    lines = [f"{protocol.SEARCH_OPEN} {q} {protocol.SEARCH_CLOSE}" for q in traj.queries]
    if opts.context_answer and traj.answer is not None:
      lines.append(f"{protocol.ANSWER_OPEN} {traj.answer} {protocol.ANSWER_CLOSE}")
    return "\n".join(lines)
  drop = _drop_ids(tokenizer)
  cut_turn = -1 if opts.context_answer else _answer_turn(traj, tokenizer)
  pieces = []
  for s, e, kind, i in _response_segments(traj):
    if kind == "obs" and not opts.context_passages and traj.obs_kinds[i] == trajectory_lib.OBS_INFORMATION:
      pieces.append(opts.elided_passages)
      continue
    text = _decode_shown(tokenizer, traj.ids[s:e], drop)
    if kind == "policy" and i == cut_turn:
      cut = text.rfind(protocol.ANSWER_OPEN)
      pieces.append(text[:cut] if cut >= 0 else text)
      break  # nothing the policy wrote after its answer is shown
    pieces.append(text)
  return "".join(pieces).strip()


def context_block(shown: Sequence[Trajectory], tokenizer, opts: ContextOptions,
                  correct: Sequence[bool] | None = None) -> str:
  """The privileged block: `header + "\\n" + body + "\\n"`.

  shown: [reference] for context_siblings='reference'; every sibling (in group order) for 'all', with
  `correct` giving each one's label.
  """
  if opts.context_siblings == "reference":
    if len(shown) != 1:
      raise ValueError(f"context_block: context_siblings='reference' shows one trajectory, got {len(shown)}")
    return f"{opts.header}\n{trajectory_body(shown[0], tokenizer, opts)}\n"
  if correct is None or len(correct) != len(shown):
    raise ValueError("context_block: context_siblings='all' needs one correct flag per shown sibling")
  parts = [f"Attempt {j + 1} ({LABEL_CORRECT if ok else LABEL_INCORRECT}):\n{trajectory_body(t, tokenizer, opts)}"
           for j, (t, ok) in enumerate(zip(shown, correct))]
  return f"{opts.header_all}\n" + "\n".join(parts) + "\n"


def teacher_prompt_ids(tokenizer, question: str, block: str, opts: ContextOptions) -> list[int]:
  """The teacher's prompt ids: the plain prompt text with `block` placed at opts.context_position."""
  prompt_text = protocol.make_prompt(question, opts.template)
  if opts.context_position == "system":
    return protocol.encode_prompt(tokenizer, prompt_text, system_text=block)
  if opts.context_position == "before_question":
    return protocol.encode_prompt(tokenizer, block + "\n" + prompt_text)
  return protocol.encode_prompt(tokenizer, prompt_text + "\n" + block)


# ----------------------------------------------------------------------------------------------- distill mask


class _CharOffsets:
  """c(j) = number of characters of decode(ids) covered by the first j tokens (memoized, monotone in j).

  Computed as the common-prefix length of decode(ids[:j]) and decode(ids), so a token that ends inside a
  multi-byte character (decoded as U+FFFD) covers none of it; the token that completes it covers it all.
  """

  def __init__(self, tokenizer, ids: np.ndarray):
    self.tokenizer, self.ids = tokenizer, [int(i) for i in ids]
    self.text = decode(tokenizer, self.ids)
    self.memo = {0: 0, len(self.ids): len(self.text)}

  def __call__(self, j: int) -> int:
    if j not in self.memo:
      prefix = decode(self.tokenizer, self.ids[:j])
      if self.text.startswith(prefix):
        n = len(prefix)
      else:
        n = 0
        for a, b in zip(prefix, self.text):
          if a != b:
            break
          n += 1
      self.memo[j] = n
    return self.memo[j]


def _first(lo: int, hi: int, pred: Callable[[int], bool]) -> int:
  """Smallest j in [lo, hi) with pred(j) (pred monotone False..True), or hi."""
  while lo < hi:
    mid = (lo + hi) // 2
    if pred(mid):
      hi = mid
    else:
      lo = mid + 1
  return lo


def tokens_in_char_range(offsets: _CharOffsets, qs: int, qe: int) -> tuple[int, int]:
  """Half-open token range [j0, j1) of the tokens whose characters overlap [qs, qe) (qs < qe).

  Token j covers [c(j), c(j+1)); tokens covering no character (a multi-byte character's leading bytes)
  directly before the first overlapping token are included too.
  """
  n = len(offsets.ids)
  j0 = _first(0, n, lambda j: offsets(j + 1) > qs)
  while j0 > 0 and offsets(j0 - 1) == offsets(j0) and offsets(j0) >= qs:
    j0 -= 1
  j1 = _first(j0, n, lambda j: offsets(j) >= qe)
  return j0, j1


def _content_range(text: str, end: int, open_tag: str, close_tag: str) -> tuple[int, int]:
  """The stripped content of the tag pair closing at `end` (exclusive) in text: (start, stop) char offsets."""
  stop = end - len(close_tag)
  start = text.rfind(open_tag, 0, stop) + len(open_tag)
  while start < stop and text[start].isspace():
    start += 1
  while stop > start and text[stop - 1].isspace():
    stop -= 1
  return start, stop


def distill_mask(traj: Trajectory, tokenizer, spans: str = "policy") -> np.ndarray:
  """[len(traj.ids)] int8: which of the trajectory's tokens carry the distillation loss (module doc)."""
  if spans not in SPANS:
    raise ValueError(f"ofsd.spans={spans!r}, expected one of {SPANS}")
  policy = (traj.policy_mask == 1)
  if spans == "policy":
    return policy.astype(np.int8)
  mask = np.zeros(traj.ids.shape[0], np.int8)
  for s, e in traj.policy_spans:
    if e <= s:
      continue
    offsets = _CharOffsets(tokenizer, traj.ids[s:e])
    action = actions.parse_action(offsets.text, _NO_QUERY_LIMIT)
    if action.kind == actions.SEARCH:
      tags = (protocol.SEARCH_OPEN, protocol.SEARCH_CLOSE)
    elif action.kind == actions.ANSWER and spans == "query_answer":
      tags = (protocol.ANSWER_OPEN, protocol.ANSWER_CLOSE)
    else:
      continue
    qs, qe = _content_range(offsets.text, action.end, *tags)
    if qs >= qe:
      continue
    j0, j1 = tokens_in_char_range(offsets, qs, qe)
    mask[s + j0:s + j1] = 1
  return (mask.astype(bool) & policy).astype(np.int8)


# ----------------------------------------------------------------------------------------------- layouts


def plain_prompt_ids(tokenizer, question: str, opts: ContextOptions) -> list[int]:
  """The student's prompt as the rollout builds it (to check a trajectory against the tokenizer/template)."""
  return protocol.encode_prompt(tokenizer, protocol.make_prompt(question, opts.template))


def check_student_prompt(student: Trajectory, tokenizer, opts: ContextOptions) -> None:
  """Raise unless student.prompt_ids equal the plain prompt rebuilt with this tokenizer and template: the teacher
  prompt is built the same way, so a mismatch means a wrong tokenizer or protocol.template."""
  want = plain_prompt_ids(tokenizer, student.question, opts)
  if want != student.prompt_ids.tolist():
    raise ValueError(
        f"Trajectory(question_id={student.question_id!r}, sample_index={student.sample_index}): prompt_ids "
        f"({len(student.prompt_ids)} tokens) differ from the prompt rebuilt from its question with this tokenizer "
        f"and template ({len(want)} tokens); pass the protocol.template the rollouts used")


def layout(student: Trajectory, teacher_prompt: Sequence[int], tokenizer, opts: ContextOptions,
           block_text: str = "", check_prompt: bool = True) -> PairLayout:
  """The pair's layout given the teacher's prompt ids (shared by every student of a group)."""
  if check_prompt:
    check_student_prompt(student, tokenizer, opts)
  p_s = student.prompt_ids.shape[0]
  p_t = len(teacher_prompt)
  if p_t < 1:
    raise ValueError("layout: empty teacher prompt")
  response = student.ids[p_s:]
  teacher_ids = np.concatenate([np.asarray(teacher_prompt, np.int32), response]).astype(np.int32)
  n = student.ids.shape[0]
  teacher_pos = np.full(n, -1, np.int32)
  teacher_pos[p_s - 1:] = np.arange(p_s - 1, n, dtype=np.int32) + (p_t - p_s)
  return PairLayout(teacher_ids=teacher_ids, student_ids=student.ids.astype(np.int32).copy(),
                    teacher_pos=teacher_pos, distill_mask=distill_mask(student, tokenizer, opts.spans),
                    teacher_prompt_len=p_t, student_prompt_len=p_s, block_text=block_text)


def build_pair(student: Trajectory, shown: Trajectory | Sequence[Trajectory], tokenizer, opts: ContextOptions,
               correct: Sequence[bool] | None = None, check_prompt: bool = True) -> PairLayout:
  """One pair's layout: the teacher sees `shown` (the reference, or all siblings with their `correct` flags)."""
  shown = [shown] if isinstance(shown, Trajectory) else list(shown)
  for t in shown:
    if t.question_id != student.question_id:
      raise ValueError(f"build_pair: the shown trajectory is for question {t.question_id!r}, the student for "
                       f"{student.question_id!r}")
  block = context_block(shown, tokenizer, opts, correct)
  return layout(student, teacher_prompt_ids(tokenizer, student.question, block, opts), tokenizer, opts, block,
                check_prompt)


def pair_summary(pair: PairLayout, tokenizer) -> dict[str, Any]:
  """Human-readable view of a pair (for the trajectory inspector and logs)."""
  p_t = pair.teacher_prompt_len
  return {"teacher_prompt": decode(tokenizer, pair.teacher_ids[:p_t]),
          "response": decode(tokenizer, pair.teacher_ids[p_t:]),
          "distilled": decode(tokenizer, pair.student_ids[pair.distill_mask == 1]),
          "distill_tokens": int(pair.distill_mask.sum())}
