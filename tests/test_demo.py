"""The embedded demo: warm-start tokenization/masks/batches, warm-start caching and its LM loss against
transformers, and the smoke config end to end (launch/demo.py), with both notebooks on its checkpoint."""
import contextlib
import io
import json
import os

import numpy as np
import pytest

from configs import demo as demo_config
from searche1_jax import config_utils
from searche1_jax.agent import protocol
from searche1_jax.agent import rollout as rollout_lib
from searche1_jax.demo import synthetic_world as sw
from searche1_jax.demo import tokenizer as tokenizer_lib
from searche1_jax.demo import transcripts as transcripts_lib
from searche1_jax.demo import warm_start

import notebook_testlib


def _smoke_config(cache: str):
  config = demo_config.get_config(f"smoke,cache={cache}")
  config_utils.validate_config(config)
  return config


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """The smoke config's world and tokenizer, built once for the module (cache in a tmp dir)."""
  cache = str(tmp_path_factory.mktemp("demo_cache"))
  config = _smoke_config(cache)
  world = sw.write_world(config.demo.world_dir, config.world)
  rng = np.random.default_rng(0)
  texts = transcripts_lib.make_transcripts(world, world.train_questions, rng, config.world.transcripts,
                                           config.protocol)
  tokenizer_lib.build_demo_tokenizer(world, texts, config.demo.tokenizer_dir, config.world.tokenizer)
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(config.demo.tokenizer_dir)
  return config, world, tok


# --------------------------------------------------------------------------------------------- masks

def test_tokenize_segments_masks_only_policy_turns(smoke):
  config, world, tok = smoke
  q = world.train_questions[0]
  rec = transcripts_lib.make_transcript_records(world, [q], np.random.default_rng(3), config.world.transcripts,
                                                config.protocol)[0]
  ids, mask = warm_start.tokenize_segments(rec.segments, tok)
  assert ids.dtype == np.int32 and mask.shape == ids.shape
  # The prompt is tokenized exactly as the rollout tokenizes it, and carries no loss.
  prompt = rollout_lib.build_prompt_ids(tok, q["question"], config.protocol.template)
  assert ids[:len(prompt)].tolist() == prompt
  assert not mask[:len(prompt)].any()
  # Segment by segment: trainable ones are exactly the mask-1 tokens, observations are mask 0.
  pos = len(prompt)
  n_obs = 0
  for text, trainable in rec.segments[1:]:
    piece = tok.encode(text, add_special_tokens=False)
    assert ids[pos:pos + len(piece)].tolist() == piece
    assert (mask[pos:pos + len(piece)] == int(trainable)).all(), text
    n_obs += protocol.INFORMATION_OPEN in text
    if protocol.INFORMATION_OPEN in text:
      assert not trainable
    pos += len(piece)
  assert n_obs == len(rec.searches)
  # The last trainable turn ends with EOS, which is a target too.
  assert pos == len(ids) - 1 and ids[-1] == tok.eos_token_id and mask[-1] == 1
  policy_text = "".join(t for t, tr in rec.segments if tr)
  assert tok.decode(ids[mask == 1][:-1].tolist(), skip_special_tokens=False) == policy_text
  # Without EOS: nothing appended.
  ids2, mask2 = warm_start.tokenize_segments(rec.segments, tok, add_eos=False)
  np.testing.assert_array_equal(ids2, ids[:-1])
  np.testing.assert_array_equal(mask2, mask[:-1])


