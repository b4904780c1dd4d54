"""Scripted Search-R1 transcripts over the synthetic world, for the warm start.

A transcript is the full protocol text: the prompt, then turns of
`<think> ... </think>\\n<search> q </search>` each followed by the observation
(`protocol.format_observation`), and a last `<think> ... </think>\\n<answer> a </answer>`.
No EOS is appended (the trainer adds the tokenizer's).

The mix is deliberately imperfect (rates in `configs/parts/world.py`, `transcripts.rates`):
  efficient  the ideal plan, one search per hop, correct answer;
  redundant  one search repeated verbatim (same query, same results), then on, correct;
  verify     the whole plan, then the last hop searched once more with another wording to
             "double-check" (same gold passage), then the correct answer: an extra search that
             never changes the scripted outcome;
  vague      one query that names only part of the entity and finds only look-alikes, then a
             precise follow-up, correct;
  premature  answers before the last hop (with no search at all for one-hop questions) with a
             guess, mostly wrong;
  wrong      runs the whole plan, then reads a look-alike's fact and answers wrongly.
A retriever is simulated: a precise query returns the gold passage among `topk - 1` look-alike
distractors (entities sharing a name part) in random order; a vague one returns only look-alikes.
With `miss_rate` > 0 the simulated retriever also misses the query texts that the real one misses
(`retrieval/misses.py`, same rate and seed): a missed search returns only look-alikes, and every kind
then says so and searches again in other words until a wording hits; when the wordings or
`max_searches` run out, it answers with a guess.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from searche1_jax import rewards
from searche1_jax.agent import protocol
from searche1_jax.agent import trajectory as trajectory_lib
from searche1_jax.demo.synthetic_world import Hop, QUESTION_TYPES, World
from searche1_jax.retrieval import misses

KINDS = ("efficient", "redundant", "verify", "vague", "premature", "wrong")
VERIFY_PHRASE = "Let me double-check with one more search."  # ends the thought before a verify search

# (kind, relation) -> (what is looked for, the fact once read, paraphrased queries).
_PHRASES: dict[tuple[str, str], tuple[str, str, tuple[str, ...]]] = {
    ("person", "birth_city"): ("where {s} was born", "{s} was born in {v}.",
                               ("where was {s} born", "{s}", "{s} place of birth")),
    ("person", "birth_year"): ("when {s} was born", "{s} was born in {v}.",
                               ("when was {s} born", "{s}", "{s} born")),
    ("person", "employer"): ("which company {s} works for", "{s} works for {v}.",
                             ("{s} works for", "{s}", "which company does {s} work for")),
    ("person", "founded"): ("which company {s} founded", "{s} founded {v}.",
                            ("{s} founder", "{s}", "what company did {s} found")),
    ("company", "founder"): ("who founded {s}", "{s} was founded by {v}.",
                             ("who founded {s}", "{s}", "{s} founded by")),
    ("company", "hq_city"): ("where {s} is headquartered", "{s} is headquartered in {v}.",
                             ("where is {s} headquartered", "{s}", "{s} headquarters city")),
    ("company", "founding_year"): ("when {s} was founded", "{s} was founded in {v}.",
                                   ("when was {s} founded", "{s}", "{s} founded")),
    ("city", "country"): ("which country {s} is in", "{s} is in {v}.",
                          ("{s}", "which country is {s} in", "{s} city")),
    ("country", "capital"): ("the capital of {s}", "The capital of {s} is {v}.",
                             ("{s}", "what is the capital of {s}", "{s} capital city")),
}


def _need(hop: Hop) -> str:
  return _PHRASES[(hop.kind, hop.relation)][0].format(s=hop.title)


def hop_wordings(hop: Hop) -> list[str]:
  """Every query the transcripts may send for `hop`: the plan's canonical one, then its paraphrases."""
  return [hop.query] + [p.format(s=hop.title) for p in _PHRASES[(hop.kind, hop.relation)][2]]


def _fact(hop: Hop, value: str | None = None) -> str:
  return _PHRASES[(hop.kind, hop.relation)][1].format(s=hop.title, v=hop.value if value is None else value)


