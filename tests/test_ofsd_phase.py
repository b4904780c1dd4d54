"""The OFSD phase (searche1_jax/rl/ofsd_phase.py): pairs -> layouts -> teacher targets -> batches -> student
updates through the real train step; buffer checkpoint round trips; deterministic, resumable batch order; and a toy
phase where the teacher's context reveals a shorter path and the student moves toward it."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.parts import ofsd as ofsd_part
from searche1_jax import sharding as shd
from searche1_jax.agent import actions
from searche1_jax.agent import protocol
from searche1_jax.agent import trajectory as trajectory_lib
from searche1_jax.models import qwen2
from searche1_jax.rl import logprobs
from searche1_jax.rl import ofsd_loss
from searche1_jax.rl import ofsd_phase
from searche1_jax.rl import privileged
from searche1_jax.train import checkpoint
from searche1_jax.train import ofsd_runner
from searche1_jax.train import optim
from searche1_jax.train import steps
from test_privileged import enc, make_tokenizer, scripted

TEMPLATE = "Q: {question}\n"
WORLD = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid")]
WRONG = "Lyon"
SEED = 0


def obs_text(country, city):
  return protocol.format_observation([{"contents": f'"{city}"\n{city} is the capital of {country}.'}])


def question(country):
  return f"What is the capital of {country}"


CORPUS = [TEMPLATE, privileged.HEADER_REFERENCE, privileged.HEADER_ALL, "Attempt CORRECT INCORRECT"] + [
    f"{question(c)}? <search> capital of {c} </search> {obs_text(c, a)} <answer> {a} </answer> {WRONG}"
    for c, a in WORLD] * 3


def group(tok, country, city):
  """Three siblings: 0 answers directly (correct, 0 searches: the reference), 1 searches then answers correctly,
  2 searches and answers wrong."""
  q = question(country)
  direct = [("policy", [f"<answer> {city} </answer>"])]
  search = [("policy", [f"<search> capital of {country} </search>"]), ("obs", "information", obs_text(country, city)),
            ("policy", [f"<answer> {city} </answer>"])]
  wrong = [("policy", [f"<search> {country} </search>"]), ("obs", "information", obs_text(country, city)),
           ("policy", [f"<answer> {WRONG} </answer>"])]
  return [scripted(tok, q, [city], turns, sample_index=i, template=TEMPLATE)[0]
          for i, turns in enumerate((direct, search, wrong))]


def all_wrong_group(tok):
  q = "What is the capital of Atlantis"
  turns = [("policy", ["<answer> Lyon </answer>"])]
  return [scripted(tok, q, ["Poseidonis"], turns, sample_index=i, template=TEMPLATE)[0] for i in range(3)]


def ofsd_block(**kw):
  b = ofsd_part.get()
  b.top_k, b.chunk_size, b.batch_size, b.num_microbatches, b.epochs = 8, 16, 4, 2, 2
  b.group_size, b.questions_per_phase = 3, len(WORLD)
  for k, v in kw.items():
    b[k] = v
  return b


def ofsd_opts(**kw):
  return ofsd_phase.OfsdOptions.from_config(ofsd_block(**kw), TEMPLATE)


@pytest.fixture(scope="module")
def tok():
  return make_tokenizer(True, vocab_size=600, corpus=CORPUS)


@pytest.fixture(scope="module")
def cfg(tok):
  return qwen2.Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def groups(tok):
  gs = {c: group(tok, c, a) for c, a in WORLD}
  out = {g[0].question_id: g for g in gs.values()}
  wrong = all_wrong_group(tok)
  out[wrong[0].question_id] = wrong
  return out


@pytest.fixture(scope="module")
def params(cfg):
  return jax.jit(qwen2.init_params, static_argnums=0)(cfg, jax.random.key(0))


def forward_logits(params, cfg, ids, width=128):
  """[len(ids), V] logits of one unpadded sequence (right-padded to `width`: causal logits unchanged)."""
  x = np.zeros((1, width), np.int32)
  x[0, :len(ids)] = ids
  return qwen2_forward(params, cfg, x)[0, :len(ids)]


_FORWARD_CACHE = {}


def qwen2_forward(params, cfg, x):
  if cfg not in _FORWARD_CACHE:
    _FORWARD_CACHE[cfg] = jax.jit(lambda p, t: qwen2.forward(p, cfg, t))
  return _FORWARD_CACHE[cfg](params, x)


# ----------------------------------------------------------------------------------------------- buffer


@pytest.fixture(scope="module")
def buffer(cfg, tok, groups, params):
  return ofsd_phase.build_buffer(params, cfg, groups, tok, ofsd_opts())


def test_pairs_and_layouts(buffer, groups, tok):
  b = buffer
  # 4 usable questions x 2 students (wrong first, then the costlier correct one); Atlantis has no correct sibling.
  assert b.num_questions == 5 and b.num_pairs == 8
  assert b.question_ids == list(groups)
  assert b.pair_reference.tolist() == [0, 0, 3, 3, 6, 6, 9, 9]
  assert b.pair_student.tolist() == [2, 1, 5, 4, 8, 7, 11, 10]
  for i in range(b.num_pairs):
    qid = b.question_ids[b.traj_group[b.pair_student[i]]]
    stu = groups[qid][b.pair_student[i] % 3]
    ref = groups[qid][0]
    want = privileged.build_pair(stu, ref, tok, privileged.ContextOptions(template=TEMPLATE))
    assert np.array_equal(b.student(i), want.student_ids)
    assert np.array_equal(b.teacher(i), want.teacher_ids)
    assert np.array_equal(b.mask(i), want.distill_mask)
    assert np.array_equal(b.teacher_pos(i), want.teacher_pos)
    assert "<answer> " + ref.answer + " </answer>" in want.block_text
  assert b.target_ids.shape == (int(b.distill_mask.sum()), 8) and b.target_logprobs.dtype == np.float32


def test_teacher_targets_equal_direct_topk(buffer, cfg, params):
  """The stored targets are the top-k of the teacher's own full-logit distribution at the aligned positions."""
  b = buffer
  for i in range(b.num_pairs):
    shift = int(b.teacher_prompt_len[i] - b.student_prompt_len[i])
    pos = np.nonzero(b.mask(i))[0]
    lt = jax.nn.log_softmax(forward_logits(params, cfg, b.teacher(i))[pos + shift - 1], axis=-1)
    v, j = jax.lax.top_k(lt, 8)
    ids, lps = b.targets(i)
    assert np.array_equal(ids, np.asarray(j))
    np.testing.assert_allclose(lps, np.asarray(v), rtol=1e-5, atol=1e-6)
    assert np.all(b.teacher(i)[pos + shift] == b.student(i)[pos])  # same tokens scored on both sides


