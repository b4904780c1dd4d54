"""Protocol strings and the scripted warm-start transcripts (parsed back with an independent parser)."""
import collections
import re

import numpy as np
import pytest

from configs.parts import protocol as protocol_part
from configs.parts import world as world_part
from searche1_jax.agent import protocol
from searche1_jax.demo import synthetic_world as sw
from searche1_jax.demo import transcripts as tr
from searche1_jax.retrieval import misses

# docs/reference.md, Search-R1 template_type='base', written out independently of the module.
REFERENCE_TEMPLATE = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every time you get "
    "new information. After reasoning, if you find you lack some knowledge, you can call a search engine by "
    "<search> query </search> and it will return the top searched results between <information> and "
    "</information>. You can search as many times as your want. If you find no further external knowledge "
    "needed, you can directly provide the answer inside <answer> and </answer>, without detailed illustrations. "
    "For example, <answer> Beijing </answer>. Question: {question}\n")
REFERENCE_INVALID = (
    "\nMy previous action is invalid. If I want to search, I should put the query between <search> and "
    "</search>. If I want to give the final answer, I should put the answer between <answer> and </answer>. "
    "Let me try again.\n")


def test_protocol_strings_are_byte_exact():
  assert protocol.SEARCH_R1_TEMPLATE == REFERENCE_TEMPLATE
  assert protocol.INVALID_ACTION_MESSAGE == REFERENCE_INVALID
  assert protocol.make_prompt("  who wrote it ") == REFERENCE_TEMPLATE.replace("{question}", "who wrote it?")
  assert protocol.make_prompt("Is it {x}?").endswith("Question: Is it {x}?\n")  # braces are not format fields
  assert protocol.make_prompt("q", template="Q: {question}") == "Q: q?"
  with pytest.raises(ValueError, match="placeholder"):
    protocol.make_prompt("q", template="no slot")
  with pytest.raises(ValueError, match="empty"):
    protocol.make_prompt("   ")
  cfg = protocol_part.get()
  assert cfg.template == REFERENCE_TEMPLATE and cfg.max_turns == 4 and cfg.topk == 3
  assert cfg.max_obs_length == 500 and cfg.max_response_length == 500
  assert cfg.max_start_length == 2048 and cfg.max_prompt_length == 4096
  assert set(protocol.TAGS) == {"<think>", "</think>", "<search>", "</search>", "<information>",
                                "</information>", "<answer>", "</answer>"}


def test_format_observation_both_styles():
  docs = [{"id": "1", "contents": '"Alpha Town"\nAlpha Town is a town.'},
          {"document": {"id": "2", "contents": '"Beta"\nBeta line one.\nline two'}, "score": 0.5}]
  # Search-R1 code: title line as stored (quoted), doc string stripped.
  assert protocol.format_observation(docs) == (
      '\n\n<information>Doc 1(Title: "Alpha Town") Alpha Town is a town.\n'
      'Doc 2(Title: "Beta") Beta line one.\nline two</information>\n\n')
  # docs/reference.md wording: bare titles, newline after every doc.
  assert protocol.format_observation(docs, keep_title_quotes=False, strip_docs=False) == (
      "\n\n<information>Doc 1(Title: Alpha Town) Alpha Town is a town.\n"
      "Doc 2(Title: Beta) Beta line one.\nline two\n</information>\n\n")
  assert protocol.format_observation([]) == "\n\n<information></information>\n\n"
  with pytest.raises(TypeError, match="wiki-18"):
    protocol.format_observation([42])


def small_world_cfg():
  cfg = world_part.get()
  cfg.num_countries, cfg.cities_per_country = 6, 4
  cfg.num_people, cfg.num_companies = 200, 70
  cfg.num_train_questions, cfg.num_test_questions = 1000, 60
  return cfg


@pytest.fixture(scope="module")
def world():
  return sw.generate_world(small_world_cfg())


@pytest.fixture(scope="module")
def records(world):
  cfg = small_world_cfg().transcripts
  cfg.rates.verify = 0.15  # off in the default mix; every kind is checked here
  return tr.make_transcript_records(world, world.train_questions, np.random.default_rng(7), cfg)


_TURN = re.compile(r"<think> ([^<>]+) </think>\n<search> ([^<>]+) </search>")
_OBS = re.compile(r"\n\n<information>(.*?)</information>\n\n", re.S)
_FINAL = re.compile(r"<think> ([^<>]+) </think>\n<answer> ([^<>]+) </answer>")
_DOC = re.compile(r'Doc (\d+)\(Title: "([^"]+)"\) ([^\n]*)(?:\n|$)')