@dataclasses.dataclass
class Transcript:
  """One scripted transcript; `segments` are `(text, trainable)` pieces whose concatenation is
  `text` (prompt and observations are not trainable, the policy's turns are)."""
  question_id: str
  kind: str
  text: str
  segments: list[tuple[str, bool]]
  searches: list[str]
  retrieved: list[list[str]]  # passage titles shown after each search, in order
  answer: str
  correct: bool


def _normalize(s: str) -> str:
  return " ".join(s.lower().split())


def _allocate(total: int, rates: Mapping[str, float]) -> list[str]:
  """Exact counts per kind (largest remainder), as a list of `total` kind names."""
  keys = list(rates)
  w = np.array([float(rates[k]) for k in keys])
  raw = total * w / w.sum()
  counts = np.floor(raw).astype(int)
  for i in np.argsort(-(raw - counts), kind="stable")[: total - counts.sum()]:
    counts[i] += 1
  return [k for k, c in zip(keys, counts) for _ in range(int(c))]


def _check_cfg(cfg, protocol_cfg=None) -> dict[str, float]:
  rates = dict(cfg.rates)
  unknown = set(rates) - set(KINDS)
  if unknown:
    raise ValueError(f"transcripts.rates has unknown kind(s) {sorted(unknown)}; "
                     f"known: {KINDS}")
  if any(r < 0 for r in rates.values()) or sum(rates.values()) <= 0:
    raise ValueError(f"transcripts.rates must be non-negative with a positive sum: {rates}")
  if cfg.topk < 1:
    raise ValueError(f"transcripts.topk must be >= 1, got {cfg.topk}")
  misses.check_rate(getattr(cfg, "miss_rate", 0.0), "transcripts.miss_rate")
  if protocol_cfg is not None:
    if cfg.topk != protocol_cfg.topk:
      raise ValueError(f"transcripts.topk={cfg.topk} differs from protocol.topk={protocol_cfg.topk}")
    if cfg.max_searches > protocol_cfg.max_turns:
      raise ValueError(f"transcripts.max_searches={cfg.max_searches} exceeds "
                       f"protocol.max_turns={protocol_cfg.max_turns}")
  longest = max(t.hops for t in QUESTION_TYPES.values())
  extra = 1 if any(rates.get(k, 0) > 0 for k in ("redundant", "verify", "vague")) else 0
  if longest + extra > cfg.max_searches:
    raise ValueError(f"transcripts.max_searches={cfg.max_searches} is below the "
                     f"{longest + extra} searches a {longest}-hop question needs here")
  return rates


class _Writer:
  """Accumulates the segments of one transcript."""

  def __init__(self, prompt: str):
    self.segments: list[tuple[str, bool]] = [(prompt, False)]
    self.searches: list[str] = []
    self.retrieved: list[list[str]] = []

  def search(self, thought: str, query: str, passages: Sequence[Mapping[str, str]],
             titles: Sequence[str], obs_kwargs: Mapping[str, Any]) -> None:
    self.segments.append((f"{protocol.THINK_OPEN} {thought} {protocol.THINK_CLOSE}\n"
                          f"{protocol.SEARCH_OPEN} {query} {protocol.SEARCH_CLOSE}", True))
    self.segments.append((protocol.format_observation(passages, **obs_kwargs), False))
    self.searches.append(query)
    self.retrieved.append(list(titles))

  def answer(self, thought: str, answer: str) -> None:
    self.segments.append((f"{protocol.THINK_OPEN} {thought} {protocol.THINK_CLOSE}\n"
                          f"{protocol.ANSWER_OPEN} {answer} {protocol.ANSWER_CLOSE}", True))


