"""Restore vs rebuild: the example project applied in checkout A, then in a fresh clone B.

Both checkouts share one tracking server (a real `mlflow server` on 127.0.0.1 with proxied
artifacts, SQLite behind it here) and one DVC remote folder. A's apply builds everything
(prepare data, build the base model, train, evaluate, promote, serve); B's apply restores
(DVC checkout/pull, rebuild-and-verify of the tiny base, adapter fetched from MLflow) and
serves. Prints both wall times side by side and what B trained and registered (nothing).

    .venv/bin/python bench/restore_vs_rebuild.py
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
       "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.invalid",
       "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.invalid"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cwd: Path, *args: str) -> float:
    started = time.perf_counter()
    proc = subprocess.run(list(args), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed in {cwd}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def llmops(cwd: Path, *args: str) -> float:
    return run(cwd, sys.executable, "-m", "llmops", *args)


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
         "--artifacts-destination", str(folder / "artifacts"), "--serve-artifacts", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=log, env=ENV, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("mlflow server did not start:\n" + (folder / "server.log").read_text()[-2000:])


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="llmops-restore-bench-"))
    server, url = start_server(tmp)
    a, b = tmp / "a", tmp / "b"
    try:
        a.mkdir()
        for part in ("data", "prompts"):
            shutil.copytree(REPO / "example-project" / part, a / part)
        config = (REPO / "example-project" / "llmops.yaml").read_text()
        config = config.replace("settings: {}", f"settings: {{tracking_uri: {json.dumps(url)}, dvc_remote: ../remote}}")
        config = config.replace("serve: {port: 8765}", f"serve: {{port: {free_port()}}}")
        (a / "llmops.yaml").write_text(config)
        (a / ".gitignore").write_text(".llmops/\n")
        run(tmp, "git", "init", "-q", "--bare", "-b", "main", str(tmp / "origin.git"))
        run(a, "git", "init", "-q", "-b", "main")
        rebuild = llmops(a, "apply", "--auto-approve")
        llmops(a, "down", "support-prod")
        run(a, "git", "add", "-A")
        run(a, "git", "commit", "-q", "-m", "apply")
        run(a, "git", "push", "-q", str(tmp / "origin.git"), "main")
        run(tmp, "git", "clone", "-q", str(tmp / "origin.git"), str(b))

        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=url, registry_uri=url)
        exp = client.get_experiment_by_name("support-assistant")
        runs_before = len(client.search_runs([exp.experiment_id]))
        versions_before = len(client.search_model_versions("name = 'support-lora'"))
        restore = llmops(b, "apply", "--auto-approve")
        runs_after = len(client.search_runs([exp.experiment_id]))
        versions_after = len(client.search_model_versions("name = 'support-lora'"))
        llmops(b, "down", "support-prod")

        print(f"{'example-project apply':<40} {'seconds':>8}")
        print(f"{'rebuild (checkout A, empty stores)':<40} {rebuild:>8.1f}")
        print(f"{'restore (fresh clone B, shared stores)':<40} {restore:>8.1f}")
        print(f"{'restore / rebuild':<40} {restore / rebuild:>8.2f}")
        print(f"clone B trained {runs_after - runs_before} runs and registered "
              f"{versions_after - versions_before} versions")
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
