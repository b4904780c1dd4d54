"""Named kill points for fault-injection tests of resume.

With SEARCHE1_KILL_AT=<point>[:<n>] in the environment, the process SIGKILLs itself the n-th time (default: the
first) it reaches `point(<point>)`: no cleanup, no flush, exactly like a preempted host. Unset (every real run),
a call is one environment lookup. The points sit where a kill is most likely to leave state half-written:

  grpo_rollout      a GRPO step's rollouts are done, its updates not
  grpo_update       one optimizer update of a GRPO step is done, the step's checkpoint not
  ofsd_enter        the checkpoint entering an OFSD phase is written, the phase's buffer not built
  ofsd_targets      the OFSD buffer and teacher targets are built, not checkpointed
  ofsd_update       one OFSD student update is done
  eval              an evaluation has run, its results are not written
  checkpoint_write  a checkpoint write has started (asynchronous: the step directory is partial)
"""
from __future__ import annotations

import collections
import os
import signal
from typing import Callable

ENV = "SEARCHE1_KILL_AT"
POINTS = ("grpo_rollout", "grpo_update", "ofsd_enter", "ofsd_targets", "ofsd_update", "eval", "checkpoint_write")
_reached: collections.Counter = collections.Counter()


def point(name: str, settle: Callable[[], None] | None = None) -> None:
  """SIGKILL this process if SEARCHE1_KILL_AT names `name` and this is the named occurrence; `settle` runs first
  (e.g. waiting for an asynchronous checkpoint write that a real run's next minutes of work would let finish)."""
  spec = os.environ.get(ENV)
  if not spec:
    return
  target, _, nth = spec.partition(":")
  if target not in POINTS or not (nth or "1").isdigit() or int(nth or "1") < 1:
    raise ValueError(f"{ENV}={spec!r}: expected <point>[:<n>] with n >= 1 and point one of {POINTS}")
  if name != target:
    return
  _reached[name] += 1
  if _reached[name] == int(nth or "1"):
    if settle is not None:
      settle()
    os.kill(os.getpid(), signal.SIGKILL)
