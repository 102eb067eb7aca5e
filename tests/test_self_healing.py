"""State that heals (issue #16): a deleted MLflow database or DVC cache is drift that plan names
and apply repairs, a killed build leaves nothing behind for good, and an unreachable DVC remote
fails in seconds naming its host. Real DVC, real MLflow on SQLite, real S3 (moto) on loopback."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import REPO, Project, dvc_cli

FULL = """\
version: 1
project: heal
datasets:
  tickets: {source: data/tickets.jsonl, prepare: [{split: {eval_fraction: 0.1, seed: 13}}]}
prompts:
  support: {template: prompts/support.j2, variables: [question]}
base_models:
  tiny: {build: {architecture: llama, hidden_size: 32, layers: 1, heads: 2, intermediate_size: 64, tokenizer_from: tickets}}
finetunes:
  heal-lora: {base_model: tiny, dataset: tickets, prompt: support, training: {max_steps: 2, batch_size: 4, max_seq_length: 64}}
evals:
  quality: {model: heal-lora, dataset: tickets, metrics: [perplexity], thresholds: {perplexity: "<= 1000000"}, decoding: {max_new_tokens: 1}, limit: 2}
deployments:
  prod: {model: heal-lora, alias: production, gates: [quality]}
"""

DATA_ONLY = """\
version: 1
project: heal-data
settings: {settings}
datasets:
  tickets: {{source: data/tickets.jsonl, prepare: [{{split: {{eval_fraction: 0.2, seed: 3}}}}]}}
