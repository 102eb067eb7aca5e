"""A real fine-tune trained in a container through the real CLI (`llmops apply`), and
`settings.docker` (interpreter in the image, extra bind mounts) reaching the Docker runner.

The engine is real (tests/dockerd.py); the image is the small locally imported base
image, running this machine's interpreter and venv bind-mounted read-only through
`settings.docker.mounts`. MLflow's SQLite database is written from inside the container.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from dockerd import ensure_base_image, tiny_project
from llmops.errors import ProviderError
from llmops.runners.select import get_runner, parse_mount

SCHEMA = Path(__file__).resolve().parents[1] / "llmops" / "schemas" / "llmops.schema.json"
NAME = "dock-lora"
ADDR = f"finetunes.{NAME}"


@pytest.fixture(scope="module")
def engine(docker_engine: str) -> str:
    return docker_engine


@pytest.fixture(scope="module")
def base_image(engine: str) -> str:
    return ensure_base_image(engine)


def config(host: str, image: str) -> dict:
    """A tiny project whose one fine-tune trains with runner: docker in `image`."""
    doc = tiny_project(host, "docker-flow", NAME)
    doc["finetunes"][NAME]["resources"] = {"runner": "docker", "image": image}
    return doc


def write_project(project, host: str, image: str) -> None:
    project.copy_example()
    project.write({"llmops.yaml": yaml.safe_dump(config(host, image), sort_keys=False)})


def job_containers(host: str) -> list:
    import docker

    client = docker.DockerClient(base_url=host)
    try:
        # DockerRunner names containers llmops-<job name>-<8 hex>; the job is finetune-NAME.
        return client.containers.list(all=True, filters={"name": f"llmops-finetune-{NAME}-"})
    finally:
        client.close()


@pytest.mark.docker
@pytest.mark.slow
def test_finetune_trains_in_a_container_through_the_cli(project, engine, base_image):
    write_project(project, engine, base_image)
    env = {"DOCKER_HOST": engine}
    res = project.run("apply", "--auto-approve", "--select", ADDR, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "training with DockerRunner" in res.stdout + res.stderr

    entry = project.locked()[ADDR]
    import docker

    client = docker.DockerClient(base_url=engine)
    try:
        image_id = client.images.get(base_image).id
    finally:
        client.close()
    assert entry["inputs"]["image_digest"].startswith("sha256:")
    assert entry["inputs"]["image_digest"] == image_id
    # The job was the container's first process: it ran there, not on the host.
    run_dir = project.path(entry["outputs"]["adapter"]["path"]).parents[1]
    start = json.loads((run_dir / "train.log").read_text().splitlines()[0])
    assert (start["event"], start["pid"]) == ("start", 1)

    # Written by the container into the project mount, as the calling user.
    weights = project.path(entry["outputs"]["adapter"]["path"]) / "adapter_model.safetensors"
    assert weights.is_file() and weights.stat().st_size > 0
    assert weights.stat().st_uid == os.getuid()

    # The job wrote its MLflow run into the project's SQLite database from inside the container.
    from llmops.integrations.mlflow import client as mlflow_client

    tracker = mlflow_client(project.root, {})
    run = tracker.get_run(entry["outputs"]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["llmops.address"] == ADDR
    version = tracker.get_model_version(NAME, str(entry["outputs"]["model_version"]))
    assert version.run_id == run.info.run_id

    assert job_containers(engine) == []
    again = project.run("plan", "--detailed-exitcode", env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "No changes." in again.stdout


@pytest.mark.docker
def test_missing_image_fails_clearly_and_writes_no_lock_entry(project, engine):
    image = "llmops-not-built-here:0"
    write_project(project, engine, image)
    res = project.run("apply", "--auto-approve", "--select", ADDR, env={"DOCKER_HOST": engine})
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert f"image {image} is not on the Docker engine" in out
    assert f"docker build -f templates/Dockerfile.train -t {image} ." in out
    lock = project.locked()
    assert "base_models.tiny" in lock  # the upstreams before it were applied and recorded
    assert ADDR not in lock
    assert job_containers(engine) == []


# -- settings.docker, without an engine ------------------------------------------------


def test_settings_docker_reach_the_docker_runner(tmp_path):
    from llmops.runners.docker import DockerRunner

    settings = {"docker_host": "tcp://127.0.0.1:1", "docker": {
        "python": "/opt/venv/bin/python",
        "mounts": ["cache/hf:/hf-cache:ro", f"{tmp_path}/shared:/shared", "~/models:/models:rw"]}}
    runner = get_runner(settings, {"resources": {"runner": "docker"}}, root=tmp_path)
    assert isinstance(runner, DockerRunner)
    assert runner.docker_host == "tcp://127.0.0.1:1"
    assert runner.python == "/opt/venv/bin/python"
    assert runner.extra_mounts == [
        (str((tmp_path / "cache" / "hf").resolve()), "/hf-cache", "ro"),
        (str((tmp_path / "shared").resolve()), "/shared", "rw"),
        (str((Path.home() / "models").resolve()), "/models", "rw"),
    ]
    plain = get_runner({"runner": "docker"}, {})
    assert isinstance(plain, DockerRunner) and (plain.python, plain.extra_mounts) == ("python", [])


@pytest.mark.parametrize("text", ["/only-host", "rel:relative/in/container", "/a:/b:rx", "/a:/b:ro:x", ":/b", ""])
def test_bad_mount_names_the_setting_and_the_form(text):
    with pytest.raises(ProviderError) as err:
        parse_mount(text, 2)
    assert err.value.message.startswith("llmops.yaml: settings.docker.mounts[2]")
    assert "HOST:CONTAINER" in err.value.message


def test_schema_accepts_settings_docker_and_rejects_bad_mounts():
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(json.loads(SCHEMA.read_text()))
    doc = {"version": 1, "project": "p"}
    good = {"python": "/usr/bin/python3", "mounts": ["~/.cache/huggingface:/hf-cache:ro", "data:/data"]}
    assert list(validator.iter_errors({**doc, "settings": {"docker": good}})) == []
    for bad in ({"mounts": ["/a:relative"]}, {"mounts": ["/a:/b:rx"]}, {"python": ""}, {"gpus_driver": "nvidia"}):
        errors = list(validator.iter_errors({**doc, "settings": {"docker": bad}}))
        assert errors and list(errors[0].absolute_path)[:2] == ["settings", "docker"], bad
