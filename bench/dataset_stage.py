"""One dataset stage process (`python -m llmops.data.stage`, what `dvc repro` runs per dataset),
an earlier commit's against this checkout's, side by side in one run.

The baseline (default 62339b2) drew the report's histograms with matplotlib; this checkout
writes them as SVG (llmops.charts). Both stages prepare the same 400-row, two-field dataset
(dedupe, split) in their own scratch project, each from its own tree through PYTHONPATH with
this checkout's .venv, alternating which goes first. Prints the wall and CPU seconds of each
run, the medians, and whether the two prepared the same rows.

    .venv/bin/python bench/dataset_stage.py [--baseline REV] [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from worktree import REPO, baseline_tree  # noqa: E402


def _project(root: Path) -> Path:
    rows = [{"question": f"how do I change setting {i} on my account", "answer": "open settings " * (1 + i % 9)}
            for i in range(400)]
    (root / "data").mkdir(parents=True)
    (root / "data" / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"name": "t", "source": "data/t.jsonl", "format": "jsonl",
            "prepare": [{"dedupe": {"fields": ["question"]}}, {"split": {"eval_fraction": 0.2, "seed": 1}}],
            "output_dir": ".llmops/data/t", "report_dir": ".llmops/reports/datasets/t"}
    path = root / ".llmops" / "data" / "t" / "spec.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(spec))
    return path


def _run(tree: Path, project: Path, spec: Path) -> tuple[float, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llmops.data.stage", str(spec.relative_to(project))], cwd=project,
                   env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", default="62339b2")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with baseline_tree(args.baseline, "dataset-stage-") as (scratch, base_tree):
        trees = {"baseline": base_tree, "this": REPO}
        projects = {label: scratch / f"project-{label}" for label in trees}
        specs = {label: _project(root) for label, root in projects.items()}
        times: dict[str, list[tuple[float, float]]] = {label: [] for label in trees}
        for i in range(args.runs):
            order = list(trees) if i % 2 == 0 else list(reversed(trees))
            for label in order:
                times[label].append(_run(trees[label], projects[label], specs[label]))
        print(f"one dataset stage, 400 rows, {args.runs} runs each; load average {os.getloadavg()[0]:.1f}")
        print(f"{'':10} {'wall s (runs)':42} {'median':>7} {'CPU s median':>13}")
        medians = {}
        for label, runs in times.items():
            walls, cpus = [w for w, _ in runs], [c for _, c in runs]
            medians[label] = (statistics.median(walls), statistics.median(cpus))
            name = args.baseline if label == "baseline" else "this"
            print(f"{name:10} {', '.join(f'{w:.2f}' for w in walls):42} {medians[label][0]:7.2f} "
                  f"{medians[label][1]:13.2f}")
        print(f"{'ratio':10} {'':42} {medians['this'][0] / medians['baseline'][0]:7.2f} "
              f"{medians['this'][1] / medians['baseline'][1]:13.2f}")
        same = all((projects["baseline"] / ".llmops/data/t" / f).read_bytes()
                   == (projects["this"] / ".llmops/data/t" / f).read_bytes() for f in ("train.jsonl", "eval.jsonl"))
        print(f"prepared rows identical: {same}")
        return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