class _Maker:
  def __init__(self, world: World, rng: np.random.Generator, cfg, template: str,
               obs_kwargs: Mapping[str, Any]):
    self.world, self.rng, self.cfg = world, rng, cfg
    self.template, self.obs_kwargs = template, dict(obs_kwargs)

  # ---- simulated retrieval --------------------------------------------------------------

  def _distractors(self, title: str, n: int, exclude: Sequence[str] = ()) -> list[str]:
    pool = [t for t in self.world.lookalikes(title) if t not in exclude]
    picked = [pool[int(i)] for i in self.rng.permutation(len(pool))[:n]]
    if len(picked) < n:  # too few look-alikes: same-kind entities fill up
      rest = [t for t in self.world.names(self.world.kind(title))
              if t != title and t not in picked and t not in exclude]
      picked += [rest[int(i)] for i in self.rng.permutation(len(rest))[: n - len(picked)]]
    return picked

  def _results(self, hop: Hop, gold: bool) -> list[str]:
    k = self.cfg.topk
    if not gold:
      return self._distractors(hop.title, k)
    titles = [hop.title] + self._distractors(hop.title, k - 1)
    return [titles[int(i)] for i in self.rng.permutation(len(titles))]

  def _query(self, hop: Hop) -> str:
    if self.rng.random() < self.cfg.paraphrase_prob:
      options = _PHRASES[(hop.kind, hop.relation)][2]
      return options[int(self.rng.integers(len(options)))].format(s=hop.title)
    return hop.query

  def _other_query(self, hop: Hop, used: str) -> str:
    """A wording of `hop`'s query other than `used`."""
    options = [q for q in hop_wordings(hop) if q != used]
    return options[int(self.rng.integers(len(options)))]

  def _room(self, w: _Writer) -> bool:
    """Whether one more search fits in `max_searches` (only retriever misses ever use it up)."""
    return len(w.searches) < self.cfg.max_searches

  def _missed(self, query: str) -> bool:
    return misses.missed(query, getattr(self.cfg, "miss_rate", 0.0), getattr(self.cfg, "miss_seed", 0))

  def _find(self, w: _Writer, thought: str, hop: Hop) -> tuple[bool, str, list[str]]:
    """Searches for `hop` (`_query`); after each missed search (only look-alikes) it says so and tries a
    wording not tried yet, until one hits or the wordings or `max_searches` run out.
    Returns (found, the last query, its result titles)."""
    if not self._room(w):
      return False, "", []
    query = self._query(hop)
    tried = {misses.query_key(query)}
    while True:
      hit = not self._missed(query)
      titles = self._results(hop, gold=hit)
      self._search(w, thought, query, titles)
      if hit:
        return True, query, titles
      options = [q for q in hop_wordings(hop) if misses.query_key(q) not in tried]
      if not options or not self._room(w):
        return False, query, titles
      thought = f"The results do not mention {hop.title}. Let me search for {hop.title} in other words."
      query = options[int(self.rng.integers(len(options)))]
      tried.add(misses.query_key(query))

  def _vague_query(self, hop: Hop) -> str:
    """Part of the name (shared with look-alikes), or no name at all where none is shared."""
    if not self.world.lookalikes(hop.title):
      return _PHRASES[(hop.kind, hop.relation)][0].format(s=f"the {hop.kind}")
    parts = self.world.name_parts(hop.title)
    part = parts[int(self.rng.integers(len(parts)))]
    return _PHRASES[(hop.kind, hop.relation)][2][0].format(s=part)

  def _search(self, w: _Writer, thought: str, query: str, titles: list[str]) -> None:
    w.search(thought, query, [self.world.passage(t) for t in titles], titles, self.obs_kwargs)

  # ---- guesses ----------------------------------------------------------------------------

  def _random_value(self, like: str, avoid: str) -> str:
    if like.isdigit():
      year = int(like)
      while True:
        guess = year + int(self.rng.integers(-30, 31))
        if str(guess) != avoid:
          return str(guess)
    names = [n for n in self.world.names(self.world.kind(like)) if n != avoid]
    return names[int(self.rng.integers(len(names)))]

  # ---- one transcript ---------------------------------------------------------------------

  def make(self, q: Mapping[str, Any], kind: str) -> Transcript:
    world = self.world
    hops = world.plan(q)
    qtype = QUESTION_TYPES[q["metadata"]["relation"]]
    comparison = qtype.category == "comparison"
    gold = world.answer(q)
    w = _Writer(protocol.make_prompt(q["question"], template=self.template))

    n_done = len(hops)
    if kind == "premature":
      n_done = int(self.rng.integers(0, len(hops)))  # stops before the last hop
    redo = int(self.rng.integers(len(hops))) if kind in ("redundant", "vague") else -1

    thought = f"I need to find {_need(hops[0])}."
    lost = None  # the hop that could not be found (retriever misses), if any
    for i, hop in enumerate(hops[:n_done]):
      if i == redo and kind == "vague" and self._room(w):
        titles = self._results(hop, gold=False)
        self._search(w, thought, self._vague_query(hop), titles)
        thought = (f"The results do not mention {hop.title}. "
                   f"I need to search for {hop.title} directly.")
      found, query, titles = self._find(w, thought, hop)
      if not found:
        lost = i
        break
      if i == redo and kind == "redundant" and self._room(w):
        self._search(w, f"{_fact(hop)} Let me search again to be sure.", query, titles)
      read = hop.value
      if kind == "wrong" and i == len(hops) - 1 and not comparison:
        read = self._misread(hop, titles)
      thought = _fact(hop, read)
      if i + 1 < len(hops) and i + 1 < n_done:
        thought += f" Now I need to find {_need(hops[i + 1])}."

    if kind == "verify" and lost is None and self._room(w):
      last = hops[-1]
      query = self._other_query(last, w.searches[-1])
      hit = not self._missed(query)
      self._search(w, f"{thought} {VERIFY_PHRASE}", query, self._results(last, gold=hit))
      thought = (f"The second search confirms it: {_fact(last)}" if hit else
                 f"The second search does not mention {last.title}, so I keep the first: {_fact(last)}")

    if lost is not None:
      answer = self._premature_guess(hops, lost, gold, comparison)
      w.answer(f"I could not find {_need(hops[lost])}. I think the answer is {answer}.", answer)
    elif kind == "premature":
      answer = self._premature_guess(hops, n_done, gold, comparison)
      lead = thought + " " if n_done else ""
      w.answer(f"{lead}I think the answer is {answer}.", answer)
    elif comparison:
      a, b = hops
      first = a.title if int(a.value) < int(b.value) else b.title
      answer = first if kind != "wrong" else (b.title if first == a.title else a.title)
      verb = "was born" if a.relation == "birth_year" else "was founded"
      w.answer(f"{thought} So {answer} {verb} first.", answer)
    else:
      answer = hops[-1].value if kind != "wrong" else read
      w.answer(f"{thought} So the answer is {answer}.", answer)

    text = "".join(s for s, _ in w.segments)
    correct = any(_normalize(answer) == _normalize(g) for g in q["golden_answers"])
    return Transcript(question_id=q["id"], kind=kind, text=text, segments=w.segments,
                      searches=w.searches, retrieved=w.retrieved, answer=answer,
                      correct=correct)

  def _misread(self, hop: Hop, titles: Sequence[str]) -> str:
    """A look-alike's value of the same relation (never the right one)."""
    for t in titles:
      if t != hop.title:
        v = self.world.facts(t).get(hop.relation)
        if v is not None and v != hop.value:
          return v
    return self._random_value(hop.value, avoid=hop.value)

  def _premature_guess(self, hops: Sequence[Hop], n_done: int, gold: str,
                       comparison: bool) -> str:
    if comparison:
      return hops[int(self.rng.integers(2))].title
    if n_done and self.rng.random() < 0.5:
      return hops[n_done - 1].value  # the last bridge taken for the answer
    return self._random_value(gold, avoid="")


