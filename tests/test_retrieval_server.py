"""HTTP server (Search-R1 API) and client: shapes, scores, 4xx on bad requests while serving on,
client retries with exponential backoff. Everything talks to 127.0.0.1 only."""
import concurrent.futures
import dataclasses
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fixtures.retrieval.helpers import make_tiny_bert, retrieval_cfg, small_corpus
from searche1_jax.agent import protocol
from searche1_jax.retrieval import Encoder, HttpRetriever, Passage, RetrievalError, iter_passages, make_retriever
from searche1_jax.retrieval.build import build_index
from searche1_jax.retrieval.cache import CachingRetriever
from searche1_jax.retrieval.server import RetrievalServer, ServerLimits, format_result

REPO = __file__.rsplit("/tests/", 1)[0]
LIMITS = ServerLimits(default_topk=3, max_topk=8, max_queries=4, max_query_chars=200, max_body_bytes=2000)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("srv")
  corpus = small_corpus(str(root / "corpus.jsonl"), n=10)
  enc_dir = make_tiny_bert(str(root / "enc"), seed=0)
  cfg = retrieval_cfg()
  build_index(corpus, Encoder.from_hf(enc_dir, batch_size=8), str(root / "idx"), "exact", cfg, progress=False)
  return str(root / "idx")


@pytest.fixture(scope="module")
def local(index_dir):
  cfg = retrieval_cfg()
  cfg.index_dir, cfg.backend = index_dir, "exact"
  cfg.cache_size = 0  # the index retriever itself (its encoder is inspected below)
  return make_retriever(cfg)


@pytest.fixture(scope="module")
def server(local):
  srv = RetrievalServer(local, "127.0.0.1", 0, LIMITS)
  srv.start_background()
  yield srv
  srv.shutdown()
  srv.server_close()


def _post(server, body: bytes, path="/retrieve", headers=None):
  host, port = server.server_address[:2]
  conn = http.client.HTTPConnection(host, port, timeout=30)
  hdrs = {"Content-Type": "application/json"}
  hdrs.update(headers or {})
  conn.request("POST", path, body=body, headers=hdrs)
  resp = conn.getresponse()
  out = resp.status, json.loads(resp.read())
  conn.close()
  return out


def _retrieve(server, payload):
  return _post(server, json.dumps(payload).encode())


QUERIES = ["Who designed the Eiffel Tower?", "first ascent of Everest", "light into chemical energy"]


def test_search_r1_response_shapes(server, local):
  status, body = _retrieve(server, {"queries": QUERIES, "topk": 3, "return_scores": True})
  assert status == 200 and list(body) == ["result"] and len(body["result"]) == 3
  expected = local.retrieve(QUERIES, 3)
  for items, ps in zip(body["result"], expected):
    assert len(items) == 3
    for item, p in zip(items, ps):
      assert set(item) == {"document", "score"} and set(item["document"]) == {"id", "contents"}
      assert item["document"] == {"id": p.id, "contents": p.contents}
      assert item["document"]["contents"].startswith('"') and abs(item["score"] - p.score) < 1e-6
    scores = [it["score"] for it in items]
    assert scores == sorted(scores, reverse=True)

  status, body = _retrieve(server, {"queries": QUERIES[:1], "topk": 2})  # no scores: the documents
  assert status == 200 and body["result"][0] == [{"id": p.id, "contents": p.contents} for p in expected[0][:2]]
  status, body = _retrieve(server, {"queries": QUERIES[:1]})  # topk absent -> default_topk
  assert status == 200 and len(body["result"][0]) == LIMITS.default_topk
  status, body = _retrieve(server, {"queries": QUERIES[:1], "topk": None, "return_scores": True})
  assert status == 200 and len(body["result"][0]) == LIMITS.default_topk
  status, body = _retrieve(server, {"queries": [], "topk": 3})
  assert status == 200 and body == {"result": []}