def test_teacher_targets_on_a_mesh(buffer, cfg, tok, groups, params):
  """Sharded teacher params (fsdp x tensor) and data-parallel teacher batches give the same targets; the rows per
  teacher call are rounded up to the data-parallel size (micro-batch 2 < data x fsdp = 4)."""
  mesh = shd.make_mesh(2, 2, 2)
  assert ofsd_phase.data_parallel_rows(2, mesh) == 4 and ofsd_phase.data_parallel_rows(5, None) == 5
  sharded = qwen2.shard_params(params, cfg, mesh)
  b = ofsd_phase.build_buffer(sharded, cfg, groups, tok, ofsd_opts(), mesh=mesh)
  np.testing.assert_array_equal(b.target_ids, buffer.target_ids)
  np.testing.assert_allclose(b.target_logprobs, buffer.target_logprobs, rtol=1e-5, atol=1e-6)


def test_make_batch_alignment(buffer):
  b = buffer
  batch = ofsd_phase.make_batch(b, [3, 1, 6], rows=4)
  t = batch["tokens"].shape[1]
  assert t == trajectory_lib.bucket_length(max(b.student(i).shape[0] for i in (3, 1, 6)))
  for r, i in enumerate([3, 1, 6]):
    n = b.student(i).shape[0]
    assert np.array_equal(batch["tokens"][r, :n], b.student(i)) and not batch["tokens"][r, n:].any()
    assert batch["attention_mask"][r].sum() == n
    pos = np.nonzero(b.mask(i))[0]
    assert np.array_equal(np.nonzero(batch["distill_mask"][r])[0], pos)
    ids, lps = b.targets(i)
    assert np.array_equal(batch["teacher_topk_ids"][r, pos], ids)
    assert np.array_equal(batch["teacher_topk_logprobs"][r, pos], lps)
    off = np.setdiff1d(np.arange(t), pos)
    assert not batch["teacher_topk_ids"][r, off].any() and not batch["teacher_topk_logprobs"][r, off].any()
  # The padding row repeats a real sequence (no all-masked attention rows) with no loss.
  assert np.array_equal(batch["tokens"][3], batch["tokens"][0]) and not batch["distill_mask"][3].any()


