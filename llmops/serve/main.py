"""`python -m llmops.serve ...`: arguments, request logging hooks, signals, and the serve loop.

Request logging: `--monitor-store URL` (or `--monitor-store-env VAR` naming an environment
variable that holds the URL, for URLs with a password) opens a `llmops.monitor` request
store, makes it the server's `on_request` hook and enables `POST /v1/feedback`; the store is
flushed and closed on shutdown, SIGTERM included. `--request-log FILE` appends one JSON line
per request instead (or as well). `--log-text` keeps prompts and completions in both.

Limits against hostile clients: `--max-connections` (handler threads), `--client-timeout`
(seconds for a request to arrive, and for an idle connection), `--max-prompts`, `--max-n` and
`--max-request-tokens` (per generation request; see `llmops.serve.openai_api.RequestLimits`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from llmops.serve.openai_api import MAX_N, MAX_PROMPTS, MAX_REQUEST_TOKENS, RequestLimits
from llmops.serve.server import (CLIENT_TIMEOUT_S, MAX_CONNECTIONS, SHUTDOWN_GRACE_S, OnFeedback, OnRequest,
                                 make_server)
from llmops.serve.service import MAX_BATCH, MAX_QUEUE, QUEUE_TIMEOUT_S

DEFAULT_CPU_THREADS = 1


class JsonlRequestLog:
    """An `on_request` hook appending one JSON line per request; texts only with `log_text`."""

    TEXT_FIELDS = ("prompt", "completion")

    def __init__(self, path: Path | str, log_text: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.log_text = log_text
        self._lock = threading.Lock()

    def __call__(self, record: dict[str, Any]) -> None:
        rec = record if self.log_text else {k: v for k, v in record.items() if k not in self.TEXT_FIELDS}
        line = json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as fh:
            fh.write(line)


def fan_out(hooks: list[OnRequest]) -> OnRequest | None:
    """One `on_request` hook calling each of `hooks` (None when there are none)."""
    if len(hooks) <= 1:
        return hooks[0] if hooks else None

    def call_all(record: dict[str, Any]) -> None:
        for hook in hooks:
            hook(record)

    return call_all


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return parse


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llmops.serve", description="OpenAI-compatible model server")
    p.add_argument("--model-dir", required=True, type=Path)
    p.add_argument("--adapter-dir", type=Path)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--model-name", required=True)
    p.add_argument("--auth-token-env", help="name of the environment variable holding the bearer token")
    p.add_argument("--max-tokens-limit", type=_positive(int), default=1024, help="max_tokens per choice")
    p.add_argument("--max-prompts", type=_positive(int), default=MAX_PROMPTS,
                   help="prompts in one completions request (default %(default)s)")
    p.add_argument("--max-n", type=_positive(int), default=MAX_N, help="choices per prompt (default %(default)s)")
    p.add_argument("--max-request-tokens", type=_positive(int), default=MAX_REQUEST_TOKENS,
                   help="prompt tokens plus prompts x n x max_tokens of one request (default %(default)s)")
    p.add_argument("--max-connections", type=_positive(int), default=MAX_CONNECTIONS,
                   help="requests handled at once; more get 503 with Retry-After (default %(default)s)")
    p.add_argument("--shutdown-grace", type=_positive(float), default=SHUTDOWN_GRACE_S, metavar="SECONDS",
                   help="on SIGTERM, how long running requests get to finish (default %(default)s)")
    p.add_argument("--client-timeout", type=_positive(float), default=CLIENT_TIMEOUT_S, metavar="SECONDS",
                   help="a request must arrive within this of its first byte (else 408), and an idle connection "
                        "is closed after it (default %(default)s)")
    p.add_argument("--request-log", type=Path, help="append one JSON line per request to this file")
    store = p.add_mutually_exclusive_group()
    store.add_argument("--monitor-store", metavar="URL",
                       help="log requests to this request store (sqlite:///PATH or postgresql://...) and accept "
                            "POST /v1/feedback")
    store.add_argument("--monitor-store-env", metavar="VAR",
                       help="like --monitor-store, with the URL read from this environment variable")
    p.add_argument("--log-text", action="store_true",
                   help="include prompts and completions in the request store and --request-log")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--max-batch", type=_positive(int), default=MAX_BATCH,
                   help="sequences of concurrent requests generated together; 1 turns batching off (default "
                        "%(default)s)")
    p.add_argument("--batching", choices=("continuous", "waves"), default="continuous",
                   help="continuous: greedy requests join the running batch at the next decode step (one paged KV "
                        "cache); waves: a batch runs to its end before the next starts (sampled requests always "
                        "batch in waves) (default %(default)s)")
    p.add_argument("--max-queue", type=_positive(int), default=MAX_QUEUE,
                   help="requests waiting for the model; more get 503 at once (default %(default)s)")
    p.add_argument("--queue-timeout", type=_positive(float), default=QUEUE_TIMEOUT_S, metavar="SECONDS",
                   help="a request waiting longer than this for the model gets 503 (default %(default)s)")
    p.add_argument("--threads", type=_positive(int),
                   help="torch CPU threads for generation (default: OMP_NUM_THREADS when set, else 1; measured "
                        "in llmops.serve.main)")
    p.add_argument("--served-file", type=Path,
                   help="JSON the deployment writes: registered version, alias, adapter sha256 (for /health and "
                        "/v1/models) and the prompt chat requests go through ({name, spec, root, version})")
    return p.parse_args(argv)


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def _store_url(args: argparse.Namespace) -> str | None:
    if args.monitor_store_env:
        url = os.environ.get(args.monitor_store_env, "")
        if not url:
            raise ValueError(f"--monitor-store-env names {args.monitor_store_env}, but that environment variable is "
                             "empty or not set; set it or pass --monitor-store URL")
        return url
    return args.monitor_store


def _cpu_threads(threads: int | None) -> None:
    """torch's CPU threads for serving: one, unless --threads or OMP_NUM_THREADS says otherwise.

    Measured on the 2-core machine under load (the example's model, 32 new tokens): one
    thread generated 32 requests/s one at a time and 162 in batches of 8; two threads 1.8 and
    20, as OpenMP's threads wait on each other whenever anything else runs. Batching, not
    threads, is what uses the CPU here; a big model on an idle many-core host may want more
    (bench/serve_latency.py --threads N compares)."""
    import torch

    if threads is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return
        threads = min(DEFAULT_CPU_THREADS, os.cpu_count() or 1)
    torch.set_num_threads(threads)


def _served(path: Path | None) -> tuple[dict[str, Any], Any]:
    """(what /health reports, the ServedPrompt or None) from --served-file; LlmopsError when bad."""
    from llmops.errors import LlmopsError
    from llmops.serve.service import ServedPrompt

    if path is None:
        return {}, None
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LlmopsError(f"--served-file {path}: cannot read it as JSON ({exc}); apply the deployment again.") from None
    if not isinstance(doc, dict):
        raise LlmopsError(f"--served-file {path}: expected a JSON object; apply the deployment again.")
    prompt = ServedPrompt.load(doc["prompt"]) if isinstance(doc.get("prompt"), dict) else None
    served = {k: doc[k] for k in ("deployment", "version", "alias", "adapter_sha256", "merge", "quantize")
              if doc.get(k) is not None}
    if prompt is not None:
        served["prompt"] = prompt.info
    return served, prompt


def feedback_hook(store: Any) -> OnFeedback:
    """The server's `feedback` hook recording `POST /v1/feedback` bodies in a request store."""
    from llmops.monitor.feedback import parse_feedback

    def record(body: Any, client_id: str | None = None) -> str:
        return store.record_feedback(parse_feedback(body, client_id)).request_id

    return record


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m llmops.serve`: load the model, serve until SIGTERM/SIGINT."""
    import signal

    args = _parse_args(argv)
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    token = None
    if args.auth_token_env:
        token = os.environ.get(args.auth_token_env, "")
        if not token:
            _error(f"--auth-token-env names {args.auth_token_env}, but that environment variable is empty or not "
                   "set; set it or drop --auth-token-env")
            return 2
    from llmops.errors import LlmopsError

    try:
        url = _store_url(args)
    except ValueError as exc:
        _error(str(exc))
        return 2
    store = None
    try:
        if url:
            from llmops.monitor.store import open_store

            store = open_store(url, log_text=args.log_text, on_error=lambda m: log(f"request store: {m}"))
        from llmops.serve.model import load_model
        from llmops.serve.service import ModelService

        served, prompt = _served(args.served_file)
        lm = load_model(args.model_dir, args.adapter_dir, args.device, merge=bool(served.get("merge")),
                        quantize=served.get("quantize"))
        if lm.device == "cpu":
            _cpu_threads(args.threads)
    except LlmopsError as exc:
        _error(exc.message)
        if store is not None:
            store.close()
        return 1
    hooks: list[OnRequest] = [JsonlRequestLog(args.request_log, args.log_text)] if args.request_log else []
    if store is not None:
        hooks.append(store)
    limits = RequestLimits(args.max_tokens_limit, args.max_prompts, args.max_n, args.max_request_tokens)
    service = ModelService(lm, limits, prompt=prompt, batching=args.max_batch > 1, max_batch=args.max_batch,
                           max_queue=args.max_queue, queue_timeout=args.queue_timeout,
                           continuous=args.batching == "continuous")
    server = make_server(service, args.host, args.port, args.model_name, token,
                         fan_out(hooks), log=log, feedback=feedback_hook(store) if store is not None else None,
                         max_connections=args.max_connections, client_timeout=args.client_timeout, served=served,
                         grace=args.shutdown_grace)
    host, port = server.server_address[:2]
    # uvicorn handles SIGTERM/SIGINT while it serves (stop accepting, let running requests
    # finish within --shutdown-grace) and raises the signal again once it is done: these
    # handlers take that second delivery (and one arriving before uvicorn's are installed),
    # so the store below is still closed.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: setattr(server.uvicorn, "should_exit", True))
    logging_to = f", logging requests to {store.describe()}" if store is not None else ""
    log(f"serving {args.model_name} on http://{host}:{port} (auth {'on' if token else 'off'}{logging_to})")
    try:
        server.serve_forever()
    finally:
        server.server_close()
        if not server.app.wait_idle(args.shutdown_grace):
            log(f"shutting down with requests still running after {args.shutdown_grace:g}s; their records are lost")
        service.close()
        if store is not None:
            store.close()  # stores what is queued: SIGTERM loses no answered request
        log("server stopped")
    return 0
