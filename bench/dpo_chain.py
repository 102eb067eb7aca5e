"""The feedback loop timed: ratings -> preference pairs -> dataset -> DPO fine-tune -> eval -> gated promotion.

    .venv/bin/python bench/dpo_chain.py [--pairs 40] [--more 20]

A fresh project from example-project/'s data (its own git repository, empty .llmops/): a
dataset joining the tickets and `data/feedback.jsonl` (preference pairs, as
`llmops feedback export --pairs` writes them) with `sources:`, a tiny built base, a
`method: dpo` LoRA fine-tune, an eval and a gated deployment. Prints the first apply's time
and the DPO job's, the loss from its first to its last step, then adds `--more` pairs (new
ratings), prints the chain the plan shows and times that apply.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}
sys.path.insert(0, str(REPO / "tests"))
from test_dpo import CONFIG  # noqa: E402 - the same project the test applies


def llmops(root: Path, *args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([str(Path(sys.executable).with_name("llmops")), *args], cwd=root, env=ENV,
                         capture_output=True, text=True)
    if res.returncode not in (0, 2):
        sys.exit(f"llmops {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
    return res


def pairs(tickets: list[dict], n: int) -> str:
    return "".join(json.dumps({"question": t["question"], "chosen": t["answer"], "rejected": "No idea, sorry."}) + "\n"
                   for t in tickets[:n])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=40)
    p.add_argument("--more", type=int, default=20)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llmops-dpo-bench-"))
    root = work / "proj"
    try:
        root.mkdir()
        for folder in ("data", "prompts"):
            shutil.copytree(REPO / "example-project" / folder, root / folder)
        tickets = [json.loads(line) for line in (root / "data/tickets.jsonl").read_text().splitlines()]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        (root / "llmops.yaml").write_text(CONFIG.format(port=port, gate="<= 100000"))
        (root / "data/feedback.jsonl").write_text(pairs(tickets, args.pairs))
        for cmd in (["init", "-q"], ["add", "-A"], ["-c", "user.name=b", "-c", "user.email=b@example.invalid", "commit",
                                                     "-qm", "bench"]):
            subprocess.run(["git", *cmd], cwd=root, check=True)
        t0 = time.perf_counter()
        llmops(root, "apply", "--auto-approve")
        first = time.perf_counter() - t0
        lock = yaml.safe_load((root / "llmops.lock").read_text())["resources"]
        ft = lock["finetunes.liked"]["outputs"]
        print(f"first apply (data, tiny base, DPO fine-tune, eval, promotion, serving): {first:.1f} s")
        print(f"DPO job: {ft['cost']['wall_s']:.1f} s wall, {ft['cost']['train_s']:.1f} s training, "
              f"{ft['metrics']['steps']} steps on {args.pairs} pairs, eval_loss (chosen answers) "
              f"{ft['metrics']['eval_loss']:.3f}")
        (root / "data/feedback.jsonl").write_text(pairs(tickets, args.pairs + args.more))
        plan = json.loads(llmops(root, "plan", "--json").stdout)
        chain = [f"{c['address']} {c['action']}" for c in plan["resource_changes"] if c["action"] != "no-op"]
        print(f"after {args.more} new ratings the plan shows: " + " -> ".join(chain))
        t0 = time.perf_counter()
        llmops(root, "apply", "--auto-approve")
        print(f"second apply (the chain, v2 promoted by its gate): {time.perf_counter() - t0:.1f} s")
    finally:
        llmops(root, "down", "deployments.prod")
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
