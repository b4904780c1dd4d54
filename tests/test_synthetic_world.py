"""The synthetic world: determinism, answerability by the stated hops, disjoint splits, files."""
import collections
import json
import re

import pytest

from configs.parts import world as world_part
from searche1_jax.demo import synthetic_world as sw


def small_cfg(seed=0):
  cfg = world_part.get()
  cfg.seed = seed
  cfg.num_countries, cfg.cities_per_country = 5, 4
  cfg.num_people, cfg.num_companies = 150, 50
  cfg.test_fraction = 0.2
  cfg.num_train_questions, cfg.num_test_questions = 400, 80
  return cfg


@pytest.fixture(scope="module")
def world():
  return sw.generate_world(world_part.get())


def _corpus_by_title(passages):
  out = {}
  for p in passages:
    first, _, text = p["contents"].partition("\n")
    assert first.startswith('"') and first.endswith('"'), p
    out[first[1:-1]] = text
  return out


def _word_in(text, name):
  return re.search(rf"(?<![A-Za-z0-9]){re.escape(name)}(?![A-Za-z0-9])", text) is not None


def test_deterministic_per_seed():
  a, b, c = (sw.generate_world(small_cfg(s)) for s in (3, 3, 4))
  assert a.passages == b.passages
  assert a.train_questions == b.train_questions and a.test_questions == b.test_questions
  assert a.to_json() == b.to_json()
  assert a.passages != c.passages and a.train_questions != c.train_questions


def test_default_sizes_and_formats(world):
  cfg = world_part.get()
  n_cities = cfg.num_countries * cfg.cities_per_country
  assert len(world.passages) == cfg.num_countries + n_cities + cfg.num_companies + cfg.num_people
  assert 1000 <= len(world.passages) <= 2000
  assert [p["id"] for p in world.passages] == [str(i) for i in range(len(world.passages))]
  titles = _corpus_by_title(world.passages)
  assert len(titles) == len(world.passages)  # one passage per entity, titles unique
  assert len(world.train_questions) == cfg.num_train_questions
  assert len(world.test_questions) == cfg.num_test_questions
  ids = [q["id"] for q in world.train_questions + world.test_questions]
  assert len(set(ids)) == len(ids)
  # Categories split exactly by the configured weights (largest remainder), in both splits.
  w = dict(cfg.category_weights)
  for qs in (world.train_questions, world.test_questions):
    got = collections.Counter(q["metadata"]["type"] for q in qs)
    for cat, weight in w.items():
      assert abs(got[cat] - len(qs) * weight / sum(w.values())) < 1
  # Every template shows up in the test set.
  assert {q["metadata"]["relation"] for q in world.test_questions} == set(sw.QUESTION_TYPES)
  for q in world.train_questions[:50]:
    assert set(q) == {"id", "question", "golden_answers", "metadata"}
    assert set(q["metadata"]) == {"type", "hops", "entities", "relation"}
    assert q["question"].endswith("?") and len(q["golden_answers"]) == 1


def _independent_answer(world, q):
  """Golden answer recomputed from the entity tables (not through World.plan)."""
  people, companies, cities, countries = world.people, world.companies, world.cities, world.countries
  rel, ents = q["metadata"]["relation"], q["metadata"]["entities"]
  if rel == "older_person":
    a, b = (people[e] for e in ents)
    return a.name if a.birth_year < b.birth_year else b.name
  if rel == "older_company":
    a, b = (companies[e] for e in ents)
    return a.name if a.founding_year < b.founding_year else b.name
  s = ents[0]
  return {
      "birth_city": lambda: people[s].birth_city,
      "birth_year": lambda: str(people[s].birth_year),
      "employer": lambda: people[s].employer,
      "founder": lambda: companies[s].founder,
      "hq_city": lambda: companies[s].hq_city,
      "founding_year": lambda: str(companies[s].founding_year),
      "birth_country": lambda: cities[people[s].birth_city].country,
      "founded_company_hq": lambda: companies[people[s].founded].hq_city,
      "employer_founder": lambda: companies[people[s].employer].founder,
      "employer_hq": lambda: companies[people[s].employer].hq_city,
      "founder_birth_country": lambda: cities[people[companies[s].founder].birth_city].country,
      "birth_country_capital": lambda: countries[cities[people[s].birth_city].country].capital,
      "employer_hq_country": lambda: cities[companies[people[s].employer].hq_city].country,
  }[rel]()


def test_golden_answers_match_world_facts(world):
  for q in world.train_questions + world.test_questions:
    assert q["golden_answers"] == [_independent_answer(world, q)], q
    assert _word_in(q["question"], q["metadata"]["entities"][0])


def test_every_question_answerable_by_its_plan(world):
  """Walk the solver's plan over the corpus text: each hop's passage holds the next bridge (or the answer),
  the answer is read only at the last hop, and the number of hops is the stated one."""
  corpus = _corpus_by_title(world.passages)
  for q in world.train_questions + world.test_questions:
    plan = world.solve(q)
    meta = q["metadata"]
    assert len(plan) == meta["hops"], q
    answer = q["golden_answers"][0]
    if meta["type"] == "comparison":
      assert [t for _, t in plan] == meta["entities"]
      years = []
      for query, title in plan:
        assert title in query
        m = re.search(r"\b(1[89]\d\d|20\d\d)\b", corpus[title])  # the only 4-digit number of the passage
        years.append(int(m.group(1)))
      assert years[0] != years[1]
      assert answer == plan[years.index(min(years))][1]
      continue
    assert plan[0][1] == meta["entities"][0]
    seen = q["question"]
    for i, (query, title) in enumerate(plan):
      assert title in query, (query, title)  # the canonical query names the entity to read
      text = corpus[title]
      # Not answerable earlier: the answer is in no passage before the last hop, nor in the question.
      assert not _word_in(seen, answer), (q, i)
      if i + 1 < len(plan):
        bridge = plan[i + 1][1]
        assert _word_in(text, bridge), (q, i, bridge)  # this hop's passage names the next entity
        assert not _word_in(seen, bridge)
      else:
        assert _word_in(text, answer), (q, text)
      seen += "\n" + text