def test_hinted_examples_show_the_teacher_prompt_then_the_transcript(smoke):
  """warm_start.hint_fraction: hinted examples start with exactly the OFSD teacher's prompt ('actions' block
  after the question) showing the transcript's own searches, then train on that efficient transcript."""
  from searche1_jax.rl import privileged
  config, world, tok = smoke
  block = config.warm_start.copy_and_resolve_references()
  block.hint_fraction = 0.5
  opts = privileged.ContextOptions(context_format="actions", context_passages=False, context_answer=False,
                                   template=config.protocol.template)
  n = len(world.train_questions)
  examples, counts = warm_start.build_examples(world, tok, block, config.world.transcripts, config.protocol, opts)
  per_q = config.world.transcripts.per_question
  assert counts["kinds"]["hinted"] == round(0.5 * n) and len(examples) == n * per_q + round(0.5 * n)
  hinted = warm_start.hint_examples(world, world.train_questions[:3], tok, np.random.default_rng(1),
                                    config.world.transcripts, config.protocol, opts)
  for q, (prompt_ids, rec) in zip(world.train_questions[:3], hinted):
    assert rec.kind == "efficient" and rec.correct
    lines = "".join(f"<search> {x} </search>\n" for x in rec.searches)
    want = (protocol.make_prompt(q["question"], config.protocol.template) + "\n" + privileged.HEADER_REFERENCE
            + "\n" + lines)
    assert tok.decode(prompt_ids, skip_special_tokens=False) == want
    ids, mask = warm_start.tokenize_segments(rec.segments, tok, prompt_ids=prompt_ids)
    plain, plain_mask = warm_start.tokenize_segments(rec.segments, tok)
    p_len = len(rollout_lib.build_prompt_ids(tok, q["question"], config.protocol.template))
    assert ids[:len(prompt_ids)].tolist() == prompt_ids and not mask[:len(prompt_ids)].any()
    assert ids[len(prompt_ids):].tolist() == plain[p_len:].tolist()  # the same response tokens
    np.testing.assert_array_equal(mask[len(prompt_ids):], plain_mask[p_len:])
  with pytest.raises(ValueError, match="context_format='actions'"):
    warm_start.build_examples(world, tok, block, config.world.transcripts, config.protocol,
                              privileged.ContextOptions(template=config.protocol.template))


def test_tokenize_segments_rejects_trainable_prompt(smoke):
  _, _, tok = smoke
  with pytest.raises(ValueError, match="prompt"):
    warm_start.tokenize_segments([("Question: x?\n", True)], tok)
  with pytest.raises(ValueError, match="at least"):
    warm_start.tokenize_segments([], tok)


def test_make_batches_pads_and_covers_every_example():
  rng = np.random.default_rng(0)
  examples = []
  for n in (3, 5, 9, 130, 140, 4):
    ids = rng.integers(1, 50, n).astype(np.int32)
    mask = (rng.random(n) < 0.5).astype(np.int32)
    examples.append((ids, mask))
  batches = warm_start.make_batches(examples, batch_size=2, pad_multiple=64, pad_id=0,
                                    rng=np.random.default_rng(1))
  seen = []
  for b in batches:
    assert b["tokens"].shape[0] == 2 and b["tokens"].shape[1] % 64 == 0
    for r in range(2):
      n = int(b["attention_mask"][r].sum())
      assert (b["attention_mask"][r, :n] == 1).all() and (b["attention_mask"][r, n:] == 0).all()
      assert (b["loss_mask"][r, n:] == 0).all() and (b["tokens"][r, n:] == 0).all()
      if n:
        seen.append((tuple(b["tokens"][r, :n]), tuple(b["loss_mask"][r, :n])))
  assert sorted(seen) == sorted((tuple(i), tuple(m)) for i, m in examples)
  assert {b["tokens"].shape[1] for b in batches} == {64, 192}


# --------------------------------------------------------------------------------------------- the stage

def _tiny_block(config, out_dir, steps=2):
  ws = config.warm_start.copy_and_resolve_references()
  ws.out_dir = out_dir
  ws.steps = steps
  ws.log_every = 1
  ws.hint_fraction = 0.0  # hinted examples: test_hinted_examples_... and the smoke end-to-end run
  return ws


def _ws_args(config, world):
  return (config.model, world, config.demo.world_dir, config.demo.tokenizer_dir, config.world.transcripts,
          config.protocol)


@pytest.fixture(scope="module")
def trained(smoke, tmp_path_factory):
  """One warm start of the smoke policy (2 steps), shared by the tests below."""
  config, world, _ = smoke
  block = _tiny_block(config, str(tmp_path_factory.mktemp("ws") / "out"))
  logged = []
  info = warm_start.run(block, *_ws_args(config, world), log=lambda s, m: logged.append((s, m["nll"])))
  return block, info, logged


