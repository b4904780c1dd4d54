"""HTTP retrieval server with Search-R1's API (stdlib ThreadingHTTPServer).

POST /retrieve {"queries": [...], "topk": 3, "return_scores": true}
  -> {"result": [[{"document": {"id", "contents"}, "score"}, ...], ...]}
  (return_scores false or absent: each item is the document itself; topk absent or null: default_topk)
GET /health -> {"status": "ok"}
Bad requests (malformed JSON, nesting too deep, queries that are not valid Unicode text, limits) get a 4xx JSON
body {"error": message}; the server keeps serving. Connections are accepted into a listen backlog of
`backlog` and served by at most `workers` threads, so the hosts of a pod slice can call at once.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from searche1_jax.retrieval.passage import Passage

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServerLimits:
  default_topk: int = 3
  max_topk: int = 100
  max_queries: int = 1024
  max_query_chars: int = 4096
  max_body_bytes: int = 8 << 20
  backlog: int = 256  # connections the OS queues before accept (the stdlib default is 5)
  workers: int = 64  # requests served at once; more wait for a free worker
  idle_timeout_s: float = 30.0  # a connection silent this long is closed (frees its worker)

  @classmethod
  def from_config(cls, block: Any) -> "ServerLimits":
    """`block` = the `server` block of configs/parts/retrieval.py."""
    return cls(block.default_topk, block.max_topk, block.max_queries, block.max_query_chars, block.max_body_bytes,
               block.backlog, block.workers, block.idle_timeout_s)


class RequestError(Exception):

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status, self.message = status, message


def parse_retrieve_request(body: bytes, limits: ServerLimits) -> tuple[list[str], int, bool]:
  """Validates a /retrieve body -> (queries, topk, return_scores); raises RequestError(400, why)."""
  try:
    req = json.loads(body)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RequestError(400, f"body is not valid JSON: {e}") from None
  except RecursionError:
    raise RequestError(400, "body is nested too deeply") from None
  if not isinstance(req, dict):
    raise RequestError(400, "body must be a JSON object with field 'queries'")
  queries = req.get("queries")
  if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
    raise RequestError(400, "field 'queries' must be a list of strings")
  if len(queries) > limits.max_queries:
    raise RequestError(400, f"{len(queries)} queries exceed the limit of {limits.max_queries} per request")
  for i, q in enumerate(queries):
    if len(q) > limits.max_query_chars:
      raise RequestError(400, f"queries[{i}] has {len(q)} characters, the limit is {limits.max_query_chars}")
    try:
      q.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate ("\ud800"): JSON allows it, text encoders do not
      raise RequestError(400, f"queries[{i}] is not valid Unicode text: {e.reason} at {e.start}") from None
  topk = req.get("topk")
  if topk is None:
    topk = limits.default_topk
  if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= limits.max_topk:
    raise RequestError(400, f"field 'topk' must be an integer in [1, {limits.max_topk}], got {topk!r}")
  return_scores = req.get("return_scores", False)
  if not isinstance(return_scores, bool):
    raise RequestError(400, f"field 'return_scores' must be a boolean, got {return_scores!r}")
  return queries, topk, return_scores


def format_result(results: list[list[Passage]], return_scores: bool) -> dict:
  doc = lambda p: {"id": p.id, "contents": p.contents}
  if return_scores:
    return {"result": [[{"document": doc(p), "score": p.score} for p in ps] for ps in results]}
  return {"result": [[doc(p) for p in ps] for ps in results]}


class _Handler(BaseHTTPRequestHandler):
  server_version = "searche1-retriever/1"
  protocol_version = "HTTP/1.1"

  def _send(self, status: int, obj: dict) -> None:
    data = json.dumps(obj).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    if self.close_connection:
      self.send_header("Connection", "close")
    self.end_headers()
    self.wfile.write(data)

  def _error(self, status: int, message: str) -> None:
    self._send(status, {"error": message})

  def log_message(self, fmt, *args):  # route the per-request log line through logging
    log.info("%s %s", self.address_string(), fmt % args)

  def do_GET(self):
    if self.path.split("?")[0] == "/health":
      self._send(200, {"status": "ok"})
    else:
      self._error(404, f"no such path {self.path!r}; use POST /retrieve")

  def do_POST(self):
    limits: ServerLimits = self.server.limits
    length = self.headers.get("Content-Length")
    if length is None:
      self.close_connection = True
      return self._error(411, "Content-Length header required")
    try:
      length = int(length)
      if length < 0:
        raise ValueError
    except ValueError:
      self.close_connection = True
      return self._error(400, f"invalid Content-Length {self.headers.get('Content-Length')!r}")
    if length > limits.max_body_bytes:
      self.close_connection = True
      self._drain(length)
      return self._error(413, f"body of {length} bytes exceeds the limit of {limits.max_body_bytes} bytes")
    body = self.rfile.read(length)
    if self.path.split("?")[0] != "/retrieve":
      return self._error(404, f"no such path {self.path!r}; use POST /retrieve")
    try:
      queries, topk, return_scores = parse_retrieve_request(body, limits)
    except RequestError as e:
      return self._error(e.status, e.message)
    try:
      results = self.server.retriever.retrieve(queries, topk) if queries else []
    except Exception as e:  # keep serving; the client sees a 500 with the reason
      log.exception("retrieval failed")
      return self._error(500, f"retrieval failed: {type(e).__name__}: {e}")
    self._send(200, format_result(results, return_scores))

  def _drain(self, length: int) -> None:
    """Reads (and drops) a refused body of moderate size so the client can read our 413 reply."""
    if length > 4 * self.server.limits.max_body_bytes:
      return
    while length > 0:
      chunk = self.rfile.read(min(length, 1 << 16))
      if not chunk:
        return
      length -= len(chunk)


class RetrievalServer(ThreadingHTTPServer):
  daemon_threads = True

  def __init__(self, retriever: Any, host: str = "127.0.0.1", port: int = 8000,
               limits: ServerLimits = ServerLimits()):
    if limits.backlog < 1 or limits.workers < 1 or limits.idle_timeout_s <= 0:
      raise ValueError(f"retrieval.server: backlog {limits.backlog} and workers {limits.workers} must be >= 1 and "
                       f"idle_timeout_s {limits.idle_timeout_s} > 0")
    self.retriever, self.limits = retriever, limits
    self.request_queue_size = limits.backlog  # read by listen() in server_activate
    self._pool = futures.ThreadPoolExecutor(limits.workers, thread_name_prefix="retrieval-worker")
    super().__init__((host, port), _Handler)

  def process_request(self, request, client_address):
    """One pooled worker per connection (the stdlib starts an unbounded thread each)."""
    request.settimeout(self.limits.idle_timeout_s)
    self._pool.submit(self.process_request_thread, request, client_address)

  def server_close(self):
    super().server_close()
    self._pool.shutdown(wait=False, cancel_futures=True)

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{host}:{port}/retrieve"

  def start_background(self) -> threading.Thread:
    """Serves on a daemon thread (tests, notebooks); stop with shutdown() + server_close()."""
    t = threading.Thread(target=self.serve_forever, name="retrieval-server", daemon=True)
    t.start()
    return t