def test_full_vocab_buffer_and_loss_equal_topk_at_k_equal_vocab(cfg, tok, groups, params):
  """Full-vocabulary mode (targets recomputed from the snapshot) gives the same mean divergence as stored
  top-k targets with k = V (exact), evaluated with a different student."""
  full = ofsd_phase.build_buffer(params, cfg, groups, tok, ofsd_opts(top_k=None))
  assert full.top_k == 0 and full.target_ids is None and full.num_pairs == 8
  batch = ofsd_phase.make_batch(full, [0, 5], rows=2)
  for r, i in enumerate([0, 5]):
    tp = batch["teacher_pos"][r]
    pos = np.nonzero(full.mask(i))[0]
    assert np.array_equal(batch["teacher_tokens"][r][tp[pos]], full.student(i)[pos])
  exact = ofsd_phase.build_buffer(params, cfg, groups, tok, ofsd_opts(top_k=cfg.vocab_size))
  student = jax.tree.map(lambda x: x * 4.0, params)
  div_full = ofsd_phase.mean_divergence(
      student, full, ofsd_phase.make_eval_fn(ofsd_loss.ofsd_full_loss_fn(cfg, ofsd_opts(top_k=None).divergence)), 4,
      ref_params=params)
  div_topk = ofsd_phase.mean_divergence(
      student, exact, ofsd_phase.make_eval_fn(ofsd_loss.ofsd_topk_loss_fn(cfg, ofsd_opts(top_k=cfg.vocab_size).divergence)), 4)
  assert div_full > 0.01
  np.testing.assert_allclose(div_full, div_topk, rtol=2e-4)


def _assert_same_buffer(a, b):
  da, db = a.to_numpy(), b.to_numpy()
  assert sorted(da) == sorted(db)
  for k in da:
    x, y = np.asarray(da[k]), np.asarray(db[k])
    assert np.array_equal(x, y) and x.dtype == y.dtype, k
  assert a.question_ids == b.question_ids and a.top_k == b.top_k and a.temperature == b.temperature
  for x, y in zip(ofsd_phase.iterate_batches(a, 1, 4, 7), ofsd_phase.iterate_batches(b, 1, 4, 7)):
    assert sorted(x) == sorted(y) and all(np.array_equal(x[k], y[k]) for k in x)


def test_buffer_round_trip_through_checkpoint(buffer, tmp_path):
  again = ofsd_phase.OfsdBuffer.from_numpy(buffer.to_numpy())
  _assert_same_buffer(buffer, again)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(3, {"step": np.int32(5)}, {"round": 1, "ofsd_epoch": 1, "ofsd_batch": 1}, extra=buffer.to_numpy())
  ckpt.wait()
  state, meta, extra = ckpt.restore(3, {"step": jax.ShapeDtypeStruct((), np.int32)})
  ckpt.close()
  restored = ofsd_phase.OfsdBuffer.from_numpy(extra)
  _assert_same_buffer(buffer, restored)
  assert meta["ofsd_batch"] == 1
  with pytest.raises(ValueError, match="missing arrays"):
    ofsd_phase.OfsdBuffer.from_numpy({"top_k": np.int64(8)})


