"""The multi-turn search-agent rollout loop (Search-R1 protocol), run on the host around a decoding session.

One call rolls out a batch of questions, G samples each (group sampling: the prompt is replicated G times, so the
trajectories come out group-contiguous: question q's samples are rows [q*G, (q+1)*G)). Per turn:

1. All live trajectories decode together (`session.decode`), each until `</search>`, `</answer>`, EOS, the per-turn
   token limit (protocol.max_response_length) or the total length limit (protocol.max_prompt_length).
2. Each turn's text is parsed (`agent.actions.parse_action`):
   - answer -> the trajectory ends (stop_reason 'answer');
   - search -> its query joins ONE batched `retriever.retrieve(queries, topk)` call for all trajectories of the turn;
     the passages are formatted (`protocol.format_observation`), tokenized, truncated to protocol.max_obs_length
     TOKENS and spliced in with `session.extend` (no prefix recompute);
   - neither -> the invalid-action message is spliced in.
3. After protocol.max_turns searching turns comes one final turn without search. As in Search-R1
   (`generation.py`, final rollout with `do_search=False`), a search in the final turn is not executed and nothing is
   appended; the trajectory ends (stop_reason 'max_turns') like one with an invalid final turn.
Finished trajectories leave the session (`session.finish`). A retriever failure is retried with exponential backoff
(rollout.retrieval_retries / retrieval_backoff_s); if it still fails, every search of that batch gets the
rollout.retrieval_error_message observation and the rollout goes on. Time in decoding, splicing and retrieval is
measured and returned (`RolloutStats`).

The session is anything with the `DecodeSession` methods: the real sampler (`searche1_jax.sampling.Session`, see
`sampler_session_factory`) or a scripted stand-in in tests.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Mapping, Protocol, Sequence

from searche1_jax import rewards
from searche1_jax import sampling
from searche1_jax.agent import actions
from searche1_jax.agent import protocol
from searche1_jax.agent import trajectory as trajectory_lib

Trajectory = trajectory_lib.Trajectory


class DecodeSession(Protocol):
  """The part of the sampler's stateful session that the rollout loop uses.

  decode(max_new_tokens, stop_sequences) decodes every live sequence until it stops (stop_sequences: a
    sampling.stops.StopAutomaton of the protocol's stop strings) and returns an object with
    per-sequence-index lists `tokens[i]`, `logprobs[i]` (temperature-1 log-prob of each new token) and
    `stop_reason[i]` (sequences that were not live have empty lists).
  extend({i: token_ids}) appends external tokens to sequence i (its prefix is not recomputed).
  finish([i, ...]) marks sequences done; they no longer decode.
  """

  def decode(self, max_new_tokens: int, stop_sequences: Any = ()) -> Any:
    ...

  def extend(self, tokens: Mapping[int, Sequence[int]]) -> None:
    ...

  def finish(self, indices: Sequence[int]) -> None:
    ...


# make_session(prompts, max_len) -> DecodeSession; max_len is the total length limit of one sequence in tokens.
SessionFactory = Callable[[list[list[int]], int], DecodeSession]


def sampler_session_factory(params, model_cfg, *, temperature: float, top_p: float = 1.0, top_k: int = 0,
                            eos_ids: Sequence[int] = (), seed: int = 0, mesh=None, rules=None,
                            options=None) -> SessionFactory:
  """A SessionFactory over the real sampler (`searche1_jax.sampling.Session`).

  Each session made gets seed, seed + 1, ... so successive rollout batches sample independently.
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
  num_turns: int = 0  # decode calls (one per turn with at least one live trajectory)
  session_s: float = 0.0  # creating the session (prefill of the prompts)
  decode_s: float = 0.0
  extend_s: float = 0.0  # splicing observations into the session
  retrieval_s: float = 0.0  # retriever calls including retries and backoff sleeps
  total_s: float = 0.0
  retrieval_calls: int = 0  # batched calls that returned results
  retrieval_attempts: int = 0  # including failed ones
  retrieval_failures: int = 0  # batches that failed after all retries
  num_queries: int = 0
  num_invalid_turns: int = 0

  def as_dict(self) -> dict[str, float]:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class RolloutResult:
  trajectories: list[Trajectory]
  stats: RolloutStats


def merge_results(results: Sequence[RolloutResult], total_s: float) -> RolloutResult:
  """The trajectories of several rollout waves in order, their counters and timings summed (total_s given)."""
  stats = RolloutStats()
  for r in results:
    for f in dataclasses.fields(RolloutStats):
      setattr(stats, f.name, getattr(stats, f.name) + getattr(r.stats, f.name))
  stats.total_s = total_s
  return RolloutResult([t for r in results for t in r.trajectories], stats)


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


def run_rollouts(make_session: SessionFactory, tokenizer, retriever, questions: Sequence[Mapping[str, Any]],
                 protocol_cfg, rollout_cfg, *, group_size: int = 1, policy_version: int = 0,
                 reward_fn: Callable[[Trajectory], float] | None = default_reward,
                 sleep: Callable[[float], None] = time.sleep) -> RolloutResult:
  """Rolls out every question `group_size` times under the Search-R1 protocol.

  Args:
    make_session: (prompts: list of token-id lists, max_len: int) -> DecodeSession.
    tokenizer: a transformers tokenizer (encode / decode / optional chat template).
    retriever: has `retrieve(queries: list[str], topk: int) -> list[list[Passage]]` (searche1_jax.retrieval).
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
  slots = int(_cfg_value(rollout_cfg, "decode_slots", "rollout"))
  per_wave = max(1, slots // group_size) if slots > 0 else len(questions)
  if len(questions) > per_wave:
    # Bounded sampler memory: waves of whole question groups, each its own session (and sampler seed).
    waves = [run_rollouts(make_session, tokenizer, retriever, questions[i:i + per_wave], protocol_cfg, rollout_cfg,
                          group_size=group_size, policy_version=policy_version, reward_fn=reward_fn, sleep=sleep)
             for i in range(0, len(questions), per_wave)]
    return merge_results(waves, time.perf_counter() - t_start)
  max_turns = int(_cfg_value(protocol_cfg, "max_turns", "protocol"))
  topk = int(_cfg_value(protocol_cfg, "topk", "protocol"))
  max_obs = int(_cfg_value(protocol_cfg, "max_obs_length", "protocol"))
  max_turn_tokens = int(_cfg_value(protocol_cfg, "max_response_length", "protocol"))
  max_start = int(_cfg_value(protocol_cfg, "max_start_length", "protocol"))
  max_total = int(_cfg_value(protocol_cfg, "max_prompt_length", "protocol"))
  template = _cfg_value(protocol_cfg, "template", "protocol")
  invalid_msg = _cfg_value(protocol_cfg, "invalid_action_message", "protocol")
  stop_strings = list(_cfg_value(protocol_cfg, "stop_strings", "protocol"))
  keep_quotes = bool(_cfg_value(protocol_cfg, "obs_keep_title_quotes", "protocol"))
  strip_docs = bool(_cfg_value(protocol_cfg, "obs_strip_docs", "protocol"))
  max_query_chars = int(_cfg_value(rollout_cfg, "max_query_chars", "rollout"))
  error_msg = _cfg_value(rollout_cfg, "retrieval_error_message", "rollout")
  if max_turns < 0 or topk < 1 or max_obs < 0 or max_turn_tokens < 1:
    raise ValueError(f"protocol config: need max_turns >= 0, topk >= 1, max_obs_length >= 0, "
                     f"max_response_length >= 1; got {max_turns}, {topk}, {max_obs}, {max_turn_tokens}")

  stats = RolloutStats()
  # A turn ends on the token whose text completes a stop string, however the model tokenized it.
  stop_automaton = sampling.stops.for_tokenizer(tokenizer, stop_strings)
  invalid_ids = list(tokenizer.encode(invalid_msg, add_special_tokens=False))
  error_ids = list(tokenizer.encode(error_msg, add_special_tokens=False))[:max_obs]

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
    ids = build_prompt_ids(tokenizer, question, template)
    if len(ids) > max_start or len(ids) >= max_total:
      raise ValueError(f"run_rollouts: question id={qid!r} has a {len(ids)}-token prompt; the limits are "
                       f"protocol.max_start_length={max_start} and < protocol.max_prompt_length={max_total}")
    for g in range(group_size):
      prompts.append(list(ids))
      meta.append((qid, question, golden, g))
  n = len(prompts)
  stats.num_trajectories = n
  if n == 0:
    stats.total_s = time.perf_counter() - t_start
    return RolloutResult([], stats)

  t0 = time.perf_counter()
  session = make_session([list(p) for p in prompts], max_total)
  stats.session_s = time.perf_counter() - t0
  states = [_State(p) for p in prompts]

  for turn in range(max_turns + 1):
    final = turn == max_turns
    live = [i for i, s in enumerate(states) if not s.done]
    if not live:
      break
    t0 = time.perf_counter()
    out = session.decode(max_turn_tokens, stop_sequences=stop_automaton)
    stats.decode_s += time.perf_counter() - t0
    stats.num_turns += 1

    searches: list[int] = []
    invalid: list[int] = []
    finished: list[int] = []
    for i in live:
      st = states[i]
      toks = [int(t) for t in out.tokens[i]]
      lps = [float(x) for x in out.logprobs[i]]
      if len(lps) != len(toks):
        raise RuntimeError(f"session.decode returned {len(toks)} tokens but {len(lps)} log-probs for sequence {i}")
      room = max_total - len(st.ids)
      hit_total = len(toks) >= room
      toks, lps = toks[:room], lps[:room]
      st.add_policy(toks, lps)
      action = actions.parse_action(_decode_text(tokenizer, toks), max_query_chars)
      st.turn_actions.append(action.kind)
      if action.kind == actions.ANSWER:
        st.answer, st.stop_reason = action.content, trajectory_lib.STOP_ANSWER
      elif hit_total:
        st.stop_reason = trajectory_lib.STOP_LENGTH
      elif final:
        # Search-R1's last turn runs with do_search=False: a search is not executed, nothing is appended.
        st.stop_reason = trajectory_lib.STOP_MAX_TURNS
      elif action.kind == actions.SEARCH:
        st.queries.append(action.content)
        st.truncated_queries += int(action.truncated)
        st.num_searches += 1
        searches.append(i)
      else:
        invalid.append(i)
      if action.kind == actions.INVALID:
        stats.num_invalid_turns += 1
      if st.stop_reason:
        st.done = True
        finished.append(i)

    # One batched retriever call for every search of this turn.
    observations: dict[int, tuple[list[int], str]] = {}
    if searches:
      queries = [states[i].queries[-1] for i in searches]
      stats.num_queries += len(queries)
      t0 = time.perf_counter()
      results, error = _retrieve_with_retries(retriever, queries, topk, rollout_cfg, stats, sleep)
      stats.retrieval_s += time.perf_counter() - t0
      for j, i in enumerate(searches):
        if results is None:
          states[i].errors.append(error)
          observations[i] = (error_ids, trajectory_lib.OBS_ERROR)
        else:
          text = protocol.format_observation([_passage_contents(p) for p in results[j]],
                                             keep_title_quotes=keep_quotes, strip_docs=strip_docs)
          obs = list(tokenizer.encode(text, add_special_tokens=False))[:max_obs]
          observations[i] = (obs, trajectory_lib.OBS_INFORMATION)
    for i in invalid:
      observations[i] = (invalid_ids, trajectory_lib.OBS_INVALID)

    to_extend = {}
    for i in sorted(observations):
      obs, kind = observations[i]
      st = states[i]
      if len(st.ids) + len(obs) >= max_total:  # no room left for another policy token
        st.stop_reason, st.done = trajectory_lib.STOP_LENGTH, True
        finished.append(i)
        continue
      st.add_obs(obs, kind)
      if obs:
        to_extend[i] = obs
    if finished:
      session.finish(sorted(finished))
    if to_extend:
      t0 = time.perf_counter()
      session.extend(to_extend)
      stats.extend_s += time.perf_counter() - t0

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