"""
ROWS = "".join(f'{{"question": "how do I fix thing {i}?", "answer": "turn it off and on {i}"}}\n' for i in range(30))
TRAIN = ".llmops/data/tickets/train.jsonl"


def ok(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 0, res.stdout + res.stderr
    assert "please report it" not in res.stdout + res.stderr, res.stdout + res.stderr  # an llmops bug
    return res.stdout


def converged(project: Project, env: dict[str, str] | None = None) -> None:
    res = project.run("plan", "--detailed-exitcode", env=env)
    assert res.returncode == 0 and "No changes." in res.stdout, res.stdout + res.stderr


def dvc_status(project: Project, *args: str, env: dict[str, str] | None = None) -> str:
    proc = dvc_cli(project.root, "status", *args, env=env)
    return proc.stdout + proc.stderr


def change_lines(plan_text: str, address: str) -> str:
    """The block plan prints for `address`: its action line and the reasons under it."""
    block = re.search(rf"^ *\S* +{re.escape(address)}  +\S.*\n(?:        .*\n)*", plan_text, re.M)
    assert block, f"{address} not in the plan:\n{plan_text}"
    return block.group(0)


def data_project(project: Project, settings: str = "{}") -> Project:
    return project.write({"llmops.yaml": DATA_ONLY.format(settings=settings), "data/tickets.jsonl": ROWS})


# --- a deleted MLflow database ------------------------------------------------------------


@pytest.mark.slow
def test_a_deleted_mlflow_database_is_drift_that_apply_rebuilds(project: Project) -> None:
    project.copy_example().write({"llmops.yaml": FULL})
    ok(project.run("apply", "--auto-approve"))
    before = project.locked()
    run_id = before["finetunes.heal-lora"]["outputs"]["run_id"]
    eval_run = before["evals.quality"]["outputs"]["run_id"]
    db = project.path(".llmops/mlflow.db")
    store = f"sqlite:///{db.resolve()}"

    db.unlink()  # the default tracking store: runs, registered models and prompts are gone
    plan = ok(project.run("plan"))
    finetune = change_lines(plan, "finetunes.heal-lora")
    assert "replace" in finetune and f"MLflow run {run_id} is not in the tracking store {store}" in finetune, plan
    evals = change_lines(plan, "evals.quality")
    assert "replace" in evals and f"eval run {eval_run} is not in the tracking store {store}" in evals, plan
    prompt = change_lines(plan, "prompts.support")
    assert "update" in prompt and f"prompt support v1 is not in the prompt registry {store}" in prompt, plan
    deployment = change_lines(plan, "deployments.prod")
    assert "update" in deployment and "upstream finetunes.heal-lora will be replaced" in deployment, plan
    # Nothing the database did not hold is rebuilt.
    assert "Plan: 0 to create, 2 to replace, 2 to update, 0 to delete." in plan, plan
    assert "datasets.tickets" not in plan and "base_models.tiny" not in plan

    out = ok(project.run("apply", "--auto-approve"))
    assert "Apply complete: 4 applied." in out, out
    after = project.locked()
    assert after["finetunes.heal-lora"]["outputs"]["run_id"] != run_id
    assert after["deployments.prod"]["outputs"]["version"] == after["finetunes.heal-lora"]["outputs"]["model_version"]
    converged(project)


# --- a deleted DVC cache ------------------------------------------------------------------


def test_a_deleted_dvc_cache_is_cached_again_from_the_copies_here_or_rebuilt(project: Project) -> None:
    data_project(project)
    ok(project.run("apply", "--auto-approve"))
    train_md5 = project.locked()["datasets.tickets"]["outputs"]["train"]["md5"]

    shutil.rmtree(project.path(".dvc/cache"))
    assert "not in cache" in dvc_status(project)
    plan = ok(project.run("plan"))
    block = change_lines(plan, "datasets.tickets")
    assert "restore" in block and "drift: the DVC cache .dvc/cache lacks outputs: " in block, plan
    assert TRAIN in block and "the copies here match the lock: they will be cached again, not rebuilt" in block
    out = ok(project.run("apply", "--auto-approve"))
    assert "restored from the copies here, back into the DVC cache (md5 verified)" in out, out
    assert "up to date" in dvc_status(project)
    converged(project)

    # Cache and output both gone, no remote: nothing holds the locked bytes, so a rebuild.
    shutil.rmtree(project.path(".dvc/cache"))
    project.path(TRAIN).unlink()
    block = change_lines(ok(project.run("plan")), "datasets.tickets")
    assert "replace" in block
    assert f"outputs missing: {TRAIN}; neither the DVC cache nor a remote holds the locked content" in block
    ok(project.run("apply", "--auto-approve"))
    assert project.locked()["datasets.tickets"]["outputs"]["train"]["md5"] == train_md5  # the stage is deterministic
    assert "up to date" in dvc_status(project)
    converged(project)


def aws_env(tmp: Path, endpoint: str) -> dict[str, str]:
    """Test credentials, an S3 endpoint and no AWS setting of this machine."""
    empty = tmp / "aws-config"
    empty.touch()
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": str(empty), "AWS_SHARED_CREDENTIALS_FILE": str(empty), "AWS_ENDPOINT_URL": endpoint}


def test_a_deleted_dvc_cache_is_pulled_from_the_remote_that_holds_it(project: Project, tmp_path, s3_server) -> None:
    import boto3

    bucket = f"heal-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=bucket)
    env = aws_env(tmp_path, s3_server)
    data_project(project, f'{{dvc_remote: "s3://{bucket}/dvc"}}')
    ok(project.run("apply", "--auto-approve", env=env))

    shutil.rmtree(project.path(".dvc/cache"))
    project.path(TRAIN).unlink()
    block = change_lines(ok(project.run("plan", env=env)), "datasets.tickets")
    assert "restore" in block and f"outputs missing: {TRAIN}" in block
    assert f"the DVC remote s3://{bucket}/dvc (endpoint {s3_server}) holds the locked content: will be " \
           "checked out, not rebuilt" in block
    out = ok(project.run("apply", "--auto-approve", env=env))
    assert f"restored from the DVC remote s3://{bucket}/dvc" in out, out
    assert "up to date" in dvc_status(project, env=env)
    converged(project, env=env)


# --- unreachable DVC remotes fail in seconds ----------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def blackhole():
    """A loopback port that drops connection attempts (its listen backlog is full): a connect
    hangs as it does to a firewalled host."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(8):
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(c)
    yield port
    for c in fillers:
        c.close()
    server.close()