def test_empty_buffer_round_trip(cfg, tok, groups, params, tmp_path):
  """A phase where no question has a correct sibling: no pairs, and still a valid checkpoint item."""
  wrong = {q: g for q, g in groups.items() if "Atlantis" in q}
  empty = ofsd_phase.build_buffer(params, cfg, wrong, tok, ofsd_opts())
  assert empty.num_pairs == 0 and empty.target_ids.shape == (0, 8)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(0, {"step": np.int32(0)}, {}, extra=empty.to_numpy())
  _, _, extra = ckpt.restore(0, {"step": jax.ShapeDtypeStruct((), np.int32)})
  ckpt.close()
  again = ofsd_phase.OfsdBuffer.from_numpy(extra)
  _assert_same_buffer(empty, again)
  assert again.target_ids.shape == (0, 8) and again.target_ids.dtype == np.int32
  m = ofsd_phase.phase_metrics(again)
  assert m["pairs"] == 0 and m["questions"] == 1 and m["questions_with_correct"] == 0


def test_disk_storage(cfg, tok, groups, params, buffer, tmp_path):
  opts = ofsd_opts(storage="disk")
  with pytest.raises(ValueError, match="work directory"):
    ofsd_phase.build_buffer(params, cfg, groups, tok, opts)
  disk = ofsd_phase.build_buffer(params, cfg, groups, tok, opts, workdir=str(tmp_path),
                                 name="round_2")
  d = tmp_path / "ofsd" / "round_2"
  assert sorted(os.listdir(d)) == ["target_ids.npy", "target_logprobs.npy"]
  assert isinstance(disk.target_ids, np.memmap)
  np.testing.assert_array_equal(disk.target_ids, buffer.target_ids)
  np.testing.assert_allclose(disk.target_logprobs, buffer.target_logprobs, rtol=1e-6)
  saved = disk.to_numpy()
  assert "target_ids" not in saved  # the checkpoint records the directory, not the arrays
  _assert_same_buffer(disk, ofsd_phase.OfsdBuffer.from_numpy(saved))
  os.remove(d / "target_ids.npy")
  with pytest.raises(FileNotFoundError, match="target_ids.npy"):
    ofsd_phase.OfsdBuffer.from_numpy(saved)


def test_batch_order_is_deterministic_and_resumable(buffer):
  def rows(batches):
    return [tuple(map(tuple, b["tokens"])) for b in batches]

  a = rows(ofsd_phase.iterate_batches(buffer, 0, 3, seed=11))
  assert a == rows(ofsd_phase.iterate_batches(buffer, 0, 3, seed=11))
  assert a != rows(ofsd_phase.iterate_batches(buffer, 1, 3, seed=11))
  assert a != rows(ofsd_phase.iterate_batches(buffer, 0, 3, seed=12))
  assert rows(ofsd_phase.iterate_batches(buffer, 0, 3, seed=11, start=2)) == a[2:]
  assert len(a) == ofsd_phase.num_batches(buffer, 3) == 3
  for epoch in range(3):
    order = ofsd_phase.epoch_order(buffer.num_pairs, epoch, 11)
    assert sorted(order.tolist()) == list(range(buffer.num_pairs))  # every pair once per epoch
  # The trainer's update index (PhaseRunner.step): epoch = index // batches, then that slice of the epoch's order.
  epoch, got = ofsd_phase.phase_batch(buffer, 3 + 2, 3, seed=11)
  want = ofsd_phase.make_batch(buffer, ofsd_phase.epoch_order(buffer.num_pairs, 1, 11)[6:9], 3)
  assert epoch == 1 and got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_phase_metrics_by_hand(buffer, tok, groups):
  # Post-phase rollouts: France now answered directly and right, Germany still searching and wrong.
  post = [group(tok, "France", "Paris")[0], group(tok, "Germany", "Berlin")[2]]
  m = ofsd_phase.phase_metrics(buffer, divergence_before=2.0, divergence_after=0.5, post_trajectories=post)
  assert m["questions"] == 5 and m["questions_with_correct"] == 4 and m["questions_with_pairs"] == 4
  assert m["pairs"] == 8 and m["distill_tokens"] == float(buffer.distill_mask.sum())
  assert m["reference_searches"] == 0 and m["student_searches"] == 1 and m["student_correct"] == 0.5
  assert m["rollout_searches"] == pytest.approx(8 / 15) and m["rollout_em"] == pytest.approx(8 / 15)
  assert m["divergence_change"] == -1.5
  assert m["post_questions"] == 2 and m["post_searches"] == 0.5 and m["post_em"] == 0.5
  assert m["searches_change"] == pytest.approx(0.5 - 2 / 3) and m["em_change"] == pytest.approx(0.5 - 2 / 3)


