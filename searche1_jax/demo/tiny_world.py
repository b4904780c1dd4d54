"""A world small enough to build in seconds (the sizes of configs/demo.py:smoke), with its demo tokenizer: what the
notebooks and tests use when there is no demo run to load."""
from __future__ import annotations

import os

import numpy as np
from transformers import AutoTokenizer

from searche1_jax.demo import synthetic_world as sw
from searche1_jax.demo import tokenizer as tokenizer_lib
from searche1_jax.demo import transcripts as transcripts_lib

# 3 countries x 2 cities, 40 people, 8 companies; 24 train / 8 test questions; a 400-entry BPE.
SIZES = {"num_countries": 3, "cities_per_country": 2, "num_people": 40, "num_companies": 8, "test_fraction": 0.25,
         "num_train_questions": 24, "num_test_questions": 8}
VOCAB_SIZE = 400


def build_tiny_world(out_dir: str, world_block, protocol_cfg, seed: int = 0):
  """Writes a tiny world to OUT_DIR/world and its demo BPE (trained on its passages and transcripts) to
  OUT_DIR/tokenizer.

  world_block: a `world` config block (configs/parts/world.py); a copy is resized (SIZES, VOCAB_SIZE, seed).
  Returns (the resized block, World, the world directory, the loaded tokenizer).
  """
  wcfg = world_block.copy_and_resolve_references()
  wcfg.seed = seed
  for field, value in SIZES.items():
    wcfg[field] = value
  wcfg.tokenizer.vocab_size = VOCAB_SIZE
  world_dir = os.path.join(out_dir, "world")
  world = sw.write_world(world_dir, wcfg)
  texts = transcripts_lib.make_transcripts(world, world.train_questions, np.random.default_rng(seed),
                                           wcfg.transcripts, protocol_cfg)
  tokenizer_dir = os.path.join(out_dir, "tokenizer")
  tokenizer_lib.build_demo_tokenizer(world, texts, tokenizer_dir, wcfg.tokenizer)
  return wcfg, world, world_dir, AutoTokenizer.from_pretrained(tokenizer_dir)
