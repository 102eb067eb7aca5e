"""Hostile input: a pull request's llmops.yaml, lock or templates must be safe to validate/plan.

Each case of tests/hostile/cases.py runs through the real CLI in a fresh interpreter with a
planted secret in its environment, under a memory cap and a generous timeout. It must fail
with a clear message that names the file, without a traceback, an "unexpected" error or
the secret, delete nothing outside the project, and stay under 300 MiB of resident memory
(its own peak: VmHWM, see hostile/measured.py). Timings are printed, not asserted (bench/hostile_corpus.py
measures them against the 5 s budget); a hang is killed after TIMEOUT_S and fails.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from hostile.cases import BASE_FILES, CASES, SECRET, Case

MEMORY_LIMIT = 1536 * 1024 * 1024  # address space: a runaway allocation fails instead of swapping
MEMORY_BUDGET = 300 * 1024 * 1024  # peak resident memory of any case (the bound)
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


MEASURED = Path(__file__).resolve().parent / "hostile" / "measured.py"


@dataclass
class Ran:
    returncode: int
    output: str
    seconds: float
    peak_rss: int  # bytes: the command's own high-water mark (see hostile/measured.py)


def _run(root: Path, args: tuple[str, ...]) -> Ran:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMOPS_")}
    env["GITHUB_TOKEN"] = SECRET
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak"
        env["LLMOPS_PEAK_RSS_FILE"] = str(peak_file)
        try:
            proc = subprocess.run([sys.executable, str(MEASURED), *args], cwd=root, capture_output=True, env=env,
                                  timeout=TIMEOUT_S, preexec_fn=_limit_memory, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"llmops {' '.join(args)} hung (killed after {TIMEOUT_S}s)") from None
        peak = int(peak_file.read_text()) if peak_file.is_file() else 0
    text = (proc.stdout + proc.stderr).decode("utf-8", errors="replace")
    return Ran(proc.returncode, text, time.monotonic() - start, peak)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_fails_clearly_and_safely(case: Case, tmp_path: Path) -> None:
    root, victim = _write_case(case, tmp_path)
    for args in case.commands:
        ran = _run(root, args)
        out = ran.output
        print(f"{case.name}: llmops {' '.join(args)}: rc={ran.returncode} {ran.seconds:.2f}s "
              f"{ran.peak_rss / 2**20:.0f} MiB")
        assert (ran.returncode == 0) == case.succeeds, out
        assert 0 < ran.peak_rss < MEMORY_BUDGET, f"peak RSS {ran.peak_rss / 2**20:.0f} MiB, budget {MEMORY_BUDGET / 2**20:.0f}"
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
