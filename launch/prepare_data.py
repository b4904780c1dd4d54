"""Builds the TFDS (array_record) QA datasets from local FlashRAG / Search-R1 files.

    python -m launch.prepare_data --raw_dir data/raw --tfds_dir data/tfds \
        --datasets nq_hotpotqa_train,nq,triviaqa,popqa,hotpotqa,2wikimultihopqa,musique,bamboogle

    # the synthetic demo world (writes it first with --generate_world):
    python -m launch.prepare_data --tfds_dir data/tfds --datasets synthetic_world \
        --world_dir data/synthetic_world --generate_world --world_seed 0

All requested datasets are checked first; missing files give one error naming each of them and
where to get it. `--datasets all` means every dataset but the synthetic world.
"""
from __future__ import annotations

import argparse
import sys

from configs.parts import world as world_part
from searche1_jax.data import qa
from searche1_jax.demo import synthetic_world


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--raw_dir", default="data/raw",
                 help="FlashRAG root (<raw_dir>/<dataset>/<split>.jsonl) or Search-R1 parquet dir")
  p.add_argument("--tfds_dir", required=True, help="where the TFDS builds go")
  p.add_argument("--datasets", required=True,
                 help=f"comma-separated, from: {', '.join(qa.DATASETS)}; or 'all'")
  p.add_argument("--world_dir", default=None,
                 help="synthetic world directory (default: <raw_dir>/synthetic_world)")
  p.add_argument("--generate_world", action="store_true",
                 help="(re)generate the synthetic world into --world_dir first "
                      "(configs/parts/world.py defaults)")
  p.add_argument("--world_seed", type=int, default=None, help="seed for --generate_world")
  p.add_argument("--overwrite", action="store_true", help="rebuild even if up to date")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.datasets.strip() == "all":
    names = [n for n in qa.DATASETS if n != qa.WORLD_NAME]
  else:
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
  unknown = [n for n in names if n not in qa.DATASETS]
  if unknown:
    print(f"--datasets: unknown {unknown}; known: {', '.join(qa.DATASETS)}", file=sys.stderr)
    return 2
  world_dir = args.world_dir or f"{args.raw_dir.rstrip('/')}/{qa.WORLD_NAME}"
  if args.generate_world:
    cfg = world_part.get()
    if args.world_seed is not None:
      cfg.seed = args.world_seed
    w = synthetic_world.write_world(world_dir, cfg)
    print(f"wrote world to {world_dir}: {len(w.passages)} passages, "
          f"{len(w.train_questions)} train / {len(w.test_questions)} test questions")
  dirs = {n: (world_dir if n == qa.WORLD_NAME else args.raw_dir) for n in names}
  try:
    qa.check_sources(dirs)
  except qa.MissingDataError as e:
    print(e, file=sys.stderr)
    return 1
  for n in names:
    out = qa.build(n, dirs[n], args.tfds_dir, overwrite=args.overwrite)
    print(f"{n}: {out} {qa.split_sizes(n, args.tfds_dir)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
