"""Secrets planted in every place one can be configured reach no output and no file.

One real apply of a small project whose llmops.yaml holds a monitor store URL with the
PostgreSQL cluster's real password and a webhook URL whose path is its secret, run with
tokens in the environment (GitHub, MLflow, AWS, a custom API key). Every command a user or
a workflow runs is captured (validate, plan in all its forms, the saved plan, apply, show,
lock --check, an error against an unreachable tracking server with a password in its URL),
and every output and every file the project holds afterwards is searched for every secret.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from conftest import Project

# The CLI calls here start model servers that outlive the command: each runs in a fresh
# interpreter, as a user's would (tests/conftest.py `Project.run`).
CLI_SUBPROCESS = True

pytestmark = pytest.mark.slow

WEBHOOK_SECRET = "T00000/B00000/WebhookPathSecret42"
ENV_SECRETS = {
    "GITHUB_TOKEN": "ghp_PlantedGitHubToken0123456789abcd",
    "LLMOPS_GITHUB_TOKEN": "ghs_PlantedLlmopsToken0123456789ab",
    "MLFLOW_TRACKING_PASSWORD": "PlantedMlflowPassword77",
    "MLFLOW_TRACKING_TOKEN": "PlantedMlflowToken88",
    "AWS_SECRET_ACCESS_KEY": "PlantedAwsSecretKey/99+abc",
    "SERVE_TOKEN": "PlantedServeBearer1234",  # the deployment's auth token, named by auth_token_env
}
TRACKING_PASSWORD = "PlantedTrackingUrlPassword55"

CONFIG = """\
version: 1
project: secrets
settings:
  dvc_remote: dvc-store
datasets:
  tickets:
    source: data/tickets.jsonl
    prepare:
      - split: {{eval_fraction: 0.1, seed: 13}}
prompts:
  support: {{template: prompts/support.j2, variables: [question], response_field: answer}}
base_models:
  tiny:
    build: {{architecture: llama, hidden_size: 32, layers: 1, heads: 2, intermediate_size: 64,
             vocab_size: 384, max_position_embeddings: 256, tokenizer_from: tickets, seed: 13}}
finetunes:
  lora:
    base_model: tiny
    dataset: tickets
    prompt: support
    adapter: {{type: lora, r: 4, alpha: 8}}
    training: {{max_steps: 2, batch_size: 8, max_seq_length: 64, seed: 13}}
deployments:
  prod:
    model: lora
    serve: {{port: {port}, auth_token_env: SERVE_TOKEN}}
monitors:
  prod:
    store: "{store}"
    webhook: "http://127.0.0.1:9/services/{webhook}"
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and ".git" not in p.parts]


def test_planted_secrets_reach_no_output_and_no_file(pg_cluster, tmp_path: Path) -> None:
    store = pg_cluster.requests_uri
    secrets = {"store password": pg_cluster.password, "webhook": WEBHOOK_SECRET,
               "tracking URL password": TRACKING_PASSWORD, **ENV_SECRETS}
    project = Project(tmp_path / "proj", subprocess=CLI_SUBPROCESS)
    project.root.mkdir()
    project.copy_example()
    port = _free_port()
    project.write({"llmops.yaml": CONFIG.format(port=port, store=store, webhook=WEBHOOK_SECRET)})
    outputs: dict[str, str] = {}

    def run(*args: str, ok: bool = True, **kw) -> str:
        res = project.run(*args, env=ENV_SECRETS, **kw)
        out = res.stdout + res.stderr
        outputs["llmops " + " ".join(args)] = out
        if ok:
            assert res.returncode == 0, out
        return out

    try:
        run("validate")
        run("plan", "--out", "saved.plan")
        run("plan", "--json")
        run("plan", "--markdown")
        run("apply", "saved.plan", "--auto-approve")
        assert "No changes" in run("plan")
        run("show")
        run("show", "--json")
        run("lock", "--check")
        # A new password (rotation) changes nothing that is recorded, so nothing to do:
        project.write({"llmops.yaml": project.read("llmops.yaml").replace(pg_cluster.password, "RotatedPw0")})
        assert "No changes" in run("plan", "--refresh=false")
        # An unreachable tracking server with a password in its URL: a clear error, redacted.
        project.write({"llmops.yaml": project.read("llmops.yaml").replace(
            "settings:\n", f"settings:\n  tracking_uri: http://alice:{TRACKING_PASSWORD}@127.0.0.1:9/\n")})
        err = run("plan", ok=False, timeout=120)
        assert "127.0.0.1:9" in err and "Traceback" not in err, err
    finally:
        # The server must stop whatever the last llmops.yaml said (an unreachable tracking server
        # would refuse `down` its lease and leave the server running after the test).
        project.write({"llmops.yaml": CONFIG.format(port=port, store=store, webhook=WEBHOOK_SECRET)})
        down = project.run("down", "deployments.prod", env=ENV_SECRETS)
        assert down.returncode == 0, down.stdout + down.stderr

    leaks = [(what, where) for where, out in outputs.items() for what, secret in secrets.items() if secret in out]
    assert not leaks, leaks
    config = project.read("llmops.yaml")  # the one file a planted URL secret may be in: where it was written
    for path in _files(project.root):
        if path.name == "llmops.yaml":
            continue
        data = path.read_bytes()
        found = [what for what, secret in secrets.items() if secret.encode() in data]
        assert not found, (path.relative_to(project.root), found)
    assert WEBHOOK_SECRET in config
    # What gets committed holds no path of this machine either.
    for rel in ("llmops.lock", "dvc.yaml", "dvc.lock", ".dvc/config"):
        if project.path(rel).is_file():
            assert str(tmp_path) not in project.read(rel), rel


def test_a_dvc_remote_password_goes_to_the_local_config_only(project) -> None:
    """`.dvc/config` is committed: the remote's URL goes there, its user and password into
    `.dvc/config.local` (DVC's per-machine file), and no output shows the password."""
    password = "PlantedDvcRemotePassword66"
    project.copy_example()
    project.write({"llmops.yaml": f"""\
        version: 1
        project: dvcsecret
        settings:
          dvc_remote: "https://bob:{password}@127.0.0.1:{_free_port()}/store"
        datasets:
          tickets: {{source: data/tickets.jsonl}}
        """})
    res = project.run("apply", "--auto-approve", timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode == 1 and "127.0.0.1" in out, out  # nothing listens there
    assert password not in out
    committed = project.read(".dvc/config")
    assert password not in committed and "bob" not in committed and "https://127.0.0.1:" in committed
    local = project.read(".dvc/config.local")
    assert f"password = {password}" in local and "user = bob" in local and "auth = basic" in local
    for path in _files(project.root):
        if path.name not in ("llmops.yaml", "config.local"):
            assert password.encode() not in path.read_bytes(), path
