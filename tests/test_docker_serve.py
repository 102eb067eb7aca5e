"""A deployment served in a container (`serve: {runner: docker}`) through the real CLI.

The engine is real (tests/dockerd.py); the image is the small locally imported base image
running this machine's interpreter and venv, bind-mounted read-only through
`settings.docker.mounts`. The fine-tune trains locally; only the server runs in a container.
Requests go over real HTTP from the host to the port the engine publishes.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from dockerd import ensure_base_image, python_mounts, tiny_project
from llmops.serve.endpoint import free_port

# The CLI calls here start model servers that outlive the command: each runs in a fresh
# interpreter, as a user's would (tests/conftest.py `Project.run`).
CLI_SUBPROCESS = True

NAME = "dock-prod"
ADDR = f"deployments.{NAME}"
TOKEN_ENV = "LLMOPS_TEST_SERVE_TOKEN"
TOKEN = "s3cret-token-for-the-container-only"


@pytest.fixture(scope="module")
def engine(docker_engine: str) -> str:
    return docker_engine


@pytest.fixture(scope="module")
def base_image(engine: str) -> str:
    return ensure_base_image(engine)


def config(host: str, serve: dict, gates: bool = True) -> dict:
    """A tiny project: a local fine-tune, a perplexity eval, and a deployment that serves it."""
    doc = tiny_project(host, "docker-serve", "lora")
    doc["deployments"] = {NAME: {"model": "lora", "alias": "production", "serve": serve}}
    if gates:
        doc["evals"] = {"quality": {"model": "lora", "dataset": "tickets", "metrics": ["perplexity"], "limit": 4}}
        doc["deployments"][NAME]["gates"] = ["quality"]
    return doc


def write_project(project, doc: dict) -> None:
    project.copy_example()
    project.write({"llmops.yaml": yaml.safe_dump(doc, sort_keys=False)})


def serve_containers(host: str) -> list:
    import docker

    client = docker.DockerClient(base_url=host)
    try:
        return client.containers.list(all=True, filters={"label": f"llmops.job=serve-{NAME}"})
    finally:
        client.close()


def post_json(url: str, body: dict, token: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.mark.docker
@pytest.mark.slow
def test_apply_serves_in_a_container_and_down_removes_it(project, engine, base_image):
    port = free_port()
    serve = {"runner": "docker", "image": base_image, "port": port, "auth_token_env": TOKEN_ENV}
    write_project(project, config(engine, serve))
    env = {"DOCKER_HOST": engine, TOKEN_ENV: TOKEN}
    try:
        res = project.run("apply", "--auto-approve", env=env)
        assert res.returncode == 0, res.stdout + res.stderr
        out = project.locked()[ADDR]["outputs"]
        url = f"http://127.0.0.1:{port}"
        assert out["endpoint"] == url and out["served_model"] == "lora"
        import docker

        client = docker.DockerClient(base_url=engine)
        try:
            assert out["image_digest"] == client.images.get(base_image).id
        finally:
            client.close()
        (container,) = serve_containers(engine)
        assert container.status == "running" and container.image.id == out["image_digest"]
        state = json.loads(project.read(f".llmops/serve/{NAME}.json"))
        assert state["container"] == container.id and state["url"] == url

        # The published port answers from the host; the token reached the container's server.
        prompt = {"model": "lora", "prompt": "### Question:\nWhere is my parcel?\n### Answer:\n", "max_tokens": 4}
        assert post_json(f"{url}/v1/completions", prompt, None)[0] == 401
        status, body = post_json(f"{url}/v1/completions", prompt, TOKEN)
        assert status == 200, body
        assert body["model"] == "lora" and body["usage"]["completion_tokens"] > 0
        for text in (project.read("llmops.lock"), json.dumps(state), res.stdout + res.stderr):
            assert TOKEN not in text

        again = project.run("plan", "--detailed-exitcode", env=env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "No changes." in again.stdout

        # An image the engine lacks fails clearly and leaves the running server alone.
        write_project(project, config(engine, {**serve, "image": "llmops-not-built-here:0"}))
        bad = project.run("apply", "--auto-approve", env=env)
        assert bad.returncode == 1, bad.stdout + bad.stderr
        assert "image llmops-not-built-here:0 is not on the Docker engine" in bad.stdout + bad.stderr
        assert "docker build -f templates/Dockerfile.serve -t llmops-not-built-here:0 ." in bad.stdout + bad.stderr
        assert [c.id for c in serve_containers(engine)] == [container.id]
        assert post_json(f"{url}/v1/completions", prompt, TOKEN)[0] == 200
        assert project.locked()[ADDR]["outputs"] == out
        write_project(project, config(engine, serve))
    finally:
        down = project.run("down", NAME, env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "Server stopped." in down.stdout
    assert serve_containers(engine) == []
    assert not project.path(f".llmops/serve/{NAME}.json").exists()
    assert "serving lora on http://0.0.0.0:" in project.read(f".llmops/serve/{NAME}.log")  # its output is kept
    # `llmops down` drops the endpoint from the lock; llmops.yaml still asks for a server, so the
    # next plan says apply starts it again.
    assert "endpoint" not in project.locked()[ADDR]["outputs"]
    after = project.run("plan", "--detailed-exitcode", env=env)
    assert after.returncode == 2, after.stdout + after.stderr
    assert "serve: no server is running (stopped by `llmops down`); apply starts it" in after.stdout


def test_docker_serving_without_an_image_fails_clearly(project):
    # Needs no engine: `llmops validate` (and so apply, before any work) names the missing image.
    write_project(project, config("unix:///nonexistent/docker.sock", {"runner": "docker", "port": free_port()},
                                  gates=False))
    for command in (("validate",), ("apply", "--auto-approve")):
        res = project.run(*command, subprocess=False)  # no server starts: no interpreter of its own
        out = res.stdout + res.stderr
        assert res.returncode == 1, out
        assert f"deployments.{NAME}.serve: serving with runner docker needs serve.image" in out
        assert "templates/Dockerfile.serve" in out
    assert not project.path("llmops.lock").exists()
    assert not project.path(f".llmops/serve/{NAME}.json").exists()


@pytest.mark.docker
def test_a_server_that_exits_while_starting_fails_with_its_output(tmp_path, engine, base_image):
    from llmops.runners.docker import DockerRunner
    from llmops.serve.container import start_container_server, wait_container_healthy
    from llmops.serve.control import server_status
    from llmops.serve.endpoint import ServeError

    runner = DockerRunner(docker_host=engine, python=sys.executable, extra_mounts=python_mounts())
    state_dir = tmp_path / ".llmops" / "serve"
    server = start_container_server(state_dir, NAME, runner, base_image, tmp_path / "no-model",
                                    workdir=tmp_path, model_name="lora")
    assert server_status(server.state_file).url == server.url  # the state file names the container
    with pytest.raises(ServeError) as err:
        wait_container_healthy(server, runner, timeout=120)
    assert f"container {server.container[:12]} (image {base_image}) exited while starting" in err.value.message
    assert f"cannot load the model in {tmp_path / 'no-model'}" in err.value.message  # the container's own output
    assert serve_containers(engine) == []
    assert not Path(server.state_file).exists() and server_status(server.state_file).running is False
    assert "cannot load the model" in Path(server.log_path).read_text()


@pytest.mark.docker
def test_serve_gpus_reach_the_engine_as_a_device_request(tmp_path, engine, base_image):
    from llmops.errors import ProviderError
    from llmops.runners.docker import DockerRunner
    from llmops.serve.container import start_container_server

    runner = DockerRunner(docker_host=engine, python=sys.executable, extra_mounts=python_mounts())
    if "nvidia" in (runner.client().info().get("Runtimes") or {}):
        pytest.skip("this engine has the NVIDIA runtime: the GPU server would start")
    state_dir = tmp_path / ".llmops" / "serve"
    with pytest.raises(ProviderError) as err:
        start_container_server(state_dir, NAME, runner, base_image, tmp_path / "model", workdir=tmp_path,
                               model_name="lora", gpus=1)
    # The engine refused the GPU device request itself: the request reached it.
    assert err.value.message.startswith("this Docker engine has no GPU support: ")
    assert f"Job serve-{NAME} asks for 1 GPU(s)" in err.value.message and "serve.gpus: 0" in err.value.message
    assert serve_containers(engine) == []
    assert not (state_dir / f"{NAME}.json").exists()
