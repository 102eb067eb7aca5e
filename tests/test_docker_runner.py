"""The Docker runner against a real Docker engine (started by tests/dockerd.py when needed).

Containers run this interpreter and venv, bind-mounted read-only, in a small locally
imported image; no registry is involved. GPU requests are checked as formed requests and
as the error a CPU-only engine gives.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dockerd import ensure_base_image, python_mounts
from llmops.errors import ProviderError
from llmops.runners.base import Job
from llmops.runners.docker import JOB_LABEL, DockerRunner, build_create_kwargs

pytestmark = pytest.mark.docker


@pytest.fixture(scope="session")
def engine(docker_engine: str) -> str:
    return docker_engine


@pytest.fixture(scope="session")
def base_image(engine: str) -> str:
    return ensure_base_image(engine)


@pytest.fixture
def runner(engine: str) -> DockerRunner:
    return DockerRunner(docker_host=engine, python=sys.executable, extra_mounts=python_mounts(), stop_timeout=5)


def make_job(root: Path, name: str, module: str, image: str | None, **fields) -> Job:
    return Job(name=name, module=module, args=fields.pop("args", []), workdir=root,
               log_path=root / ".llmops" / "logs" / f"{name}.log", image=image, **fields)


def containers_of(runner: DockerRunner, job_name: str) -> list:
    return runner.client().containers.list(all=True, filters={"label": f"{JOB_LABEL}={job_name}"})


def test_output_reaches_log_file_and_on_line(project, runner, base_image):
    project.write({"hello.py": (
        "import sys\n"
        "for i in range(3):\n"
        "    print(f'line {i} of', sys.argv[1])\n"
        "print('to stderr', file=sys.stderr)\n"
    )})
    job = make_job(project.root, "hello", "hello", base_image, args=["the-job"])
    seen: list[str] = []
    result = runner.run(job, on_line=seen.append)
    assert result.exit_code == 0
    # Docker copies stdout and stderr separately: order holds within a stream only.
    assert [line for line in seen if line != "to stderr"] == [f"line {i} of the-job" for i in range(3)]
    assert sorted(seen) == ["line 0 of the-job", "line 1 of the-job", "line 2 of the-job", "to stderr"]
    assert job.log_path.read_text().splitlines() == seen
    assert result.log_tail.splitlines() == seen
    assert result.image_digest == runner.client().images.get(base_image).id
    assert result.image_digest.startswith("sha256:")
    assert containers_of(runner, "hello") == []


def test_failing_job_returns_its_exit_code_and_log_tail(project, runner, base_image):
    project.write({"boom.py": "print('loading data')\nraise SystemExit('bad row 7')\n"})
    job = make_job(project.root, "boom", "boom", base_image)
    result = runner.run(job)
    assert result.exit_code == 1
    assert "loading data" in result.log_tail
    assert "bad row 7" in result.log_tail
    assert containers_of(runner, "boom") == []


def test_job_sees_project_mount_workdir_env_and_runs_as_host_user(project, runner, base_image):
    project.write({"trainish.py": (
        "import json, os, sys\n"
        "out = os.path.join('outputs', sys.argv[1])\n"
        "os.makedirs('outputs', exist_ok=True)\n"
        "with open(out, 'w') as f:\n"
        "    json.dump({'cwd': os.getcwd(), 'uri': os.environ['MLFLOW_TRACKING_URI'],\n"
        "               'data': open('data.txt').read()}, f)\n"
        "print('wrote', out)\n"
    ), "data.txt": "rows from the host\n"})
    uri = f"sqlite:///{project.root}/.llmops/mlflow.db"
    job = make_job(project.root, "trainish", "trainish", base_image, args=["model.json"],
                   env={"MLFLOW_TRACKING_URI": uri})
    result = runner.run(job)
    assert result.exit_code == 0, result.log_tail
    written = project.path("outputs/model.json")
    assert json.loads(written.read_text()) == {
        "cwd": str(project.root.resolve()), "uri": uri, "data": "rows from the host\n"}
    assert (written.stat().st_uid, written.stat().st_gid) == (os.getuid(), os.getgid())


def test_user_option_sets_the_owner_of_written_files(project, engine, base_image):
    runner = DockerRunner(docker_host=engine, python=sys.executable, extra_mounts=python_mounts(),
                          user=f"{os.getuid()}:4321")
    project.write({"touch.py": "open('made-here', 'w').write('x')\n"})
    result = runner.run(make_job(project.root, "touch", "touch", base_image))
    assert result.exit_code == 0, result.log_tail
    assert project.path("made-here").stat().st_gid == 4321


def test_cancellation_stops_and_removes_the_container(project, runner, base_image):
    project.write({"forever.py": (
        "import time\n"
        "print('started')\n"
        "try:\n"
        "    time.sleep(600)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted, saving checkpoint')\n"
        "    raise SystemExit(130)\n"
    )})
    job = make_job(project.root, "forever", "forever", base_image)
    seen: list[str] = []
    result = runner.run(job, on_line=seen.append, cancelled=lambda: "started" in seen)
    assert result.exit_code == 130
    # SIGINT reached the job (a graceful stop), not only the final SIGKILL.
    assert seen == ["started", "interrupted, saving checkpoint"]
    assert containers_of(runner, "forever") == []


def test_gpu_request_is_formed_for_gpu_jobs_only(tmp_path):
    from docker.types import DeviceRequest

    gpu = build_create_kwargs(make_job(tmp_path, "g", "m", "img:1", gpus=2))
    assert gpu["device_requests"] == [DeviceRequest(count=2, capabilities=[["gpu"]])]
    assert gpu["device_requests"][0]["Count"] == 2
    assert gpu["device_requests"][0]["Capabilities"] == [["gpu"]]
    cpu = build_create_kwargs(make_job(tmp_path, "c", "m", "img:1"))
    assert "device_requests" not in cpu
    assert cpu["user"] == f"{os.getuid()}:{os.getgid()}"
    assert cpu["entrypoint"] == ["python", "-m", "m"]
    assert cpu["working_dir"] == str(tmp_path.resolve())


def test_gpu_job_on_cpu_engine_fails_clearly_and_leaves_nothing(project, runner, base_image):
    if "nvidia" in (runner.client().info().get("Runtimes") or {}):
        pytest.skip("this engine has the NVIDIA runtime: a GPU job would run")
    project.write({"gpu.py": "print('never runs')\n"})
    job = make_job(project.root, "gpu-job", "gpu", base_image, gpus=1)
    with pytest.raises(ProviderError) as err:
        runner.run(job)
    assert err.value.message.startswith("this Docker engine has no GPU support: ")
    assert "resources.gpus: 0" in err.value.message
    assert containers_of(runner, "gpu-job") == []


def test_missing_image_says_how_to_build_it(project, runner, engine):
    job = make_job(project.root, "noimg", "m", "llmops-not-built:0")
    with pytest.raises(ProviderError) as err:
        runner.run(job)
    assert "docker build -f templates/Dockerfile.train -t llmops-not-built:0 ." in err.value.message
    assert f"DOCKER_HOST={engine}" in err.value.message
    assert containers_of(runner, "noimg") == []


def test_unreachable_engine_names_docker_host(tmp_path):
    host = f"unix://{tmp_path}/no-engine.sock"
    with pytest.raises(ProviderError) as err:
        DockerRunner(docker_host=host).run(make_job(tmp_path, "x", "m", "img:1"))
    assert f"DOCKER_HOST={host}" in err.value.message
    assert "cannot reach the Docker engine" in err.value.message


def test_job_without_image_is_refused(tmp_path):
    with pytest.raises(ProviderError, match="resources.image"):
        build_create_kwargs(make_job(tmp_path, "x", "m", None))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, deadline_s: float = 30.0) -> bytes:
    end = time.monotonic() + deadline_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read()
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.2)


def test_detached_server_is_published_on_loopback_and_stopped(project, runner, base_image):
    project.write({"served.txt": "from the project folder\n"})
    port = _free_port()
    job = make_job(project.root, "server", "http.server", base_image, args=["8000", "--bind", "0.0.0.0"])
    container_id = runner.run_detached(job, port=port, container_port=8000)
    try:
        assert runner.is_running(container_id)
        assert [c.id for c in containers_of(runner, "server")] == [container_id]
        assert _get(f"http://127.0.0.1:{port}/served.txt") == b"from the project folder\n"
        assert "GET /served.txt" in runner.logs(container_id)
    finally:
        runner.stop(container_id)
    assert not runner.is_running(container_id)
    assert containers_of(runner, "server") == []
    runner.stop(container_id)  # stopping again is not an error
