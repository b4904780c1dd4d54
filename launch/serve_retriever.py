r"""Serves an index over HTTP with Search-R1's API (POST /retrieve).

  python -m launch.serve_retriever --index DIR/wiki18_e5 --port 8000 [--backend scann|exact]

Binds to 127.0.0.1 unless --host says otherwise. Limits on batch size, query length, topk and body size
default to configs/parts/retrieval.py (server block).
"""
import argparse
import logging
import sys

from configs.parts import retrieval as retrieval_config
from searche1_jax.config_utils import ConfigError, apply_overrides
from searche1_jax.retrieval.retriever import load_index_retriever
from searche1_jax.retrieval.server import RetrievalServer, ServerLimits


def main(argv=None) -> int:
  cfg = retrieval_config.get()
  s = cfg.server
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--index", required=True, help="index directory written by launch/build_index.py")
  ap.add_argument("--backend", choices=("scann", "exact"), default=cfg.backend)
  ap.add_argument("--corpus", default="", help="corpus path if it moved since the build")
  ap.add_argument("--encoder", default="", help="encoder alias/dir if it moved (must match the index)")
  ap.add_argument("--host", default=s.host)
  ap.add_argument("--port", type=int, default=s.port)
  ap.add_argument("--default_topk", type=int, default=s.default_topk)
  ap.add_argument("--max_topk", type=int, default=s.max_topk)
  ap.add_argument("--max_queries", type=int, default=s.max_queries, help="queries per request")
  ap.add_argument("--max_query_chars", type=int, default=s.max_query_chars)
  ap.add_argument("--max_body_bytes", type=int, default=s.max_body_bytes)
  ap.add_argument("--backlog", type=int, default=s.backlog, help="connections queued before accept")
  ap.add_argument("--workers", type=int, default=s.workers, help="requests served at once")
  ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                  help="any retrieval config field, e.g. --set encoding.platform=cpu")
  args = ap.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

  cfg.index_dir, cfg.backend, cfg.corpus_path, cfg.encoder = args.index, args.backend, args.corpus, args.encoder
  s.host, s.port, s.default_topk, s.max_topk = args.host, args.port, args.default_topk, args.max_topk
  s.max_queries, s.max_query_chars, s.max_body_bytes = args.max_queries, args.max_query_chars, args.max_body_bytes
  s.backlog, s.workers = args.backlog, args.workers
  try:
    apply_overrides(cfg, args.overrides)
  except ConfigError as e:
    ap.error(f"--set: {e}")

  retriever = load_index_retriever(cfg)
  server = RetrievalServer(retriever, s.host, s.port, ServerLimits.from_config(s))
  logging.info("serving %s (%s, %d passages) at %s", args.index, args.backend, len(retriever.corpus), server.url)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