def test_an_unreachable_s3_remote_fails_at_once_naming_its_endpoint(project: Project, tmp_path) -> None:
    port = closed_port()
    env = aws_env(tmp_path, f"http://127.0.0.1:{port}")
    data_project(project, '{dvc_remote: "s3://nobucket/dvc"}')
    res = project.run("apply", "--auto-approve", env=env, timeout=60)
    assert res.returncode == 1, res.stdout + res.stderr
    assert (f"datasets.tickets: cannot push the prepared data: the DVC remote s3://nobucket/dvc (endpoint "
            f"http://127.0.0.1:{port}) failed `dvc status`") in res.stdout, res.stdout + res.stderr
    assert "please report it" not in res.stdout + res.stderr and "dvc.org/support" not in res.stdout
    # Short per-request timeouts for this machine, outside the committed config.
    local = project.read(".dvc/config.local")
    assert "connect_timeout = 5" in local and "read_timeout = 10" in local
    assert "timeout" not in project.read(".dvc/config")


def test_a_remote_that_never_answers_is_given_up_at_the_deadline_without_its_password(project: Project,
                                                                                    blackhole: int) -> None:
    data_project(project, f'{{dvc_remote: "https://alice:s3cret@127.0.0.1:{blackhole}/dvc"}}')
    # A short deadline still proves the give-up: nothing ever answers there.
    res = project.run("apply", "--auto-approve", env={"LLMOPS_DVC_REMOTE_TIMEOUT": "1"}, timeout=60)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "s3cret" not in res.stdout + res.stderr  # its user and password live in .dvc/config.local
    assert (f"the DVC remote https://127.0.0.1:{blackhole}/dvc did not answer `dvc status` within 1s; check "
            "that it is reachable (network, endpoint, credentials) or give it longer with "
            "LLMOPS_DVC_REMOTE_TIMEOUT=SECONDS.") in res.stdout, res.stdout + res.stderr
    assert "s3cret" not in res.stdout + res.stderr


# --- builds that were killed --------------------------------------------------------------

# A build as a process that dies in the middle: it holds the build lock and has written part
# of its temp folder when SIGKILL arrives (or, with `hold`, it stays alive in the middle).
_BUILDER = """\
import os, signal, sys, time
from pathlib import Path
from llmops.fsutil import atomic_folder
from llmops.train.build import build_lock
out = Path(sys.argv[1])
with build_lock(out), atomic_folder(out) as tmp:
    (tmp / "model.safetensors").write_bytes(b"half a model")
    print(tmp.name, flush=True)
    if sys.argv[2] == "hold":
        time.sleep(600)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def start_build(out_dir: Path, mode: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-c", _BUILDER, str(out_dir), mode], stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def test_a_killed_builds_temp_folder_goes_at_the_next_build_and_a_running_ones_stays(project: Project) -> None:
    from llmops.train.build import remove_stale_builds

    project.write({"llmops.yaml": DATA_ONLY.format(settings="{}") + "base_models:\n  tiny: {build: {architecture: "
                   "llama, hidden_size: 32, layers: 1, heads: 2, intermediate_size: 64, tokenizer_from: tickets}}\n",
                   "data/tickets.jsonl": ROWS})
    models = project.path(".llmops/models")
    killed, killed_tmp = start_build(models / "tiny", "kill")
    assert killed.wait(timeout=60) == -signal.SIGKILL and (models / killed_tmp).is_dir()
    running, running_tmp = start_build(models / "other", "hold")  # say, another checkout's build
    try:
        out = ok(project.run("apply", "--auto-approve"))
        assert "base_models.tiny: create complete" in out
        assert not (models / killed_tmp).exists()  # gone: its build died
        assert (models / running_tmp).is_dir()  # kept: its build is alive and holds the lock
        assert remove_stale_builds(models) == [] and (models / running_tmp).is_dir()
    finally:
        running.kill()
        running.wait(timeout=60)
    assert remove_stale_builds(models) == [models / running_tmp] and not (models / running_tmp).exists()
    assert sorted(p.name for p in models.iterdir() if ".tmp-" in p.name) == []
    converged(project)
