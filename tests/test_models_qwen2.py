"""The Flax Qwen2 decoder against an independent plain-numpy implementation; KV cache; remat; config checks.

(Parity with transformers' PyTorch model is in test_models_hf.py.)
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from searche1_jax.models import qwen2
from model_testlib import random_params

TINY = qwen2.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=2, rope_theta=10000.0, initializer_range=0.2,
                         attention_block=4)  # small causal blocks so T=8..12 tests cross block edges


# ------------------------------------------------------------------------------------------------ numpy reference

def np_forward(params, cfg, tokens, mask=None):
  """Plain float64 numpy Qwen2 forward (HF semantics). tokens [B, T]; mask [B, T] 1 = real (left padding)."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  b, t = tokens.shape
  mask = np.ones((b, t), bool) if mask is None else mask.astype(bool)
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  hd, h, k = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads

  def rms(x, w):
    return w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.rms_norm_eps)

  inv = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2) / hd)
  ang = pos[..., None] * inv  # [B, T, hd/2]
  cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

  def rot(x):  # x [B, T, N, hd]
    half = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
    return x * cos[:, :, None] + half * sin[:, :, None]

  x = p["embed"]["embedding"][tokens]
  allowed = np.tril(np.ones((t, t), bool))[None] & mask[:, None, :]
  for i in range(cfg.num_layers):
    lp = jax.tree.map(lambda a: a[i], p["layers"])
    a = lp["attn"]
    y = rms(x, lp["input_norm"]["scale"])
    q = np.einsum("btd,dnh->btnh", y, a["q"]["kernel"]) + a["q"]["bias"]
    kk = np.einsum("btd,dnh->btnh", y, a["k"]["kernel"]) + a["k"]["bias"]
    v = np.einsum("btd,dnh->btnh", y, a["v"]["kernel"]) + a["v"]["bias"]
    q, kk = rot(q), rot(kk)
    kk = np.repeat(kk, h // k, axis=2)
    v = np.repeat(v, h // k, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, kk) / np.sqrt(hd)
    s = np.where(allowed[:, None], s, -1e30)  # finite: fully masked (padding) rows stay NaN-free
    s = s - s.max(-1, keepdims=True)
    w = np.exp(s)
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("bnts,bsnh->btnh", w, v)
    x = x + np.einsum("btnh,nhd->btd", o, a["o"]["kernel"])
    y = rms(x, lp["post_norm"]["scale"])
    m = lp["mlp"]
    g = y @ m["gate"]["kernel"]
    x = x + ((g / (1 + np.exp(-g))) * (y @ m["up"]["kernel"])) @ m["down"]["kernel"]
  x = rms(x, p["final_norm"]["scale"])
  head = p["embed"]["embedding"].T if cfg.tie_word_embeddings else p["lm_head"]["kernel"]
  return x @ head


@pytest.mark.parametrize("kv_heads,tie", [(2, False), (4, True), (1, False)])
def test_forward_matches_numpy(kv_heads, tie):
  cfg = TINY.replace(num_kv_heads=kv_heads, tie_word_embeddings=tie)
  params = random_params(cfg)
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 10))
  ref = np_forward(params, cfg, tokens)
  out = np.asarray(qwen2.forward(params, cfg, jnp.asarray(tokens)))
  assert ref.std() > 0.5
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)