def parse(text, question):
  """Independent parser: prompt, then (turn, observation)*, then the final answer turn, nothing else."""
  prompt = REFERENCE_TEMPLATE.replace("{question}", question)
  assert text.startswith(prompt)
  rest = text[len(prompt):]
  searches, observations = [], []
  while True:
    m = _TURN.match(rest)
    if not m:
      break
    searches.append(m.group(2))
    rest = rest[m.end():]
    o = _OBS.match(rest)
    assert o, rest[:200]
    docs = _DOC.findall(o.group(1))
    assert "".join(f'Doc {i}(Title: "{t}") {x}\n' for i, t, x in docs).strip() == o.group(1)
    assert [int(i) for i, _, _ in docs] == list(range(1, len(docs) + 1))
    observations.append([(t, x) for _, t, x in docs])
    rest = rest[o.end():]
  m = _FINAL.fullmatch(rest)
  assert m, rest[:300]
  return searches, observations, m.group(2)


def test_transcripts_follow_the_protocol_exactly(world, records):
  questions = {q["id"]: q for q in world.train_questions}
  corpus = {}
  for p in world.passages:
    title, _, text = p["contents"].partition("\n")
    corpus[title.strip('"')] = text
  for rec in records:
    q = questions[rec.question_id]
    searches, observations, answer = parse(rec.text, q["question"])
    assert searches == rec.searches and answer == rec.answer
    assert [[t for t, _ in obs] for obs in observations] == rec.retrieved
    for obs in observations:
      assert len(obs) == 3 and len({t for t, _ in obs}) == 3
      for title, text in obs:
        assert corpus[title] == text  # the passages shown are the corpus passages
    assert "".join(s for s, _ in rec.segments) == rec.text
    # Policy (trainable) segments are the turns; the prompt and the observations are not.
    assert [t for _, t in rec.segments] == [False] + [True, False] * len(searches) + [True]
    assert len(searches) <= 4


def test_each_kind_behaves_as_described(world, records):
  questions = {q["id"]: q for q in world.train_questions}
  for rec in records:
    q = questions[rec.question_id]
    plan = world.solve(q)
    gold = [t for _, t in plan]  # the passage each hop must read
    found = [g in shown for g, shown in zip(gold, rec.retrieved)]  # search i shows hop i's gold?
    correct = rec.answer in q["golden_answers"]
    assert rec.correct == correct
    if rec.kind == "efficient":
      assert len(rec.searches) == len(plan) and all(found) and correct
    elif rec.kind == "redundant":
      assert len(rec.searches) == len(plan) + 1 and correct
      dup = [i for i in range(len(rec.searches) - 1) if rec.searches[i] == rec.searches[i + 1]]
      assert dup and rec.retrieved[dup[0]] == rec.retrieved[dup[0] + 1]
      hops = list(range(dup[0] + 1)) + list(range(dup[0], len(plan)))
      assert all(gold[h] in shown for h, shown in zip(hops, rec.retrieved))
    elif rec.kind == "verify":
      assert len(rec.searches) == len(plan) + 1 and all(found) and correct
      assert rec.searches[-1] != rec.searches[-2] and gold[-1] in rec.retrieved[-1]  # last hop, other words
      assert "double-check" in rec.segments[-3][0] and "double-check" not in rec.segments[-1][0]
    elif rec.kind == "vague":
      assert len(rec.searches) == len(plan) + 1 and correct
      i = found.index(False) if False in found else len(plan)
      assert i < len(plan)  # one search finds only look-alikes of the entity it needed ...
      assert all(t not in gold[i:i + 1] for t in rec.retrieved[i])
      hops = list(range(i + 1)) + list(range(i, len(plan)))
      assert all(gold[h] in shown for h, shown in zip(hops[i + 1:], rec.retrieved[i + 1:]))  # ... then the gold
    elif rec.kind == "premature":
      assert len(rec.searches) < len(plan) and all(found)
    elif rec.kind == "wrong":
      assert len(rec.searches) == len(plan) and all(found) and not correct
  by_kind = collections.defaultdict(list)
  for rec in records:
    by_kind[rec.kind].append(rec.correct)
  assert set(by_kind) == set(tr.KINDS)
  assert np.mean(by_kind["premature"]) < 0.3  # mostly wrong guesses


def test_mix_rates_are_respected(world):
  cfg = small_world_cfg().transcripts
  cfg.rates = {"efficient": 0.4, "redundant": 0.1, "verify": 0.1, "vague": 0.2, "premature": 0.15, "wrong": 0.05}
  cfg.per_question = 2
  qs = world.train_questions[:700]
  recs = tr.make_transcript_records(world, qs, np.random.default_rng(0), cfg)
  assert len(recs) == 1400
  counts = collections.Counter(r.kind for r in recs)
  for kind, rate in cfg.rates.items():
    assert abs(counts[kind] / len(recs) - rate) <= 1 / len(recs), (kind, counts)
  assert collections.Counter(r.question_id for r in recs) == {q["id"]: 2 for q in qs}
  # Kinds are shuffled over questions, not in blocks.
  first = collections.Counter(r.kind for r in recs[:200])
  assert len(first) == 6


