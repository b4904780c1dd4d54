"""The multi-turn search-agent rollout loop (Search-R1 protocol), run on the host around a decoding session.

One call rolls out a batch of questions, G samples each (group sampling: work item w = q * G + g is sample g of
question q, and the trajectories come out group-contiguous in that order). A work item's life, turn by turn:

1. It decodes a turn (`session.begin`, then `session.step` chunks) until `</search>`, `</answer>`, EOS, the
   per-turn token limit (protocol.max_response_length) or the total length limit (protocol.max_prompt_length).
2. The turn's text is parsed (`agent.actions.parse_action`):
   - answer -> the trajectory ends (stop_reason 'answer');
   - search -> its query goes to `retriever.retrieve(queries, topk)`, batched with the other searches that ended
     at the same time; the passages are formatted (`protocol.format_observation`), tokenized, truncated to
     protocol.max_obs_length TOKENS and spliced in with `session.extend` (no prefix recompute);
   - neither -> the invalid-action message is spliced in.
3. After protocol.max_turns searching turns comes one final turn without search. As in Search-R1
   (`generation.py`, final rollout with `do_search=False`), a search in the final turn is not executed and nothing is
   appended; the trajectory ends (stop_reason 'max_turns') like one with an invalid final turn.

How work items share the decode batch is `rollout.schedule`:
  'sync'        Search-R1's loop: waves of whole question groups (rollout.decode_slots rows); in a wave every live
                item decodes its turn, then ONE retriever call serves every search of the turn, then all extends.
  'continuous'  rollout.decode_slots items decode at once, each on its own turns; a finished item's slot goes to
                the next waiting one, and retrieval runs on a worker thread while the others keep decoding (see
                `_run_continuous`).
Both give the same trajectories for one seed: the sampler keys its draws by (seed, work item, position), and a
trajectory depends only on its own tokens.

A retriever failure is retried with exponential backoff (rollout.retrieval_retries / retrieval_backoff_s); if it
still fails, every search of that batch gets the rollout.retrieval_error_message observation and the rollout goes
on. Time in decoding, splicing and retrieval, and how full the decode slots were, come back in `RolloutStats`.

The session is anything with the `DecodeSession` methods: the real sampler (`searche1_jax.sampling.Session`, see
`sampler_session_factory`) or a scripted stand-in in tests.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import time
from typing import Any, Callable, Mapping, Protocol, Sequence

from searche1_jax import rewards
from searche1_jax import sampling
from searche1_jax.agent import actions
from searche1_jax.agent import protocol
from searche1_jax.agent import trajectory as trajectory_lib

Trajectory = trajectory_lib.Trajectory


class DecodeSession(Protocol):
  """The part of the sampler's stateful session that the rollout loop uses (`searche1_jax.sampling.Session`).

  begin(indices, max_new_tokens, stop_sequences) starts a turn for those sequences (stop_sequences: a
    sampling.stops.StopAutomaton of the protocol's stop strings).
  step(exit_stopped=None) decodes one chunk for every sequence in a turn (ending it early once `exit_stopped`
    turns ended, if given) and returns an object with per-sequence-index lists `tokens[i]`, `logprobs[i]`
    (temperature-1 log-prob of each new token) and `stop_reason[i]` (not None once sequence i's turn ended in this
    chunk).
  extend({i: token_ids}) appends external tokens to sequence i between its turns (its prefix is not recomputed).
  finish([i, ...]) marks sequences done; they no longer decode.
  admit(prompts) adds sequences (prefilled) and returns their indices, numbered after the existing ones.
  """

  def begin(self, indices: Sequence[int], max_new_tokens: int, stop_sequences: Any = ()) -> None:
    ...

  def step(self, exit_stopped: int | None = None) -> Any:
    ...

  def extend(self, tokens: Mapping[int, Sequence[int]]) -> None:
    ...

  def finish(self, indices: Sequence[int]) -> None:
    ...

  def admit(self, prompts: Sequence[Sequence[int]]) -> list[int]:
    ...


# make_session(prompts, max_len) -> DecodeSession; max_len is the total length limit of one sequence in tokens.
SessionFactory = Callable[[list[list[int]], int], DecodeSession]


def sampler_session_factory(params, model_cfg, *, temperature: float, top_p: float = 1.0, top_k: int = 0,
                            eos_ids: Sequence[int] = (), seed: int = 0, mesh=None, rules=None,
                            options=None) -> SessionFactory:
  """A SessionFactory over the real sampler (`searche1_jax.sampling.Session`).

  Each session made (one per `run_rollouts` call) gets seed, seed + 1, ... so successive rollout batches sample
  independently.
  options: a `configs/parts/sampling.py` block (engine buckets / chunking) or None for the sampler's defaults.
  """
  calls = [0]

  def make(prompts: list[list[int]], max_len: int) -> DecodeSession:
    kw = {} if rules is None else {"rules": rules}
    sess = sampling.Session(params, model_cfg, prompts, max_len=max_len, temperature=temperature, top_p=top_p,
                            top_k=top_k, eos_ids=list(eos_ids), seed=seed + calls[0], mesh=mesh,
                            options=options, **kw)
    calls[0] += 1
    return sess

  return make


@dataclasses.dataclass
class RolloutStats:
  """Counters and timings of one `run_rollouts` call (seconds are wall-clock on the host)."""
  num_trajectories: int = 0
  num_turns: int = 0  # policy turns, summed over the trajectories
  decode_chunks: int = 0  # session.step calls
  decode_tokens: int = 0  # tokens decoded (policy tokens, including any cut by the total length limit)
  slot_steps: int = 0  # decode steps run x decode slots: occupancy = decode_tokens / slot_steps
  session_s: float = 0.0  # creating the session and admitting work items (prefill of the prompts)
  decode_s: float = 0.0
  extend_s: float = 0.0  # splicing observations into the session
  retrieval_s: float = 0.0  # the rollout waiting on the retriever (sync: every call; continuous: what overlap missed)
  retrieval_busy_s: float = 0.0  # retriever calls including retries and backoff, overlapped or not
  total_s: float = 0.0
  retrieval_calls: int = 0  # batched calls that returned results
  retrieval_attempts: int = 0  # including failed ones
  retrieval_failures: int = 0  # batches that failed after all retries
  num_queries: int = 0
  num_invalid_turns: int = 0

  @property
  def occupancy(self) -> float:
    """Fraction of the decode slots' steps that produced a token (1.0 = the batch was always full)."""
    return self.decode_tokens / self.slot_steps if self.slot_steps else 0.0

  def as_dict(self) -> dict[str, float]:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class RolloutResult:
  trajectories: list[Trajectory]
  stats: RolloutStats


def build_prompt_ids(tokenizer, question: str, template: str) -> list[int]:
  """The prompt ids of one question: `protocol.encode_prompt` of `protocol.make_prompt(question, template)`."""
  return protocol.encode_prompt(tokenizer, protocol.make_prompt(question, template))


def _cfg_value(cfg, name: str, block: str):
  try:
    return cfg[name]
  except (KeyError, AttributeError) as e:
    raise KeyError(f"config block '{block}' has no field '{name}' (see configs/parts/{block}.py)") from e


def _decode_text(tokenizer, ids: Sequence[int]) -> str:
  # Tags may be special tokens (demo tokenizer): keep them in the text the parser sees.
  return tokenizer.decode(list(ids), skip_special_tokens=False)


def _retrieve_with_retries(retriever, queries: list[str], topk: int, rollout_cfg, stats: RolloutStats,
                           sleep: Callable[[float], None]):
  """Returns (list of passage lists, None) or (None, error text) after all retries failed."""
  retries = int(_cfg_value(rollout_cfg, "retrieval_retries", "rollout"))
  delay = float(_cfg_value(rollout_cfg, "retrieval_backoff_s", "rollout"))
  max_delay = float(_cfg_value(rollout_cfg, "retrieval_backoff_max_s", "rollout"))
  error = ""
  for attempt in range(retries + 1):
    if attempt:
      sleep(min(delay * 2 ** (attempt - 1), max_delay))
    stats.retrieval_attempts += 1
    try:
      results = retriever.retrieve(queries, topk)
      if not isinstance(results, (list, tuple)) or len(results) != len(queries):
        n = len(results) if isinstance(results, (list, tuple)) else type(results).__name__
        raise ValueError(f"retriever returned {n} result lists for {len(queries)} queries")
      stats.retrieval_calls += 1
      return [list(r)[:topk] for r in results], None
    except Exception as e:  # noqa: BLE001  any retriever failure is retried, then reported, never fatal
      error = f"{type(e).__name__}: {e}"
      logging.warning("retrieval attempt %d/%d for %d queries failed: %s", attempt + 1, retries + 1, len(queries),
                      error)
  stats.retrieval_failures += 1
  return None, error


def _passage_contents(p) -> Any:
  # searche1_jax.retrieval.Passage -> its wiki-18 contents; dicts / strings go to format_observation as they are.
  contents = getattr(p, "contents", None)
  return contents if isinstance(contents, str) else p


def default_reward(traj: Trajectory) -> float:
  """Search-R1 EM reward: EM of the answer of the answering turn (the last complete `<answer>` the policy wrote),
  0 without one."""
  return float(rewards.exact_match(traj.answer, traj.golden_answers))


SCHEDULES = ("sync", "continuous")


@dataclasses.dataclass(frozen=True)
class _Cfg:
  """The protocol and rollout fields the loop reads, checked once per call."""
  max_turns: int
  topk: int
  max_obs: int
  max_turn_tokens: int
  max_start: int
  max_total: int
  template: str
  max_query_chars: int
  parse: str  # protocol.parse: actions.PARSE_MODES
  keep_quotes: bool
  strip_docs: bool
  schedule: str
  slots: int  # work items decoding at once (sync: a wave)
  exit_stopped: int  # continuous: a decode chunk ends once this many turns ended in it
  stop_automaton: Any
  answer_cut: Any  # parse 'search_r1': automaton of the answer's closing tag (the turn is cut after it), else None
  invalid_ids: list
  error_ids: list
  rollout_cfg: Any

  @classmethod
  def read(cls, protocol_cfg, rollout_cfg, tokenizer, group_size: int, n: int) -> "_Cfg":
    v = {k: int(_cfg_value(protocol_cfg, f, "protocol")) for k, f in (
        ("max_turns", "max_turns"), ("topk", "topk"), ("max_obs", "max_obs_length"),
        ("max_turn_tokens", "max_response_length"), ("max_start", "max_start_length"),
        ("max_total", "max_prompt_length"))}
    if v["max_turns"] < 0 or v["topk"] < 1 or v["max_obs"] < 0 or v["max_turn_tokens"] < 1:
      raise ValueError(f"protocol config: need max_turns >= 0, topk >= 1, max_obs_length >= 0, "
                       f"max_response_length >= 1; got {v['max_turns']}, {v['topk']}, {v['max_obs']}, "
                       f"{v['max_turn_tokens']}")
    schedule = str(_cfg_value(rollout_cfg, "schedule", "rollout"))
    if schedule not in SCHEDULES:
      raise ValueError(f"rollout.schedule must be one of {SCHEDULES}, got {schedule!r}")
    slots = int(_cfg_value(rollout_cfg, "decode_slots", "rollout"))
    if slots <= 0:
      slots = n
    elif schedule == "sync":  # waves of whole question groups
      slots = max(1, slots // group_size) * group_size
    refill = float(_cfg_value(rollout_cfg, "refill_fraction", "rollout"))
    if not 0 < refill <= 1:
      raise ValueError(f"rollout.refill_fraction must be in (0, 1], got {refill!r}")
    parse = str(_cfg_value(protocol_cfg, "parse", "protocol"))
    if parse not in actions.PARSE_MODES:
      raise ValueError(f"protocol.parse must be one of {actions.PARSE_MODES}, got {parse!r}")
    # Search-R1 generates a turn without stop strings and keeps it up to the first '</search>', else up to the first
    # '</answer>': so 'search_r1' decodes up to '</search>' only, and a turn without one is cut after its first
    # '</answer>' (parse_action then reads what Search-R1 reads, e.g. an <answer> inside a <search>).
    decode_stops = list(_cfg_value(protocol_cfg, "stop_strings", "protocol"))
    cut = parse == "search_r1" and protocol.ANSWER_CLOSE in decode_stops
    if cut:
      decode_stops.remove(protocol.ANSWER_CLOSE)
    invalid_msg = _cfg_value(protocol_cfg, "invalid_action_message", "protocol")
    error_msg = _cfg_value(rollout_cfg, "retrieval_error_message", "rollout")
    return cls(
        **v, template=_cfg_value(protocol_cfg, "template", "protocol"),
        max_query_chars=int(_cfg_value(rollout_cfg, "max_query_chars", "rollout")), parse=parse,
        keep_quotes=bool(_cfg_value(protocol_cfg, "obs_keep_title_quotes", "protocol")),
        strip_docs=bool(_cfg_value(protocol_cfg, "obs_strip_docs", "protocol")), schedule=schedule, slots=slots,
        exit_stopped=max(1, math.ceil(refill * min(slots, n))),
        # A turn ends on the token whose text completes a stop string, however the model tokenized it.
        stop_automaton=sampling.stops.for_tokenizer(tokenizer, decode_stops),
        answer_cut=sampling.stops.for_tokenizer(tokenizer, [protocol.ANSWER_CLOSE]) if cut else None,
        invalid_ids=list(tokenizer.encode(invalid_msg, add_special_tokens=False)),
        error_ids=list(tokenizer.encode(error_msg, add_special_tokens=False))[:v["max_obs"]],
        rollout_cfg=rollout_cfg)


class _State:
  """Mutable per-trajectory bookkeeping while the rollout runs."""

  def __init__(self, prompt: list[int]):
    self.prompt = prompt
    self.ids = list(prompt)
    self.mask = [0] * len(prompt)
    self.logprobs = [0.0] * len(prompt)
    self.policy_spans, self.obs_spans, self.obs_kinds = [], [], []
    self.turn_actions, self.queries, self.errors = [], [], []
    self.truncated_queries = 0
    self.num_searches = 0
    self.answer = None
    self.stop_reason = ""
    self.done = False

  def add_policy(self, toks: Sequence[int], lps: Sequence[float]):
    s = len(self.ids)
    self.ids.extend(int(t) for t in toks)
    self.mask.extend([1] * len(toks))
    self.logprobs.extend(float(x) for x in lps)
    self.policy_spans.append((s, len(self.ids)))

  def add_obs(self, toks: Sequence[int], kind: str):
    s = len(self.ids)
    self.ids.extend(int(t) for t in toks)
    self.mask.extend([0] * len(toks))
    self.logprobs.extend([0.0] * len(toks))
    self.obs_spans.append((s, len(self.ids)))
    self.obs_kinds.append(kind)


class _Loop:
  """One rollout's host-side state: the work items (question x sample), their turns, observations and stats."""

  def __init__(self, session_factory, prompts, cfg: "_Cfg", tokenizer, retriever, stats, sleep):
    self.prompts, self.cfg, self.tok, self.retriever, self.stats, self.sleep = prompts, cfg, tokenizer, retriever, \
        stats, sleep
    self.states = [_State(p) for p in prompts]
    self.turns = [0] * len(prompts)  # decode turns each work item has begun
    self.decoding: set[int] = set()  # work items in a turn
    self.turn_toks: dict[int, list[int]] = {}  # the tokens and log-probs of each item's current / ended turn
    self.turn_lps: dict[int, list[float]] = {}
    self.admitted = 0
    self.make_session = session_factory
    self.session = None

  # -- the session side

  def admit(self, count: int) -> None:
    """The next `count` work items enter the session (the first call creates it) and begin their first turn."""
    idx = list(range(self.admitted, min(self.admitted + count, len(self.prompts))))
    if not idx:
      return
    t0 = time.perf_counter()
    new = [list(self.prompts[i]) for i in idx]
    if self.session is None:
      self.session = self.make_session(new, self.cfg.max_total)
      got = idx
    else:
      got = list(self.session.admit(new))
    self.stats.session_s += time.perf_counter() - t0
    if got != idx:
      raise RuntimeError(f"session numbered admitted work items {got}, expected {idx}")
    self.admitted = idx[-1] + 1
    self.begin(idx)

  def begin(self, indices: list[int]) -> None:
    if indices:
      self.session.begin(indices, self.cfg.max_turn_tokens, self.cfg.stop_automaton)
      for i in indices:
        self.turn_toks[i], self.turn_lps[i] = [], []
        self.turns[i] += 1
      self.decoding.update(indices)

  def step(self, exit_stopped: int | None = None) -> list[int]:
    """One decode chunk; returns the work items whose turn ended in it (in index order)."""
    t0 = time.perf_counter()
    out = self.session.step(exit_stopped=exit_stopped)
    self.stats.decode_s += time.perf_counter() - t0
    self.stats.decode_chunks += 1
    ended, steps = [], 0
    for i in sorted(self.decoding):
      toks = [int(t) for t in out.tokens[i]]
      lps = [float(x) for x in out.logprobs[i]]
      if len(lps) != len(toks):
        raise RuntimeError(f"session.step returned {len(toks)} tokens but {len(lps)} log-probs for sequence {i}")
      self.turn_toks[i] += toks
      self.turn_lps[i] += lps
      steps = max(steps, len(toks))
      self.stats.decode_tokens += len(toks)
      if out.stop_reason[i] is not None:
        ended.append(i)
    self.decoding.difference_update(ended)
    self.stats.slot_steps += steps * self.cfg.slots
    return ended

  # -- the protocol side

  def _cut_after_answer(self, toks: list, lps: list) -> tuple[list, list]:
    """parse 'search_r1': a turn without '</search>' ends at the token completing its first '</answer>', when the
    text up to there is an answer (the rest was decoded, but the trajectory ends with the answer; a stray
    '</answer>' that makes no answer keeps the whole turn, which the session holds)."""
    cut = self.cfg.answer_cut
    if cut is None or self.cfg.stop_automaton.first_stop(toks) is not None:
      return toks, lps
    k = cut.first_stop(toks)
    if k is None or k + 1 == len(toks):
      return toks, lps
    text = _decode_text(self.tok, toks[:k + 1])
    if actions.parse_action(text, self.cfg.max_query_chars, self.cfg.parse).kind != actions.ANSWER:
      return toks, lps
    return toks[:k + 1], lps[:k + 1]

  def end_turn(self, i: int) -> str:
    """Parse work item i's finished turn into its trajectory. Returns 'done', 'search' (its query is
    states[i].queries[-1]) or 'invalid'."""
    cfg, st = self.cfg, self.states[i]
    toks, lps = self.turn_toks.pop(i), self.turn_lps.pop(i)
    toks, lps = self._cut_after_answer(toks, lps)
    room = cfg.max_total - len(st.ids)
    hit_total = len(toks) >= room
    st.add_policy(toks[:room], lps[:room])
    action = actions.parse_action(_decode_text(self.tok, toks[:room]), cfg.max_query_chars, cfg.parse)
    st.turn_actions.append(action.kind)
    self.stats.num_turns += 1
    if action.kind == actions.INVALID:
      self.stats.num_invalid_turns += 1
    if action.kind == actions.ANSWER:
      st.answer, st.stop_reason = action.content, trajectory_lib.STOP_ANSWER
    elif hit_total:
      st.stop_reason = trajectory_lib.STOP_LENGTH
    elif self.turns[i] > cfg.max_turns:
      # Search-R1's last turn runs with do_search=False: a search is not executed, nothing is appended.
      st.stop_reason = trajectory_lib.STOP_MAX_TURNS
    elif action.kind == actions.SEARCH:
      st.queries.append(action.content)
      st.truncated_queries += int(action.truncated)
      st.num_searches += 1
      return "search"
    else:
      return "invalid"
    st.done = True
    return "done"

  def retrieve(self, indices: list[int]):
    """The observation (token ids, kind) of each search in `indices`, from one batched retriever call with retries.
    Returns ({index: observation}, RolloutStats of the call); safe to run on a worker thread."""
    cfg = self.cfg
    stats = RolloutStats(num_queries=len(indices))
    t0 = time.perf_counter()
    results, error = _retrieve_with_retries(self.retriever, [self.states[i].queries[-1] for i in indices], cfg.topk,
                                            cfg.rollout_cfg, stats, self.sleep)
    obs = {}
    for j, i in enumerate(indices):
      if results is None:
        obs[i] = (cfg.error_ids, trajectory_lib.OBS_ERROR, error)
      else:
        text = protocol.format_observation([_passage_contents(p) for p in results[j]],
                                           keep_title_quotes=cfg.keep_quotes, strip_docs=cfg.strip_docs)
        ids = list(self.tok.encode(text, add_special_tokens=False))[:cfg.max_obs]
        obs[i] = (ids, trajectory_lib.OBS_INFORMATION, None)
    stats.retrieval_busy_s = time.perf_counter() - t0
    return obs, stats

  def observe(self, observations: dict) -> list[int]:
    """Splice observations ({index: (ids, kind, error or None)}) into their trajectories and the session (one
    extend call). Returns the work items that go on to their next turn; the others ran out of room (done)."""
    go_on, to_extend = [], {}
    for i in sorted(observations):
      obs, kind, error = observations[i]
      st = self.states[i]
      if error is not None:
        st.errors.append(error)
      if len(st.ids) + len(obs) >= self.cfg.max_total:  # no room left for another policy token
        st.stop_reason, st.done = trajectory_lib.STOP_LENGTH, True
        continue
      st.add_obs(obs, kind)
      if obs:
        to_extend[i] = obs
      go_on.append(i)
    if to_extend:
      t0 = time.perf_counter()
      self.session.extend(to_extend)
      self.stats.extend_s += time.perf_counter() - t0
    return go_on


def _add_stats(stats: RolloutStats, part: RolloutStats) -> None:
  for f in dataclasses.fields(RolloutStats):
    setattr(stats, f.name, getattr(stats, f.name) + getattr(part, f.name))


def _run_sync(loop: _Loop, per_wave: int) -> None:
  """Waves of `per_wave` work items; within a wave, turns in lockstep: every live item decodes its turn, then
  one batched retriever call serves every search of the turn, then all observations are spliced in."""
  stats = loop.stats
  while loop.admitted < len(loop.prompts):
    loop.admit(per_wave)
    while loop.decoding:
      ended = []
      while loop.decoding:
        ended += loop.step()
      kinds = {i: loop.end_turn(i) for i in sorted(ended)}
      searches = [i for i, k in kinds.items() if k == "search"]
      observations = {i: (loop.cfg.invalid_ids, trajectory_lib.OBS_INVALID, None)
                      for i, k in kinds.items() if k == "invalid"}
      if searches:
        obs, part = loop.retrieve(searches)
        part.retrieval_s = part.retrieval_busy_s
        _add_stats(stats, part)
        observations.update(obs)
      go_on = loop.observe(observations)
      finished = sorted(i for i in kinds if loop.states[i].done)
      if finished:
        loop.session.finish(finished)
      loop.begin(go_on)


def _run_continuous(loop: _Loop, slots: int) -> None:
  """`slots` work items decode at once; each goes through its turns on its own, and a finished one's slot goes to
  the next waiting item at once. A search leaves the decode batch: its query goes to the retriever on a worker
  thread (batched with the others that stopped at the same chunk) while the rest keep decoding; its observation
  is spliced in after the next chunk, and it rejoins. Every join happens at a fixed chunk, whatever the
  retriever's latency (the host waits for it there), so the trajectories do not depend on timing."""
  stats = loop.stats
  loop.admit(slots)
  in_flight = None
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="retrieval") as pool:
    while loop.decoding or in_flight is not None:
      ended = loop.step(loop.cfg.exit_stopped) if loop.decoding else []
      kinds = {i: loop.end_turn(i) for i in ended}
      observations = {i: (loop.cfg.invalid_ids, trajectory_lib.OBS_INVALID, None)
                      for i, k in kinds.items() if k == "invalid"}
      if in_flight is not None:
        t0 = time.perf_counter()
        obs, part = in_flight.result()
        part.retrieval_s = time.perf_counter() - t0
        _add_stats(stats, part)
        observations.update(obs)
        in_flight = None
      searches = [i for i, k in kinds.items() if k == "search"]
      if searches:
        in_flight = pool.submit(loop.retrieve, searches)
      go_on = loop.observe(observations)
      finished = sorted(i for i in list(kinds) + list(observations) if loop.states[i].done)
      if finished:
        loop.session.finish(finished)
      loop.begin(go_on)
      live = sum(not s.done for s in loop.states[:loop.admitted])
      loop.admit(slots - live)


def run_rollouts(make_session: SessionFactory, tokenizer, retriever, questions: Sequence[Mapping[str, Any]],
                 protocol_cfg, rollout_cfg, *, group_size: int = 1, policy_version: int = 0,
                 reward_fn: Callable[[Trajectory], float] | None = default_reward,
                 sleep: Callable[[float], None] = time.sleep) -> RolloutResult:
  """Rolls out every question `group_size` times under the Search-R1 protocol, scheduled by rollout.schedule.

  Args:
    make_session: (prompts: list of token-id lists, max_len: int) -> DecodeSession; called once.
    tokenizer: a transformers tokenizer (encode / decode / optional chat template).
    retriever: has `retrieve(queries: list[str], topk: int) -> list[list[Passage]]` (searche1_jax.retrieval); in
      the 'continuous' schedule it is called from a worker thread (one call at a time).
    questions: records with 'id', 'question', 'golden_answers' (searche1_jax.data.qa).
    protocol_cfg: configs/parts/protocol.py block; rollout_cfg: configs/parts/rollout.py block.
    group_size: G samples per question (the prompt is replicated G times).
    policy_version: recorded in every trajectory (the trainer's step / round).
    reward_fn: Trajectory -> float, stored in `traj.reward`; None leaves rewards unset.
    sleep: used for retry backoff (tests pass a fake).
  Returns:
    RolloutResult(trajectories: len(questions) * group_size, group-contiguous; stats).
  """
  t_start = time.perf_counter()
  if group_size < 1:
    raise ValueError(f"run_rollouts: group_size must be >= 1, got {group_size}")
  cfg = _Cfg.read(protocol_cfg, rollout_cfg, tokenizer, group_size, len(questions) * group_size)
  stats = RolloutStats()

  # Prompts: one per question, replicated G times.
  meta = []
  prompts = []
  for qi, q in enumerate(questions):
    for key in ("id", "question", "golden_answers"):
      if key not in q:
        raise KeyError(f"run_rollouts: question #{qi} has no field '{key}' (fields: {sorted(q)})")
    golden = q["golden_answers"]
    golden = [golden] if isinstance(golden, (str, bytes)) else list(golden)
    golden = [g.decode("utf-8") if isinstance(g, bytes) else str(g) for g in golden]
    qid = q["id"].decode("utf-8") if isinstance(q["id"], bytes) else str(q["id"])
    question = q["question"].decode("utf-8") if isinstance(q["question"], bytes) else str(q["question"])
    ids = build_prompt_ids(tokenizer, question, cfg.template)
    if len(ids) > cfg.max_start or len(ids) >= cfg.max_total:
      raise ValueError(f"run_rollouts: question id={qid!r} has a {len(ids)}-token prompt; the limits are "
                       f"protocol.max_start_length={cfg.max_start} and < protocol.max_prompt_length={cfg.max_total}")
    for g in range(group_size):
      prompts.append(list(ids))
      meta.append((qid, question, golden, g))
  stats.num_trajectories = len(prompts)
  if prompts:
    loop = _Loop(make_session, prompts, cfg, tokenizer, retriever, stats, sleep)
    if cfg.schedule == "sync":
      _run_sync(loop, cfg.slots)
    else:
      _run_continuous(loop, cfg.slots)
    states = loop.states
  else:
    states = []

  trajs = []
  for st, (qid, question, golden, g) in zip(states, meta):
    metadata = {}
    if st.errors:
      metadata["retrieval_errors"] = st.errors
    if st.truncated_queries:
      metadata["truncated_queries"] = st.truncated_queries
    traj = Trajectory(
        question_id=qid, question=question, golden_answers=golden, prompt_ids=st.prompt, ids=st.ids,
        policy_mask=st.mask, logprobs=st.logprobs, policy_spans=st.policy_spans, obs_spans=st.obs_spans,
        obs_kinds=st.obs_kinds, turn_actions=st.turn_actions, queries=st.queries, num_searches=st.num_searches,
        answer=st.answer, stop_reason=st.stop_reason or trajectory_lib.STOP_MAX_TURNS,
        policy_version=policy_version, sample_index=g, metadata=metadata)
    if reward_fn is not None:
      traj.reward = float(reward_fn(traj))
    trajs.append(traj)
  stats.total_s = time.perf_counter() - t_start
  return RolloutResult(trajs, stats)
