"""The model server against hostile clients, over real sockets on 127.0.0.1.

Bursts of concurrent clients, clients that stall or trickle, oversized and undecodable
requests, and methods the server does not serve. The tiny model and the request helpers are
tests/test_server.py's; the servers here run in process with small limits so that every
bound is reached within seconds. Timings are printed, never asserted; the timeouts below
only guard against hangs.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_server import MODEL, TOKEN, assert_error, call, model_dir, wait_for  # noqa: F401 - model_dir: fixture

MAX_CONNECTIONS = 16
HANG_GUARD_S = 60.0
LIMITS = {"max_tokens": 32, "max_prompts": 4, "max_n": 4, "max_request_tokens": 100}


def _serve(lm: Any, max_connections: int, client_timeout: float, **service: Any):
    from llmops.serve.openai_api import RequestLimits
    from llmops.serve.server import make_server
    from llmops.serve.service import ModelService

    srv = make_server(ModelService(lm, RequestLimits(**LIMITS), **service), "127.0.0.1", 0, MODEL, TOKEN,
                      max_connections=max_connections, client_timeout=client_timeout)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    host, port = srv.server_address[:2]
    return srv, {"url": f"http://{host}:{port}", "host": host, "port": port, "lm": lm, "server": srv}


@pytest.fixture(scope="module")
def lm(model_dir: Path) -> Any:
    from llmops.serve.model import load_model

    return load_model(model_dir)


@pytest.fixture(scope="module")
def guarded(lm: Any):
    """Few handler threads and small per-request limits."""
    srv, info = _serve(lm, MAX_CONNECTIONS, client_timeout=10.0)
    yield info
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def impatient(lm: Any):
    """A one-second client timeout, and more threads than the stalling clients below."""
    srv, info = _serve(lm, 64, client_timeout=1.0)
    yield info
    srv.shutdown()
    srv.server_close()


def open_connections(server: dict) -> int:
    """Connections the server holds open now."""
    return len(server["server"].uvicorn.server_state.connections)


def raw(server: dict, data: bytes, timeout: float = 15.0, to_eof: bool = True) -> tuple[int, dict[str, str], bytes]:
    """Send `data` on a fresh socket and read the answer: until the server closes the connection,
    or (`to_eof` False) the one response its Content-Length delimits."""
    with socket.create_connection((server["host"], server["port"]), timeout=timeout) as sock:
        sock.sendall(data)
        return parse_response(read_to_eof(sock) if to_eof else read_one(sock))


def read_one(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a whole answer: {data[:200]!r}"
        data += chunk
    status, headers, body = parse_response(data)
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, f"closed before a whole answer: {data[:200]!r}"
        body += chunk
    return data.partition(b"\r\n\r\n")[0] + b"\r\n\r\n" + body


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if ": " in line)}
    return int(lines[0].split()[1]), headers, body


def request_head(method: str, path: str, length: int | None = None, token: str | None = TOKEN,
                 extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    if token:
        head += f"Authorization: Bearer {token}\r\n"
    return (head + extra + "\r\n").encode()


# --- many clients at once ------------------------------------------------------------------


def test_200_concurrent_clients_get_answers_or_503_within_a_bound_of_requests_and_memory(guarded: dict) -> None:
    clients, generating = 200, 20
    start = threading.Barrier(clients + 1)
    results: list[Any] = [None] * clients
    sampling = threading.Event()
    rss_before, rss_peak = _rss(), [0]
    app = guarded["server"].app
    app.peak = 0

    def sample() -> None:
        while not sampling.is_set():
            rss_peak[0] = max(rss_peak[0], _rss())
            time.sleep(0.002)

    def client(i: int) -> None:
        conn = http.client.HTTPConnection(guarded["host"], guarded["port"], timeout=HANG_GUARD_S)
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        start.wait()
        t0 = time.perf_counter()
        try:
            answers = []
            for _ in range(2):  # keep-alive: two requests on each connection
                if i < generating:
                    body = json.dumps({"model": MODEL, "prompt": f"Where is order {i}?", "max_tokens": 2})
                    conn.request("POST", "/v1/completions", body, headers)
                else:
                    conn.request("GET", "/v1/models", headers=headers)
                resp = conn.getresponse()
                out = json.loads(resp.read())
                answers.append((resp.status, resp.getheader("Retry-After"),
                                out.get("object") or out["error"]["code"]))
            results[i] = (answers, time.perf_counter() - t0)
        except Exception as exc:  # recorded: the assertion below lists them
            results[i] = (f"{type(exc).__name__}: {exc}", time.perf_counter() - t0)
        finally:
            conn.close()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(HANG_GUARD_S * 2)
    elapsed = time.perf_counter() - t0
    sampling.set()
    sampler.join()
    assert not [i for i, t in enumerate(threads) if t.is_alive()], "clients hung"
    failed = [r[0] for r in results if not isinstance(r[0], list)]
    assert failed == []  # no resets, no refused connections, no timeouts
    busy = (503, "1", "server_busy")
    for i, (answers, _) in enumerate(results):
        assert all(a in ((200, None, "text_completion" if i < generating else "list"), busy) for a in answers), answers
    flat = [a for answers, _ in results for a in answers]
    slowest = max(r[1] for r in results)
    print(f"\n{clients} clients x 2 requests in {elapsed:.2f}s (slowest client {slowest:.2f}s): "
          f"{len(flat) - flat.count(busy)} answered, {flat.count(busy)} got 503; at most {app.peak} requests "
          f"handled at once (bound {MAX_CONNECTIONS})")
    assert 1 <= app.peak <= MAX_CONNECTIONS
    assert len(flat) - flat.count(busy) >= MAX_CONNECTIONS
    assert call(guarded, "GET", "/v1/models")[0] == 200  # and it keeps answering
    grown = (rss_peak[0] - rss_before) / 2**20  # server and 200 client threads share this process
    print(f"resident memory grew by {grown:.0f} MiB at most")
    assert grown < 256


def _batching(lm: Any, max_queue: int):
    srv, info = _serve(lm, 64, client_timeout=10.0, batching=True, max_batch=8, max_queue=max_queue,
                       queue_timeout=30.0)
    info["service"] = srv.app.service
    yield info
    srv.shutdown()
    srv.server_close()
    srv.app.service.close()


@pytest.fixture(scope="module")
def batching(lm: Any):
    """The batching service with a queue much smaller than the burst below."""
    yield from _batching(lm, max_queue=6)


def test_a_burst_beyond_the_queue_gets_answers_or_503_and_nothing_hangs(batching: dict) -> None:
    clients = 200
    start = threading.Barrier(clients)
    results: list[Any] = [None] * clients
    rss_before, rss_peak, sampling = _rss(), [0], threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            rss_peak[0] = max(rss_peak[0], _rss())
            time.sleep(0.005)

    def client(i: int) -> None:
        conn = http.client.HTTPConnection(batching["host"], batching["port"], timeout=HANG_GUARD_S)
        body = json.dumps({"model": MODEL, "prompt": f"Where is order {i}?", "max_tokens": 4, "temperature": 0})
        start.wait()
        try:
            conn.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {TOKEN}",
                                                          "Content-Type": "application/json"})
            resp = conn.getresponse()
            out = json.loads(resp.read())
            results[i] = (resp.status, resp.getheader("Retry-After"), out)
        except Exception as exc:  # recorded: the assertion below lists them
            results[i] = (f"{type(exc).__name__}: {exc}", None, None)
        finally:
            conn.close()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_GUARD_S * 2)
    sampling.set()
    assert not [i for i, t in enumerate(threads) if t.is_alive()], "clients hung"
    statuses = [r[0] for r in results]
    assert set(statuses) <= {200, 503}, [s for s in statuses if s not in (200, 503)][:5]
    answered, busy = statuses.count(200), statuses.count(503)
    assert answered >= 6 and busy > 0  # the queue of 6 overflowed; what it held was answered
    for status, retry, out in results:
        if status == 503:
            assert retry == "1" and out["error"]["code"] == "server_busy"
        else:
            assert out["object"] == "text_completion" and out["usage"]["completion_tokens"] >= 1
    service = batching["service"]
    print(f"\n{clients} clients at once: {answered} answered, {busy} got 503; {service.batcher.batches} batches, "
          f"largest {service.batcher.largest} sequences; memory grew {(rss_peak[0] - rss_before) / 2**20:.0f} MiB")
    assert service.batcher.largest > 1  # concurrent requests were generated together
    assert (rss_peak[0] - rss_before) / 2**20 < 256
    # Afterwards the server answers as before, and a batched answer is the one alone.
    status, out = call(batching, "POST", "/v1/completions", {"model": MODEL, "prompt": "Where is order 7?",
                                                              "max_tokens": 4, "temperature": 0})
    assert status == 200
    if results[7][0] == 200:
        assert results[7][2]["choices"][0]["text"] == out["choices"][0]["text"]


@pytest.fixture(scope="module")
def roomy(lm: Any):
    """The batching service with room for every request below."""
    yield from _batching(lm, max_queue=64)


def test_requests_sent_together_are_generated_together_with_the_answers_of_one_at_a_time(roomy: dict) -> None:
    batching = roomy
    prompts = [f"How do I return item {i}?" for i in range(8)]
    one_by_one = [call(batching, "POST", "/v1/completions", {"model": MODEL, "prompt": p, "max_tokens": 6,
                                                              "temperature": 0})[1]["choices"][0]["text"]
                  for p in prompts]
    service = batching["service"]
    before = service.batcher.batches
    together: list[Any] = [None] * len(prompts)
    go = threading.Barrier(len(prompts))

    def send(i: int) -> None:
        go.wait()
        together[i] = call(batching, "POST", "/v1/completions", {"model": MODEL, "prompt": prompts[i],
                                                                  "max_tokens": 6, "temperature": 0})[1]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_GUARD_S)
    assert [t["choices"][0]["text"] for t in together] == one_by_one
    assert service.batcher.batches - before < len(prompts)  # fewer batches than requests


def _rss() -> int:
    """This process's resident memory in bytes (VmRSS)."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# --- slow clients ---------------------------------------------------------------------------


