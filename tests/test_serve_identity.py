"""Only the server llmops started counts as up (issue #16, false success).

Real `python -m llmops.serve` processes with a tiny random Llama (built locally), real
sockets and real HTTP on 127.0.0.1: a foreign server on the port, an orphaned llmops
server, our own server dying while it starts, and the environment the server inherits.
One test drives the real CLI: an orphan left after `.llmops/serve/` was deleted is named by
`plan` and refused by `apply`, which converges once it is stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from llmops.serve.control import server_status, stop_server
from llmops.serve.endpoint import ServeError, free_port
from llmops.serve.process import start_server, wait_healthy

# The CLI calls here start model servers that outlive the command: each runs in a fresh
# interpreter, as a user's would (tests/conftest.py `Project.run`).
CLI_SUBPROCESS = True

MODEL = "tiny-support"
TEXTS = ["Where is my order? Orders ship within two days.", "Can I get a refund? Within thirty days."] * 4
BUILD = {"hidden_size": 16, "layers": 1, "heads": 2, "intermediate_size": 32, "vocab_size": 300,
         "max_position_embeddings": 64, "seed": 0}
TOKEN_ENV = "LLMOPS_TEST_IDENTITY_TOKEN"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llmops.train.build import build_tiny_model

    out = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_model(BUILD, TEXTS, out)
    return out


class _OkHandler(BaseHTTPRequestHandler):
    """Answers every GET with `server.answer`: by default a health check that says nothing
    about who it is."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = json.dumps(getattr(self.server, "answer", {"status": "ok"})).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class Foreign:
    """A plain http.server on 127.0.0.1:PORT answering /health with {"status": "ok"}."""

    def __init__(self, port: int, answer: dict | None = None) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", port), _OkHandler)
        if answer is not None:
            self.server.answer = answer  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def foreign() -> Iterator[list[Foreign]]:
    started: list[Foreign] = []
    yield started
    for server in started:
        server.close()


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.parametrize("answer", [
    {"status": "ok"},
    {"status": "ok", "model": "fake", "pid": 0},  # `kill 0` would hit our own process group
], ids=["plain", "pid-0"])
def test_a_foreign_server_on_the_port_fails_the_start_at_once(model_dir, tmp_path, foreign, answer) -> None:
    port = free_port()
    foreign.append(Foreign(port, answer))
    with pytest.raises(ServeError) as err:
        start_server(tmp_path, "prod", model_dir, model_name=MODEL, port=port)
    message = err.value.message
    assert f"server 'prod' cannot start on 127.0.0.1:{port}" in message
    assert f"a program that is not an llmops server answers HTTP on port {port}" in message
    assert f"`ss -ltnp 'sport = :{port}'`" in message and "choose another serve.port" in message
    assert not (tmp_path / "prod.json").exists() and not (tmp_path / "prod.log").exists()  # nothing started


def test_a_container_on_a_taken_port_fails_before_the_engine_is_asked(tmp_path, foreign) -> None:
    from llmops.runners.docker import DockerRunner
    from llmops.serve.container import start_container_server

    port = free_port()
    foreign.append(Foreign(port))
    runner = DockerRunner(docker_host="unix:///nonexistent/docker.sock")  # never reached
    with pytest.raises(ServeError, match=f"server 'prod' cannot start on 127.0.0.1:{port}: a program that is not"):
        start_container_server(tmp_path, "prod", runner, "llmops-serve:0", tmp_path / "model", workdir=tmp_path,
                               model_name=MODEL, port=port)
    assert not (tmp_path / "prod.json").exists()


def test_a_foreign_answer_is_not_our_server_which_fails_with_its_log(model_dir, tmp_path, foreign) -> None:
    # The port is free when we check, and taken before our server (still loading) binds it:
    # the foreign "ok" must neither make it healthy nor hide that it died.
    handle = start_server(tmp_path, "prod", model_dir, model_name=MODEL)
    try:
        foreign.append(Foreign(handle.port))
        status = server_status(handle.state_file, probe=True)
        assert (status.running, status.healthy) == (True, False)
        with pytest.raises(ServeError) as err:
            wait_healthy(handle.url, timeout=120, handle=handle)
        assert f"the model server (pid {handle.pid}) exited while starting" in err.value.message
        assert "Address already in use" in err.value.message  # its log's last lines
        status = server_status(handle.state_file, probe=True)  # ours died; the foreign one still answers
        assert (status.running, status.healthy, status.port) == (False, False, handle.port)
    finally:
        _kill_group(handle.pid)
        stop_server(handle.state_file)