def test_warm_start_trains_once_then_is_cached(smoke, trained):
  config, world, _ = smoke
  block, info, logged = trained
  assert info["status"] == "trained" and info["steps"] == 2
  assert [s for s, _ in logged] == [1, 2] and all(np.isfinite(v) for _, v in logged)
  files = set(os.listdir(block.out_dir))
  assert {"config.json", "model.safetensors", "tokenizer.json", warm_start.FINGERPRINT_FILE} <= files
  assert warm_start.read_info(block.out_dir)["fingerprint"] == info["fingerprint"]
  stamp = os.path.getmtime(os.path.join(block.out_dir, "model.safetensors"))
  # Second call: a no-op (no training, files untouched).
  calls = []
  again = warm_start.run(block, *_ws_args(config, world), log=lambda s, m: calls.append(s))
  assert again["status"] == "cached" and again["fingerprint"] == info["fingerprint"] and not calls
  assert os.path.getmtime(os.path.join(block.out_dir, "model.safetensors")) == stamp
  # The fingerprint follows every knob but not where the output goes.
  fp = lambda b, m=config.model: warm_start.fingerprint(b, m, config.world.transcripts, config.protocol,
                                                         config.demo.tokenizer_dir, config.demo.world_dir)
  moved = block.copy_and_resolve_references()
  moved.out_dir = "/elsewhere"
  assert fp(moved) == info["fingerprint"]
  for field, value in (("steps", 3), ("seed", 1), ("batch_size", 2)):
    changed = block.copy_and_resolve_references()
    changed[field] = value
    assert fp(changed) != info["fingerprint"], field
  wider = config.model.copy_and_resolve_references()
  wider.hidden_size = 48
  assert fp(block, wider) != info["fingerprint"]


def test_warm_start_rejects_bad_fields(smoke, tmp_path):
  config, world, _ = smoke
  block = _tiny_block(config, str(tmp_path / "ws"))
  block.batch_size = 0
  with pytest.raises(ValueError, match="warm_start.batch_size"):
    warm_start.run(block, *_ws_args(config, world))