def test_stalled_and_trickling_clients_are_dropped_while_others_are_served(impatient: dict) -> None:
    address = (impatient["host"], impatient["port"])
    t0 = time.perf_counter()
    stalled = []
    for _ in range(100):  # half a header each, then silence
        sock = socket.create_connection(address, timeout=HANG_GUARD_S)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Ty")
        stalled.append(sock)
    silent = [socket.create_connection(address, timeout=HANG_GUARD_S) for _ in range(10)]  # connect, say nothing
    short = socket.create_connection(address, timeout=HANG_GUARD_S)  # promises 1000 bytes, sends 10
    short.sendall(request_head("POST", "/v1/completions", 1000) + b'{"model": ')
    trickled: dict[str, Any] = {}

    def trickle() -> None:
        """A byte every 0.2 s: never idle for the 1 s timeout, but never done either."""
        sock = socket.create_connection(address, timeout=HANG_GUARD_S)
        line, began = request_head("GET", "/v1/models") * 50, time.perf_counter()
        try:
            for i in range(len(line)):
                if select.select([sock], [], [], 0.2)[0]:
                    break
                sock.send(line[i:i + 1])
            trickled["answer"] = read_to_eof(sock)
        except OSError as exc:  # a reset after the 408 is a drop too
            trickled["answer"] = repr(exc).encode()
        finally:
            trickled["after_s"] = time.perf_counter() - began
            sock.close()

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    status, body = call(impatient, "GET", "/v1/models")
    served_after = time.perf_counter() - t0
    assert status == 200 and body["data"][0]["id"] == MODEL

    answers = []
    for sock in stalled:
        answers.append(parse_response(read_to_eof(sock)))
        sock.close()
    dropped_after = time.perf_counter() - t0
    for sock in silent:  # an idle connection is closed without an answer (as between keep-alive requests)
        assert read_to_eof(sock) == b""
        sock.close()
    for status, headers, body in answers:
        assert (status, headers["connection"]) == (408, "close")
        assert json.loads(body)["error"]["code"] == "request_timeout"
    status, _, body = parse_response(read_to_eof(short))
    short.close()
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    trickler.join(HANG_GUARD_S)
    assert not trickler.is_alive(), "the trickling client was never dropped"
    answer = trickled["answer"]
    assert answer.startswith(b"HTTP/1.1 408 ") or b"ConnectionResetError" in answer, answer[:200]
    assert wait_for(lambda: open_connections(impatient) == 0, timeout=10)
    print(f"\nwith 100 stalled clients: a normal request answered after {served_after:.2f}s, stalled ones "
          f"dropped after {dropped_after:.2f}s, the trickling one after {trickled['after_s']:.2f}s")


