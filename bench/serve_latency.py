"""Latency and throughput of the model server on the example project's tiny model, and what
logging every request into the monitor's request store costs.

Builds the example's tiny base model (random init, tokenizer trained on
example-project/data/tickets.jsonl) and starts `python -m llmops.serve` twice on 127.0.0.1:
one plain server and one with `--monitor-store sqlite:///...` (what a deployment watched by
a monitor runs; `--log-text` optional). For each concurrency level it runs that many
clients (threads, one keep-alive connection each) sending POST /v1/completions with the
example prompt, in `--rounds` alternating plain/logged rounds (so both see the same machine
noise), until `--requests` per server are done or `--max-seconds` pass. Prints requests/s,
p50/p95 latency and generated tokens/s for each, and the p50 overhead of logging (target
< 5%).

With `--batching` the servers are instead: `continuous` (the default: greedy requests join
the running batch at the next decode step, transformers' paged-cache manager), `waves`
(`--batching waves`: a batch of concurrent requests runs to its end before the next starts)
and `one-lock` (`--max-batch 1`: one request at a time). `--baseline COMMIT` adds that
commit's server, run from a git worktree (e.g. `089ad8c^`, the http.server one-lock server
before batching). The run ends with each one's concurrency-8 vs concurrency-1 ratios (goal
for the default server: >= 4x requests/s, p95 <= 2x).

    .venv/bin/python bench/serve_latency.py [--requests 48] [--concurrency 1,4] [--max-tokens 32] [--log-text]
    .venv/bin/python bench/serve_latency.py --batching --concurrency 1,8 --requests 96 [--baseline 089ad8c^]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from llmops.evals.metrics import percentile
from llmops.monitor.store import open_store
from llmops.templating.prompt_template import render_prompt
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
              max_tokens: int) -> tuple[list[tuple[float, int]], float]:
    """Run `requests` requests from `concurrency` clients: ([(latency ms, tokens)], wall seconds)."""
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
    return results, time.perf_counter() - t0


def report(label: str, results: list[tuple[float, int]], wall: float) -> float:
    """Print one line of numbers; returns p50 latency in ms."""
    lat = [ms for ms, _ in results]
    tokens = sum(n for _, n in results)
    p50 = percentile(lat, 50)
    print(f"{label}: {len(results):>4} requests in {wall:6.2f}s  {len(results) / wall:7.2f} req/s  "
          f"p50 {p50:8.1f} ms  p95 {percentile(lat, 95):8.1f} ms  {tokens / wall:8.1f} generated tokens/s")
    return p50


def compare_level(urls: dict[str, str], prompts: list[str], level: int,
                  args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Alternate plain/logged rounds at one concurrency level; print both and the overhead."""
    per_round = max(1, args.requests // args.rounds)
    got: dict[str, tuple[list[tuple[float, int]], float]] = {name: ([], 0.0) for name in urls}
    for _ in range(args.rounds):
        for name, url in urls.items():
            results, wall = run_level(url, prompts, level, per_round, args.max_seconds / args.rounds,
                                      args.max_tokens)
            got[name] = (got[name][0] + results, got[name][1] + wall)
    p50 = {name: report(f"concurrency {level:>2} {name:<14}", *got[name]) for name in urls}
    if "logged" in p50:
        overhead = (p50["logged"] - p50["plain"]) / p50["plain"] * 100.0
        print(f"concurrency {level:>2}: request-store logging adds {overhead:+.1f}% to p50 latency (target < 5%)")
    return {name: summary(*got[name]) for name in urls}


def summary(results: list[tuple[float, int]], wall: float) -> dict[str, float]:
    lat = [ms for ms, _ in results]
    return {"rps": len(results) / wall, "p95": percentile(lat, 95)}


def batching_verdict(levels: dict[int, dict[str, dict[str, float]]]) -> None:
    """The serving issue's goal: at concurrency 8, >= 4x the requests/s of concurrency 1 and a
    p95 no worse than 2x p95 at 1, for the batched server; the one-lock server beside it."""
    if 1 not in levels or 8 not in levels:
        return
    for name in levels[1]:
        one, eight = levels[1][name], levels[8][name]
        print(f"{name:<14}: concurrency 8 vs 1: {eight['rps'] / one['rps']:.2f}x requests/s (goal >= 4x), "
              f"p95 {eight['p95'] / one['p95']:.2f}x (goal <= 2x)")


def baseline_tree(commit: str, where: Path) -> Path:
    """A git worktree of `commit` (its `llmops` package comes first on PYTHONPATH)."""
    repo = Path(__file__).resolve().parents[1]
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", "-q", str(where), commit], check=True)
    found = subprocess.run([sys.executable, "-c", "import llmops; print(llmops.__file__)"], env={
        **os.environ, "PYTHONPATH": str(where)}, capture_output=True, text=True, check=True).stdout.strip()
    assert found.startswith(str(where)), f"the baseline imports {found}, not the worktree's llmops"
    print(f"baseline server: {commit} from {where}")
    return where


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=48, help="requests per server and concurrency level (default 48)")
    p.add_argument("--concurrency", default="1,4", help="comma-separated client counts (default 1,4)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-seconds", type=float, default=60.0, help="time limit per server and level (default 60)")
    p.add_argument("--rounds", type=int, default=4, help="alternating plain/logged rounds per level (default 4)")
    p.add_argument("--log-text", action="store_true", help="also store prompts and completions")
    p.add_argument("--batching", action="store_true",
                   help="compare the batched server with the one-lock server (--max-batch 1) instead of logging")
    p.add_argument("--threads", type=int, help="torch CPU threads of the servers (default: the server's)")
    p.add_argument("--baseline", metavar="COMMIT", help="with --batching: also run this commit's server")
    args = p.parse_args()
    rows = load_rows()
    prompts = [render_prompt(PROMPT, EXAMPLE, {"question": r["question"]}) for r in rows]
    with tempfile.TemporaryDirectory(prefix="llmops-serve-bench-") as tmp:
        model_dir = Path(tmp) / "model"
        t0 = time.perf_counter()
        build_tiny_model(BUILD, [f"{r['question']} {r['answer']}" for r in rows], model_dir)
        print(f"built tiny model in {time.perf_counter() - t0:.2f}s")
        state = Path(tmp) / "state"
        store = f"sqlite:///{Path(tmp) / 'monitor.db'}"
        extra = ["--threads", str(args.threads)] if args.threads else []
        if args.batching:
            handles = {"one-lock": start_server(state, "onelock", model_dir, model_name=MODEL,
                                                extra_args=["--max-batch", "1", *extra]),
                       "waves": start_server(state, "waves", model_dir, model_name=MODEL,
                                             extra_args=["--batching", "waves", *extra]),
                       "continuous": start_server(state, "continuous", model_dir, model_name=MODEL, extra_args=extra)}
            if args.baseline:
                os.chdir(tmp)  # `python -m` puts the working folder first on sys.path: not this checkout
                old = baseline_tree(args.baseline, Path(tmp) / "baseline")
                handles[f"at {args.baseline}"] = start_server(state, "baseline", model_dir, model_name=MODEL,
                                                              env={"PYTHONPATH": str(old)}, extra_args=extra)
        else:
            handles = {"plain": start_server(state, "plain", model_dir, model_name=MODEL, extra_args=extra),
                       "logged": start_server(state, "logged", model_dir, model_name=MODEL, monitor_store=store,
                                              log_text=args.log_text, extra_args=extra)}
        try:
            t0 = time.perf_counter()
            for name, handle in handles.items():
                wait_healthy(handle.url, timeout=180, handle=handle)
            print(f"servers healthy after {time.perf_counter() - t0:.2f}s "
                  f"(logged: {store}{', with texts' if args.log_text else ''})")
            urls = {name: h.url for name, h in handles.items()}
            for url in urls.values():
                run_level(url, prompts, 1, 2, 30.0, args.max_tokens)  # warm-up
            levels = {}
            for level in [int(c) for c in args.concurrency.split(",") if c.strip()]:
                levels[level] = compare_level(urls, prompts, level, args)
            batching_verdict(levels)
        finally:
            for handle in handles.values():
                stop_server(handle.state_file)
            if args.batching and args.baseline:
                subprocess.run(["git", "-C", str(EXAMPLE.parent), "worktree", "remove", "--force",
                                str(Path(tmp) / "baseline")], check=False)
        if not args.batching:
            with open_store(store) as logged:
                print(f"request store holds {logged.count()} requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
