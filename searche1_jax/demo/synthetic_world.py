"""A seeded fictional world for the CPU demo: entities, a wiki-18 style corpus, and questions.

People, cities, countries and companies carry made-up, syllable-built names, so no pretrained
knowledge helps: a question can only be answered by searching the corpus. Names share parts on
purpose (people share first names and surnames, cities and companies share roots), so a search
returns look-alike distractors next to the right passage.

Relations: person born in city (and year), works for company, founded (at most one) company;
company founded by person (in year), headquartered in city; city located in country; country
has a capital city. Every entity has exactly one passage, titled with its name, that states its
own relations (and a little filler). A question is answered by walking a chain of relations, one
passage per hop, which `World.plan` / `World.solve` return as the ideal search plan.

Train and test questions are about disjoint entities: people (and the companies they founded)
are split into a train pool and a test pool; employment stays inside a pool, and a question only
names entities of one pool. Cities and countries are shared by both pools.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from searche1_jax.data import qa

# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "h", "j", "k", "kr", "l", "m", "n", "p", "pr",
           "r", "s", "sh", "st", "t", "tr", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "th", "k")
_CITY_ENDINGS = ("holm", "port", "dale", "mar", "vik", "ford", "wick", "haven", "stad", "ley")
_COUNTRY_ENDINGS = ("ia", "land", "mark", "ora", "esh", "istan")
_COMPANY_KINDS = ("Labs", "Works", "Holdings", "Trading", "Mills", "Foundry", "Systems",
                  "Partners")
_OCCUPATIONS = ("painter", "engineer", "historian", "chemist", "architect", "sailor", "poet",
                "botanist", "judge", "composer", "surgeon", "cartographer")
_INDUSTRIES = ("shipping", "textile", "software", "mining", "brewing", "publishing", "aviation",
               "glassmaking", "insurance", "railway")
_KNOWN_FOR = ("its harbor", "its old bridges", "its glassworks", "its spring fair",
              "its university", "its salt mines", "its vineyards", "its clock tower",
              "its river port", "its textile mills", "its observatory", "its botanical garden")
_WORD_RE = re.compile(r"[A-Za-z]+")


class _NameMaker:
  """Draws pronounceable syllable words; a word is never handed out twice."""

  def __init__(self, rng: np.random.Generator):
    self.rng = rng
    self.used: set[str] = set()

  def word(self, min_syll: int, max_syll: int, min_len: int = 4, max_len: int = 9) -> str:
    for _ in range(10_000):
      n = int(self.rng.integers(min_syll, max_syll + 1))
      parts = []
      for i in range(n):
        onset = "" if (i == 0 and self.rng.random() < 0.2) else self.rng.choice(_ONSETS)
        coda = self.rng.choice(_CODAS) if i == n - 1 or self.rng.random() < 0.3 else ""
        parts.append(f"{onset}{self.rng.choice(_VOWELS)}{coda}")
      w = "".join(parts)
      if not (min_len <= len(w) <= max_len) or re.search(r"(.)\1\1", w):
        continue
      w = w.capitalize()
      if w.lower() in self.used:
        continue
      self.used.add(w.lower())
      return w
    raise RuntimeError("name generator exhausted; lower the world sizes")


# --------------------------------------------------------------------------------------------
# Entities
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Country:
  name: str
  capital: str
  neighbors: tuple[str, ...]
  population_millions: int


@dataclasses.dataclass(frozen=True)
class City:
  name: str
  country: str
  population_thousands: int
  known_for: str


@dataclasses.dataclass(frozen=True)
class Company:
  name: str
  founder: str
  founding_year: int
  hq_city: str
  industry: str
  pool: str  # 'train' or 'test' (the founder's pool)


@dataclasses.dataclass(frozen=True)
class Person:
  name: str
  birth_city: str
  birth_year: int
  employer: str
  founded: str | None
  occupation: str
  pool: str  # 'train' or 'test'


# (kind of the entity a hop reads, relation) -> (kind of the value, canonical search query).
RELATIONS: dict[tuple[str, str], tuple[str, str]] = {
    ("person", "birth_city"): ("city", "{s} birthplace"),
    ("person", "birth_year"): ("year", "{s} birth year"),
    ("person", "employer"): ("company", "{s} employer"),
    ("person", "founded"): ("company", "company founded by {s}"),
    ("company", "founder"): ("person", "founder of {s}"),
    ("company", "hq_city"): ("city", "{s} headquarters"),
    ("company", "founding_year"): ("year", "{s} founding year"),
    ("city", "country"): ("country", "{s} country"),
    ("country", "capital"): ("city", "capital of {s}"),
}


@dataclasses.dataclass(frozen=True)
class QuestionType:
  """One question template: the category, the subject kind and the relation chain walked."""
  category: str  # single_hop | compositional | comparison | three_hop
  subject: str  # person | company (comparison: two of them)
  chain: tuple[str, ...]  # relations applied in turn, starting at the subject
  text: str  # '{s}' (and '{t}' for comparison) are replaced by names

  @property
  def hops(self) -> int:
    return 2 if self.category == "comparison" else len(self.chain)


QUESTION_TYPES: dict[str, QuestionType] = {
    "birth_city": QuestionType("single_hop", "person", ("birth_city",), "Where was {s} born?"),
    "birth_year": QuestionType("single_hop", "person", ("birth_year",),
                               "In which year was {s} born?"),
    "employer": QuestionType("single_hop", "person", ("employer",),
                             "Which company does {s} work for?"),
    "founder": QuestionType("single_hop", "company", ("founder",), "Who founded {s}?"),
    "hq_city": QuestionType("single_hop", "company", ("hq_city",),
                            "In which city is {s} headquartered?"),
    "founding_year": QuestionType("single_hop", "company", ("founding_year",),
                                  "In which year was {s} founded?"),
    "birth_country": QuestionType("compositional", "person", ("birth_city", "country"),
                                  "In which country was {s} born?"),
    "founded_company_hq": QuestionType(
        "compositional", "person", ("founded", "hq_city"),
        "In which city is the company founded by {s} headquartered?"),
    "employer_founder": QuestionType("compositional", "person", ("employer", "founder"),
                                     "Who founded the company that {s} works for?"),
    "employer_hq": QuestionType("compositional", "person", ("employer", "hq_city"),
                                "In which city is the company that {s} works for headquartered?"),
    "older_person": QuestionType("comparison", "person", ("birth_year",),
                                 "Who was born first, {s} or {t}?"),
    "older_company": QuestionType("comparison", "company", ("founding_year",),
                                  "Which company was founded first, {s} or {t}?"),
    "founder_birth_country": QuestionType(
        "three_hop", "company", ("founder", "birth_city", "country"),
        "In which country was the founder of {s} born?"),
    "birth_country_capital": QuestionType(
        "three_hop", "person", ("birth_city", "country", "capital"),
        "What is the capital of the country where {s} was born?"),
    "employer_hq_country": QuestionType(
        "three_hop", "person", ("employer", "hq_city", "country"),
        "In which country is the company that {s} works for headquartered?"),
}

CATEGORIES = ("single_hop", "compositional", "comparison", "three_hop")


class Hop(NamedTuple):
  """One step of the ideal search plan: search `query`, read passage `title`, learn `value`."""
  query: str
  title: str  # the entity (and passage title) read in this hop
  kind: str  # that entity's kind
  relation: str
  value: str  # what the passage tells: the next bridge entity, or an answer/comparison fact


def contains_name(text: str, name: str) -> bool:
  """Whole-word, case-sensitive occurrence of an entity name (or a year) in text."""
  return re.search(rf"(?<![A-Za-z0-9]){re.escape(name)}(?![A-Za-z0-9])", text) is not None


# --------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------

class World:
  """Entities, passages and questions of one generated world; the solver/oracle."""

  def __init__(self, countries: Sequence[Country], cities: Sequence[City],
               companies: Sequence[Company], people: Sequence[Person],
               passages: Sequence[Mapping[str, str]], train_questions: Sequence[dict],
               test_questions: Sequence[dict], config: Mapping[str, Any] | None = None):
    self.countries = {c.name: c for c in countries}
    self.cities = {c.name: c for c in cities}
    self.companies = {c.name: c for c in companies}
    self.people = {p.name: p for p in people}
    self.passages = [dict(p) for p in passages]
    self.train_questions = [dict(q) for q in train_questions]
    self.test_questions = [dict(q) for q in test_questions]
    self.config = dict(config or {})
    self._kind: dict[str, str] = {}
    for kind, table in (("country", self.countries), ("city", self.cities),
                        ("company", self.companies), ("person", self.people)):
      for name in table:
        if name in self._kind:
          raise ValueError(f"entity name {name!r} is used twice")
        self._kind[name] = kind
    self._passage_by_title: dict[str, dict] = {}
    for p in self.passages:
      title = p["contents"].partition("\n")[0].strip('"')
      self._passage_by_title[title] = p
    self._questions_by_id = {q["id"]: q for q in self.train_questions + self.test_questions}
    self._questions_by_text = {q["question"]: q
                               for q in self.train_questions + self.test_questions}
    self._train_ids = {q["id"] for q in self.train_questions}
    self._by_part: dict[str, list[str]] = {}
    for name, kind in self._kind.items():
      for part in self.name_parts(name):
        self._by_part.setdefault(f"{kind}:{part}", []).append(name)

  # ---- entities and facts ---------------------------------------------------------------

  def kind(self, name: str) -> str:
    if name not in self._kind:
      raise KeyError(f"no entity named {name!r} in this world")
    return self._kind[name]

  def names(self, kind: str) -> list[str]:
    return [n for n, k in self._kind.items() if k == kind]

  def facts(self, name: str) -> dict[str, str]:
    """The relations of one entity as strings (years too), plus its 'kind'."""
    kind = self.kind(name)
    if kind == "person":
      p = self.people[name]
      out = {"birth_city": p.birth_city, "birth_year": str(p.birth_year),
             "employer": p.employer, "occupation": p.occupation, "pool": p.pool}
      if p.founded is not None:
        out["founded"] = p.founded
    elif kind == "company":
      c = self.companies[name]
      out = {"founder": c.founder, "founding_year": str(c.founding_year),
             "hq_city": c.hq_city, "industry": c.industry, "pool": c.pool}
    elif kind == "city":
      c = self.cities[name]
      out = {"country": c.country, "population_thousands": str(c.population_thousands),
             "known_for": c.known_for}
    else:
      c = self.countries[name]
      out = {"capital": c.capital, "neighbors": ", ".join(c.neighbors),
             "population_millions": str(c.population_millions)}
    return {"kind": kind, **out}

  def passage(self, title: str) -> dict:
    """The wiki-18 passage `{'id', 'contents'}` of one entity."""
    if title not in self._passage_by_title:
      raise KeyError(f"no passage titled {title!r} in this world")
    return self._passage_by_title[title]

  @staticmethod
  def name_parts(name: str) -> list[str]:
    """Parts a look-alike may share: person first/last name, the root of a place/company."""
    words = _WORD_RE.findall(name)
    if len(words) >= 2:  # person "First Last", or company "Root Kind"
      return words[:1] if words[-1] in _COMPANY_KINDS else words
    w = words[0]
    for ending in sorted(_CITY_ENDINGS + _COUNTRY_ENDINGS, key=len, reverse=True):
      if w.lower().endswith(ending) and len(w) > len(ending) + 1:
        return [w[: len(w) - len(ending)]]
    return [w]

  def lookalikes(self, name: str) -> list[str]:
    """Other entities of the same kind that share a name part with `name` (sorted)."""
    kind = self.kind(name)
    out = set()
    for part in self.name_parts(name):
      out.update(self._by_part.get(f"{kind}:{part}", ()))
    out.discard(name)
    return sorted(out)

  # ---- questions and the oracle ---------------------------------------------------------

  def is_train_question(self, question: Mapping[str, Any] | str) -> bool:
    """True for a training question of this world (matched by id, else by text)."""
    if isinstance(question, str):
      q = self._questions_by_text.get(question)
    else:
      q = self._questions_by_id.get(question.get("id"))
      if q is None or q["question"] != question.get("question"):
        q = self._questions_by_text.get(question.get("question"))
    return q is not None and q["id"] in self._train_ids

  def _lookup(self, question: Mapping[str, Any] | str) -> dict:
    """A question of this world by text, id, or (for a dict carrying its metadata) itself."""
    if isinstance(question, str):
      q = self._questions_by_text.get(question)
      if q is None:
        raise KeyError(f"question {question!r} is not one of this world's questions")
      return q
    meta = question.get("metadata") or {}
    if meta.get("relation") in QUESTION_TYPES and meta.get("entities"):
      return dict(question)
    qid, text = question.get("id"), question.get("question")
    if qid in self._questions_by_id:
      return self._questions_by_id[qid]
    if text in self._questions_by_text:
      return self._questions_by_text[text]
    raise KeyError(f"question {qid!r} ({text!r}) is not one of this world's questions")

  def plan(self, question: Mapping[str, Any] | str) -> list[Hop]:
    """The ideal search plan of a question (a dict with metadata, or the question text).

    Each hop reads one passage; chained questions pass the hop's value on as the next
    subject; comparison questions read both subjects' passages.
    """
    q = self._lookup(question)
    qtype = QUESTION_TYPES[q["metadata"]["relation"]]
    subjects = list(q["metadata"]["entities"])
    if qtype.category == "comparison":
      return [self._hop(s, qtype.chain[0]) for s in subjects]
    hops, current = [], subjects[0]
    for relation in qtype.chain:
      hop = self._hop(current, relation)
      hops.append(hop)
      current = hop.value
    return hops

  def _hop(self, name: str, relation: str) -> Hop:
    kind = self.kind(name)
    facts = self.facts(name)
    if relation not in facts:
      raise ValueError(f"{kind} {name!r} has no {relation!r}")
    query = RELATIONS[(kind, relation)][1].format(s=name)
    return Hop(query=query, title=name, kind=kind, relation=relation, value=facts[relation])

  def answer(self, question: Mapping[str, Any] | str) -> str:
    """The answer the oracle derives from the facts (the golden answer)."""
    q = self._lookup(question)
    qtype = QUESTION_TYPES[q["metadata"]["relation"]]
    hops = self.plan(q)
    if qtype.category == "comparison":
      a, b = hops
      return a.title if int(a.value) < int(b.value) else b.title
    return hops[-1].value

  def solve(self, question: Mapping[str, Any] | str) -> list[tuple[str, str]]:
    """The ideal search plan as `[(search_query, expected_title), ...]`, one per hop."""
    return [(h.query, h.title) for h in self.plan(question)]

  # ---- serialization --------------------------------------------------------------------

  def to_json(self) -> dict:
    return {
        "config": self.config,
        "countries": [dataclasses.asdict(c) for c in self.countries.values()],
        "cities": [dataclasses.asdict(c) for c in self.cities.values()],
        "companies": [dataclasses.asdict(c) for c in self.companies.values()],
        "people": [dataclasses.asdict(p) for p in self.people.values()],
    }


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------

_CFG_FIELDS = ("seed", "num_countries", "cities_per_country", "num_people", "num_companies",
               "test_fraction", "birth_years", "founder_age", "num_train_questions",
               "num_test_questions", "category_weights")


def _check_cfg(cfg) -> None:
  missing = [f for f in _CFG_FIELDS if f not in cfg]
  if missing:
    raise ValueError(f"world config lacks field(s) {missing}; see configs/parts/world.py")
  if cfg.num_countries < 3:
    raise ValueError(f"world.num_countries must be >= 3, got {cfg.num_countries}")
  if cfg.cities_per_country < 1:
    raise ValueError(f"world.cities_per_country must be >= 1, got {cfg.cities_per_country}")
  if not 0.0 < cfg.test_fraction < 1.0:
    raise ValueError(f"world.test_fraction must be in (0, 1), got {cfg.test_fraction}")
  n_test = int(round(cfg.num_people * cfg.test_fraction))
  if min(n_test, cfg.num_people - n_test) < 4:
    raise ValueError("world.num_people * world.test_fraction leaves fewer than 4 people in a "
                     f"pool (num_people={cfg.num_people}, test_fraction={cfg.test_fraction})")
  if not 4 <= cfg.num_companies <= cfg.num_people // 2:
    raise ValueError(f"world.num_companies must be in [4, num_people // 2], got "
                     f"{cfg.num_companies} with num_people={cfg.num_people}")
  lo, hi = cfg.birth_years
  if lo >= hi:
    raise ValueError(f"world.birth_years must be (first, last) with first < last, got "
                     f"{tuple(cfg.birth_years)}")
  a, b = cfg.founder_age
  if not 0 < a <= b:
    raise ValueError(f"world.founder_age must be (min, max) with 0 < min <= max, got "
                     f"{tuple(cfg.founder_age)}")
  weights = dict(cfg.category_weights)
  unknown = set(weights) - set(CATEGORIES)
  if unknown or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
    raise ValueError(f"world.category_weights must map {CATEGORIES} to non-negative "
                     f"weights with a positive sum, got {weights}")


def _allocate(total: int, weights: Mapping[str, float]) -> dict[str, int]:
  """Largest-remainder split of `total` items by `weights` (exact counts, sum == total)."""
  keys = list(weights)
  w = np.array([float(weights[k]) for k in keys])
  raw = total * w / w.sum()
  counts = np.floor(raw).astype(int)
  order = np.argsort(-(raw - counts), kind="stable")
  for i in order[: total - counts.sum()]:
    counts[i] += 1
  return {k: int(c) for k, c in zip(keys, counts)}


def _a(word: str) -> str:
  """English indefinite article + word."""
  return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _sentences(rng: np.random.Generator, variants: Sequence[str], **kw) -> str:
  return variants[int(rng.integers(len(variants)))].format(**kw)


def _person_text(rng, p: Person) -> str:
  last = p.name.split()[-1]
  text = _sentences(rng, (
      "{n} is {a_occ} born in {city} in {year}. {n} works for {emp}.",
      "{n} (born {year} in {city}) is {a_occ}. {last} works for {emp}.",
      "{n} was born in {city} in {year}. The {occ} works for {emp}.",
  ), n=p.name, occ=p.occupation, a_occ=_a(p.occupation), city=p.birth_city,
      year=p.birth_year, emp=p.employer, last=last)
  if p.founded is not None:
    text += _sentences(rng, (" {n} founded {c}.", " {last} is the founder of {c}."),
                       n=p.name, last=last, c=p.founded)
  return text


def _company_text(rng, c: Company) -> str:
  return _sentences(rng, (
      "{n} is {a_ind} company founded in {year} by {f}. It is headquartered in {city}.",
      "{n} was founded by {f} in {year}. The {ind} company is headquartered in {city}.",
  ), n=c.name, ind=c.industry, a_ind=_a(c.industry), year=c.founding_year, f=c.founder,
      city=c.hq_city)


def _city_text(rng, c: City, is_capital: bool) -> str:
  lead = "{n} is the capital city of {k}" if is_capital else "{n} is a city in {k}"
  return _sentences(rng, (
      lead + ". It has about {pop} thousand inhabitants and is known for {kf}.",
      lead + ", known for {kf}. About {pop} thousand people live there.",
  ), n=c.name, k=c.country, pop=c.population_thousands, kf=c.known_for)


def _country_text(rng, c: Country) -> str:
  return _sentences(rng, (
      "{n} is a country whose capital is {cap}. It borders {a} and {b} and has about {m} "
      "million inhabitants.",
      "The capital of {n} is {cap}. {n} borders {a} and {b}; about {m} million people live "
      "there.",
  ), n=c.name, cap=c.capital, a=c.neighbors[0], b=c.neighbors[1], m=c.population_millions)


def _make_entities(cfg, rng: np.random.Generator):
  names = _NameMaker(rng)
  # Countries: distinct roots, a shared pool of endings.
  countries_n = []
  for _ in range(cfg.num_countries):
    countries_n.append(names.word(2, 2, 4, 7) + str(rng.choice(_COUNTRY_ENDINGS)))
    names.used.add(countries_n[-1].lower())
  # Cities: roots shared by up to three cities (look-alikes), several endings.
  n_cities = cfg.num_countries * cfg.cities_per_country
  city_names: list[str] = []
  roots = [names.word(2, 2, 4, 7) for _ in range(max(1, (n_cities + 1) // 2))]
  combos = [(r, e) for r in roots for e in _CITY_ENDINGS]
  for i in rng.permutation(len(combos)):
    name = "".join(combos[int(i)])
    if len(city_names) < n_cities and name.lower() not in names.used:
      city_names.append(name)
      names.used.add(name.lower())
  # Company names: roots shared by a few companies, kind words.
  comp_roots = [names.word(2, 3, 4, 8) for _ in range(max(1, (cfg.num_companies + 1) // 2))]
  comp_combos = [(r, k) for r in comp_roots for k in _COMPANY_KINDS]
  company_names = [f"{comp_combos[int(i)][0]} {comp_combos[int(i)][1]}"
                   for i in rng.permutation(len(comp_combos))[: cfg.num_companies]]
  # People: small pools of first names and surnames, so names overlap (look-alikes).
  n_first = max(4, cfg.num_people // 5)
  n_last = max(4, cfg.num_people // 6, -(-2 * cfg.num_people // n_first))
  firsts = [names.word(2, 2, 4, 7) for _ in range(n_first)]
  lasts = [names.word(2, 3, 5, 9) for _ in range(n_last)]
  person_names, seen = [], set()
  while len(person_names) < cfg.num_people:
    n = f"{rng.choice(firsts)} {rng.choice(lasts)}"
    if n not in seen:
      seen.add(n)
      person_names.append(n)

  # Places.
  city_country = {}
  cities_of: dict[str, list[str]] = {k: [] for k in countries_n}
  for i, c in enumerate(city_names):
    k = countries_n[i % cfg.num_countries]
    city_country[c] = k
    cities_of[k].append(c)
  countries = []
  for k in countries_n:
    others = [o for o in countries_n if o != k]
    nb = tuple(str(x) for x in rng.choice(others, size=2, replace=False))
    countries.append(Country(name=k, capital=cities_of[k][0], neighbors=nb,
                             population_millions=int(rng.integers(1, 90))))
  cities = [City(name=c, country=city_country[c],
                 population_thousands=int(rng.integers(20, 990)),
                 known_for=str(rng.choice(_KNOWN_FOR))) for c in city_names]

  # Pools: people split train/test; companies follow their founder's pool.
  n_test = int(round(cfg.num_people * cfg.test_fraction))
  perm = rng.permutation(cfg.num_people)
  pool = {person_names[int(i)]: ("test" if j < n_test else "train") for j, i in enumerate(perm)}
  n_test_comp = min(max(2, int(round(cfg.num_companies * cfg.test_fraction))),
                    cfg.num_companies - 2, n_test)
  test_people = [n for n in person_names if pool[n] == "test"]
  train_people = [n for n in person_names if pool[n] == "train"]
  founders = (list(rng.choice(test_people, size=n_test_comp, replace=False))
              + list(rng.choice(train_people, size=cfg.num_companies - n_test_comp,
                                replace=False)))
  birth_year = {n: int(rng.integers(cfg.birth_years[0], cfg.birth_years[1] + 1))
                for n in person_names}
  companies, founded = [], {}
  for cname, founder in zip(company_names, founders):
    founder = str(founder)
    year = birth_year[founder] + int(rng.integers(cfg.founder_age[0], cfg.founder_age[1] + 1))
    companies.append(Company(name=cname, founder=founder, founding_year=year,
                             hq_city=str(rng.choice(city_names)),
                             industry=str(rng.choice(_INDUSTRIES)), pool=pool[founder]))
    founded[founder] = cname
  pool_companies = {p: [c.name for c in companies if c.pool == p] for p in ("train", "test")}
  people = []
  for n in person_names:
    options = [c for c in pool_companies[pool[n]] if c != founded.get(n)]
    people.append(Person(name=n, birth_city=str(rng.choice(city_names)),
                         birth_year=birth_year[n], employer=str(rng.choice(options)),
                         founded=founded.get(n), occupation=str(rng.choice(_OCCUPATIONS)),
                         pool=pool[n]))
  return countries, cities, companies, people


def _make_passages(rng, countries, cities, companies, people) -> list[dict]:
  capitals = {c.capital for c in countries}
  texts = ([(c.name, _country_text(rng, c)) for c in countries]
           + [(c.name, _city_text(rng, c, c.name in capitals)) for c in cities]
           + [(c.name, _company_text(rng, c)) for c in companies]
           + [(p.name, _person_text(rng, p)) for p in people])
  return [{"id": str(i), "contents": f'"{title}"\n{text}'} for i, (title, text) in
          enumerate(texts)]


def _valid_question(world: World, q: dict) -> bool:
  """Checks a candidate: the plan walks, each hop's passage states its value, and no shortcut.

  A shortcut would be the answer (or a later bridge) already visible in the question or in an
  earlier hop's passage; such candidates are dropped so the stated hop count is honest.
  """
  try:
    hops = world.plan(q)
  except (ValueError, KeyError):
    return False
  qtype = QUESTION_TYPES[q["metadata"]["relation"]]
  if qtype.category == "comparison":
    return hops[0].value != hops[1].value
  answer = hops[-1].value
  seen = q["question"]
  for i, hop in enumerate(hops):
    later = [h.value for h in hops[i:]]
    if any(contains_name(seen, v) for v in later):
      return False
    seen += "\n" + world.passage(hop.title)["contents"]
  return contains_name(world.passage(hops[-1].title)["contents"], answer)


def _make_questions(world: World, cfg, rng: np.random.Generator, pool: str, total: int,
                    id_prefix: str) -> list[dict]:
  people = sorted(n for n, p in world.people.items() if p.pool == pool)
  companies = sorted(n for n, c in world.companies.items() if c.pool == pool)
  counts = _allocate(total, dict(cfg.category_weights))
  by_cat = {c: [n for n, t in QUESTION_TYPES.items() if t.category == c] for c in CATEGORIES}
  out, seen = [], set()
  for category in CATEGORIES:
    need = counts.get(category, 0)
    made, fails = 0, 0
    while made < need:
      fails += 1
      if fails > 5000:  # this many draws in a row gave nothing new
        raise ValueError(
            f"could only make {made} of {need} {category} questions for the {pool} pool; "
            "raise world.num_people / world.num_companies or lower "
            f"world.num_{pool}_questions")
      relation = str(rng.choice(by_cat[category]))
      qtype = QUESTION_TYPES[relation]
      candidates = people if qtype.subject == "person" else companies
      if qtype.category == "comparison":
        s, t = (str(x) for x in rng.choice(candidates, size=2, replace=False))
        key = (relation, frozenset((s, t)))
        subjects = [s, t]
        text = qtype.text.format(s=s, t=t)
      else:
        s = str(rng.choice(candidates))
        key = (relation, s)
        subjects = [s]
        text = qtype.text.format(s=s)
      if key in seen:
        continue
      q = {"id": "", "question": text, "golden_answers": [],
           "metadata": {"type": category, "hops": qtype.hops, "entities": subjects,
                        "relation": relation}}
      if not _valid_question(world, q):
        continue
      seen.add(key)
      q["golden_answers"] = [world.answer(q)]
      out.append(q)
      made, fails = made + 1, 0
  order = rng.permutation(len(out))
  out = [out[int(i)] for i in order]
  for i, q in enumerate(out):
    q["id"] = f"{id_prefix}_{i}"
  return out


def generate_world(cfg) -> World:
  """Builds the whole world from a `configs/parts/world.py` block; deterministic per seed."""
  _check_cfg(cfg)
  rng = np.random.default_rng(cfg.seed)
  countries, cities, companies, people = _make_entities(cfg, rng)
  passages = _make_passages(rng, countries, cities, companies, people)
  config = {f: (list(cfg[f]) if isinstance(cfg[f], tuple) else cfg[f]) for f in _CFG_FIELDS}
  config["category_weights"] = dict(cfg.category_weights)
  world = World(countries, cities, companies, people, passages, [], [], config)
  train = _make_questions(world, cfg, rng, "train", cfg.num_train_questions, "world_train")
  test = _make_questions(world, cfg, rng, "test", cfg.num_test_questions, "world_test")
  return World(countries, cities, companies, people, passages, train, test, config)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

CORPUS_FILE, TRAIN_FILE, TEST_FILE, WORLD_FILE = ("corpus.jsonl", "train.jsonl", "test.jsonl",
                                                  "world.json")


def _write_jsonl(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  os.replace(tmp, path)


def write_world(out_dir: str, cfg, tfds_dir: str | None = None) -> World:
  """Generates the world and writes `corpus.jsonl`, `train.jsonl`, `test.jsonl`, `world.json`.

  `corpus.jsonl` is wiki-18 format (`{"id", "contents"}`), the question files are the
  benchmark JSONL format. With `tfds_dir`, also (re)builds the TFDS dataset
  `synthetic_world` (splits train/test) from these files.
  """
  world = generate_world(cfg)
  os.makedirs(out_dir, exist_ok=True)
  _write_jsonl(os.path.join(out_dir, CORPUS_FILE), world.passages)
  _write_jsonl(os.path.join(out_dir, TRAIN_FILE), world.train_questions)
  _write_jsonl(os.path.join(out_dir, TEST_FILE), world.test_questions)
  tmp = os.path.join(out_dir, WORLD_FILE + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(world.to_json(), f, ensure_ascii=False, indent=1)
  os.replace(tmp, os.path.join(out_dir, WORLD_FILE))
  if tfds_dir is not None:
    qa.build("synthetic_world", data_dir=out_dir, tfds_dir=tfds_dir, overwrite=True)
  return world


def _read_jsonl(path: str) -> list[dict]:
  rows = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
  return rows


def load_world(out_dir: str) -> World:
  """Reads back a world written by `write_world` (no regeneration)."""
  paths = {n: os.path.join(out_dir, n) for n in (CORPUS_FILE, TRAIN_FILE, TEST_FILE,
                                                  WORLD_FILE)}
  missing = [p for p in paths.values() if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f"not a synthetic world directory, missing: {missing}; "
                            "write one with searche1_jax.demo.synthetic_world.write_world")
  with open(paths[WORLD_FILE], encoding="utf-8") as f:
    data = json.load(f)
  return World(
      countries=[Country(**{**c, "neighbors": tuple(c["neighbors"])}) for c in data["countries"]],
      cities=[City(**c) for c in data["cities"]],
      companies=[Company(**c) for c in data["companies"]],
      people=[Person(**p) for p in data["people"]],
      passages=_read_jsonl(paths[CORPUS_FILE]),
      train_questions=_read_jsonl(paths[TRAIN_FILE]),
      test_questions=_read_jsonl(paths[TEST_FILE]),
      config=data["config"])
