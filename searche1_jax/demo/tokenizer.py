"""The demo tokenizer: a small byte-level BPE trained on the synthetic world's text.

Saved as a transformers `PreTrainedTokenizerFast` (`AutoTokenizer.from_pretrained(dir)` loads it
offline). The eight protocol tags are added tokens, one id each, that decode back to their text;
eos and pad are special tokens. Byte-level, so any text encodes and `decode(encode(text)) == text`.
No chat template: the raw Search-R1 template is the prompt. Training is deterministic for the
same texts and config.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

from searche1_jax.agent import protocol


def _strip_tags(text: str) -> str:
  # Tags become whole tokens anyway; leaving them out of BPE training saves merges for words.
  for tag in protocol.TAGS:
    text = text.replace(tag, " ")
  return text


def train_tokenizer(texts: Iterable[str], out_dir: str, cfg):
  """Trains byte-level BPE on `texts`, adds tags/eos/pad, saves to `out_dir`; returns it.

  cfg: the `tokenizer` sub-block of `configs/parts/world.py` (vocab_size, min_frequency,
  eos_token, pad_token, model_max_length).
  """
  # deferred: importing transformers takes ~4 s; only building the tokenizer needs these
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  specials = [cfg.eos_token, cfg.pad_token]
  if len(set(specials)) != 2 or any(not s for s in specials):
    raise ValueError(f"tokenizer.eos_token and tokenizer.pad_token must be distinct and "
                     f"non-empty, got {specials}")
  clash = [t for t in specials if t in protocol.TAGS]
  if clash:
    raise ValueError(f"tokenizer special tokens {clash} collide with protocol tags")

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=int(cfg.vocab_size), min_frequency=int(cfg.min_frequency),
      special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False)
  tok.train_from_iterator((_strip_tags(t) for t in texts), trainer=trainer)
  tok.add_tokens([AddedToken(t, special=False, normalized=False, single_word=False,
                             lstrip=False, rstrip=False) for t in protocol.TAGS])

  fast = PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token=cfg.eos_token, pad_token=cfg.pad_token,
      model_max_length=int(cfg.model_max_length), clean_up_tokenization_spaces=False)
  os.makedirs(out_dir, exist_ok=True)
  fast.save_pretrained(out_dir)
  return fast


def demo_texts(world, transcripts: Sequence[str] = ()) -> list[str]:
  """Training text of the demo tokenizer: passages, prompts of all questions (train and test:
  their wording, not their answers, which stay in the passages anyway), transcripts and the
  protocol strings."""
  texts = [p["contents"] for p in world.passages]
  texts += [protocol.make_prompt(q["question"])
            for q in world.train_questions + world.test_questions]
  texts += list(transcripts)
  texts += [protocol.SEARCH_R1_TEMPLATE, protocol.INVALID_ACTION_MESSAGE]
  return texts


def build_demo_tokenizer(world, transcripts: Sequence[str], out_dir: str, cfg):
  """`train_tokenizer(demo_texts(world, transcripts), out_dir, cfg)`."""
  return train_tokenizer(demo_texts(world, transcripts), out_dir, cfg)


def tag_ids(tokenizer) -> dict[str, int]:
  """The id of each protocol tag (each is exactly one token)."""
  out = {}
  for tag in protocol.TAGS:
    ids = tokenizer.encode(tag, add_special_tokens=False)
    if len(ids) != 1:
      raise ValueError(f"tag {tag!r} is not a single token in this tokenizer: {ids}")
    out[tag] = ids[0]
  return out
