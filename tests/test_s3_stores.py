"""The real S3 paths (dvc-s3, and boto3 inside `mlflow server`) against moto's S3 server on
loopback. Each test names the endpoint one way llmops may pass it: the DVC remote option
`endpointurl`, or the AWS SDK's `AWS_ENDPOINT_URL` environment variable; credentials come
from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` in the environment of the process that
talks to S3 (the `dvc` command, the mlflow server), never of the test process."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from services import mlflow_server

pytestmark = pytest.mark.slow

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def aws_env(tmp: Path, **extra: str) -> dict[str, str]:
    """This environment without any AWS setting of the machine, plus test credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "MLFLOW_S3_ENDPOINT_URL"}
    # Empty config files (botocore refuses /dev/null): no profile or region of the machine counts.
    empty = tmp / "aws-config"
    empty.touch()
    env.update(AWS_CONFIG_FILE=str(empty), AWS_SHARED_CREDENTIALS_FILE=str(empty), **CREDENTIALS, **extra)
    return env


def new_bucket(endpoint: str) -> str:
    import boto3

    name = f"llmops-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **_client_credentials())
    s3.create_bucket(Bucket=name)
    return name


def list_keys(endpoint: str, bucket: str, prefix: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **_client_credentials())
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]


def _client_credentials() -> dict[str, str]:
    return {"aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}"
    return proc


def dvc(repo: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "dvc", *args], repo, env)


@pytest.mark.parametrize("endpoint_via", ["remote option endpointurl", "env AWS_ENDPOINT_URL"])
def test_dvc_push_and_pull_through_s3(tmp_path, s3_server, endpoint_via):
    bucket = new_bucket(s3_server)
    repo = tmp_path / "repo"
    repo.mkdir()
    env = aws_env(tmp_path, DVC_NO_ANALYTICS="1")
    if endpoint_via == "env AWS_ENDPOINT_URL":
        env["AWS_ENDPOINT_URL"] = s3_server
    run(["git", "init", "-q"], repo, env)
    dvc(repo, env, "init", "-q")
    dvc(repo, env, "remote", "add", "-d", "store", f"s3://{bucket}/path")
    if endpoint_via == "remote option endpointurl":
        dvc(repo, env, "remote", "modify", "store", "endpointurl", s3_server)
    data = repo / "data.jsonl"
    data.write_text("".join(f'{{"id": {i}, "text": "ticket {i}"}}\n' for i in range(100)))
    digest = md5(data)
    dvc(repo, env, "add", "-q", "data.jsonl")
    assert yaml.safe_load((repo / "data.jsonl.dvc").read_text())["outs"][0]["md5"] == digest

    dvc(repo, env, "push", "-q")
    assert list_keys(s3_server, bucket, "path/") == [f"path/files/md5/{digest[:2]}/{digest[2:]}"]

    shutil.rmtree(repo / ".dvc" / "cache")
    data.unlink()
    dvc(repo, env, "pull", "-q")
    assert md5(data) == digest


@pytest.mark.parametrize("endpoint_var", ["MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"])
def test_mlflow_server_proxies_artifacts_to_s3(tmp_path, s3_server, endpoint_var):
    from mlflow.tracking import MlflowClient

    bucket = new_bucket(s3_server)
    server_env = aws_env(tmp_path, **{endpoint_var: s3_server})
    with mlflow_server(f"sqlite:///{tmp_path}/mlflow.db", f"s3://{bucket}/mlflow",
                       log_file=tmp_path / "server.log", env=server_env) as url:
        client = MlflowClient(tracking_uri=url)  # this process has no AWS settings: all goes via the server
        run_id = client.create_run(client.create_experiment("s3-artifacts")).info.run_id
        notes = tmp_path / "notes.txt"
        notes.write_text("adapter card\n" * 50)
        client.log_artifact(run_id, str(notes), artifact_path="card")
        assert client.get_run(run_id).info.artifact_uri.startswith("mlflow-artifacts:")

        assert [a.path for a in client.list_artifacts(run_id, "card")] == ["card/notes.txt"]
        back = Path(client.download_artifacts(run_id, "card/notes.txt", str(tmp_path / "back")))
        assert back.read_text() == notes.read_text()
    keys = list_keys(s3_server, bucket, "mlflow/")
    assert len(keys) == 1 and keys[0].endswith(f"/{run_id}/artifacts/card/notes.txt"), keys
