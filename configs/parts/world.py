"""Synthetic world block (the CPU demo's data): `config.world = parts.world.get()`.

Sub-blocks: `transcripts` (the scripted warm-start texts) and `tokenizer` (the demo tokenizer).
Defaults suit a CPU demo: 700 people, 1,064 passages, 3,000 train and 300 test questions.
"""
import ml_collections


def get() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Seed of the whole world (names, facts, passages, questions); same seed -> same files.
  c.seed = 0
  # Countries (each gets cities_per_country cities; the first one is its capital).
  c.num_countries = 12
  c.cities_per_country = 6
  # People (one passage each); first names and surnames are shared to make look-alikes.
  c.num_people = 700
  # Companies (one founder each, no person founds two); at most num_people // 2.
  c.num_companies = 280
  # Fraction of people (and the companies they founded) whose questions go to test.
  c.test_fraction = 0.15
  # Birth years are drawn uniformly from [first, last].
  c.birth_years = (1880, 1975)
  # A company is founded when its founder is this old, uniformly in [min, max] years.
  c.founder_age = (22, 50)
  # Questions per split; train and test name disjoint people/companies.
  c.num_train_questions = 3000
  c.num_test_questions = 300
  # Share of each question category (normalized; exact counts by largest remainder):
  # single_hop "Where was X born?", compositional "In which country was X born?",
  # comparison "Who was born first, X or Y?", three_hop "In which country was the founder of
  # C born?".
  c.category_weights = ml_collections.ConfigDict(
      dict(single_hop=0.3, compositional=0.3, comparison=0.15, three_hop=0.25))

  t = ml_collections.ConfigDict()
  # Share of each transcript kind (normalized; exact counts by largest remainder):
  # efficient = the ideal plan; redundant = one search repeated verbatim; verify = the plan, then
  # the last hop searched again in other words "to double-check" (never changes the answer; off
  # by default: GRPO alone removed it, see docs/demo.md); vague = one query that
  # only finds look-alikes, then a precise follow-up; premature = answers before the last hop (a
  # guess, mostly wrong); wrong = searches fully, then answers from a distractor.
  t.rates = ml_collections.ConfigDict(
      dict(efficient=0.4, redundant=0.15, verify=0.0, vague=0.15, premature=0.15, wrong=0.15))
  # Transcripts per training question (each with its own kind).
  t.per_question = 1
  # Passages shown per search (keep equal to protocol.topk).
  t.topk = 3
  # Searches per transcript at most (keep <= protocol.max_turns).
  t.max_searches = 4
  # Probability that a search uses a paraphrase instead of the plan's canonical query.
  t.paraphrase_prob = 0.5
  # Retriever misses scripted into every kind (searche1_jax/retrieval/misses.py): a missed query text finds
  # only look-alikes and the transcript searches again in other words. Must equal retrieval.miss_rate and
  # retrieval.miss_seed (checked). 0 = a retriever that never misses.
  t.miss_rate = 0.0
  t.miss_seed = 0
  c.transcripts = t

  k = ml_collections.ConfigDict()
  # BPE vocabulary (bytes and merges), before the added tag/special tokens.
  k.vocab_size = 3000
  # A merge needs at least this many occurrences in the training text.
  k.min_frequency = 2
  # End-of-sequence and padding tokens (special; Qwen's eos spelling).
  k.eos_token = "<|endoftext|>"
  k.pad_token = "<|pad|>"
  # Longest sequence the saved tokenizer reports (tokenizer.model_max_length).
  k.model_max_length = 4096
  c.tokenizer = k
  return c
