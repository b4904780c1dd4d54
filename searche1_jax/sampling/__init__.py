"""Sampling with a KV cache: jitted prefill / extend / decode, stop sequences, log-probs (see docs/models_and_sampling.md).

  generate(params, cfg, prompts, max_new_tokens=..., ...) -> GenerateResult   one batch, one turn
  Session(params, cfg, prompts, max_len=..., ...)                              multi-turn rollouts:
      .decode(max_new_tokens, stop_sequences) / .extend({i: ids}) / .finish([i]) / .tokens(i) ...
      .begin([i], max_new_tokens, stops) / .step() / .admit(prompts)           a turn per sequence, chunk by chunk
  stops.for_tokenizer(tokenizer, ['</search>'])                               stop strings matched by bytes
"""
from searche1_jax.sampling import stops
from searche1_jax.sampling.engine import REASONS, TRACE_COUNTS, programs
from searche1_jax.sampling.generate import GenerateResult, generate
from searche1_jax.sampling.options import SamplerOptions, bucket
from searche1_jax.sampling.session import DecodeOutput, Session, check_sampling_params

__all__ = ["generate", "GenerateResult", "Session", "DecodeOutput", "SamplerOptions", "bucket", "programs",
           "TRACE_COUNTS", "REASONS", "check_sampling_params", "stops"]
