"""DVC commands the way llmops runs them: a plain `python -m dvc` subprocess each against one
forked from the warm interpreter (llmops.integrations.dvcrun), side by side in one run.

Each round makes two fresh git repos and runs in each, plain in one and forked in the other
(alternating which goes first): `init`, `repro` of a one-file stage, `status`, `remote add`,
`push`, `status --cloud`. Prints the median wall seconds per command and in all, and the
warm interpreter's own start (paid once per llmops process).

    .venv/bin/python bench/dvc_commands.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmops.integrations import dvcrun

STAGE = "stages:\n  copy:\n    cmd: cp a.txt b.txt\n    deps: [a.txt]\n    outs: [b.txt]\n"
COMMANDS = [["init", "-q"], ["repro", "copy"], ["status"], ["remote", "add", "--default", "r", "../store"],
            ["push", "copy"], ["status", "--cloud", "copy"]]


def _plain(root: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    start = time.perf_counter()
    dvcrun._start()
    warm_start = time.perf_counter() - start
    runners = {"plain": _plain, "forked": dvcrun.run}
    times: dict[str, dict[str, list[float]]] = {k: {" ".join(c[:2]): [] for c in COMMANDS} for k in runners}
    with tempfile.TemporaryDirectory() as scratch:
        for i in range(args.rounds):
            for kind in (list(runners) if i % 2 == 0 else list(reversed(runners))):
                root = Path(scratch) / f"{kind}-{i}" / "repo"
                root.mkdir(parents=True)
                subprocess.run(["git", "init", "-q", str(root)], check=True)
                (root / "a.txt").write_text("x\n")
                for command in COMMANDS:
                    if command[0] == "repro":
                        (root / "dvc.yaml").write_text(STAGE)
                    t0 = time.perf_counter()
                    proc = runners[kind](root, command, env)
                    times[kind][" ".join(command[:2])].append(time.perf_counter() - t0)
                    if proc.returncode != 0:
                        print(f"{kind} dvc {' '.join(command)} failed: {proc.stderr.strip()[-300:]}")
                        return 1
    print(f"{args.rounds} rounds; load average {os.getloadavg()[0]:.1f}; the warm interpreter started in "
          f"{warm_start:.2f} s")
    print(f"{'command':22} {'plain s':>8} {'forked s':>9} {'ratio':>6}")
    totals = {k: 0.0 for k in runners}
    for name in times["plain"]:
        med = {k: statistics.median(times[k][name]) for k in runners}
        for k in runners:
            totals[k] += med[k]
        print(f"dvc {name:18} {med['plain']:8.2f} {med['forked']:9.2f} {med['forked'] / med['plain']:6.2f}")
    print(f"{'all six':22} {totals['plain']:8.2f} {totals['forked']:9.2f} {totals['forked'] / totals['plain']:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
