"""The quick start's main job, measured: time, fine-tune vs base, sampled answers, cost estimate.

    python bench/example_quality.py [--keep DIR]

Copies example-project/ into a fresh folder (its own git repository, empty .llmops/), then:
1. times `llmops plan` + `llmops apply --auto-approve` end to end (what scripts/example.sh runs
   after the install);
2. prints the fine-tune's and the base model's metrics on the eval split side by side;
3. asks the served model three questions at temperature 1.0 with the `openai` client and
   checks the answers hold no replacement or control characters;
4. changes the fine-tune's learning rate, reads the plan's cost estimate for the retrain,
   applies it, and prints the estimate beside the actual wall time of the training job.

Targets (issue #11): end to end <= 180 s on a 2-core CPU; rougeL >= 0.40 and >= base + 0.20;
exact match > 0; the actual training time within 30% of the estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
QUESTIONS = ["How do I reset my password on my laptop?", "Can I return the keyboard for a refund?",
             "Do you ship the backpack to Japan?"]


def llmops(root: Path, *args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("llmops")
    res = subprocess.run([str(exe), *args], cwd=root, env=ENV, capture_output=True, text=True)
    if res.returncode not in (0, 2):
        sys.exit(f"llmops {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="apply in this folder and leave it (default: a temp folder)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="llmops-example-bench-"))
    root = work / "example-project"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(REPO / "example-project", root, ignore=shutil.ignore_patterns(".llmops", "llmops.lock", "dvc.*"))
    port = free_port()
    config = (root / "llmops.yaml").read_text().replace("serve: {port: 8765}", f"serve: {{port: {port}}}")
    (root / "llmops.yaml").write_text(config)
    for cmd in (["init", "-q"], ["add", "-A"], ["-c", "user.name=bench", "-c", "user.email=bench@example.invalid",
                                                 "commit", "-qm", "example"]):
        subprocess.run(["git", *cmd], cwd=root, check=True)
    try:
        t0 = time.perf_counter()
        llmops(root, "plan")
        llmops(root, "apply", "--auto-approve")
        total = time.perf_counter() - t0
        lock = yaml.safe_load((root / "llmops.lock").read_text())["resources"]
        tuned, base = lock["evals.support-quality"]["outputs"], lock["evals.support-base"]["outputs"]
        pre = lock["base_models.tiny"]["outputs"]["pretrain"]
        print(f"main job (plan + apply, fresh state): {total:.1f} s   (target <= 180 s)")
        print(f"base pre-training: {pre['steps']} steps, {pre['tokens']:,} tokens, {pre['seconds']:.1f} s, "
              f"loss {pre['first_loss']} -> {pre['last_loss']}")
        ft = lock["finetunes.support-lora"]["outputs"]["cost"]
        print(f"LoRA fine-tune job: {ft['wall_s']:.1f} s wall, {ft['train_s']:.1f} s training, {ft['tokens']:,} tokens")
        print(f"\n{'metric':<16}{'fine-tune':>12}{'base':>12}{'delta':>12}")
        for metric, side in tuned["comparison"]["metrics"].items():
            print(f"{metric:<16}{tuned['metrics'][metric]:>12.4g}{side['value']:>12.4g}{side['delta']:>+12.4g}")
        lat = tuned.get("latency") or {}
        if lat:
            print(f"latency_p95_ms {tuned['metrics'].get('latency_p95_ms', 0):.1f} from {lat['requests']} requests in "
                  f"{lat['timed']} timings (min {lat['min_ms']:.1f}, max {lat['max_ms']:.1f})")
        gain = tuned["metrics"]["rougeL"] - base["metrics"]["rougeL"]
        ok = tuned["metrics"]["rougeL"] >= 0.40 and gain >= 0.20 and tuned["metrics"]["exact_match"] > 0
        print(f"targets rougeL >= 0.40, gain >= 0.20, exact match > 0: {'met' if ok else 'MISSED'}")

        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        print("\nanswers at temperature 1.0:")
        clean = True
        for q in QUESTIONS:
            text = client.completions.create(model="support-lora", prompt=f"### Question:\n{q}\n### Answer:\n",
                                             max_tokens=32, temperature=1.0).choices[0].text
            bad = "\ufffd" in text or bool(re.search(r"[\x00-\x08\x0b-\x1f\x7f]", text))
            clean &= not bad
            print(f"  Q: {q}\n  A: {text.strip()!r}{'   <- replacement/control characters' if bad else ''}")
        print(f"no replacement or control characters: {'yes' if clean else 'NO'}")

        edited = config.replace("learning_rate: 1.0e-2 ", "learning_rate: 8.0e-3 ")
        (root / "llmops.yaml").write_text(edited)
        plan = json.loads(llmops(root, "plan", "--json").stdout)
        change = next(c for c in plan["resource_changes"] if c["address"] == "finetunes.support-lora")
        estimate = change["details"]["cost"]
        llmops(root, "apply", "--auto-approve", "--select", "finetunes.support-lora")
        actual = yaml.safe_load((root / "llmops.lock").read_text())["resources"]["finetunes.support-lora"]["outputs"]
        actual = actual["cost"]
        ratio = actual["wall_s"] / estimate["wall_s"]
        print(f"\nretrain after learning_rate 1e-2 -> 8e-3 ({estimate['basis']}):")
        print(f"{'':<14}{'estimate':>12}{'actual':>12}")
        print(f"{'wall s':<14}{estimate['wall_s']:>12.1f}{actual['wall_s']:>12.1f}")
        print(f"{'tokens':<14}{estimate['tokens']:>12,}{actual['tokens']:>12,}")
        print(f"actual / estimate: {ratio:.2f}   (target within 0.70..1.30: {'met' if 0.7 <= ratio <= 1.3 else 'MISSED'})")
    finally:
        subprocess.run([str(Path(sys.executable).with_name("llmops")), "down", "deployments.support-prod"], cwd=root,
                       env=ENV, capture_output=True)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
