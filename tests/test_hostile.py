"""Hostile input: a pull request's llmops.yaml, lock or templates must be safe to validate/plan.

Each case of tests/hostile/cases.py runs through the real CLI in a process of its own with a
planted secret in its environment, under a memory cap and a generous timeout: a child forked
from a warm interpreter (tests/hostile/forkserver.py; a test checks it answers as a fresh
`python -m llmops` does, which bench/hostile_corpus.py still starts for its timings). It must fail
with a clear message that names the file, without a traceback, an "unexpected" error or
the secret, delete nothing outside the project, and stay under 300 MiB of resident memory
(its own peak: VmHWM, see hostile/measured.py). Timings are printed, not asserted (bench/hostile_corpus.py
measures them against the 5 s budget); a hang is killed after TIMEOUT_S and fails.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from hostile.cases import BASE_FILES, CASES, CONFIG_CMDS, SECRET, Case

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
FORKSERVER = Path(__file__).resolve().parent / "hostile" / "forkserver.py"


@dataclass
class Ran:
    returncode: int
    output: str
    seconds: float
    peak_rss: int  # bytes: the command's own high-water mark (see hostile/measured.py)


def _case_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMOPS_")}
    env["GITHUB_TOKEN"] = SECRET
    return env


def _run(root: Path, args: tuple[str, ...]) -> Ran:
    """`llmops ARGS` in a fresh interpreter (bench/hostile_corpus.py times these)."""
    env = _case_env()
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


class ForkServer:
    """tests/hostile/forkserver.py: a child process per command, forked from one interpreter
    that has imported what the commands load (see there for what that does and does not skip)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(FORKSERVER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=_case_env())

    def run(self, root: Path, args: tuple[str, ...]) -> Ran:
        start = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            files = {k: str(Path(tmp) / k) for k in ("stdout", "stderr", "peak")}
            request = {"cwd": str(root), "env": _case_env(), "args": list(args), "timeout": TIMEOUT_S,
                       "memory_limit": MEMORY_LIMIT, **files}
            assert self.proc.stdin and self.proc.stdout
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            reply = json.loads(self.proc.stdout.readline() or '{"lost": true}')
            if reply.get("timeout"):
                raise AssertionError(f"llmops {' '.join(args)} hung (killed after {TIMEOUT_S}s)")
            assert "rc" in reply, f"the fork server died: {reply}"
            peak_file = Path(files["peak"])
            peak = int(peak_file.read_text()) if peak_file.is_file() else 0
            text = (Path(files["stdout"]).read_bytes() + Path(files["stderr"]).read_bytes()).decode(
                "utf-8", errors="replace")
        return Ran(reply["rc"], text, time.monotonic() - start, peak)

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def forkserver():
    server = ForkServer()
    yield server
    server.close()


def test_a_forked_command_is_its_own_process_as_a_fresh_one_is(forkserver: ForkServer, tmp_path: Path) -> None:
    """The fork server's child and a fresh interpreter give the same answer, the same way."""
    case = next(c for c in CASES if c.commands == CONFIG_CMDS and not c.succeeds)
    root, _ = _write_case(case, tmp_path)
    fresh, forked = _run(root, ("validate",)), forkserver.run(root, ("validate",))
    assert (forked.returncode, forked.output) == (fresh.returncode, fresh.output)
    assert 0 < forked.peak_rss < MEMORY_BUDGET and 0 < fresh.peak_rss < MEMORY_BUDGET


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_fails_clearly_and_safely(case: Case, tmp_path: Path, forkserver: ForkServer) -> None:
    root, victim = _write_case(case, tmp_path)
    for args in case.commands:
        ran = forkserver.run(root, args)
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