def test_passages_state_all_facts(world):
  corpus = _corpus_by_title(world.passages)
  for p in world.people.values():
    t = corpus[p.name]
    assert _word_in(t, p.birth_city) and _word_in(t, str(p.birth_year)) and _word_in(t, p.employer)
    assert p.founded is None or _word_in(t, p.founded)
  for c in world.companies.values():
    t = corpus[c.name]
    assert _word_in(t, c.founder) and _word_in(t, str(c.founding_year)) and _word_in(t, c.hq_city)
  for c in world.cities.values():
    assert _word_in(corpus[c.name], c.country)
  for k in world.countries.values():
    assert _word_in(corpus[k.name], k.capital)
    assert world.cities[k.capital].country == k.name


def test_train_and_test_subjects_are_disjoint(world):
  def entities(qs):
    return {e for q in qs for e in q["metadata"]["entities"]}

  train, test = entities(world.train_questions), entities(world.test_questions)
  assert train and test and not train & test
  # Stronger: every person/company read along a test plan belongs to the test pool (and vice versa).
  for qs, pool in ((world.train_questions, "train"), (world.test_questions, "test")):
    for q in qs:
      for _, title in world.solve(q):
        kind = world.kind(title)
        if kind in ("person", "company"):
          assert world.facts(title)["pool"] == pool, (q, title)


def test_names_are_made_up_and_lookalikes_share_parts(world):
  names = list(world.people) + list(world.companies) + list(world.cities) + list(world.countries)
  assert len(set(names)) == len(names)
  for n in names:
    assert re.fullmatch(r"[A-Z][a-z]+( [A-Z][a-z]+)?", n), n
  # No entity name occurs inside another entity's name (whole words), so name matching is unambiguous.
  words = collections.Counter(w for n in world.cities.keys() | world.countries.keys() for w in n.split())
  for n in world.people:
    assert not any(w in words for w in n.split())
  # Most people have look-alikes (a shared first name or surname), most cities a shared root.
  with_people = [n for n in world.people if world.lookalikes(n)]
  assert len(with_people) > 0.9 * len(world.people)
  for n in with_people[:100]:
    first, last = n.split()
    assert all(first in o.split() or last in o.split() for o in world.lookalikes(n))
  assert sum(bool(world.lookalikes(c)) for c in world.cities) > 0.5 * len(world.cities)


def test_solve_accepts_text_and_tfds_style_records(world):
  q = world.test_questions[0]
  by_text = world.solve(q["question"])
  stripped = {"id": q["id"], "question": q["question"], "golden_answers": q["golden_answers"],
              "data_source": "synthetic_world", "metadata": dict(q["metadata"])}
  assert world.solve(stripped) == by_text == world.solve(q)
  assert world.answer(q) == q["golden_answers"][0]
  assert world.is_train_question(world.train_questions[0]) and not world.is_train_question(q)
  with pytest.raises(KeyError, match="not one of this world's questions"):
    world.solve("Who founded Nowhere Labs?")


def test_write_and_load_world(tmp_path):
  from searche1_jax.data import qa

  cfg = small_cfg()
  world = sw.write_world(str(tmp_path / "world"), cfg, tfds_dir=str(tmp_path / "tfds"))
  with open(tmp_path / "world" / "corpus.jsonl") as f:
    corpus = [json.loads(line) for line in f]
  assert corpus == world.passages
  assert all(set(p) == {"id", "contents"} for p in corpus)
  with open(tmp_path / "world" / "test.jsonl") as f:
    assert [json.loads(line) for line in f] == world.test_questions
  back = sw.load_world(str(tmp_path / "world"))
  assert back.to_json() == world.to_json() and back.passages == world.passages
  assert back.train_questions == world.train_questions
  # The TFDS build holds the same questions, in order, and the oracle solves them.
  rows = qa.load_split("synthetic_world", "test", None, str(tmp_path / "tfds"))
  assert [r["id"] for r in rows] == [q["id"] for q in world.test_questions]
  assert [r["golden_answers"] for r in rows] == [q["golden_answers"] for q in world.test_questions]
  assert [r["metadata"] for r in rows] == [q["metadata"] for q in world.test_questions]
  assert all(r["data_source"] == "synthetic_world" for r in rows)
  assert back.solve(rows[3]) == world.solve(world.test_questions[3])
  with pytest.raises(FileNotFoundError, match="world.json"):
    sw.load_world(str(tmp_path))


@pytest.mark.parametrize("field,value,match", [
    ("num_companies", 500, "num_companies"),
    ("test_fraction", 1.5, "test_fraction"),
    ("birth_years", (1990, 1900), "birth_years"),
    ("category_weights", {"single_hop": 1.0, "five_hop": 1.0}, "category_weights"),
])
def test_bad_config_names_the_field(field, value, match):
  cfg = small_cfg()
  cfg[field] = value
  with pytest.raises(ValueError, match=match):
    sw.generate_world(cfg)


def test_too_many_questions_for_the_pool_is_a_clear_error():
  cfg = small_cfg()
  cfg.num_test_questions = 5000
  with pytest.raises(ValueError, match="num_test_questions"):
    sw.generate_world(cfg)