@pytest.mark.parametrize("body,status,message", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"topk": 3}', 400, "'queries'"),
    (b'{"queries": "a single string"}', 400, "'queries'"),
    (b'{"queries": ["a", 3]}', 400, "'queries'"),
    (b'{"queries": ["a"], "topk": 0}', 400, "'topk'"),
    (b'{"queries": ["a"], "topk": -2}', 400, "'topk'"),
    (b'{"queries": ["a"], "topk": 1000000}', 400, "'topk'"),
    (b'{"queries": ["a"], "topk": "3"}', 400, "'topk'"),
    (b'{"queries": ["a"], "topk": true}', 400, "'topk'"),
    (b'{"queries": ["a"], "return_scores": "yes"}', 400, "'return_scores'"),
    (b'{"queries": ["a", "b", "c", "d", "e"]}', 400, "limit of 4"),
    (json.dumps({"queries": ["x" * 201]}).encode(), 400, "limit is 200"),
    (json.dumps({"queries": ["x" * 150] * 4 + ["y" * 150] * 10}).encode(), 413, "exceeds the limit"),
    (b"[" * 1999, 400, "nested too deeply"),  # the parser's recursion limit, before the missing brackets
    (b'{"queries": ["ok", "\\ud800"]}', 400, "queries[1] is not valid Unicode"),  # a lone surrogate
])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, body, status, message):
  got_status, got = _post(server, body)
  assert got_status == status and message in got["error"], got
  ok_status, ok = _retrieve(server, {"queries": QUERIES[:1], "topk": 1})
  assert ok_status == 200 and len(ok["result"][0]) == 1


def test_twenty_four_clients_at_once_all_get_their_answers(local):
  """More clients than workers and than the stdlib's backlog of 5: every request is queued and answered."""
  limits = dataclasses.replace(LIMITS, workers=3, backlog=64)
  srv = RetrievalServer(local, "127.0.0.1", 0, limits)
  assert srv.request_queue_size == 64
  srv.start_background()
  try:
    want = {q: [p.id for p in ps] for q, ps in zip(QUERIES, local.retrieve(QUERIES, 2))}
    jobs = [QUERIES[i % 3] for i in range(24 * 3)]
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
      got = list(pool.map(lambda q: _retrieve(srv, {"queries": [q], "topk": 2}), jobs))
    assert all(status == 200 for status, _ in got)
    assert [[d["id"] for d in body["result"][0]] for _, body in got] == [want[q] for q in jobs]
  finally:
    srv.shutdown()
    srv.server_close()


def test_passages_keep_their_corpus_contents_byte_for_byte(tmp_path):
  """A wiki-18 record whose title line has no quotes (or odd spacing) is served, and formatted into an
  observation, exactly as stored; title/text records get the quoted form."""
  records = [{"id": "0", "contents": "Plain title\nbody one"}, {"id": "1", "contents": '"Quoted"\n  two\n'},
             {"id": "2", "title": "T", "text": "three"}]
  path = tmp_path / "c.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  passages = list(iter_passages(str(path)))
  served = format_result([passages], return_scores=False)["result"][0]
  assert [d["contents"] for d in served] == ["Plain title\nbody one", '"Quoted"\n  two\n', '"T"\nthree']
  assert protocol.format_passages([passages[0].contents]) == "Doc 1(Title: Plain title) body one\n"


def test_unknown_path_and_health(server):
  status, body = _post(server, b'{"queries": ["a"]}', path="/search")
  assert status == 404 and "/retrieve" in body["error"]
  host, port = server.server_address[:2]
  with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=10) as r:
    assert json.loads(r.read()) == {"status": "ok"}


def test_repeated_queries_are_encoded_once_with_the_same_results(local, monkeypatch):
  seen = []
  encode = local.encoder.encode
  def recording(texts, kind="query"):
    seen.append(list(texts))
    return encode(texts, kind)

  monkeypatch.setattr(local.encoder, "encode", recording)
  q = QUERIES[:2]
  got = local.retrieve([q[0], q[1], q[0], q[0]], 3)
  assert seen == [[q[0], q[1]]]
  alone = [local.retrieve([x], 3)[0] for x in (q[0], q[1])]
  for g, w in zip(got, [alone[0], alone[1], alone[0], alone[0]]):
    assert [p.id for p in g] == [p.id for p in w]
    assert [p.score for p in g] == pytest.approx([p.score for p in w], abs=1e-5)
  assert got[0] is not got[2]  # callers may edit their lists