def test_only_training_questions_and_deterministic(world):
  cfg = small_world_cfg().transcripts
  with pytest.raises(ValueError, match="not a training question"):
    tr.make_transcripts(world, world.train_questions[:3] + world.test_questions[:1],
                        np.random.default_rng(0), cfg)
  a = tr.make_transcripts(world, world.train_questions[:50], np.random.default_rng(5), cfg)
  b = tr.make_transcripts(world, world.train_questions[:50], np.random.default_rng(5), cfg)
  c = tr.make_transcripts(world, world.train_questions[:50], np.random.default_rng(6), cfg)
  assert a == b and a != c


def test_protocol_block_sets_template_and_observation_style(world):
  cfg = small_world_cfg().transcripts
  pcfg = protocol_part.get()
  pcfg.template = "Q: {question}\n"
  pcfg.obs_keep_title_quotes, pcfg.obs_strip_docs = False, False
  rec = tr.make_transcript_records(world, world.train_questions[:1], np.random.default_rng(0), cfg,
                                   protocol_cfg=pcfg)[0]
  assert rec.text.startswith("Q: " + world.train_questions[0]["question"] + "\n<think> ")
  obs = rec.segments[2][0]
  assert obs.startswith("\n\n<information>Doc 1(Title: ") and '(Title: "' not in obs
  assert obs.endswith("\n</information>\n\n")


def test_bad_config_is_a_clear_error(world):
  cfg = small_world_cfg().transcripts
  cfg.rates = {"efficient": 1.0, "lazy": 0.5}
  with pytest.raises(ValueError, match="lazy"):
    tr.make_transcripts(world, world.train_questions[:2], np.random.default_rng(0), cfg)
  cfg = small_world_cfg().transcripts
  cfg.max_searches = 3
  with pytest.raises(ValueError, match="max_searches"):
    tr.make_transcripts(world, world.train_questions[:2], np.random.default_rng(0), cfg)
  cfg = small_world_cfg().transcripts
  pcfg = protocol_part.get()
  pcfg.topk = 5
  with pytest.raises(ValueError, match="protocol.topk=5"):
    tr.make_transcripts(world, world.train_questions[:2], np.random.default_rng(0), cfg, protocol_cfg=pcfg)
  pcfg = protocol_part.get()
  pcfg.max_turns = 2
  with pytest.raises(ValueError, match="protocol.max_turns=2"):
    tr.make_transcripts(world, world.train_questions[:2], np.random.default_rng(0), cfg, protocol_cfg=pcfg)


def test_scripted_misses_are_the_retrievers_and_are_searched_again(world):
  cfg = small_world_cfg().transcripts
  cfg.rates.verify = 0.15
  cfg.miss_rate, cfg.miss_seed = 0.3, 2
  recs = tr.make_transcript_records(world, world.train_questions, np.random.default_rng(3), cfg)
  questions = {q["id"]: q for q in world.train_questions}
  retried = lost = 0
  for rec in recs:
    q = questions[rec.question_id]
    parse(rec.text, q["question"])  # still the exact protocol
    hops = world.plan(q)
    wordings = [{misses.query_key(w) for w in tr.hop_wordings(h)} for h in hops]
    for i, (query, shown) in enumerate(zip(rec.searches, rec.retrieved)):
      hop = next((h for h, ws in enumerate(wordings) if misses.query_key(query) in ws), None)
      if hop is None:
        assert rec.kind == "vague"  # a partial name: only look-alikes
        continue
      hit = not misses.missed(query, 0.3, 2)
      assert (hops[hop].title in shown) == hit, (rec.text, query)
      if not hit and i + 1 < len(rec.searches):
        # a miss is said and searched again for the same hop in words not tried yet
        retried += 1
        nxt = misses.query_key(rec.searches[i + 1])
        assert nxt in wordings[hop], rec.text
        assert nxt not in {misses.query_key(s) for s in rec.searches[:i + 1]}, rec.text
    if "I could not find" in rec.segments[-1][0]:
      lost += 1
      assert misses.missed(rec.searches[-1], 0.3, 2) or len(rec.searches) == cfg.max_searches
    elif rec.kind in ("efficient", "verify", "redundant", "vague"):
      assert rec.correct, rec.text
    assert len(rec.searches) <= cfg.max_searches
  assert retried > 100 and 0 < lost < 0.2 * len(recs)  # lost: mostly 3-hop questions out of searches
