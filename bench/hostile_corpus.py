"""The hostile-input corpus (tests/hostile/cases.py) against its budgets: 5 s and 300 MiB a case.

Runs every case's commands as tests/test_hostile.py does (fresh interpreter, planted secret,
address-space cap) and prints, per case, wall time and peak resident memory next to the
baseline: the same commands on the corpus's valid base project. Ends with the slowest and
the largest case and how many are over budget.

    .venv/bin/python bench/hostile_corpus.py [CASE-SUBSTRING]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hostile.cases import CASES, Case  # noqa: E402
from test_hostile import _run, _write_case  # noqa: E402

TIME_BUDGET_S = 5.0
MEMORY_BUDGET = 300 * 2**20


def _measure(case: Case) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        root, _ = _write_case(case, Path(tmp))
        runs = [_run(root, args) for args in case.commands]
    return max(r.seconds for r in runs), max(r.peak_rss for r in runs)


def main() -> None:
    wanted = sys.argv[1] if len(sys.argv) > 1 else ""
    base = _measure(Case("baseline (valid project)", {}, ()))
    print(f"{'case':40s} {'seconds':>8s} {'MiB':>6s}   baseline: {base[0]:.2f} s {base[1] / 2**20:.0f} MiB")
    results = []
    for case in CASES:
        if wanted in case.name:
            seconds, rss = _measure(case)
            results.append((case.name, seconds, rss))
            print(f"{case.name:40s} {seconds:8.2f} {rss / 2**20:6.0f}   x{seconds / base[0]:.1f} time")
    if results:
        slow = max(results, key=lambda r: r[1])
        big = max(results, key=lambda r: r[2])
        over = [r for r in results if r[1] > TIME_BUDGET_S or r[2] > MEMORY_BUDGET]
        print(f"\n{len(results)} cases; slowest {slow[0]} {slow[1]:.2f} s (budget {TIME_BUDGET_S:g} s); "
              f"largest {big[0]} {big[2] / 2**20:.0f} MiB (budget 300 MiB); over budget: {len(over)}")


if __name__ == "__main__":
    main()