# --- oversized requests ---------------------------------------------------------------------

LONG = "Where is my order? Orders ship within two days. " * 2


@pytest.mark.parametrize(("path", "body", "param", "code"), [
    ("/v1/completions", {"prompt": ["a"] * 5, "max_tokens": 1}, "prompt", None),
    ("/v1/completions", {"prompt": "a", "n": 5, "max_tokens": 1}, "n", None),
    ("/v1/completions", {"prompt": ["a"] * 4, "n": 4, "max_tokens": 7}, "max_tokens", "request_tokens_exceeded"),
    ("/v1/completions", {"prompt": [LONG] * 2, "max_tokens": 10}, "prompt", "request_tokens_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "n": 4, "max_completion_tokens": 26,
                              "max_tokens": 1}, "max_completion_tokens", "request_tokens_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}], "n": 4, "max_tokens": 10},
     "messages", "request_tokens_exceeded"),
])
def test_requests_beyond_the_limits_get_400_naming_the_param(guarded: dict, path: str, body: dict, param: str,
                                                             code: str | None) -> None:
    assert_error(call(guarded, "POST", path, dict(body, model=MODEL)), 400, param, code)


def test_requests_within_the_limits_are_served(guarded: dict) -> None:
    assert len(guarded["lm"].encode(LONG)) * 2 + 2 * 10 > LIMITS["max_request_tokens"]  # (the case above)
    assert len(guarded["lm"].encode(LONG)) + 10 <= 128  # refused for the budget, not the context length
    status, out = call(guarded, "POST", "/v1/completions", {"model": MODEL, "prompt": ["a"] * 4, "n": 4,
                                                            "max_tokens": 5, "temperature": 0})
    assert status == 200 and len(out["choices"]) == 16


