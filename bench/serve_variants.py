"""Latency of the served model as the adapter, merged into the base, and int8, side by side.

    .venv/bin/python bench/serve_variants.py [--project example-project] [--requests 32]

Needs an applied project (the quick start's `bash scripts/example.sh` leaves one): loads its
fine-tune the three ways a deployment can serve it (`serve.merge`, `serve.quantize: int8`;
`llmops.serve.model.load_model`, as the server does), on CPU with one torch thread (the
server's default), and prints per-request latency one at a time and in batches of 8, and how
many greedy answers equal the adapter's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--project", type=Path, default=REPO / "example-project")
    p.add_argument("--finetune", default="support-lora")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=24)
    args = p.parse_args()
    import torch

    from llmops.evals.metrics import percentile
    from llmops.serve.model import generate_batch, load_model

    torch.set_num_threads(1)
    lock = args.project / "llmops.lock"
    if not lock.is_file():
        sys.exit(f"{lock} not found: apply the project first (bash scripts/example.sh)")
    out = yaml.safe_load(lock.read_text())["resources"][f"finetunes.{args.finetune}"]["outputs"]
    base, adapter = args.project / out["base_model"]["path"], args.project / out["adapter"]["path"]
    rows = [json.loads(line) for line in (args.project / "data/tickets.jsonl").read_text().splitlines()]
    prompts = [f"### Question:\n{r['question']}\n### Answer:\n" for r in rows[: args.requests]]
    answers: dict[str, list[str]] = {}
    print(f"{'variant':<10}{'p50 ms (one)':>14}{'p95 ms (one)':>14}{'ms/request (batch 8)':>22}{'same answers':>14}")
    for name, kw in (("adapter", {}), ("merged", {"merge": True}), ("int8", {"quantize": "int8"})):
        lm = load_model(base, adapter, "cpu", **kw)
        generate_batch(lm, prompts[:1], max_new_tokens=2)  # warm-up
        lat = []
        texts = []
        for prompt in prompts:
            t0 = time.perf_counter()
            texts.append(generate_batch(lm, [prompt], max_new_tokens=args.max_tokens)[0].text)
            lat.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        for s in range(0, len(prompts), 8):
            generate_batch(lm, prompts[s : s + 8], max_new_tokens=args.max_tokens)
        batched = (time.perf_counter() - t0) * 1000 / len(prompts)
        answers[name] = texts
        same = sum(a == b for a, b in zip(texts, answers["adapter"]))
        print(f"{name:<10}{percentile(lat, 50):>14.1f}{percentile(lat, 95):>14.1f}{batched:>22.1f}"
              f"{f'{same}/{len(prompts)}':>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
