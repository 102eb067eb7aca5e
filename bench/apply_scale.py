"""Apply engine overhead per resource as the project grows: flat, or it does not scale.

Each size runs in a fresh interpreter: a generated project (bench/plan_scale.py's five kinds
with their dependencies) whose providers do nothing, applied with parallelism 4, so all of
the time measured is the engine's (scheduling, recording in llmops.lock, hooks). Target: the
10,000-resource figure within 1.3x of the 500 one.

With --baseline REF, the same measurement also runs against llmops at git REF (checked out
with `git worktree add` into a temp folder and put first on PYTHONPATH), side by side.
Sizes above --baseline-max are skipped for the baseline (it was quadratic). Each figure is the
best of --repeat runs: on a shared machine the noise is all upwards.

    .venv/bin/python bench/apply_scale.py [--sizes 500,1000,2000,4000,10000] [--repeat 2] [--baseline 21384c1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(n: int) -> dict:
    """Apply a fresh n-resource project with trivial providers; engine seconds and bytes written."""
    from plan_scale import KINDS, Timing, Trivial, generate

    from llmops.engine.apply import apply_plan
    from llmops.engine.planner import make_plan
    from llmops.engine.project import open_project

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(root, n)
        overrides = {k: type(f"T_{k}", (Trivial,), {"kind": k}) for k in KINDS}
        project = open_project(root, provider_overrides=overrides)
        plan = make_plan(project, refresh=False)
        written = _io_written()
        hooks = Timing()
        t0, cpu = time.perf_counter(), time.process_time()
        report = apply_plan(project, plan, hooks=hooks, parallelism=4)
        total, cpu = time.perf_counter() - t0, time.process_time() - cpu
        written = _io_written() - written
        assert report.ok, report.failed
        assert len(report.applied) == len(plan.changes) == n, (len(report.applied), n)
        # The second half of the completions: the steady cost, without the apply's fixed start-up.
        half = hooks.done[len(hooks.done) // 2:]
        steady = 1000 * (half[-1] - half[0]) / max(1, len(half) - 1)
        return {"n": n, "total_s": total, "ms_per_resource": 1000 * total / n, "steady_ms": steady,
                "cpu_ms": 1000 * cpu / n,
                "written_mb": written / 1e6,
                "lock_mb": (root / "llmops.lock").stat().st_size / 1e6}


def _io_written() -> int:
    """Bytes this process asked to write (/proc/self/io wchar), or 0 where that is not readable."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def best_of(repeat: int, n: int, llmops_path: Path | None) -> dict | None:
    runs = [r for r in (run_one(n, llmops_path) for _ in range(repeat)) if r is not None]
    return min(runs, key=lambda r: r["total_s"]) if runs else None


def run_one(n: int, llmops_path: Path | None) -> dict | None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1")
    if llmops_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(llmops_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", str(n)],
                         env=env, capture_output=True, text=True, cwd=HERE)
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def _baseline_tree(ref: str, tmp: Path) -> Path:
    tree = tmp / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", "-f", str(tree), ref], cwd=HERE.parent,
                   check=True, capture_output=True)
    return tree


def _cell(row: dict | None) -> str:
    if row is None:
        return f"{'-':>42}"
    return (f"{row['ms_per_resource']:6.2f} {row['steady_ms']:6.2f} {row['cpu_ms']:6.2f} ms/res "
            f"{row['total_s']:6.2f} s {row['written_mb']:5.0f} MB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="500,1000,2000,4000,10000")
    ap.add_argument("--repeat", type=int, default=1, help="runs per figure (the best is shown)")
    ap.add_argument("--baseline", metavar="REF", help="also measure llmops at this git ref")
    ap.add_argument("--baseline-max", type=int, default=4000, help="largest size measured for the baseline")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tree = _baseline_tree(args.baseline, Path(tmp)) if args.baseline else None
        try:
            print("overhead per resource: whole apply, its second half, CPU; then apply total, bytes written")
            head = f"{'resources':>9}  {'this tree':>42}"
            print(head + (f"   {'baseline ' + args.baseline:>42}" if tree else ""))
            rows = {}
            for n in sizes:
                rows[n] = best_of(args.repeat, n, None)
                line = f"{n:>9}  {_cell(rows[n])}"
                if tree:
                    line += f"   {_cell(best_of(args.repeat, n, tree) if n <= args.baseline_max else None)}"
                print(line, flush=True)
        finally:
            if tree:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=HERE.parent,
                               capture_output=True)
    small, big = rows.get(min(sizes)), rows.get(max(sizes))
    if small and big:
        ratio = big["ms_per_resource"] / small["ms_per_resource"]
        steady = big["steady_ms"] / small["steady_ms"]
        print(f"{max(sizes)} vs {min(sizes)}: {ratio:.2f}x per resource, {steady:.2f}x in the second half "
              f"(target <= 1.3x)")


if __name__ == "__main__":
    main()