def make_transcript_records(world: World, questions: Sequence[Mapping[str, Any]],
                            rng: np.random.Generator, cfg,
                            protocol_cfg=None) -> list[Transcript]:
  """`cfg.per_question` transcripts per question, kinds split exactly by `cfg.rates`.

  Only training questions of `world` are accepted (test answers must come from search).
  `protocol_cfg` (a `configs/parts/protocol.py` block) sets the template and the observation
  style (by default the Search-R1 ones) and must agree with `cfg` on topk and max turns.
  """
  rates = _check_cfg(cfg, protocol_cfg)
  for q in questions:
    if not world.is_train_question(q):
      raise ValueError(f"question {q.get('id')!r} ({q.get('question')!r}) is not a "
                       "training question of this world; transcripts use train only")
  template = protocol.SEARCH_R1_TEMPLATE
  obs_kwargs: dict[str, Any] = {}
  if protocol_cfg is not None:
    template = protocol_cfg.template
    obs_kwargs = dict(keep_title_quotes=protocol_cfg.obs_keep_title_quotes,
                      strip_docs=protocol_cfg.obs_strip_docs)
  jobs = [q for q in questions for _ in range(int(cfg.per_question))]
  kinds = _allocate(len(jobs), rates)
  kinds = [kinds[int(i)] for i in rng.permutation(len(kinds))]
  maker = _Maker(world, rng, cfg, template, obs_kwargs)
  return [maker.make(q, k) for q, k in zip(jobs, kinds)]


