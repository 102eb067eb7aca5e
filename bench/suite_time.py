"""The non-slow test suite's wall time, the old way and the new way, side by side in one run.

Old: every `Project.run` starts `python -m llmops` and every project's MLflow store is created
by its first apply (LLMOPS_TEST_SUBPROCESS=1, tests/conftest.py). New: the CLI runs in the
test's interpreter where a subprocess proves nothing extra, and an apply that would create
an empty embedded store gets a copy of one prepared per session.

Each test file runs in its own `pytest -m "not slow"` once per mode, the two modes
interleaved file by file (and which goes first alternates), so load from other jobs on the
machine falls on both alike. Prints a row per file and the totals, wall time and CPU time
(pytest and the processes it waited for: the steadier number when other jobs share the
CPUs); exits non-zero when a file's outcome (passed/failed/skipped counts) differs between
the modes.

    PYTHONPATH=. .venv/bin/python bench/suite_time.py [tests/test_x.py ...]
        (no files: every tests/test_*.py)
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = {"old": {"LLMOPS_TEST_SUBPROCESS": "1"}, "new": {}}
COUNTS = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def run_file(path: Path, mode: str, basetemp: Path) -> tuple[float, float, dict[str, int], str]:
    """Wall seconds, CPU seconds (user + system of pytest and every process it waited for:
    CLI subprocesses, DVC, training jobs), the outcome counts and pytest's last line."""
    env = {k: v for k, v in os.environ.items() if k != "LLMOPS_TEST_SUBPROCESS"}
    env.update(MODES[mode])
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
           f"--basetemp={basetemp}", str(path)]
    basetemp.parent.mkdir(parents=True, exist_ok=True)
    wall, cpu, proc = timed_run(cmd, REPO, env)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    return wall, cpu, outcome_counts(tail[0]), tail[0]


def timed_run(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """Run `cmd`; wall seconds, CPU seconds (user + system of it and every process it waited
    for) and the finished process, its output captured."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), proc


def outcome_counts(line: str) -> dict[str, int]:
    """{"passed": N, "failed": N, ...} of pytest's summary line."""
    return {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in COUNTS.findall(line)}


def _row(old: float, new: float, width: int = 8) -> str:
    return f"{old:{width}.1f} {new:6.1f} {new / old if old else 1.0:5.2f}"


def main(argv: list[str]) -> int:
    files = [Path(a) for a in argv] or sorted((REPO / "tests").glob("test_*.py"))
    scratch = Path(tempfile.mkdtemp(prefix="suite-time-"))
    wall = {"old": 0.0, "new": 0.0}
    cpu = {"old": 0.0, "new": 0.0}
    differ: list[str] = []
    print(f"{'file':<30} {'wall old':>8} {'new':>6} {'ratio':>5}   {'cpu old':>7} {'new':>6} {'ratio':>5}  outcome")
    for i, path in enumerate(files):
        order = ("old", "new") if i % 2 == 0 else ("new", "old")
        results = {}
        for mode in order:
            results[mode] = run_file(path, mode, scratch / mode / path.stem)
        (old_wall, old_cpu, old_counts, old_tail) = results["old"]
        (new_wall, new_cpu, new_counts, new_tail) = results["new"]
        for total, old, new in ((wall, old_wall, new_wall), (cpu, old_cpu, new_cpu)):
            total["old"] += old
            total["new"] += new
        same = old_counts == new_counts
        if not same:
            differ.append(f"{path.name}: old {old_tail!r}, new {new_tail!r}")
        print(f"{path.name:<30} {_row(old_wall, new_wall)}   {_row(old_cpu, new_cpu, 7)}  "
              f"{new_tail if same else 'DIFFERS'}", flush=True)
    print(f"{'total (' + str(len(files)) + ' files)':<30} {_row(wall['old'], wall['new'])}   "
          f"{_row(cpu['old'], cpu['new'], 7)}")
    for line in differ:
        print("outcome differs:", line)
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
