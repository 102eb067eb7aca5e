"""The example project's `llmops apply`, before and after: wall time, and time to the first start.

"Before" is an older commit (default d1440a0, the commit before apply's warm-up thread)
checked out in a git worktree and run with PYTHONPATH pointing at it, from the same venv;
"after" is this working tree. Both apply the same example-project/ (this checkout's) in a
fresh folder each round, rounds alternating before, after, before, after, ...; medians are
printed side by side.

- apply wall: from starting `python -m llmops apply --auto-approve` to its exit.
- first start: from that start to the first `ADDRESS: creating...` line (the line every
  version prints when a resource's work begins).
- training job: the apply's own job spec (.llmops/runs/finetunes/*/*/job.json) run again
  on its own (`python -m llmops.train`, fresh output folder, a copy of the MLflow database),
  timed from its start to its first step event ("before training": imports, tokenizer,
  MLflow run, model loading), the loop's train_runtime_s, and the whole job; plus the
  job process's own imports by `-X importtime` (top-level modules, summed) in a separate run.

Every Python process of a version imports that version's llmops (checked: each prints
llmops.__file__ first, and a job's helper gets the job's path).

    .venv/bin/python bench/apply_example.py [--before COMMIT] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
START_LINE = re.compile(r"^\S+: (creating|updating|restoring|replacing|deleting)\.\.\.$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(code: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(code), "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
            "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
            "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.invalid",
            "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.invalid"}


def check_code(code: Path) -> None:
    out = subprocess.run([sys.executable, "-c", "import llmops; print(llmops.__file__)"], env=env_for(code),
                         cwd=tempfile.gettempdir(), capture_output=True, text=True, check=True).stdout.strip()
    if not Path(out).resolve().is_relative_to(code.resolve()):
        sys.exit(f"{code}: `import llmops` found {out}, not this version's code")


def worktree(commit: str) -> tuple[Path, bool]:
    """A detached worktree of `commit` under the temp folder; True when made here."""
    path = Path(tempfile.gettempdir()) / f"llmops-before-{commit}"
    if (path / "llmops" / "__init__.py").is_file():
        return path, False
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), commit],
                   check=True, capture_output=True)
    return path, True


def project(folder: Path) -> Path:
    shutil.copytree(REPO / "example-project", folder)
    config = (folder / "llmops.yaml").read_text()
    (folder / "llmops.yaml").write_text(config.replace("serve: {port: 8765}", f"serve: {{port: {free_port()}}}"))
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    return folder


def timed_lines(cmd: list[str], cwd: Path, env: dict[str, str], first: re.Pattern | None) -> tuple[float, float, list[str]]:
    """(wall seconds, seconds to the first line matching `first`, the output lines)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen, lines = float("nan"), []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if seen != seen and first is not None and first.match(lines[-1]):
            seen = time.perf_counter() - started
    code = proc.wait()
    wall = time.perf_counter() - started
    if code != 0:
        sys.exit(f"{' '.join(cmd)} failed in {cwd}:\n" + "\n".join(lines[-60:]))
    return wall, seen, lines


def job_copy(root: Path, dest: Path) -> Path:
    """The apply's fine-tune job spec, pointed at `dest` and a copy of the project's MLflow db."""
    spec_path = next((root / ".llmops" / "runs" / "finetunes").glob("*/*/job.json"))
    job = json.loads(spec_path.read_text())
    dest.mkdir(parents=True)
    shutil.copy(root / ".llmops" / "mlflow.db", dest / "mlflow.db")
    job.update(output_dir=str(dest / "out"), checkpoint_dir=str(dest / "checkpoints"),
               tracking_uri=f"sqlite:///{dest / 'mlflow.db'}", registry_uri=f"sqlite:///{dest / 'mlflow.db'}",
               artifact_location=(dest / "artifacts").as_uri())
    (dest / "job.json").write_text(json.dumps(job))
    return dest / "job.json"


def run_job(spec: Path, env: dict[str, str]) -> dict[str, float]:
    step = re.compile(r'^\{.*"event": "step"')
    wall, first_step, lines = timed_lines([sys.executable, "-m", "llmops.train", str(spec)], spec.parent, env, step)
    done = json.loads(next(line for line in lines if '"event": "done"' in line))
    train = float(done["metrics"]["train_runtime_s"])
    return {"job_wall": wall, "before_training": first_step, "training": train,
            "adapter": done["adapter"]["sha256"], "eval_loss": done["metrics"]["eval_loss"]}


def job_imports(spec: Path, env: dict[str, str]) -> float:
    """Seconds of top-level imports in the job process (`-X importtime`, which itself slows them)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "llmops.train", str(spec)], cwd=spec.parent,
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    total = 0
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", line)  # no indent: a top-level import
        if m:
            total += int(m.group(1))
    return total / 1e6


def one_round(name: str, code: Path, tmp: Path, with_imports: bool) -> dict[str, float]:
    env = env_for(code)
    root = project(tmp / f"{name}-project")
    load = os.getloadavg()[0]
    wall, first, lines = timed_lines([sys.executable, "-m", "llmops", "apply", "--auto-approve"], root, env, START_LINE)
    subprocess.run([sys.executable, "-m", "llmops", "down", "deployments.support-prod"], cwd=root, env=env,
                   capture_output=True)
    result = {"load_avg": load, "apply_wall": wall, "first_start": first}
    result.update(run_job(job_copy(root, tmp / f"{name}-job"), env))
    if with_imports:
        result["job_imports"] = job_imports(job_copy(root, tmp / f"{name}-job-imports"), env)
    shutil.rmtree(root, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="d1440a0", help="the commit to compare with (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each version (default: %(default)s)")
    parser.add_argument("--no-importtime", action="store_true", help="skip the -X importtime runs of the job")
    args = parser.parse_args()
    before, made = worktree(args.before)
    versions = {"before": before, "after": REPO}
    results: dict[str, list[dict[str, float]]] = {k: [] for k in versions}
    tmp = Path(tempfile.mkdtemp(prefix="llmops-apply-bench-"))
    try:
        for code in versions.values():
            check_code(code)
        for r in range(args.rounds):
            for name, code in versions.items():
                out = one_round(name, code, tmp / f"round-{r}", not args.no_importtime)
                results[name].append(out)
                print(f"round {r + 1} {name:6} " + "  ".join(
                    f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {str(v)[:12]}" for k, v in out.items()),
                    flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if made:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)], capture_output=True)
    rows = [("apply wall (s)", "apply_wall"), ("first resource starts (s)", "first_start"),
            ("job: before first step (s)", "before_training"), ("job: training loop (s)", "training"),
            ("job: wall (s)", "job_wall")]
    if not args.no_importtime:
        rows.append(("job process imports, -X importtime (s)", "job_imports"))
    rows.append(("load average at the round's start", "load_avg"))
    print(f"\nmedians of {args.rounds} alternating rounds; before = {args.before}, after = this working tree")
    print(f"{'':40} {'before':>8} {'after':>8}")
    for label, key in rows:
        b, a = (statistics.median(x[key] for x in results[n]) for n in ("before", "after"))
        print(f"{label:40} {b:8.2f} {a:8.2f}")
    adapters = {n: {x["adapter"] for x in results[n]} for n in results}
    print(f"adapter sha256 before {sorted(adapters['before'])}, after {sorted(adapters['after'])}")


if __name__ == "__main__":
    main()