def make_transcripts(world: World, questions: Sequence[Mapping[str, Any]],
                     rng: np.random.Generator, cfg, protocol_cfg=None) -> list[str]:
  """The transcript texts (see `make_transcript_records`)."""
  return [t.text for t in make_transcript_records(world, questions, rng, cfg, protocol_cfg)]


def encode_segments(segments: Sequence[tuple[str, bool]], tokenizer, prompt_ids: Sequence[int]
                    ) -> tuple[list[int], list[int], list[tuple[int, int, bool]]]:
  """`prompt_ids`, then every later `(text, trainable)` segment encoded on its own without special tokens, as the
  rollout splices turns and observations. Returns (ids, mask: 1 on trainable segments' tokens, spans: (start, end,
  trainable) per later segment)."""
  ids, mask, spans = list(prompt_ids), [0] * len(prompt_ids), []
  for text, trainable in segments[1:]:
    piece = list(tokenizer.encode(text, add_special_tokens=False))
    spans.append((len(ids), len(ids) + len(piece), bool(trainable)))
    ids += piece
    mask += [int(bool(trainable))] * len(piece)
  return ids, mask, spans


def transcript_trajectory(record, question: Mapping[str, Any], tokenizer, template: str,
                          sample_index: int = 0) -> trajectory_lib.Trajectory:
  """The Trajectory a policy following `record` (one `make_transcript_records` entry) would produce: the prompt as
  the rollout encodes it (`protocol.encode_prompt`), then each later segment encoded on its own, as the rollout
  splices turns and observations (policy segments: mask 1). Its reward is the EM of its answer."""
  prompt = protocol.encode_prompt(tokenizer, protocol.make_prompt(question["question"], template))
  if tokenizer.decode(prompt, skip_special_tokens=False) != record.segments[0][0]:
    raise ValueError(f"transcript_trajectory: question {question['id']!r}: the transcript's prompt text differs from "
                     "the encoded prompt (another template or tokenizer?)")
  ids, mask, spans = encode_segments(record.segments, tokenizer, prompt)
  policy_spans = [(s, e) for s, e, trainable in spans if trainable]
  obs_spans = [(s, e) for s, e, trainable in spans if not trainable]
  traj = trajectory_lib.Trajectory(
      question_id=question["id"], question=question["question"], golden_answers=question["golden_answers"],
      prompt_ids=prompt, ids=ids, policy_mask=mask, logprobs=np.zeros(len(ids), np.float32),
      policy_spans=policy_spans, obs_spans=obs_spans, obs_kinds=[trajectory_lib.OBS_INFORMATION] * len(obs_spans),
      turn_actions=["search"] * len(record.searches) + ["answer"], queries=list(record.searches),
      num_searches=len(record.searches), answer=record.answer, stop_reason=trajectory_lib.STOP_ANSWER,
      sample_index=sample_index, metadata={"scripted_kind": record.kind})
  traj.reward = float(rewards.exact_match(record.answer, question["golden_answers"]))
  return traj
