"""End-to-end evaluation: a tiny Qwen2 checkpoint (save_hf), the real sampler, a MiniLM exact index over a tiny
corpus, questions through the TFDS data path, results.json / results.md / trajectories.jsonl.

The policy is a random tiny Qwen2 whose attention and MLP outputs are zeroed and whose LM head is set so that greedy
decoding follows a fixed next-token chain (a bigram machine): prompt end '\\n' -> '<search>' A '</search>', then after
the observation's final '\\n\\n' -> '<answer>' B '</answer>'. So every trajectory is known exactly in advance:
one search, one spliced observation, one answer; EM is 1 exactly for the questions whose golden answer is B.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from rollout_testlib import chain_params, make_tokenizer, search_answer_chain
import testenv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CORPUS = [
    ("p0", "Velora", "Velora is a city in Marisk. It was founded long ago."),
    ("p1", "Marisk", "Marisk is a country. Its capital is Velora."),
    ("p2", "Tobin Arel", "Tobin Arel was born in Velora in 1950."),
    ("p3", "Quen Labs", "Quen Labs is a company founded by Tobin Arel."),
    ("p4", "Drosk", "Drosk is a river that flows through Marisk."),
    ("p5", "Ilva Sorn", "Ilva Sorn works for Quen Labs."),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  from searche1_jax.models import qwen2, save_hf
  from searche1_jax.retrieval.build import build_index
  from searche1_jax.retrieval.encoder import Encoder
  import configs.parts.retrieval as retrieval_part

  root = str(tmp_path_factory.mktemp("eval_tiny"))
  tok = make_tokenizer()
  model_dir = os.path.join(root, "model")
  tok.save_pretrained(model_dir)
  chain, a, b = search_answer_chain(tok)
  cfg = qwen2.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2)
  assert len(tok) <= cfg.vocab_size
  save_hf(chain_params(cfg, chain), cfg, model_dir, extra_config={"eos_token_id": tok.eos_token_id})

  world = os.path.join(root, "world")
  os.makedirs(world)
  with open(os.path.join(world, "corpus.jsonl"), "w") as f:
    for pid, title, text in CORPUS:
      f.write(json.dumps({"id": pid, "contents": f'"{title}"\n{text}'}) + "\n")
  answer_b = tok.decode([b])
  questions = [{"id": f"t{i}", "question": f"Question number {i}", "golden_answers": [answer_b if i % 2 else "zzz"]}
               for i in range(6)]
  for split, qs in (("train", questions[:2]), ("test", questions)):
    with open(os.path.join(world, f"{split}.jsonl"), "w") as f:
      for q in qs:
        f.write(json.dumps(q) + "\n")
  r_cfg = retrieval_part.get()
  encoder = Encoder.from_hf("minilm", batch_size=8, devices=jax.devices()[:1])
  build_index(os.path.join(world, "corpus.jsonl"), encoder,
              os.path.join(root, "index"), "exact", r_cfg, progress=False)
  return dict(root=root, tok=tok, query=tok.decode([a]).strip(), answer=answer_b.strip(), questions=questions)


def _check_outputs(setup, workdir, n):
  with open(os.path.join(workdir, "results.json")) as f:
    res = json.load(f)
  m = res["benchmarks"]["synthetic_world"]
  want_em = np.mean([q["golden_answers"][0].strip() == setup["answer"] for q in setup["questions"][:n]])
  assert m["n"] == n and m["em"] == pytest.approx(want_em) and m["f1"] == pytest.approx(want_em)
  assert m["mean_searches"] == 1.0 and m["invalid_action_rate"] == 0.0 and m["answered_rate"] == 1.0
  assert m["stop_reasons"] == {"answer": n}
  assert res["average"]["em"] == pytest.approx(want_em)
  assert res["timing"]["retrieval_s"] > 0 and res["timing"]["decode_s"] > 0
  md = open(os.path.join(workdir, "results.md")).read()
  assert "| World | Avg. |" in md.splitlines()[0] and f"{want_em:.3f} | {want_em:.3f} |" in md.splitlines()[2]
  from searche1_jax.agent.trajectory import load_jsonl
  trajs = load_jsonl(os.path.join(workdir, "trajectories.jsonl"))
  assert [t.question_id for t in trajs] == [q["id"] for q in setup["questions"][:n]]
  lines = [json.loads(line) for line in open(os.path.join(workdir, "trajectories.jsonl"))]
  tok = setup["tok"]
  for t, rec in zip(trajs, lines):
    assert t.turn_actions == ["search", "answer"] and t.queries == [setup["query"]]
    assert t.obs_kinds == ["information"] and t.answer == setup["answer"]
    s, e = t.obs_spans[0]
    obs_text = tok.decode(t.ids[s:e].tolist())
    assert obs_text.startswith("\n\n<information>Doc 1(Title: ") and obs_text.endswith("</information>\n\n")
    assert obs_text.count("(Title: ") == 3  # protocol.topk passages
    assert rec["turn_texts"] == [f"<search>{setup['query']}</search>", f"<answer>{setup['answer']}</answer>"]
    # Policy tokens carry the sampler's (finite, negative) log-probs; everything else is 0.
    assert (t.logprobs[t.policy_mask == 1] < 0).all() and (t.logprobs[t.policy_mask == 0] == 0).all()
    assert t.reward == float(t.golden_answers[0].strip() == setup["answer"])


@pytest.mark.slow  # ~20-35 s with its fixture on 2 busy cores (XLA compiles of sampler and encoder)
def test_eval_in_process(setup, tmp_path):
  import configs.eval_tiny as eval_tiny
  from searche1_jax.train import evaluation
  config = eval_tiny.get_config(f"root={setup['root']}")
  config.data.eval_limit.synthetic_world = 5
  config.protocol.max_obs_length = 500  # whole observations: the chain continues after their final '\n\n'
  workdir = str(tmp_path / "eval")
  res = evaluation.evaluate_from_config(config, workdir, progress=False)
  assert res["benchmarks"]["synthetic_world"]["n"] == 5
  _check_outputs(setup, workdir, 5)


@pytest.mark.slow
def test_eval_cli(setup, tmp_path):
  workdir = str(tmp_path / "cli")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=testenv.xla_flags(1))
  proc = subprocess.run(
      [sys.executable, "-m", "launch.eval", f"--config=configs/eval_tiny.py:root={setup['root']}",
       "--config.protocol.max_obs_length=500", f"--checkpoint={os.path.join(setup['root'], 'model')}",
       f"--workdir={workdir}", "--limit=4",
       "--noprogress"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| method | World | Avg. |" in proc.stdout
  _check_outputs(setup, workdir, 4)
