"""Hostile input: a pull request's llmops.yaml, lock or templates must be safe to validate/plan.

Each case of tests/hostile/cases.py runs through the real CLI in a fresh interpreter with a
planted secret in its environment, under a memory cap and a generous timeout. It must fail
with a clear message that names the file, without a traceback, an "unexpected" error or
the secret, and delete nothing outside the project. Timings are printed, not asserted.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hostile.cases import BASE_FILES, CASES, Case

SECRET = "ghp_HostileTestFakeToken0123456789abcdef"
MEMORY_LIMIT = 1536 * 1024 * 1024
TIMEOUT_S = 30


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _write_case(case: Case, tmp: Path) -> tuple[Path, Path]:
    root, victim = tmp / "proj", tmp / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("must survive\n")
    (tmp / "outside.txt").write_text("outside the project\n")
    for rel, content in {**BASE_FILES, **case.files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    for rel, target in case.links.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target.format(victim=victim, outside=tmp / "outside.txt"))
    return root, victim


def _run(root: Path, args: tuple[str, ...]) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMOPS_")}
    env["GITHUB_TOKEN"] = SECRET
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "llmops", *args], cwd=root, capture_output=True, text=True,
                          env=env, timeout=TIMEOUT_S, preexec_fn=_limit_memory, stdin=subprocess.DEVNULL)
    return proc, time.monotonic() - start


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_fails_clearly_and_safely(case: Case, tmp_path: Path) -> None:
    root, victim = _write_case(case, tmp_path)
    for args in case.commands:
        proc, took = _run(root, args)
        out = proc.stdout + proc.stderr
        print(f"{case.name}: llmops {' '.join(args)}: rc={proc.returncode} {took:.2f}s")
        assert proc.returncode != 0, out
        for bad in ("Traceback", "This is a bug", "unexpected", SECRET):
            assert bad not in out, (bad, out)
        for needle in case.needles:
            assert needle in out, (needle, out)
        assert len(out) < 4000, out
        assert (victim / "keep.txt").is_file(), "a file outside the project was deleted"
    state = root / ".llmops"
    for path in state.rglob("*") if state.is_dir() else ():
        if path.is_file() and not path.is_symlink():
            assert SECRET not in path.read_text(errors="replace"), path