def test_forward_left_padding_matches_numpy():
  params = random_params(TINY, seed=1)
  tokens = np.random.RandomState(1).randint(0, TINY.vocab_size, (2, 9))
  mask = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9])
  ref = np_forward(params, TINY, tokens, mask)
  out = np.asarray(qwen2.forward(params, TINY, jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
  assert np.all(np.isfinite(out))  # fully masked (padding) query rows give finite values, never NaN
  real = mask.astype(bool)
  np.testing.assert_allclose(out[real], ref[real], atol=2e-5, rtol=0)


def test_explicit_positions_shift_rope_only():
  """RoPE is relative: shifting all positions by a constant leaves the logits unchanged."""
  params = random_params(TINY)
  tokens = jnp.asarray(np.random.RandomState(2).randint(0, TINY.vocab_size, (1, 8)))
  a = qwen2.forward(params, TINY, tokens)
  b = qwen2.forward(params, TINY, tokens, positions=jnp.arange(8)[None] + 37)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4, rtol=0)
  c = qwen2.forward(params, TINY, tokens, positions=jnp.arange(8)[None] * 2)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-2


def test_hidden_states_and_head():
  params = random_params(TINY)
  tokens = jnp.asarray(np.random.RandomState(3).randint(0, TINY.vocab_size, (2, 5)))
  h = qwen2.hidden_states(params, TINY, tokens)
  assert h.shape == (2, 5, TINY.hidden_size)
  np.testing.assert_allclose(np.asarray(qwen2.logits_from_hidden(params, TINY, h)),
                             np.asarray(qwen2.forward(params, TINY, tokens)), atol=1e-6)
  assert qwen2.head_kernel(params, TINY).shape == (TINY.hidden_size, TINY.vocab_size)
  tied = TINY.replace(tie_word_embeddings=True)
  tp = random_params(tied)
  np.testing.assert_array_equal(np.asarray(qwen2.head_kernel(tp, tied)), np.asarray(tp["embed"]["embedding"]).T)


def np_attention(q, k, v, mask):
  """float64 GQA attention. q [B, T, H, hd]; k, v [B, S, K, hd]; mask [B, T, S]."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  rep = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  s = np.where(np.asarray(mask)[:, None], s, -1e30)
  w = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("bhts,bshd->bthd", w / w.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("t,block", [(11, 0), (11, 4), (11, 5), (12, 4), (11, 11), (11, 64)])
def test_attention_causal_blocks_match_numpy(t, block):
  rng = np.random.RandomState(t + block)
  q = rng.randn(2, t, 6, 8).astype(np.float32)
  k, v = rng.randn(2, 2, t, 2, 8).astype(np.float32)
  pad = np.array([0, 4])  # left padding of each row
  mask = np.tril(np.ones((t, t), bool))[None] & (np.arange(t)[None, :] >= pad[:, None])[:, None, :]
  real = np.arange(t)[None, :] >= pad[:, None]  # query rows of real tokens (padding rows are unspecified)
  got = np.asarray(qwen2.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(real),
                                   dtype=jnp.float32, causal_block=block))
  ref = np_attention(q, k, v, mask)
  np.testing.assert_allclose(got[real], ref[real], atol=1e-5, rtol=1e-5)
  assert np.all(np.isfinite(got))


# ------------------------------------------------------------------------------------------------ KV cache

@pytest.mark.parametrize("layout", qwen2.KV_CACHE_LAYOUTS)
def test_prefill_then_decode_equals_full_forward(layout):
  """Ragged right-padded prefill, then one-token decode steps: logits equal a full forward of each sequence, with
  the cache in either layout."""
  cfg = TINY.replace(kv_cache_layout=layout)
  params = random_params(TINY, seed=3)
  rng = np.random.RandomState(4)
  lengths = np.array([5, 3])
  seqs = [rng.randint(0, cfg.vocab_size, n + 4) for n in lengths]  # prompt + 4 decoded tokens
  prompt = np.zeros((2, 5), np.int32)
  for b, n in enumerate(lengths):
    prompt[b, :n] = seqs[b][:n]
  cache = qwen2.init_cache(cfg, 2, 16)
  fwd = jax.jit(qwen2.forward_with_cache, static_argnums=1)
  h, cache = fwd(params, cfg, jnp.asarray(prompt), cache, jnp.zeros(2, jnp.int32))
  got = {b: [np.asarray(qwen2.logits_from_hidden(params, cfg, h[b, n - 1]))] for b, n in enumerate(lengths)}
  write = lengths.copy()
  for step in range(4):
    tok = np.array([[seqs[b][lengths[b] + step]] for b in range(2)], np.int32)
    h, cache = fwd(params, cfg, jnp.asarray(tok), cache, jnp.asarray(write, jnp.int32))
    for b in range(2):
      got[b].append(np.asarray(qwen2.logits_from_hidden(params, cfg, h[b, 0])))
    write += 1
  for b, n in enumerate(lengths):
    full = np.asarray(qwen2.forward(params, cfg, jnp.asarray(seqs[b][None])))[0]
    np.testing.assert_allclose(np.stack(got[b]), full[n - 1:n + 4], atol=1e-5, rtol=0)
  kv, hd = cfg.num_kv_heads, cfg.head_dim
  k_shape, v_shape = ((2, kv, hd, 16), (2, kv, 16, hd)) if layout == "heads_major" else ((2, 16, kv, hd),) * 2
  assert all(k.shape == k_shape for k in cache.k) and all(v.shape == v_shape for v in cache.v)
  assert qwen2.cache_length(cfg, cache) == 16


def test_fresh_prefill_equals_prefill_over_the_cache():
  """fresh=True (self-attention over the new tokens) gives the hidden states and cache of the general path (scores
  over all S slots) on every real token; a row passing write_index = S takes nothing in both."""
  params = random_params(TINY, seed=8)
  tokens = np.random.RandomState(8).randint(0, TINY.vocab_size, (3, 6)).astype(np.int32)
  counts = np.array([6, 4, 0])
  starts = jnp.array([0, 0, 16])
  cache = qwen2.init_cache(TINY, 3, 16)
  h_f, c_f = qwen2.forward_with_cache(params, TINY, jnp.asarray(tokens), cache, starts, fresh=True)
  h_g, c_g = qwen2.forward_with_cache(params, TINY, jnp.asarray(tokens), cache, starts)
  real = np.arange(6)[None, :] < counts[:, None]
  np.testing.assert_allclose(np.asarray(h_f)[real], np.asarray(h_g)[real], atol=1e-5, rtol=0)
  for l in range(TINY.num_layers):
    np.testing.assert_allclose(np.asarray(c_f.v[l])[:, :, :6][real[:, None].repeat(2, 1)],
                               np.asarray(c_g.v[l])[:, :, :6][real[:, None].repeat(2, 1)], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(np.asarray(c_f.k[l])[2], 0)  # the row that took nothing
    np.testing.assert_array_equal(np.asarray(c_g.k[l])[2], 0)


def test_extend_chunk_and_out_of_range_slots_are_dropped():
  params = random_params(TINY, seed=5)
  tokens = np.random.RandomState(5).randint(0, TINY.vocab_size, (1, 8))
  cache = qwen2.init_cache(TINY, 1, 8)
  h1, cache = qwen2.forward_with_cache(params, TINY, jnp.asarray(tokens[:, :5]), cache, jnp.array([0]))
  # Extend by 4 tokens starting at slot 5 of an 8-slot cache: slots 5, 6, 7 written, slot 8 dropped.
  h2, cache2 = qwen2.forward_with_cache(params, TINY, jnp.asarray(np.concatenate([tokens[:, 5:], [[1]]], 1)),
                                        cache, jnp.array([5]))
  full = np.asarray(qwen2.forward(params, TINY, jnp.asarray(tokens)))[0]
  got = np.asarray(qwen2.logits_from_hidden(params, TINY, jnp.concatenate([h1[0], h2[0, :3]])))
  np.testing.assert_allclose(got, full, atol=1e-5, rtol=0)
  # The dropped write did not wrap around into slot 0.
  for l in range(TINY.num_layers):
    np.testing.assert_array_equal(np.asarray(cache2.k[l][..., 0]), np.asarray(cache.k[l][..., 0]))
    np.testing.assert_array_equal(np.asarray(cache2.v[l][:, :, 0]), np.asarray(cache.v[l][:, :, 0]))
  assert len(cache2.k) == len(cache2.v) == TINY.num_layers
  assert cache2.k[0].shape == (1, TINY.num_kv_heads, TINY.head_dim, 8)
  assert cache2.v[0].shape == (1, TINY.num_kv_heads, 8, TINY.head_dim)


def test_single_slot_write_off_the_end_changes_nothing():
  """Decode writes one slot per row with a dynamic_update_slice, which clamps its start: a row told to write
  at S (an idle row) must leave every slot as it was, the last one included, while the other row writes."""
  params = random_params(TINY, seed=7)
  cache = qwen2.init_cache(TINY, 2, 4)
  tokens = np.random.RandomState(7).randint(0, TINY.vocab_size, (2, 4))
  _, full = qwen2.forward_with_cache(params, TINY, jnp.asarray(tokens), cache, jnp.array([0, 0]))
  _, after = qwen2.forward_with_cache(params, TINY, jnp.asarray([[3], [5]]), full, jnp.array([4, 2]))
  for l in range(TINY.num_layers):
    k0, k1 = np.asarray(full.k[l]), np.asarray(after.k[l])
    v0, v1 = np.asarray(full.v[l]), np.asarray(after.v[l])
    np.testing.assert_array_equal(k1[0], k0[0])  # row 0 (start = S = 4): untouched
    np.testing.assert_array_equal(v1[0], v0[0])
    assert not np.array_equal(k1[1, ..., 2], k0[1, ..., 2])  # row 1 rewrote slot 2 with token 5 ...
    np.testing.assert_array_equal(np.delete(k1[1], 2, axis=-1), np.delete(k0[1], 2, axis=-1))  # ... only
    np.testing.assert_array_equal(np.delete(v1[1], 2, axis=-2), np.delete(v0[1], 2, axis=-2))


# ------------------------------------------------------------------------------------------------ remat

def test_remat_modes_give_same_gradients():
  params = random_params(TINY, seed=6)
  tokens = jnp.asarray(np.random.RandomState(6).randint(0, TINY.vocab_size, (2, 12)))

  def loss(p, cfg):
    logits = qwen2.forward(p, cfg, tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

  grads = {m: jax.jit(jax.grad(loss), static_argnums=1)(params, TINY.replace(remat=m))
           for m in ("none", "full", "dots")}
  ref = jax.tree.leaves(grads["none"])
  assert max(float(jnp.abs(g).max()) for g in ref) > 1e-3
  for mode in ("full", "dots"):
    for a, b in zip(ref, jax.tree.leaves(grads[mode])):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ config

def test_param_tree_shapes_axes_and_count():
  cfg = TINY.replace(tie_word_embeddings=False)
  params = jax.eval_shape(qwen2.init_params, cfg, jax.random.key(0))
  axes = qwen2.param_logical_axes(cfg)
  L, D, H, K, hd, F, V = 2, 32, 4, 2, 8, 48, 64
  expect = {
      ("embed", "embedding"): ((V, D), ("vocab", "embed")),
      ("layers", "attn", "q", "kernel"): ((L, D, H, hd), ("layers", "embed", "heads", "head_dim")),
      ("layers", "attn", "k", "bias"): ((L, K, hd), ("layers", "kv_heads", "head_dim")),
      ("layers", "attn", "o", "kernel"): ((L, H, hd, D), ("layers", "heads", "head_dim", "embed")),
      ("layers", "mlp", "down", "kernel"): ((L, F, D), ("layers", "mlp", "embed")),
      ("layers", "input_norm", "scale"): ((L, D), ("layers", "norm")),
      ("lm_head", "kernel"): ((D, V), ("embed", "vocab")),
  }
  for path, (shape, names) in expect.items():
    leaf, ax = params, axes
    for p in path:
      leaf, ax = leaf[p], ax[p]
    assert leaf.shape == shape and ax == names, path
  assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params
  tied = jax.eval_shape(qwen2.init_params, TINY.replace(tie_word_embeddings=True), jax.random.key(0))
  assert "lm_head" not in tied and sum(x.size for x in jax.tree.leaves(tied)) == TINY.replace(
      tie_word_embeddings=True).num_params


def test_presets_match_published_sizes():
  # Published parameter counts (Qwen2.5 model cards): 0.49B, 1.54B, 3.09B, 7.61B.
  sizes = {"qwen2.5-0.5b": 0.49e9, "qwen2.5-1.5b": 1.54e9, "qwen2.5-3b": 3.09e9, "qwen2.5-7b": 7.61e9}
  for name, n in sizes.items():
    assert abs(qwen2.preset(name).num_params - n) / n < 0.01, name
  assert qwen2.preset("Qwen2.5-3B", dtype="bfloat16").dtype == "bfloat16"
  with pytest.raises(ValueError, match="unknown model preset 'qwen9'"):
    qwen2.preset("qwen9")


@pytest.mark.parametrize("kw,needle", [
    ({"num_kv_heads": 3}, "num_heads=4 is not a multiple of num_kv_heads=3"),
    ({"remat": "some"}, "remat must be"),
    ({"dtype": "float64"}, "dtype must be"),
    ({"attention_block": -1}, "attention_block must be >= 0"),
])
def test_config_validation(kw, needle):
  with pytest.raises(ValueError, match=needle):
    TINY.replace(**kw)


def test_config_from_model_block():
  from configs.parts import model as model_part
  block = model_part.get()
  cfg = qwen2.config_from_block(block)
  assert cfg == qwen2.preset("qwen2.5-3b", dtype=block.dtype, param_dtype=block.param_dtype, remat=block.remat)
  block.hidden_size, block.num_heads, block.num_layers, block.attention_block = 256, 4, 2, 0
  tiny = qwen2.config_from_block(block)
  assert (tiny.hidden_size, tiny.num_heads, tiny.head_dim, tiny.num_layers) == (256, 4, 64, 2)  # head_dim re-derived
  assert tiny.attention_block == 0 and tiny.vocab_size == cfg.vocab_size
  block.preset = "qwen3"
  with pytest.raises(ValueError, match="config model: unknown model preset 'qwen3'"):
    qwen2.config_from_block(block)
