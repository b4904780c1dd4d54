"""evaluation.evaluate with a scripted policy: per-benchmark metrics, the unweighted average, batching, outputs."""
import json
import os

import numpy as np
import pytest

from searche1_jax.models import hf
from searche1_jax.train import evaluation
from searche1_jax.agent import protocol
from searche1_jax.agent import trajectory as trajectory_lib
from rollout_testlib import ScriptedRetriever, ScriptedSession, configs, enc, make_tokenizer


@pytest.fixture(scope="module")
def tok():
  return make_tokenizer()


# Per question: (golden answers, the policy's turns).
NQ = {
    "n1": (["Paris"], ["<search> capital </search>", "<answer> Paris </answer>"]),  # EM 1, 1 search
    "n2": (["Rome"], ["<answer> Milan </answer>"]),  # EM 0, F1 0
    "n3": (["New York City"], ["hmm", "<answer> York City </answer>"]),  # EM 0, F1 0.8, 1 invalid turn
}
BAMBOOGLE = {
    "b1": (["42"], ["<search> a </search>", "<search> b </search>", "<answer> 42 </answer>"]),  # EM 1, 2 searches
}


def _questions(table):
  return [{"id": qid, "question": f"question {qid}", "golden_answers": g} for qid, (g, _) in table.items()]


def _factory(tok, tables, made):
  """Scripts are looked up by prompt, so any batching of the questions works."""
  by_prompt = {}
  for table in tables:
    for qid, (_, turns) in table.items():
      prompt = tuple(enc(tok, protocol.make_prompt(f"question {qid}")))
      by_prompt[prompt] = [enc(tok, t) for t in turns]

  def make(prompts, max_len):
    sess = ScriptedSession(prompts, max_len, [by_prompt[tuple(p)] for p in prompts])
    made.append(len(prompts))
    return sess

  return make


def test_evaluate_metrics_and_outputs(tok, tmp_path):
  p_cfg, r_cfg = configs()
  r_cfg.eval.batch_size = 2
  made = []
  workdir = str(tmp_path / "eval")
  res = evaluation.evaluate(_factory(tok, [NQ, BAMBOOGLE], made), tok, ScriptedRetriever(),
                            {"nq": _questions(NQ), "bamboogle": _questions(BAMBOOGLE)}, p_cfg, r_cfg,
                            workdir=workdir, policy_version=3, method="tiny", progress=False)
  assert made == [2, 1, 1]  # nq in batches of 2 + 1, then bamboogle
  nq, bam = res["benchmarks"]["nq"], res["benchmarks"]["bamboogle"]
  assert nq["n"] == 3 and nq["em"] == pytest.approx(1 / 3)
  assert nq["f1"] == pytest.approx((1 + 0 + 0.8) / 3)
  assert nq["mean_searches"] == pytest.approx(1 / 3)
  assert nq["invalid_action_rate"] == pytest.approx(1 / 5)  # 5 turns, 1 invalid
  assert nq["answered_rate"] == 1.0 and nq["stop_reasons"] == {"answer": 3}
  assert bam["n"] == 1 and bam["em"] == 1.0 and bam["mean_searches"] == 2.0 and bam["invalid_action_rate"] == 0.0
  assert res["average"]["em"] == pytest.approx((1 / 3 + 1) / 2)  # unweighted over benchmarks
  assert res["average"]["mean_searches"] == pytest.approx((1 / 3 + 2) / 2)

  trajs = trajectory_lib.load_jsonl(os.path.join(workdir, "trajectories.jsonl"))
  assert [t.question_id for t in trajs] == ["n1", "n2", "n3", "b1"]
  assert all(t.policy_version == 3 for t in trajs)
  assert [t.metadata["benchmark"] for t in trajs] == ["nq"] * 3 + ["bamboogle"]
  # Mean response tokens = tokens after the prompt, from the records themselves.
  assert nq["mean_response_tokens"] == pytest.approx(np.mean([len(t.response_ids) for t in trajs[:3]]))
  assert nq["mean_policy_tokens"] == pytest.approx(np.mean([t.num_policy_tokens for t in trajs[:3]]))
  rec = json.loads(open(os.path.join(workdir, "trajectories.jsonl")).readline())
  assert rec["response_text"].startswith("<search> capital </search>\n\n<information>Doc 1(Title: ")
  assert rec["response_text"].endswith("<answer> Paris </answer>")

  with open(os.path.join(workdir, "results.json")) as f:
    on_disk = json.load(f)
  assert on_disk["benchmarks"] == res["benchmarks"] and on_disk["average"] == res["average"]
  md = open(os.path.join(workdir, "results.md")).read()
  lines = md.splitlines()
  assert lines[0] == "| method | NQ | Bamboogle | Avg. |"
  assert lines[2] == "| tiny | 0.333 | 1.000 | 0.667 |"
  assert "| NQ | 3 | 0.333 | 0.600 | 0.33 |" in md
  assert md == res["markdown"]


def test_empty_benchmark_and_bad_batch_size(tok, tmp_path):
  p_cfg, r_cfg = configs()
  res = evaluation.evaluate(_factory(tok, [BAMBOOGLE], []), tok, ScriptedRetriever(),
                            {"nq": [], "bamboogle": _questions(BAMBOOGLE)}, p_cfg, r_cfg, progress=False)
  assert res["benchmarks"]["nq"] == {"n": 0}
  assert res["average"]["num_benchmarks"] == 1 and res["average"]["em"] == 1.0
  assert "| policy | - | 1.000 | 1.000 |" in res["markdown"]
  r_cfg.eval.batch_size = 0
  with pytest.raises(ValueError, match="rollout.eval.batch_size must be >= 1"):
    evaluation.evaluate(_factory(tok, [], []), tok, ScriptedRetriever(), {}, p_cfg, r_cfg, progress=False)


def test_eos_ids_and_checkpoint_detection(tok, tmp_path):
  d = tmp_path / "ckpt"
  d.mkdir()
  assert not hf.is_hf_checkpoint(str(d))
  (d / "config.json").write_text("{}")
  (d / "model.safetensors").write_bytes(b"")
  assert hf.is_hf_checkpoint(str(d))
  (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
  assert hf.eos_ids_for(tok, str(d)) == sorted({7, 9, tok.eos_token_id})
  # A directory that is neither an HF checkpoint nor a trainer workdir: one clear error naming it.
  with pytest.raises(FileNotFoundError, match="no trainer checkpoint found"):
    evaluation.load_trainer_checkpoint(str(tmp_path), None, None, None)