def test_all_siblings_mode(cfg, tok, groups, params):
  b = ofsd_phase.build_buffer(params, cfg, groups, tok, ofsd_opts(context_siblings="all", max_pairs_per_question=2,
                                                                   top_k=None))
  assert b.pair_reference.tolist() == [-1] * 8
  assert b.pair_student.tolist() == [2, 0, 5, 3, 8, 6, 11, 9]  # wrong first, then correct by index, capped at 2
  prompt = tok.decode(b.teacher(0)[:b.teacher_prompt_len[0]].tolist())
  assert "Attempt 3 (INCORRECT)" in prompt and "Attempt 1 (CORRECT)" in prompt


def test_on_policy_sd_fields(tok, groups):
  trajs = [t for qid in list(groups)[:2] for t in groups[qid]] + groups[list(groups)[4]]
  batch = trajectory_lib.to_batch(trajs, np.zeros(len(trajs)))
  opts = ofsd_opts(warmup_steps=5)
  off = ofsd_phase.on_policy_sd_fields(trajs, batch, tok, opts, step=4, agg="token-mean")
  on = ofsd_phase.on_policy_sd_fields(trajs, batch, tok, opts, step=5, agg="token-mean")
  assert not off["sd_weight"].any()
  students = [1, 2, 4, 5]  # rows; row 0 / 3 are references, rows 6-8 (Atlantis) have no correct sibling
  n_sd = sum(int(trajs[r].policy_mask.sum()) for r in students)
  n_g = int(batch["loss_mask"][:, 1:].sum())
  np.testing.assert_allclose(on["sd_weight"], [n_g / n_sd if r in students else 0 for r in range(9)], rtol=1e-6)
  for r, t in enumerate(trajs):
    n, p = t.ids.shape[0], t.prompt_ids.shape[0]
    tp = on["teacher_pos"][r]
    assert np.array_equal(on["teacher_tokens"][r][tp[p:n]], t.ids[p:])
    assert on["teacher_attention_mask"][r].sum() == (n if r not in students else n + tp[p] - p)
    assert np.array_equal(on["distill_mask"][r, :n].astype(bool), (t.policy_mask == 1) & (r in students))
  assert np.array_equal(on["distill_mask"], off["distill_mask"])


# ----------------------------------------------------------------------------------------------- toy phase


def _lm_batch(seqs, t_len=64):
  b = len(seqs)
  out = {"tokens": np.zeros((b, t_len), np.int32), "attention_mask": np.zeros((b, t_len), np.int32),
         "loss_mask": np.zeros((b, t_len), np.int32)}
  for i, (ids, mask) in enumerate(seqs):
    out["tokens"][i, :len(ids)], out["attention_mask"][i, :len(ids)], out["loss_mask"][i, :len(ids)] = ids, 1, mask
  return out