def test_the_token_is_checked_before_the_body_is_read(guarded: dict, impatient: dict) -> None:
    # Headers announcing 4 MB and no body: a 401 comes at once; the connection is closed once
    # the rest of the request has not come within the client timeout (1 s here).
    t0 = time.perf_counter()
    with socket.create_connection((impatient["host"], impatient["port"]), timeout=HANG_GUARD_S) as sock:
        sock.sendall(request_head("POST", "/v1/completions", 4_000_000, token=None))
        status, headers, body = parse_response(read_one(sock))
        answered = time.perf_counter() - t0
        assert read_to_eof(sock) == b""
    print(f"\n401 without the body after {answered:.3f}s, connection closed after {time.perf_counter() - t0:.3f}s")
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    # A client that sends the whole body before reading still gets the 401 (the server drains it).
    assert_error(call(guarded, "POST", "/v1/completions", raw=b" " * (4 * 1024 * 1024), token=None), 401,
                 code="invalid_api_key")
    assert call(guarded, "POST", "/v1/completions", raw=b" " * (4 * 1024 * 1024 + 1))[0] == 413
    # `Expect: 100-continue`: refused clients are not invited to send their body; others are.
    expect = "Expect: 100-continue\r\n"
    with socket.create_connection((guarded["host"], guarded["port"]), timeout=HANG_GUARD_S) as sock:
        sock.sendall(request_head("POST", "/v1/completions", 50, token=None, extra=expect))
        assert sock.recv(12) == b"HTTP/1.1 401"  # no 100 Continue before it
    body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 1}).encode()
    with socket.create_connection((guarded["host"], guarded["port"]), timeout=HANG_GUARD_S) as sock:
        sock.sendall(request_head("POST", "/v1/completions", len(body), extra=expect + "Connection: close\r\n"))
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        status, _, answer = parse_response(read_to_eof(sock))
    assert status == 200 and json.loads(answer)["usage"]["completion_tokens"] == 1


