r"""Builds a retrieval index directory from a JSONL corpus (resumable).

  python -m launch.build_index --corpus wiki-18.jsonl --encoder DIR/e5-base-v2 --index scann --out DIR/wiki18_e5
  python -m launch.build_index --corpus wiki-18.jsonl --encoder DIR/e5-base-v2 --from_faiss DIR/e5_Flat.index \
      --index scann --out DIR/wiki18_e5      # Search-R1's prebuilt vectors: no passage is encoded

Encodes the corpus in shards (each saved when done; re-running the same command skips finished
shards), then builds the index. Defaults come from configs/parts/retrieval.py; flags override them.
"""
import argparse
import logging
import sys

from configs.parts import retrieval as retrieval_config
from searche1_jax.config_utils import ConfigError, apply_overrides
from searche1_jax.retrieval.build import build_index
from searche1_jax.retrieval.encoder import Encoder


def main(argv=None) -> int:
  cfg = retrieval_config.get()
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--corpus", required=True, help="JSONL corpus ({id, contents} or {id, title, text})")
  ap.add_argument("--encoder", default="minilm", help="'minilm', an HF BERT directory, or intfloat/e5-base-v2")
  ap.add_argument("--index", choices=("scann", "exact"), default="scann")
  ap.add_argument("--out", required=True, help="index directory (created; an unfinished build there resumes)")
  ap.add_argument("--shard_size", type=int, default=cfg.build.shard_size, help="passages per saved shard")
  ap.add_argument("--batch_size", type=int, default=cfg.encoding.batch_size)
  ap.add_argument("--passage_max_length", type=int, default=cfg.encoding.passage_max_length)
  ap.add_argument("--query_prefix", default=cfg.encoding.query_prefix, help="'auto' = model convention")
  ap.add_argument("--passage_prefix", default=cfg.encoding.passage_prefix, help="'auto' = model convention")
  ap.add_argument("--dtype", default=cfg.encoding.dtype, choices=("float32", "bfloat16"))
  ap.add_argument("--skip_malformed", action="store_true", help="skip and count malformed lines")
  ap.add_argument("--stop_after_shards", type=int, default=None,
                  help="encode at most this many shards, then exit (the next run resumes)")
  ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                  help="any retrieval config field, e.g. --set scann.reorder=300")
  ap.add_argument("--from_faiss", default=None, metavar="FILE",
                  help="take the passage vectors from this FAISS flat inner-product index (e.g. Search-R1's "
                       "e5_Flat.index, row i = corpus line i) instead of encoding; --encoder still encodes queries")
  ap.add_argument("--no_progress", action="store_true")
  args = ap.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

  cfg.build.shard_size = args.shard_size
  cfg.build.skip_malformed = args.skip_malformed
  cfg.encoding.batch_size = args.batch_size
  cfg.encoding.passage_max_length = args.passage_max_length
  cfg.encoding.query_prefix = args.query_prefix
  cfg.encoding.passage_prefix = args.passage_prefix
  cfg.encoding.dtype = args.dtype
  try:
    apply_overrides(cfg, args.overrides)
  except ConfigError as e:
    ap.error(f"--set: {e}")

  encoder = Encoder.from_config(args.encoder, cfg.encoding)
  logging.info("encoder %s (dim %d, %d device(s)), prefixes query=%r passage=%r", encoder.model_dir, encoder.dim,
               encoder.num_devices, encoder.query_prefix, encoder.passage_prefix)
  try:
    manifest = build_index(args.corpus, encoder, args.out, args.index, cfg, stop_after_shards=args.stop_after_shards,
                           progress=not args.no_progress, from_faiss=args.from_faiss)
  except (FileNotFoundError, ValueError) as e:  # bad inputs: the message names the file and the problem
    print(f"build_index: {e}", file=sys.stderr)
    return 2
  if manifest is None:
    logging.info("stopped after %d shard(s); re-run the same command to resume", args.stop_after_shards)
    return 0
  logging.info("index ready: %s (%d passages, %d skipped, dim %d, %s %s)", args.out, manifest["num_passages"],
               manifest["corpus"]["num_skipped"], manifest["dim"], manifest["index_type"], manifest["scann"] or "")
  return 0


if __name__ == "__main__":
  sys.exit(main())
