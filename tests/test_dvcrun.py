"""llmops.integrations.dvcrun: DVC commands forked from a warm interpreter answer as
`python -m dvc` does, each with its own folder and environment; it falls back when it must."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmops.integrations import dvcrun

STAGES = """stages:
  copy:
    cmd: python -c "import os, pathlib; pathlib.Path('b.txt').write_text(os.environ.get('MARK', '-') + pathlib.Path('a.txt').read_text())"
    deps: [a.txt]
    outs: [b.txt]
  slow:
    cmd: python -c "import time; time.sleep(30)"
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a.txt").write_text("x\n")
    return tmp_path


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return dict(os.environ, DVC_NO_ANALYTICS="1", PATH=path, **extra)


def _plain(root: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(autouse=True)
def fresh_server():
    """Each test starts without a warm interpreter and leaves none behind."""
    dvcrun._stop()
    dvcrun._server, dvcrun._broken = None, False
    yield
    dvcrun._stop()
    dvcrun._server, dvcrun._broken = None, False


def test_commands_answer_as_python_m_dvc_does(tmp_path: Path, monkeypatch) -> None:
    # One hash seed for both sides (the warm interpreter's children share the one it started
    # with): DVC prints some sets, e.g. the files in "git add dvc.lock .gitignore".
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    roots = {}
    for kind in ("plain", "forked"):
        root = tmp_path / kind / "repo"  # and its own ../store
        root.mkdir(parents=True)
        subprocess.run(["git", "init", "-q", str(root)], check=True)
        (root / "a.txt").write_text("x\n")
        roots[kind] = root
    run = {"plain": _plain, "forked": lambda root, args, env: dvcrun.run(root, args, env, timeout=120)}
    steps = [["init", "-q"], None, ["repro", "copy"], ["status", "--json"], ["nonsense"],
             ["remote", "add", "--default", "r", "../store"], ["push", "copy"], ["status", "--cloud", "--json", "copy"]]
    answers: dict[str, list[tuple[int, str, str]]] = {"plain": [], "forked": []}
    for kind, root in roots.items():
        for args in steps:
            if args is None:
                (root / "dvc.yaml").write_text(STAGES)
                continue
            proc = run[kind](root, args, _env())
            assert proc.args == [sys.executable, "-m", "dvc", *args]
            answers[kind].append((proc.returncode, proc.stdout, proc.stderr))
    assert answers["forked"] == answers["plain"]
    codes = [a[0] for a in answers["forked"]]
    assert codes == [0, 0, 0, 254, 0, 0, 0] and "Running stage 'copy'" in answers["forked"][1][1]
    assert json.loads(answers["forked"][2][1]) == {"slow": ["always changed"]}
    assert dvcrun._server is not None  # the forked side ran in the warm interpreter
    assert (roots["forked"] / "dvc.lock").read_text() == (roots["plain"] / "dvc.lock").read_text()


def test_each_command_has_its_own_folder_and_environment(tmp_path: Path) -> None:
    roots = [tmp_path / "one", tmp_path / "two"]
    for i, root in enumerate(roots):
        root.mkdir()
        subprocess.run(["git", "init", "-q", str(root)], check=True)
        (root / "a.txt").write_text(f"{i}\n")
        assert dvcrun.run(root, ["init", "-q"], _env()).returncode == 0
        (root / "dvc.yaml").write_text(STAGES)
    pid = dvcrun._server.proc.pid
    for i, root in enumerate(roots):
        proc = dvcrun.run(root, ["repro", "copy"], _env(MARK=f"mark{i}"))
        assert proc.returncode == 0, proc.stderr
    assert [(r / "b.txt").read_text() for r in roots] == ["mark00\n", "mark11\n"]
    # A variable the caller leaves out is gone, though the warm interpreter started with it.
    env = _env()
    env.pop("MARK", None)
    (roots[0] / "a.txt").write_text("again\n")
    assert dvcrun.run(roots[0], ["repro", "copy"], env).returncode == 0
    assert (roots[0] / "b.txt").read_text() == "-again\n"
    assert dvcrun._server.proc.pid == pid  # one warm interpreter for all of them


def test_a_command_past_its_timeout_is_killed_and_the_next_one_runs(repo: Path) -> None:
    assert dvcrun.run(repo, ["init", "-q"], _env()).returncode == 0
    (repo / "dvc.yaml").write_text(STAGES)
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as info:
        dvcrun.run(repo, ["repro", "slow"], _env(), timeout=2)
    assert time.monotonic() - start < 10 and "Running stage 'slow'" in info.value.output
    proc = dvcrun.run(repo, ["repro", "copy"], _env())
    assert proc.returncode == 0 and (repo / "b.txt").is_file() and not dvcrun._broken


def test_without_a_warm_interpreter_commands_run_the_plain_way(repo: Path, monkeypatch) -> None:
    monkeypatch.setenv(dvcrun.FORK_ENV, "0")
    assert dvcrun.run(repo, ["init", "-q"], _env()).returncode == 0
    assert dvcrun._server is None and (repo / ".dvc").is_dir()
    monkeypatch.delenv(dvcrun.FORK_ENV)
    assert dvcrun.run(repo, ["status"], _env()).returncode == 0 and dvcrun._server is not None
    # The warm interpreter dies: the next command still runs, the plain way.
    dvcrun._server.kill()
    proc = dvcrun.run(repo, ["status", "--json"], _env())
    assert proc.returncode == 0 and json.loads(proc.stdout) == {}
    with pytest.raises(FileNotFoundError):  # a missing folder fails as subprocess.run fails
        dvcrun.run(repo / "missing", ["status"], _env())


_KILLED = r"""
import os, signal, sys
from llmops.integrations import dvcrun
env = dict(os.environ, DVC_NO_ANALYTICS="1")
assert dvcrun.run(sys.argv[1], ["init", "-q"], env).returncode == 0
print(dvcrun._server.proc.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_llmops_leaves_no_warm_interpreter_behind(repo: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _KILLED, str(repo)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL and (repo / ".dvc").is_dir()
    server = int(proc.stdout.strip())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and Path(f"/proc/{server}").exists():
        state = Path(f"/proc/{server}/stat").read_text().split()[2] if Path(f"/proc/{server}/stat").exists() else "X"
        if state == "Z":  # exited; its parent (killed) left it to init
            break
        time.sleep(0.05)
    stat = Path(f"/proc/{server}/stat")
    assert not stat.exists() or stat.read_text().split()[2] == "Z"