def pretrain(cfg, tok, params, groups, steps_=80):
  """Teach the tiny policy the toy's habits: with the plain prompt it searches first; with the privileged block
  showing a direct answer it answers directly. (So the teacher, the same policy, really reads its context.)"""
  opts = privileged.ContextOptions(template=TEMPLATE)
  seqs = []
  for qid, g in list(groups.items())[:4]:
    seqs.append((g[1].ids, g[1].policy_mask))  # plain prompt -> search, then answer
    pair = privileged.build_pair(g[1], g[0], tok, opts)
    t_prompt = pair.teacher_ids[:pair.teacher_prompt_len]
    resp = g[0].response_ids
    seqs.append((np.concatenate([t_prompt, resp]), np.r_[np.zeros(len(t_prompt)), np.ones(len(resp))]))
  batch = _lm_batch(seqs)
  mesh = shd.make_mesh(1, 1, 1)
  block = ofsd_part.get().optim
  block.learning_rate, block.warmup_steps, block.weight_decay = 1e-2, 0, 0.0
  step = steps.model_train_step(cfg, logprobs.lm_loss_fn(cfg, 16), optim.make_optimizer(block, steps_), mesh)
  state = step.init_state(params)
  for _ in range(steps_):
    state, m = step(state, batch)
  return state.params, float(m["nll"])


def first_action_prob(params, cfg, tok, groups, tag=protocol.ANSWER_OPEN):
  """Mean probability (plain prompt) that the first response token is `tag`."""
  tid = enc(tok, tag)[0]
  ps = []
  for g in list(groups.values())[:4]:
    ids = g[0].prompt_ids
    ps.append(float(jax.nn.softmax(forward_logits(params, cfg, ids)[-1])[tid]))
  return float(np.mean(ps))


def greedy_rollout(cfg, tok, max_turns=2, max_turn_tokens=12):
  """(params, questions) -> one greedy trajectory per question (scripted retriever: the question's passage)."""
  stops = {enc(tok, protocol.SEARCH_CLOSE)[0], enc(tok, protocol.ANSWER_CLOSE)[0], tok.eos_token_id}
  capital = dict(WORLD)

  def run(params, questions):
    out = []
    for q in questions:
      country = q["question"].split()[-1]
      prompt = enc(tok, protocol.make_prompt(q["question"], TEMPLATE))
      ids, mask, spans, obs_spans, kinds, queries, answer = list(prompt), [0] * len(prompt), [], [], [], [], None
      for turn in range(max_turns + 1):
        s = len(ids)
        for _ in range(max_turn_tokens):
          nxt = int(jnp.argmax(forward_logits(params, cfg, ids)[-1]))
          ids.append(nxt)
          mask.append(1)
          if nxt in stops:
            break
        spans.append((s, len(ids)))
        act = actions.parse_action(tok.decode(ids[s:], skip_special_tokens=False), 100)
        if act.kind == actions.ANSWER:
          answer = act.content
          break
        if act.kind != actions.SEARCH or turn == max_turns:
          break
        queries.append(act.content)
        o = enc(tok, obs_text(country, capital.get(country, "Paris")))
        obs_spans.append((len(ids), len(ids) + len(o)))
        kinds.append("information")
        ids += o
        mask += [0] * len(o)
      out.append(trajectory_lib.Trajectory(
          question_id=q["id"], question=q["question"], golden_answers=q["golden_answers"], prompt_ids=prompt,
          ids=ids, policy_mask=mask, logprobs=np.zeros(len(ids)), policy_spans=spans, obs_spans=obs_spans,
          obs_kinds=kinds, queries=queries, num_searches=len(queries), answer=answer))
    return out

  return run


@pytest.fixture(scope="module")
def toy(cfg, tok, groups, params):
  """The pretrained toy policy and the trainer's phase runner (shared: its student step is compiled once)."""
  policy, nll = pretrain(cfg, tok, params, groups)
  block = ofsd_block(epochs=6)
  block.optim.learning_rate = 3e-3
  runner = ofsd_runner.PhaseRunner(cfg, ofsd_phase.OfsdOptions.from_config(block, TEMPLATE), shd.make_mesh(1, 1, 1),
                                   shd.DEFAULT_RULES, tok)
  return policy, nll, block, runner