def test_http_retriever_against_our_server(server, local):
  cfg = retrieval_cfg()
  cfg.backend, cfg.url = "http", server.url
  cfg.http.batch_size = 2  # 3 queries -> 2 requests, within the server's limit of 4
  remote = make_retriever(cfg)
  assert isinstance(remote, CachingRetriever) and isinstance(remote.inner, HttpRetriever)
  got, ref = remote.retrieve(QUERIES, 4), local.retrieve(QUERIES, 4)
  assert [[p.id for p in ps] for ps in got] == [[p.id for p in ps] for ps in ref]
  assert all(abs(a.score - b.score) < 1e-6 for x, y in zip(got, ref) for a, b in zip(x, y))
  assert got[0][0].title == ref[0][0].title and got[0][0].text == ref[0][0].text
  with pytest.raises(RetrievalError, match="HTTP 400"):  # 4xx is not retried
    remote.retrieve(["q"], 50)


class _FlakyHandler(BaseHTTPRequestHandler):
  """Answers like Search-R1's FastAPI server, after failing the first `fail` requests."""
  calls = 0
  fail = 1
  mode = "503"

  def log_message(self, *args):
    pass

  def do_POST(self):
    req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    cls = type(self)
    cls.calls += 1
    if cls.calls <= cls.fail:
      if cls.mode == "drop":
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)
        return
      self.send_response(503)
      self.send_header("Content-Length", "0")
      self.end_headers()
      return
    docs = [{"document": {"id": str(i), "contents": f'"Title {i}"\nText {i} for {q}'}, "score": 0.9 - 0.1 * i}
            for q in req["queries"] for i in range(req["topk"])]
    out = json.dumps({"result": [docs[j * req["topk"]:(j + 1) * req["topk"]] for j in range(len(req["queries"]))]})
    self.send_response(200)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(out)))
    self.end_headers()
    self.wfile.write(out.encode())


@pytest.fixture
def flaky():
  handler = type("H", (_FlakyHandler,), {"calls": 0})
  srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
  threading.Thread(target=srv.serve_forever, daemon=True).start()
  yield srv, handler
  srv.shutdown()
  srv.server_close()


@pytest.mark.parametrize("mode", ["503", "drop"])
def test_client_retries_then_succeeds(flaky, mode):
  srv, handler = flaky
  handler.mode, handler.fail = mode, 1
  sleeps = []
  client = HttpRetriever(f"http://127.0.0.1:{srv.server_address[1]}/retrieve", timeout_s=5, max_retries=3,
                         backoff_initial_s=0.25, sleep=sleeps.append)
  out = client.retrieve(["who?", "what?"], 2)
  assert handler.calls == 2 and sleeps == [0.25]
  assert out[1] == [Passage("0", "Title 0", "Text 0 for what?", 0.9), Passage("1", "Title 1", "Text 1 for what?", 0.8)]


def test_client_gives_up_with_exponential_backoff(flaky):
  srv, handler = flaky
  handler.mode, handler.fail = "503", 100
  sleeps = []
  client = HttpRetriever(f"http://127.0.0.1:{srv.server_address[1]}/retrieve", timeout_s=5, max_retries=4,
                         backoff_initial_s=0.5, backoff_max_s=2.0, sleep=sleeps.append)
  with pytest.raises(RetrievalError, match="failed after 5 attempts.*HTTP 503"):
    client.retrieve(["q"], 1)
  assert handler.calls == 5 and sleeps == [0.5, 1.0, 2.0, 2.0]


def test_client_connection_refused_is_retried():
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  port = s.getsockname()[1]
  s.close()  # nothing listens there now
  sleeps = []
  client = HttpRetriever(f"http://127.0.0.1:{port}/retrieve", timeout_s=2, max_retries=2, sleep=sleeps.append)
  with pytest.raises(RetrievalError, match="3 attempts"):
    client.retrieve(["q"], 1)
  assert len(sleeps) == 2


def test_serve_retriever_command(index_dir):
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  port = s.getsockname()[1]
  s.close()
  proc = subprocess.Popen([sys.executable, "-m", "launch.serve_retriever", "--index", index_dir, "--backend",
                           "exact", "--port", str(port), "--max_topk", "5"], cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    client = HttpRetriever(f"http://127.0.0.1:{port}/retrieve", timeout_s=30, max_retries=0)
    deadline = time.time() + 120
    while True:
      try:
        out = client.retrieve(["Who designed the Eiffel Tower?"], 2)
        break
      except RetrievalError:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.5)
    assert len(out[0]) == 2 and out[0][0].score >= out[0][1].score
    with pytest.raises(RetrievalError, match="HTTP 400"):
      client.retrieve(["q"], 6)  # --max_topk 5
  finally:
    proc.terminate()
    proc.wait(timeout=30)
