"""The demo tokenizer: exact round trips, single-token tags, offline AutoTokenizer load, determinism."""
import os

import numpy as np
import pytest

from configs.parts import world as world_part
from searche1_jax.agent import protocol
from searche1_jax.demo import synthetic_world as sw
from searche1_jax.demo import tokenizer as tk
from searche1_jax.demo import transcripts as tr


def small_cfg():
  cfg = world_part.get()
  cfg.num_countries, cfg.cities_per_country = 5, 4
  cfg.num_people, cfg.num_companies = 150, 50
  cfg.num_train_questions, cfg.num_test_questions = 400, 60
  cfg.tokenizer.vocab_size = 2000
  return cfg


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  cfg = small_cfg()
  world = sw.generate_world(cfg)
  texts = tr.make_transcripts(world, world.train_questions, np.random.default_rng(0), cfg.transcripts)
  out = str(tmp_path_factory.mktemp("tok"))
  tok = tk.build_demo_tokenizer(world, texts, out, cfg.tokenizer)
  return cfg, world, texts, out, tok


def test_autotokenizer_loads_offline_and_matches(setup):
  from transformers import AutoTokenizer

  cfg, _, texts, out, tok = setup
  assert os.environ.get("HF_HUB_OFFLINE") == "1"
  loaded = AutoTokenizer.from_pretrained(out)
  for t in texts[:50]:
    assert loaded.encode(t, add_special_tokens=False) == tok.encode(t, add_special_tokens=False)
  assert loaded.eos_token == cfg.tokenizer.eos_token and loaded.pad_token == cfg.tokenizer.pad_token
  assert loaded.eos_token_id != loaded.pad_token_id
  assert loaded.convert_ids_to_tokens(loaded.eos_token_id) == cfg.tokenizer.eos_token
  assert not getattr(loaded, "chat_template", None)  # the raw template is the prompt
  # Nothing is added around the text (no BOS/EOS); the trainer appends EOS itself.
  assert loaded.encode("hello", add_special_tokens=True) == loaded.encode("hello", add_special_tokens=False)
  # 256 bytes + merges (training stops early once whole words are tokens) + the 8 tags.
  assert 256 + 500 < len(loaded) <= cfg.tokenizer.vocab_size + len(protocol.TAGS)


def test_tags_are_single_tokens_everywhere(setup):
  _, _, texts, out, tok = setup
  ids = tk.tag_ids(tok)
  assert len(set(ids.values())) == len(protocol.TAGS)
  for tag, i in ids.items():
    assert tok.decode([i]) == tag
    # Also glued to neighbours, the tag stays one token.
    enc = tok.encode(f"x{tag}y", add_special_tokens=False)
    assert i in enc and tok.decode(enc) == f"x{tag}y"
  for t in texts[:200]:
    enc = tok.encode(t, add_special_tokens=False)
    for tag, i in ids.items():
      assert enc.count(i) == t.count(tag)  # every tag occurrence is exactly its one token


def test_exact_round_trips(setup):
  _, world, texts, _, tok = setup

  def rt(s):
    return tok.decode(tok.encode(s, add_special_tokens=False))

  samples = [protocol.SEARCH_R1_TEMPLATE, protocol.INVALID_ACTION_MESSAGE,
             protocol.make_prompt(world.test_questions[0]["question"]),
             protocol.format_observation(world.passages[:3]),
             "  two  spaces\t\ttabs\n\n\nnewlines  ", "Ünïcödé — 漢字 🙂 <think>", "",
             "<answer>no spaces</answer><search>q</search>", "Doc 1(Title: \"X\") y\n"]
  samples += texts + [p["contents"] for p in world.passages]
  for s in samples:
    assert rt(s) == s, repr(s[:80])
  # Special tokens round-trip too, and are dropped with skip_special_tokens; tags are not.
  s = "<answer> a </answer>" + tok.eos_token
  assert tok.decode(tok.encode(s, add_special_tokens=False)) == s
  assert tok.decode(tok.encode(s, add_special_tokens=False), skip_special_tokens=True) == "<answer> a </answer>"


def test_deterministic(setup, tmp_path):
  cfg, world, texts, out, _ = setup
  tk.build_demo_tokenizer(world, texts, str(tmp_path), cfg.tokenizer)
  with open(os.path.join(out, "tokenizer.json"), "rb") as a, open(tmp_path / "tokenizer.json", "rb") as b:
    assert a.read() == b.read()


def test_compact_on_world_text(setup):
  _, world, texts, _, tok = setup
  # Trained on this text, BPE needs far fewer tokens than bytes (a check that training happened).
  n_bytes = sum(len(t.encode()) for t in texts[:100])
  n_tok = sum(len(tok.encode(t, add_special_tokens=False)) for t in texts[:100])
  assert n_tok < 0.35 * n_bytes


def test_bad_special_tokens(tmp_path):
  cfg = small_cfg().tokenizer
  cfg.pad_token = cfg.eos_token
  with pytest.raises(ValueError, match="distinct"):
    tk.train_tokenizer(["a b c"], str(tmp_path), cfg)
  cfg = small_cfg().tokenizer
  cfg.eos_token = "<answer>"
  with pytest.raises(ValueError, match="collide"):
    tk.train_tokenizer(["a b c"], str(tmp_path), cfg)