# --- undecodable input ----------------------------------------------------------------------


@pytest.mark.parametrize(("path", "data", "param"), [
    ("/v1/completions", b'{"model": "tiny-support", "prompt": "caf\xe9"}', None),  # Latin-1, not UTF-8
    ("/v1/completions", b'\xff\xfe{\x00}\x00', None),
    ("/v1/completions", b'{"model": "tiny-support", "prompt": "\\ud800"}', "prompt"),
    ("/v1/completions", b'{"model": "tiny-support", "prompt": ["ok", "x\\udfffy"]}', "prompt[1]"),
    ("/v1/completions", b'{"model": "tiny-support", "prompt": "x", "stop": ["a", "\\ud800"]}', "stop[1]"),
    ("/v1/completions", b'{"model": "tiny-support", "prompt": "x", "user": "\\udc00"}', "user"),
    ("/v1/completions", b'{"model": "tiny-support", "prompt": "x", "\\ud800": 1}', None),
    ("/v1/chat/completions", b'{"model": "tiny-support", "messages": [{"role": "user", "content": "\\ud83d"}]}',
     "messages[0].content"),
    ("/v1/completions", b'{"model": "tiny-support", "prompt": "x", "temperature": NaN}', "temperature"),
    ("/v1/completions", b'{"model": "tiny-support", "prompt": "x", "top_p": Infinity}', "top_p"),
    ("/v1/completions", b'{"model": "tiny-support", "prompt": "x", "temperature": 1e999}', "temperature"),
    ("/v1/completions", b'{"model": "tiny-support", "prompt": "x", "max_tokens": -Infinity}', "max_tokens"),
    ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, None),
    ("/v1/completions", b'{"model": "tiny-support", "prompt": "x", "n": 1' + b"0" * 5000 + b"}", None),
])
def test_undecodable_bodies_get_400(guarded: dict, path: str, data: bytes, param: str | None) -> None:
    assert_error(call(guarded, "POST", path, raw=data), 400, param)


@pytest.mark.parametrize(("field", "value"), [
    ("seed", 2**63), ("seed", -(2**63) - 1), ("seed", 10**30), ("seed", 1.5), ("seed", True), ("seed", "7"),
    ("n", True), ("n", 2.0), ("n", "2"), ("max_tokens", 2.0), ("max_tokens", False), ("logprobs", True),
    ("temperature", True),
])
def test_mistyped_numbers_get_400(guarded: dict, field: str, value: Any) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1, field: value}
    err = assert_error(call(guarded, "POST", "/v1/completions", body), 400, field)
    assert len(err["message"]) < 300


def test_valid_unicode_and_64_bit_seeds_are_served(guarded: dict) -> None:
    for seed in (2**63 - 1, -(2**63)):
        body = {"model": MODEL, "prompt": "caf\u00e9 \U0001f600", "max_tokens": 1, "seed": seed, "temperature": 1}
        status, out = call(guarded, "POST", "/v1/completions", body)
        assert status == 200 and out["usage"]["completion_tokens"] == 1


