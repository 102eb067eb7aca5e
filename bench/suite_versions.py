"""The whole non-slow suite, an earlier commit's against this checkout's, side by side in one run.

Each version runs its own tests on its own code through its own `scripts/test.sh` (the README's
test command, so each version's environment, pytest options and file order), with `-m "not slow"
-n 2 --dist loadfile --no-loadscope-reorder` (what that script passes for a whole run), from a
git worktree of `--baseline` (default: 49ac291, the commit before the #13 work) and from this
checkout. Both use this checkout's .venv (the worktree's .venv/bin/python execs it): each
version's processes import their own llmops through PYTHONPATH (checked before the runs).
Bytecode caches in the trees are removed before each run, so every run starts as a fresh clone
does. tests/test_wheel.py is left out of both, since PYTHONPATH would also reach the venv it
installs the wheel into. Rounds alternate which version goes first, so load from other jobs falls on both alike. Prints wall and CPU time
(pytest and every process it waited for) per round, the medians, and the files that cost most
CPU in each version (from pytest's junit XML), and says when the two versions' outcomes
(passed/failed/skipped) differ (tests added since the baseline make them differ; a failure in
either is worth a look).

    .venv/bin/python bench/suite_versions.py [--baseline REV] [--rounds N] [--workers N]
"""

from __future__ import annotations

import argparse
import collections
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite_time import COUNTS, REPO, outcome_counts, timed_run  # noqa: E402
from worktree import baseline_tree  # noqa: E402


def _which_llmops(tree: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, "-c", "import llmops, os; print(os.path.dirname(llmops.__file__))"],
                         cwd=tree, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def run_suite(tree: Path, workers: int, scratch: Path) -> tuple[float, float, dict[str, int], dict[str, float]]:
    """Wall seconds, CPU seconds, outcome counts, CPU-ish seconds per file (junit times)."""
    scratch.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true",
               DVC_NO_ANALYTICS="1")
    env.pop("LLMOPS_TEST_SUBPROCESS", None)
    junit = scratch / "junit.xml"
    for cache in [p for top in ("llmops", "tests") for p in (tree / top).rglob("__pycache__")]:
        shutil.rmtree(cache, ignore_errors=True)
    cmd = ["bash", str(tree / "scripts" / "test.sh"), "-m", "not slow", "-n", str(workers), "--dist", "loadfile",
           "--no-loadscope-reorder", f"--basetemp={scratch / 'tmp'}", f"--junitxml={junit}",
           # its wheel's own venv would import the tree's llmops through PYTHONPATH, not the wheel
           "--ignore=tests/test_wheel.py", "tests"]
    wall, cpu, proc = timed_run(cmd, tree, env)
    tail = [line for line in (proc.stdout + proc.stderr).strip().splitlines() if COUNTS.search(line)][-1:] or [""]
    counts = outcome_counts(tail[0])
    per_file: dict[str, float] = collections.Counter()
    if junit.is_file():
        for case in ET.parse(junit).iter("testcase"):
            per_file[case.get("classname", "").rpartition(".")[2] or "?"] += float(case.get("time") or 0)
    shutil.rmtree(scratch / "tmp", ignore_errors=True)
    return wall, cpu, counts, dict(per_file)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", default="49ac291")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    with baseline_tree(args.baseline, "suite-versions-") as (scratch, base_tree):
        trees = {"baseline": base_tree, "this": REPO}
        # Its scripts/test.sh runs .venv/bin/python: there, a script that execs this checkout's (not
        # a link to this .venv, which Docker tests would mount through the worktree, where it dangles).
        python = base_tree / ".venv" / "bin" / "python"
        python.parent.mkdir(parents=True)
        python.write_text(f'#!/bin/sh\nexec {shlex.quote(str(REPO / ".venv" / "bin" / "python"))} "$@"\n')
        python.chmod(0o755)
        return _compare(args, trees, scratch)


def _compare(args: argparse.Namespace, trees: dict[str, Path], scratch: Path) -> int:
    for label, tree in trees.items():
        found = _which_llmops(tree)
        assert Path(found).resolve() == (tree / "llmops").resolve(), f"{label} imports llmops from {found}"
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    print(f"baseline {args.baseline} against this checkout (HEAD {rev.strip()} + working tree), "
          f"{args.workers} workers, {args.rounds} round(s); load average {os.getloadavg()[0]:.1f}")
    results: dict[str, list] = {"baseline": [], "this": []}
    for r in range(args.rounds):
        order = ("baseline", "this") if r % 2 == 0 else ("this", "baseline")
        for label in order:
            res = run_suite(trees[label], args.workers, scratch / f"{label}-{r}")
            results[label].append(res)
            print(f"round {r + 1} {label:<8} wall {res[0]:7.1f} s  cpu {res[1]:7.1f} s  {res[2]}  "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in results.items()}
    print(f"\n{'':<10} {'wall s':>8} {'cpu s':>8}")
    for label in ("baseline", "this"):
        print(f"{label:<10} {med[label][0]:8.1f} {med[label][1]:8.1f}")
    print(f"{'ratio':<10} {med['this'][0] / med['baseline'][0]:8.2f} {med['this'][1] / med['baseline'][1]:8.2f}")
    last = {k: v[-1][3] for k, v in results.items()}
    print(f"\n{'file (junit seconds, last round)':<34} {'baseline':>8} {'this':>8}")
    for name in sorted(set(last["baseline"]) | set(last["this"]),
                       key=lambda n: -max(last["baseline"].get(n, 0), last["this"].get(n, 0)))[:25]:
        print(f"{name:<34} {last['baseline'].get(name, 0):8.1f} {last['this'].get(name, 0):8.1f}")
    outcomes = {k: v[-1][2] for k, v in results.items()}
    if outcomes["baseline"] != outcomes["this"]:
        print(f"outcomes differ: baseline {outcomes['baseline']}, this {outcomes['this']} "
              "(tests were added or removed since the baseline)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