def test_our_server_killed_while_starting_fails_at_once(model_dir, tmp_path) -> None:
    handle = start_server(tmp_path, "prod", model_dir, model_name=MODEL)
    _kill_group(handle.pid)
    with pytest.raises(ServeError) as err:
        wait_healthy(handle.url, timeout=600, handle=handle)  # not a timeout: it says it exited
    assert f"the model server (pid {handle.pid}) exited while starting; its log {handle.log_path}" in err.value.message
    assert "did not answer" not in err.value.message
    stop_server(handle.state_file)


def test_the_server_inherits_no_credentials_and_an_orphan_is_named(model_dir, tmp_path, monkeypatch) -> None:
    from llmops.serve.endpoint import other_server_at

    monkeypatch.setenv("GITHUB_TOKEN", "ghp_not_for_the_server")
    monkeypatch.setenv("FOO_API_KEY", "key_not_for_the_server")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws_not_for_the_server")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # a setting, not a token
    monkeypatch.setenv(TOKEN_ENV, "the-serve-token")
    state = tmp_path / "state"
    port = free_port()
    handle = start_server(state, "prod", model_dir, model_name=MODEL, port=port, auth_token_env=TOKEN_ENV)
    try:
        health = wait_healthy(handle.url, timeout=120, handle=handle)
        assert (health["pid"], health["model"], health["instance"]) == (handle.pid, MODEL, handle.instance)
        assert json.loads(Path(handle.state_file).read_text())["instance"] == handle.instance
        environ = dict(item.split("=", 1) for item in
                       Path(f"/proc/{handle.pid}/environ").read_text().split("\0") if "=" in item)
        assert not {"GITHUB_TOKEN", "FOO_API_KEY", "AWS_SECRET_ACCESS_KEY"} & set(environ)
        assert environ[TOKEN_ENV] == "the-serve-token" and environ["TOKENIZERS_PARALLELISM"] == "false"
        assert environ["LLMOPS_SERVE_INSTANCE"] == handle.instance
        assert server_status(handle.state_file, probe=True).healthy is True

        # Its state is deleted (`rm -rf .llmops`): the server runs on, an orphan holding the port.
        shutil.rmtree(state)
        assert other_server_at(handle.url) == f"an llmops server (pid {handle.pid}, model {MODEL})"
        with pytest.raises(ServeError) as err:
            start_server(state, "prod", model_dir, model_name=MODEL, port=port)
        assert err.value.message == (
            f"server 'prod' cannot start on 127.0.0.1:{port}: an llmops server (pid {handle.pid}, model {MODEL}) "
            f"still holds port {port}, perhaps orphaned after .llmops/ was deleted: stop it with "
            f"`kill {handle.pid}`, or choose another serve.port.")
    finally:
        _kill_group(handle.pid)


@pytest.mark.slow
def test_apply_names_an_orphaned_server_and_converges_once_it_is_stopped(project) -> None:
    from dockerd import tiny_project
    from llmops.serve.endpoint import pid_alive

    port = free_port()
    doc = tiny_project("unused", "identity", "lora")
    del doc["settings"]
    doc["deployments"] = {"prod": {"model": "lora", "alias": "production", "serve": {"port": port}}}
    project.copy_example()
    project.write({"llmops.yaml": yaml.safe_dump(doc, sort_keys=False)})
    orphan = None
    try:
        res = project.run("apply", "--auto-approve")
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"serving http://127.0.0.1:{port}" in res.stdout
        orphan = json.loads(project.read(".llmops/serve/prod.json"))["pid"]
        shutil.rmtree(project.path(".llmops/serve"))  # the state goes; the server keeps answering

        res = project.run("plan", "--detailed-exitcode")
        assert res.returncode == 2, res.stdout + res.stderr
        assert (f"endpoint http://127.0.0.1:{port} is answered by an llmops server (pid {orphan}, model lora), "
                "not by the server llmops started") in res.stdout
        res = project.run("apply", "--auto-approve")
        out = res.stdout + res.stderr
        assert res.returncode == 1, out
        assert f"an llmops server (pid {orphan}, model lora) still holds port {port}" in out
        assert f"stop it with `kill {orphan}`" in out and "deployments.prod" in out
        assert "serving" not in res.stdout

        os.kill(orphan, signal.SIGTERM)  # what the message says to do
        deadline = time.monotonic() + 30
        while pid_alive(orphan) and time.monotonic() < deadline:
            time.sleep(0.1)
        res = project.run("apply", "--auto-approve")
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"serving http://127.0.0.1:{port}" in res.stdout
        res = project.run("plan", "--detailed-exitcode")
        assert res.returncode == 0 and "No changes." in res.stdout, res.stdout + res.stderr
    finally:
        if orphan is not None:
            _kill_group(orphan)
        project.run("down", "prod")
