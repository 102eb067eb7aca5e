"""Latency and throughput of the model server on the example project's tiny model.

Builds the example's tiny base model (random init, tokenizer trained on
example-project/data/tickets.jsonl), starts `python -m llmops.serve` as a background process
on 127.0.0.1, then for each concurrency level runs that many clients (threads, one
keep-alive connection each) sending POST /v1/completions with the example prompt, until
`--requests` are done or `--max-seconds` pass. Prints requests/s, p50/p95 latency and
generated tokens/s. Generation runs under one lock, so throughput stays flat while latency
grows with concurrency: the numbers show what that costs.

    .venv/bin/python bench/serve_latency.py [--requests 48] [--concurrency 1,4] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from llmops.evals.metrics import percentile
from llmops.prompts import render_prompt
from llmops.serve.process import start_server, stop_server, wait_healthy
from llmops.train.build import build_tiny_model

EXAMPLE = Path(__file__).resolve().parents[1] / "example-project"
BUILD = {"architecture": "llama", "hidden_size": 64, "layers": 2, "heads": 4, "intermediate_size": 128,
         "vocab_size": 512, "max_position_embeddings": 256, "seed": 13}
PROMPT = {"template": "prompts/support.j2", "variables": ["question"]}
MODEL = "support-bench"


def load_rows() -> list[dict]:
    lines = (EXAMPLE / "data/tickets.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def client(url: str, prompts: list[str], next_index, deadline: float, max_tokens: int, out: list) -> None:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        while time.monotonic() < deadline:
            i = next_index()
            if i is None:
                return
            body = json.dumps({"model": MODEL, "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                               "temperature": 0})
            t0 = time.perf_counter()
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = json.loads(resp.read())
            elapsed = time.perf_counter() - t0
            if resp.status != 200:
                raise SystemExit(f"request failed: HTTP {resp.status} {data}")
            out.append((elapsed * 1000.0, data["usage"]["completion_tokens"]))
    finally:
        conn.close()


def run_level(url: str, prompts: list[str], concurrency: int, requests: int, max_seconds: float,
              max_tokens: int, label: str = "") -> None:
    lock = threading.Lock()
    issued = [0]

    def next_index() -> int | None:
        with lock:
            if issued[0] >= requests:
                return None
            issued[0] += 1
            return issued[0] - 1

    results: list[tuple[float, int]] = []
    deadline = time.monotonic() + max_seconds
    threads = [threading.Thread(target=client, args=(url, prompts, next_index, deadline, max_tokens, results))
               for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = [ms for ms, _ in results]
    tokens = sum(n for _, n in results)
    print(f"{label or f'concurrency {concurrency:>2}'}: {len(results):>4} requests in {wall:6.2f}s  "
          f"{len(results) / wall:7.2f} req/s  p50 {percentile(lat, 50):8.1f} ms  p95 {percentile(lat, 95):8.1f} ms  "
          f"{tokens / wall:8.1f} generated tokens/s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=48, help="requests per concurrency level (default 48)")
    p.add_argument("--concurrency", default="1,4", help="comma-separated client counts (default 1,4)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-seconds", type=float, default=60.0, help="time limit per level (default 60)")
    args = p.parse_args()
    rows = load_rows()
    prompts = [render_prompt(PROMPT, EXAMPLE, {"question": r["question"]}) for r in rows]
    with tempfile.TemporaryDirectory(prefix="llmops-serve-bench-") as tmp:
        model_dir = Path(tmp) / "model"
        t0 = time.perf_counter()
        build_tiny_model(BUILD, [f"{r['question']} {r['answer']}" for r in rows], model_dir)
        print(f"built tiny model in {time.perf_counter() - t0:.2f}s")
        t0 = time.perf_counter()
        handle = start_server(Path(tmp) / "state", "bench", model_dir, model_name=MODEL)
        try:
            wait_healthy(handle.url, timeout=180, handle=handle)
            print(f"server {handle.url} healthy after {time.perf_counter() - t0:.2f}s (pid {handle.pid})")
            run_level(handle.url, prompts, 1, 2, 30.0, args.max_tokens, label="warm-up       ")
            for level in [int(c) for c in args.concurrency.split(",") if c.strip()]:
                run_level(handle.url, prompts, level, args.requests, args.max_seconds, args.max_tokens)
        finally:
            stop_server(handle.state_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