@pytest.mark.slow
def test_toy_phase_moves_student_toward_reference(cfg, tok, groups, toy):
  """End to end with the trainer's driver (pairs -> layouts -> top-k targets -> student updates): after the
  phase the plain-prompt policy is closer to its privileged self and answers directly more often."""
  policy, nll, block, runner = toy
  assert nll < 0.3
  questions = [{"id": g[0].question_id, "question": g[0].question, "golden_answers": g[0].golden_answers}
               for g in groups.values()]
  p_answer_before = first_action_prob(policy, cfg, tok, groups)
  trajs = [t for g in groups.values() for t in g]  # the phase's sampled rollouts: scripted siblings
  state = runner.train.init_state(policy)
  carry = runner.start(state.params, trajs, group_size=3)
  history = []
  for s in range(carry.num_steps()):
    state, metrics = runner.step(state, carry, s, seed=SEED)
    history.append(metrics)
  m = runner.end_metrics(state.params, carry, greedy_rollout(cfg, tok)(state.params, questions))
  p_answer_after = first_action_prob(state.params, cfg, tok, groups)
  assert m["pairs"] == 8 and m["updates"] == 6 * 2 and len(history) == 12
  assert [h["epoch"] for h in history] == [e for e in range(6) for _ in range(2)]
  assert m["divergence_after"] < 0.25 * m["divergence_before"]
  # The probability of the reference's first action (answer without searching) under the plain prompt.
  assert p_answer_before < 0.1 and p_answer_after > 0.5
  # Greedy behaviour on the same questions: fewer searches than the phase's rollouts (0.53 per trajectory).
  assert m["post_questions"] == 5 and m["post_searches"] < m["rollout_searches"] and m["searches_change"] < 0
  # The train step's own metric agrees with the evaluated divergence at the start.
  assert history[0]["divergence"] == pytest.approx(m["divergence_before"], rel=0.5)


def test_phase_start_copies_params_only_for_a_full_teacher(toy, monkeypatch):
  """empty_carry allocates the optimizer state and (ofsd.targets 'full' only) the teacher's copy: no throwaway
  copy of the params, one more model-sized buffer at every phase start (issue 23, finding 7)."""
  policy, _, _, runner = toy
  copies = []
  real = steps.fresh_copy
  monkeypatch.setattr(steps, "fresh_copy", lambda tree, shardings: copies.append(tree) or real(tree, shardings))
  carry = runner.empty_carry(policy)
  assert len(copies) == int(runner.full) and (carry.teacher is not None) == runner.full
  state = runner.train.init_state(policy)
  ref = jax.tree.leaves(jax.device_get(state.opt_state))
  got = jax.tree.leaves(jax.device_get(carry.opt_state))
  assert len(got) == len(ref) and all(np.array_equal(a, b) for a, b in zip(got, ref)) and int(carry.step) == 0


def test_resumed_phase_replays_identically(cfg, tok, groups, toy, tmp_path):
  """Interrupt after one update, checkpoint the buffer ('extra'), restore it and continue from (epoch, batch):
  the final params equal an uninterrupted run's."""
  policy, _, block, runner = toy
  step = runner.train
  buf = ofsd_phase.build_buffer(policy, cfg, groups, tok, runner.opts)

  def train(state, b, epoch, start=0):
    for batch in ofsd_phase.iterate_batches(b, epoch, block.batch_size, SEED, start=start):
      state, _ = step(state, batch)
    return state

  full = step.init_state(policy)
  for epoch in range(2):
    full = train(full, buf, epoch)

  part = step.init_state(policy)
  part, _ = step(part, next(ofsd_phase.iterate_batches(buf, 0, block.batch_size, SEED)))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(1, {"step": np.int32(1)}, {"ofsd_epoch": 0, "ofsd_batch": 1}, extra=buf.to_numpy())
  _, meta, extra = ckpt.restore(1, {"step": jax.ShapeDtypeStruct((), np.int32)})
  ckpt.close()
  restored = ofsd_phase.OfsdBuffer.from_numpy(extra)
  part = train(part, restored, meta["ofsd_epoch"], start=meta["ofsd_batch"])
  part = train(part, restored, 1)
  assert int(part.step) == int(full.step) == 4
  for a, b in zip(jax.tree.leaves(jax.device_get(full.params)), jax.tree.leaves(jax.device_get(part.params))):
    np.testing.assert_array_equal(a, b)