# --- methods, malformed requests -------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("HEAD", "/v1/models", "GET"), ("OPTIONS", "/v1/completions", "POST"), ("PATCH", "/v1/chat/completions", "POST"),
    ("PUT", "/v1/completions", "POST"), ("DELETE", "/v1/models", "GET"), ("BREW", "/health", "GET"),
    ("GET", "/v1/completions", "POST"),
])
def test_other_methods_get_a_json_405_with_allow(guarded: dict, method: str, path: str, allow: str) -> None:
    conn = http.client.HTTPConnection(guarded["host"], guarded["port"], timeout=HANG_GUARD_S)
    try:
        body = b'{"a": 1}' if method in ("PATCH", "PUT") else None
        conn.request(method, path, body, {"Authorization": f"Bearer {TOKEN}"})
        resp = conn.getresponse()
        data = resp.read()
        assert (resp.status, resp.headers["Allow"], resp.headers["content-type"]) == (405, allow, "application/json")
        if method == "HEAD":
            assert data == b""  # a HEAD answer has no body
        else:
            assert_error((405, json.loads(data)), 405, code="method_not_allowed")
        conn.request("GET", "/health")  # the connection stays usable (an unread body is drained)
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def test_unknown_paths_stay_404_whatever_the_method(guarded: dict) -> None:
    for method in ("OPTIONS", "PATCH", "GET"):
        assert_error(call(guarded, method, "/v2/anything"), 404, code="unknown_url")


@pytest.mark.parametrize(("data", "status"), [
    (b"NONSENSE\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without a Host header
    (b"GET /health HTTP/1.1\r\nHost: t\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(101)) + b"\r\n", 431),
    (b"GET /health HTTP/1.1\r\nHost: t\r\nX: " + b"y" * 70_000 + b"\r\n\r\n", 431),
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
    (request_head("POST", "/v1/completions", extra="Transfer-Encoding: chunked\r\n") + b"5\r\nhello\r\n0\r\n\r\n",
     411),
    (request_head("POST", "/v1/completions", -1), 400),
])
def test_malformed_requests_get_json_errors(guarded: dict, data: bytes, status: int) -> None:
    got, headers, body = raw(guarded, data)
    assert (got, headers["content-type"], headers["connection"]) == (status, "application/json", "close")
    assert json.loads(body)["error"]["message"]


# --- the command line -------------------------------------------------------------------------


def test_limits_are_flags_of_the_serve_command() -> None:
    from llmops.serve.main import _parse_args

    base = ["--model-dir", "m", "--model-name", "x"]
    args = _parse_args(base)
    assert (args.max_connections, args.client_timeout, args.max_prompts, args.max_n, args.max_request_tokens) == (
        64, 30.0, 64, 8, 16384)
    args = _parse_args(base + ["--max-connections", "8", "--client-timeout", "2.5", "--max-prompts", "3",
                               "--max-n", "2", "--max-request-tokens", "500"])
    assert (args.max_connections, args.client_timeout, args.max_prompts, args.max_n, args.max_request_tokens) == (
        8, 2.5, 3, 2, 500)
    for bad in (["--max-connections", "0"], ["--client-timeout", "-1"], ["--max-request-tokens", "many"],
                ["--max-batch", "0"], ["--queue-timeout", "0"], ["--threads", "-2"]):
        with pytest.raises(SystemExit):
            _parse_args(base + bad)
    args = _parse_args(base)
    assert (args.max_batch, args.max_queue, args.queue_timeout, args.threads) == (8, 64, 60.0, None)
    args = _parse_args(base + ["--max-batch", "1", "--max-queue", "3", "--queue-timeout", "5", "--threads", "4"])
    assert (args.max_batch, args.max_queue, args.queue_timeout, args.threads) == (1, 3, 5.0, 4)