def test_warm_start_loss_is_policy_token_nll_under_transformers(smoke, trained):
  """The LM loss the stage trains equals -mean log p(policy tokens) of the SAVED model under transformers'
  Qwen2ForCausalLM (PyTorch), i.e. the masks select exactly the trainable tokens and save_hf round-trips."""
  import jax.numpy as jnp
  import torch
  from transformers import AutoModelForCausalLM

  from searche1_jax import models
  from searche1_jax.rl import logprobs

  config, world, tok = smoke
  block = trained[0]
  examples, _ = warm_start.build_examples(world, tok, block, config.world.transcripts, config.protocol)
  batch = warm_start.make_batches(examples[:3], 3, int(block.max_length), 0, np.random.default_rng(0))[0]
  assert batch["attention_mask"].sum(1).min() > 0

  cfg, params = models.load_hf(block.out_dir)
  loss_sum, denom, _ = logprobs.lm_loss_fn(cfg)(params, {k: jnp.asarray(v) for k, v in batch.items()}, None)
  ours = float(loss_sum) / float(denom)
  assert float(denom) == batch["loss_mask"][:, 1:].sum()

  model = AutoModelForCausalLM.from_pretrained(block.out_dir, dtype=torch.float32).eval()
  total, count = 0.0, 0
  with torch.no_grad():
    for r in range(3):
      n = int(batch["attention_mask"][r].sum())
      ids = torch.tensor(batch["tokens"][r:r + 1, :n], dtype=torch.long)
      logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
      tgt = ids[0, 1:]
      lp = logp.gather(-1, tgt[:, None])[:, 0].numpy()
      m = batch["loss_mask"][r, 1:n].astype(bool)
      total += -lp[m].sum()
      count += m.sum()
  assert count == float(denom)
  np.testing.assert_allclose(ours, total / count, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_smoke_demo_end_to_end(tmp_path):
  from launch import demo

  config = _smoke_config(str(tmp_path / "cache"))
  workdir = str(tmp_path / "run")
  out = io.StringIO()
  summary = demo.run_demo(config, workdir, out=out)
  printed = out.getvalue()

  with open(os.path.join(workdir, "results.json")) as f:
    rounds = json.load(f)["rounds"]
  assert rounds[0]["round"] == 0 and rounds[0]["phase"] == "init"
  # Each round is evaluated after its OFSD phase (with train.eval_after_grpo, also after its GRPO steps).
  phases = ("grpo", "ofsd") if config.train.eval_after_grpo else ("ofsd",)
  assert [(r["round"], r["phase"]) for r in rounds[1:]] == [
      (k, p) for k in range(1, config.train.num_rounds + 1) for p in phases]
  assert all(0.0 <= r["avg_em"] <= 1.0 for r in rounds)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  grpo_rows = [r for r in rows if r["phase"] == "grpo"]
  assert len(grpo_rows) == config.train.grpo_steps_per_round * config.train.num_rounds
  assert all({"step", "phase", "loss"} <= set(r) and np.isfinite(r["loss"]) for r in grpo_rows)
  # Learner batches are padded to train.length_buckets (powers of two when empty).
  buckets = tuple(config.train.length_buckets)
  assert all(int(r["learner_length"]) in buckets if buckets else int(r["learner_length"]).bit_count() == 1
             for r in grpo_rows), [r["learner_length"] for r in grpo_rows]
  # The OFSD phase ran: its buffer and end rows are logged every round (the smoke policy answers nothing
  # correctly, so it has no pairs and no student updates; tests/test_ofsd_phase.py covers phases with pairs).
  for phase in ("ofsd_buffer", "ofsd_end"):
    assert [r["round"] for r in rows if r["phase"] == phase] == list(range(1, config.train.num_rounds + 1))
  assert all(("post_em" in r) == bool(config.ofsd.post_phase_rollouts) for r in rows if r["phase"] == "ofsd_end")
  assert [int(r["step"]) for r in rows] == sorted(int(r["step"]) for r in rows)
  tb = os.path.join(workdir, "tensorboard")
  assert any(f.startswith("events.out.tfevents") for _, _, fs in os.walk(tb) for f in fs)
  plots = summary["paths"]["plots"]
  assert plots and all(p.endswith(".png") and os.path.getsize(p) > 0 for p in plots)
  assert os.path.basename(plots[0]) == "em_by_type.png"
  with open(summary["paths"]["report.md"]) as f:
    report_md = f.read()
  assert summary["table"] in report_md and "report/em_by_type.png" in report_md
  # The printed table: a header with the four question types, then one line per evaluation.
  for title in ("single-hop", "compositional", "comparison", "three-hop", "avg EM", "searches"):
    assert title in printed
  table_lines = [l for l in printed.splitlines() if l.startswith("| ")]
  assert len(table_lines) == 1 + len(rounds)
  assert "warm start" in table_lines[1]
  for name in ("results.json", "metrics.jsonl", "TensorBoard", "plots"):
    assert name in printed
  assert len(summary["rows"]) == len(rounds)
  assert summary["rows"][0]["n"] == len(sw.load_world(config.demo.world_dir).test_questions)

  # A second run reuses every artifact and the finished workdir: nothing is rebuilt or retrained.
  out2 = io.StringIO()
  demo.run_demo(config, workdir, out=out2)
  log2 = out2.getvalue()
  for stage in ("world reused", "tokenizer reused", "index reused", "warm start reused"):
    assert stage in log2
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["rounds"] == rounds

  # Both notebooks on this run's checkpoint. SOURCE='smoke' runs the smoke demo into WORKDIR (here: finds it
  # finished and reuses it, as above), then the notebooks read its latest checkpoint.
  nb, _ = notebook_testlib.execute("rollout_inspector.ipynb", SOURCE="smoke", WORKDIR=workdir, QUESTIONS=[0],
                                   GROUP_SIZE=2, SMOKE_CONFIG=f"configs/demo.py:smoke,cache={tmp_path / 'cache'}")
  assert f"policy: checkpoint of the demo run in {workdir}" in notebook_testlib.stdout_text(nb)
  assert sum(h.startswith("<h4>sibling ") for h in notebook_testlib.outputs(nb, "text/html")) == 2
  nb, _ = notebook_testlib.execute("ofsd_kl.ipynb", WORKDIR=workdir, WORK_DIR=str(tmp_path / "unused"))
  assert f"model: the demo run's latest checkpoint in {workdir}" in notebook_testlib.stdout_text(nb)


def test_em_series_follows_the_table_rows():
  from launch import demo
  rows = [{"round": 0, "phase": "init", "em_by_type": {"single_hop": 0.5, "three_hop": 0.1},
           "multi_hop_em": 0.1, "avg_em": 0.3},
          {"round": 1, "phase": "grpo", "em_by_type": {"single_hop": 0.6, "comparison": 0.2, "three_hop": 0.4},
           "multi_hop_em": 0.3, "avg_em": 0.45}]
  assert demo.em_series(rows) == {
      "single-hop": [0.5, 0.6], "compositional": [None, None], "comparison": [None, 0.2],
      "three-hop": [0.1, 0.4], "multi-hop": [0.1, 0.3], "average": [0.3, 0.45]}


def test_extra_searches_on_correct_answers_remove_the_type_mix():
  from types import SimpleNamespace
  from launch import demo
  world = SimpleNamespace(test_questions=[{"metadata": {"type": "single_hop", "hops": 1}},
                                          {"metadata": {"type": "three_hop", "hops": 3}}])
  # 4 correct single-hop answers with 1.5 searches each, 2 correct three-hop answers with 3 searches each.
  types = {"single_hop": {"n": 8, "em": 0.5, "searches_correct": 1.5},
           "three_hop": {"n": 4, "em": 0.5, "searches_correct": 3.0}}
  assert demo._extra_searches_correct(types, world) == pytest.approx((4 * 0.5 + 2 * 0.0) / 6)
  types["three_hop"]["em"] = 1.0  # more three-hop answers right: the plain mean rises, the extra searches fall
  assert demo._extra_searches_correct(types, world) == pytest.approx(2.0 / 8)
  assert demo._extra_searches_correct({"single_hop": {"n": 3, "em": 0.0, "searches_correct": 0.0}}, world) is None


def test_search_stats_counts_searches_against_hops(smoke, tmp_path):
  from launch import search_stats
  config, world, _ = smoke
  by_hops = {}
  for q in world.test_questions:
    by_hops.setdefault(int(q["metadata"]["hops"]), q["id"])
  one, two = by_hops[1], by_hops[2]
  check = transcripts_lib.VERIFY_PHRASE

  plans = {q["id"]: {t for _, t in world.solve(q)} for q in world.test_questions}
  questions = {q["id"]: q for q in world.test_questions}
  (t1,), (t2a, t2b) = [t for _, t in world.solve(questions[one])], [t for _, t in world.solve(questions[two])]
  other = next(t for t in world.names("person") if t not in plans[one] | plans[two])

  def row(qid, queries, reward, shown=None, text="", stop="answer"):
    obs = [protocol.format_observation([world.passage(t)]) for t in shown or [other] * len(queries)]
    return {"question_id": qid, "num_searches": len(queries), "queries": queries, "reward": reward,
            "response_text": text, "stop_reason": stop, "obs_texts": obs}

  rows = [row(one, [], 0.0),                                                   # fewer
          row(one, ["a"], 1.0, [t1]), row(two, ["a", "b"], 0.0, [t2a, t2b]),     # exact
          row(one, ["a", "a", "a", "a"], 0.0, stop="max_turns"),               # extra: repeat, max_turns
          row(two, ["a", "b", "c", "d"], 1.0, [other, t2a, t2b, t2b], text=f"x {check} y")]  # extra, checked
  got = search_stats.search_stats(rows, {q["id"]: int(q["metadata"]["hops"]) for q in world.test_questions},
                                  plans)
  assert got["n"] == 5 and got["em"] == pytest.approx(0.4)
  assert got["fewer"] == {"n": 1, "em": 0.0} and got["exact"] == {"n": 2, "em": 0.5}
  assert got["extra"] == {"n": 2, "em": 0.5, "repeat_query": 1, "max_turns": 1}
  assert got["double_check"] == {"n": 1, "em": 1.0}
  assert got["last_hop_without_check"] == {"n": 3, "em": 0.3333}  # rounded to 4 digits
  # Correct answers: [new] and [off, new, new, again].
  assert got["correct"] == {"n": 2, "new": 1.5, "again": 0.5, "off": 0.5}

  # The command pools workdirs per evaluation name and finds the world through config.json.
  for i, part in enumerate((rows[:2], rows[2:])):
    d = tmp_path / f"w{i}" / "eval" / "round000_init"
    d.mkdir(parents=True)
    (d / "trajectories.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
  (tmp_path / "w0" / "config.json").write_text(json.dumps({"data": {"world_dir": config.demo.world_dir}}))
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    search_stats.main([str(tmp_path / "w0"), str(tmp_path / "w1")])
  assert json.loads(out.getvalue()) == {"round000_init": got}
  with pytest.raises(SystemExit):  # no config.json and no --world_dir: a usage error naming the file
    search_stats.main([str(tmp_path / "w1")])
