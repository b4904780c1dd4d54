"""Models: the Qwen2 / Qwen2.5 decoder (Flax), HF safetensors in and out, the BERT retrieval encoder."""
from searche1_jax.models.qwen2 import (
    PRESETS, KVCache, Qwen2Config, cache_axes, cache_length, forward, forward_with_cache, head_kernel,
    hidden_states, init_cache, init_params, logits_from_hidden, param_logical_axes, preset)

from searche1_jax.models.hf import (
    HFCheckpointError, config_from_hf, config_to_hf, load_hf, model_from_config, save_hf)
