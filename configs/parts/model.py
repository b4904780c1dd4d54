"""Config block `model`: which decoder (a preset shape or an HF checkpoint directory) and its numerics."""
import ml_collections
from ml_collections import config_dict


def get() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = "qwen2.5-3b"  # a name in searche1_jax.models.qwen2.PRESETS; random init. Ignored when hf_dir is set
  c.hf_dir = ""  # HF Qwen2 checkpoint directory (config.json + safetensors); overrides preset and shape fields
  c.param_dtype = "float32"  # storage dtype of the parameters (and of the optimizer state derived from them)
  c.dtype = "bfloat16"  # compute dtype of matmuls; norms, softmax, log-probs stay float32
  c.remat = "full"  # per-layer rematerialization: 'none' | 'full' (save nothing) | 'dots' (save matmul outputs)
  c.seed = 0  # init seed when starting from a preset
  c.attention_block = 128  # query rows per causal attention block (skips keys after the block; 0 = off). Speed only
  # Causal self-attention (training, teacher scoring, prefill): 'auto' = the Pallas splash kernel when compiled for
  # TPU (sequence lengths that are multiples of 128), einsums elsewhere; 'xla' = einsums; 'splash' = the kernel
  # everywhere it applies (Pallas' interpreter off TPU: for tests). Results agree to float rounding
  c.attention = "auto"
  # The KV cache: 'heads_major' (keys [B, K, hd, S], values [B, K, S, hd]: fastest on the CPU) or 'slots_major' (both
  # [B, S, K, hd]: on TPU no per-step relayout of the cache in decoding; the TPU mesh presets set it). Speed only
  c.kv_cache_layout = "heads_major"
  # Shape overrides on top of the preset (None = keep the preset's value); e.g. tiny demo models.
  c.vocab_size = config_dict.placeholder(int)
  c.hidden_size = config_dict.placeholder(int)
  c.intermediate_size = config_dict.placeholder(int)
  c.num_layers = config_dict.placeholder(int)
  c.num_heads = config_dict.placeholder(int)
  c.num_kv_heads = config_dict.placeholder(int)
  c.head_dim = config_dict.placeholder(int)
  c.rope_theta = config_dict.placeholder(float)
  c.tie_word_embeddings = config_dict.placeholder(bool)
  return c
