"""searche1_jax/schema.py: one declaration per option field gives the config check, the typed object and the
direct-construction check; the option classes built on it."""
import dataclasses

import ml_collections
import pytest

from configs.parts import grpo as grpo_part
from configs.parts import ofsd as ofsd_part
from searche1_jax import schema
from searche1_jax.rl import grpo_loss, ofsd_loss, ofsd_phase, privileged
from searche1_jax.sampling import options as sampling_options


@dataclasses.dataclass(frozen=True)
class Toy:
  n: int = schema.option("int", lo=1)
  rate: float = schema.option("float", lo=0.0, hi=1.0, hi_open=True)
  mode: str = schema.option("str", choices=("a", "b"))
  flag: bool = schema.option("bool")
  sizes: tuple = schema.option("ints", (), lo=1, optional=True)
  limit: int | None = schema.option("int", None, lo=0, none_ok=True, optional=True, key="max_limit")

  def __post_init__(self):
    schema.check(self, "toy")

  @classmethod
  def _normalize(cls, v):
    if v.get("limit") == 0:
      v["limit"] = None
    return v

  @classmethod
  def _cross_problems(cls, v):
    return [("n", "must be even when flag is set")] if v["flag"] and v["n"] % 2 else []


GOOD = {"n": 2, "rate": 0.5, "mode": "a", "flag": True}


@pytest.mark.parametrize("spec,value,why", [
    (schema.Spec("int", lo=1), 0, "must be >= 1"),
    (schema.Spec("int"), 1.5, "must be an integer"),
    (schema.Spec("int"), True, "must be an integer"),  # a bool is not a number here
    (schema.Spec("float", lo=0.0, lo_open=True), 0.0, "must be > 0.0"),
    (schema.Spec("float", hi=1.0, hi_open=True), 1.0, "must be < 1.0"),
    (schema.Spec("float"), float("nan"), "must be finite"),
    (schema.Spec("float"), None, "must not be None"),
    (schema.Spec("bool"), 1, "must be True or False"),
    (schema.Spec("str", choices=("x", "y")), "z", "must be one of ('x', 'y')"),
    (schema.Spec("str"), 3, "must be a string"),
    (schema.Spec("ints", lo=1), (4, 0), "entries must each be >= 1"),
    (schema.Spec("ints"), "12", "must be a sequence of integers"),
])
def test_field_problem_names_the_rule(spec, value, why):
  assert schema.field_problem(spec, value) == why


@pytest.mark.parametrize("spec,value", [
    (schema.Spec("int", lo=1), 1), (schema.Spec("float", lo=0.0, hi=1.0), 1), (schema.Spec("int", none_ok=True), None),
    (schema.Spec("ints", lo=1), [1, 2]), (schema.Spec("str", choices=("x",)), "x"), (schema.Spec("bool"), False)])
def test_field_problem_accepts_valid_values(spec, value):
  assert schema.field_problem(spec, value) is None


def test_problems_lists_every_bad_field_with_its_config_key():
  bad = dict(GOOD, n=0, mode="c", max_limit=-1)
  assert schema.problems(Toy, ml_collections.ConfigDict(bad), "toy") == [
      "toy.n=0: must be >= 1", "toy.mode='c': must be one of ('a', 'b')", "toy.max_limit=-1: must be >= 0"]
  assert schema.problems(Toy, {"n": 2}, "toy", "the toy block") == [
      f"toy: missing field {k!r} (see the toy block)" for k in ("rate", "mode", "flag")]
  assert schema.problems(Toy, dict(GOOD, n=3), "toy") == ["toy.n=3: must be even when flag is set"]
  assert schema.problems(Toy, dict(GOOD, unrelated="ignored"), "toy") == []


def test_build_types_normalizes_and_raises_all_at_once():
  t = schema.build(Toy, ml_collections.ConfigDict(dict(GOOD, sizes=[4, 8], max_limit=0)), "toy")
  assert t == Toy(n=2, rate=0.5, mode="a", flag=True, sizes=(4, 8), limit=None)
  assert isinstance(t.sizes, tuple)
  with pytest.raises(schema.SchemaError) as e:
    schema.build(Toy, dict(GOOD, n=0, rate=2.0), "toy")
  assert str(e.value).splitlines() == [
      "invalid toy config:", "  toy.n=0: must be >= 1", "  toy.rate=2.0: must be < 1.0"]


def test_direct_construction_is_checked_by_the_same_declaration():
  with pytest.raises(schema.SchemaError, match=r"toy.mode='q': must be one of"):
    Toy(n=2, rate=0.5, mode="q", flag=False)
  assert Toy(n=2, rate=0.5, mode="a", flag=False, limit=0).limit is None  # _normalize runs on direct objects too


def test_option_classes_build_from_the_config_parts():
  part = grpo_part.get()
  g = grpo_loss.GRPOOptions.from_config(part)
  assert g.clip_eps_high == (part.clip_eps if part.clip_eps_high is None else part.clip_eps_high)
  assert (g.kl_coef, g.num_microbatches) == (part.kl_coef, part.num_microbatches)
  o = ofsd_part.get()
  d = ofsd_loss.DivergenceOptions.from_config(o)
  assert (d.kind, d.beta) == (o.kind, o.beta)
  assert ofsd_phase.PhaseOptions.from_config(o).batch_size == o.batch_size
  assert privileged.ContextOptions.from_config(o).header == privileged.HEADER_REFERENCE  # optional text field
  assert sampling_options.SamplerOptions.from_config(None) == sampling_options.SamplerOptions()


def test_option_class_errors_name_the_block_field():
  block = grpo_part.get()
  block.clip_eps_high = None
  assert grpo_loss.GRPOOptions.from_config(block).clip_eps_high == block.clip_eps  # None = symmetric clip
  block.kl_estimator, block.num_microbatches = "k4", 0
  with pytest.raises(ValueError) as e:
    grpo_loss.GRPOOptions.from_config(block)
  assert "grpo.kl_estimator='k4': must be one of" in str(e.value) and "grpo.num_microbatches=0" in str(e.value)
  with pytest.raises(ValueError, match=r"ofsd.num_microbatches=3: must divide ofsd.batch_size=64"):
    ofsd_phase.PhaseOptions(batch_size=64, num_microbatches=3)
