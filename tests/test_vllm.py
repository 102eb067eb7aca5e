"""`serve.engine: vllm`: vLLM's OpenAI server in a container, behind the logging proxy.

No vLLM image can be pulled here, so the container's command is checked against a parser
that mirrors vLLM's documented `vllm serve` CLI for every flag llmops emits (names, types,
choices and nargs as defined in vllm/entrypoints/openai/cli_args.py, vllm/engine/arg_utils.py
and vllm/config/lora.py of vllm-project/vllm; docs.vllm.ai "OpenAI-Compatible Server",
"LoRA Adapters", "Using Docker"): an unknown or misspelled flag fails it. Where a real Docker
engine runs (tests/dockerd.py), a stand-in "vLLM" image built here runs `vllm serve` with the
real container spec (entrypoint, mounts, port, key, healthcheck), parses its arguments with
that same parser and answers /health and /v1/* in OpenAI's shape, so apply, the proxy, the
monitor store, refresh and `llmops down` are exercised for real; only the model is a stand-in.

This file is also the stand-in's program (`standin_main`), copied into its image: keep its
top-level imports to the standard library and pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pytest

# -- a mirror of vLLM's documented `vllm serve` arguments (the ones llmops emits) ----------

MAX_LORA_RANKS = [1, 8, 16, 32, 64, 128, 256, 320, 512]  # vllm/config/lora.py MaxLoRARanks
DTYPES = ["auto", "half", "float16", "bfloat16", "float", "float32"]


class ArgError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # raise instead of exiting, so a test sees the message
        raise ArgError(message)


class _LoRAModules(argparse.Action):
    """vLLM's LoRAParserAction: `name=path` (no comma), else JSON with name and path."""

    def __call__(self, parser, namespace, values, option_string=None):
        modules = []
        for item in values or []:
            if "=" in item and "," not in item:
                name, path = item.split("=")  # vLLM splits on every '=': a second one fails there too
                modules.append({"name": name, "path": path})
            else:
                try:
                    found = json.loads(item)
                except json.JSONDecodeError:
                    parser.error(f"Invalid JSON format for --lora-modules: {item}")
                if not isinstance(found, dict) or not {"name", "path"} <= set(found):
                    parser.error(f"Invalid fields for --lora-modules: {item}")
                modules.append(found)
        setattr(namespace, self.dest, modules)


def vllm_serve_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vllm serve", allow_abbrev=False)
    p.add_argument("model_tag", type=str, nargs="?")
    # FrontendArgs (cli_args.py)
    p.add_argument("--host", type=str)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", type=str, nargs="+")
    p.add_argument("--lora-modules", type=str, nargs="+", action=_LoRAModules)
    # EngineArgs (arg_utils.py): ModelConfig, ParallelConfig, LoRAConfig, CacheConfig groups
    p.add_argument("--served-model-name", type=str, nargs="+")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--enable-lora", action=argparse.BooleanOptionalAction)
    p.add_argument("--max-loras", type=int, default=1)
    p.add_argument("--max-lora-rank", type=int, choices=MAX_LORA_RANKS, default=16)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--dtype", type=str, choices=DTYPES, default="auto")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    return p


# -- the stand-in vLLM server (runs inside its container) ---------------------------------


def standin_main(argv: list[str]) -> int:
    """`vllm serve ARGS` in the stand-in image: parse ARGS as vLLM would, check the mounted
    model and adapters exist, then answer /health and the OpenAI routes (vLLM's `--api-key`
    or `VLLM_API_KEY` guards /v1 only, as vLLM's does)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    try:
        args = vllm_serve_parser().parse_args(argv)
    except ArgError as exc:
        print(f"vllm serve: error: {exc}", file=sys.stderr, flush=True)
        return 2
    if not args.model_tag or not os.path.isdir(args.model_tag):
        print(f"model {args.model_tag} is not a folder", file=sys.stderr, flush=True)
        return 1
    loras = args.lora_modules or []
    for module in loras:
        if not os.path.isfile(os.path.join(module["path"], "adapter_config.json")):
            print(f"LoRA module {module['name']}: no adapter_config.json at {module['path']}", file=sys.stderr)
            return 1
    key = (args.api_key or [os.environ.get("VLLM_API_KEY", "")])[0]
    names = list(args.served_model_name or [args.model_tag]) + [m["name"] for m in loras]
    counter = iter(range(1, 1 << 30))

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):  # quiet
            pass

        def _send(self, status: int, body: object | None) -> None:
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if key and self.headers.get("Authorization") != f"Bearer {key}":
                self._send(401, {"error": "Unauthorized"})
                return False
            return True

        def do_GET(self):
            if self.path == "/health":
                return self._send(200, None)  # vLLM: 200, empty body
            if self.path == "/v1/models" and self._authorized():
                return self._send(200, {"object": "list", "data": [{"id": n, "object": "model"} for n in names]})
            if not self.path.startswith("/v1/"):
                self._send(404, {"detail": "Not Found"})

        def do_POST(self):
            if not self._authorized():
                return
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            if body.get("model") not in names:
                return self._send(404, {"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                                  "type": "NotFoundError", "code": 404}})
            n = next(counter)
            usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
            if self.path == "/v1/completions":
                return self._send(200, {"id": f"cmpl-standin-{n}", "object": "text_completion", "created": 0,
                                        "model": body["model"], "usage": usage,
                                        "choices": [{"index": 0, "text": " stand-in answer", "finish_reason": "stop",
                                                     "logprobs": None}]})
            if self.path == "/v1/chat/completions":
                return self._send(200, {"id": f"chatcmpl-standin-{n}", "object": "chat.completion", "created": 0,
                                        "model": body["model"], "usage": usage,
                                        "choices": [{"index": 0, "finish_reason": "stop",
                                                     "message": {"role": "assistant", "content": "stand-in answer"}}]})
            self._send(404, {"detail": "Not Found"})

    server = ThreadingHTTPServer((args.host or "0.0.0.0", args.port), Handler)
    print(f"stand-in vLLM serving {names} on {args.host}:{args.port}", flush=True)
    server.serve_forever()
    return 0


# -- the container spec against the documented CLI ----------------------------------------


def adapter(root: Path, rank: int = 8, name: str = "abc123") -> tuple[Path, Path]:
    base = root / "models" / "base"
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.json").write_text("{}")
    lora = root / ".llmops" / "serve" / "adapters" / name
    lora.mkdir(parents=True, exist_ok=True)
    (lora / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    (lora / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    return base, lora


def test_the_command_parses_with_vllms_documented_flags(tmp_path: Path) -> None:
    from llmops.serve.vllm import ADAPTER_MOUNT, ENTRYPOINT, MODEL_MOUNT, vllm_container

    base, lora = adapter(tmp_path, rank=12)
    spec = vllm_container(model_name="support-bot", base_model=base, adapter=lora, gpus=2, api_key="k",
                          extra_args=["--max-model-len", "4096", "--dtype=bfloat16"])
    assert spec.entrypoint == ENTRYPOINT == ["vllm", "serve"]
    args = vllm_serve_parser().parse_args(spec.command)
    assert args.model_tag == MODEL_MOUNT
    assert (args.host, args.port) == ("0.0.0.0", spec.container_port)
    assert args.served_model_name == ["support-bot-base"]
    assert args.enable_lora is True
    assert args.lora_modules == [{"name": "support-bot", "path": f"{ADAPTER_MOUNT}/{lora.name}"}]
    assert args.max_lora_rank == 16  # the smallest of vLLM's allowed ranks that holds r=12
    assert (args.max_loras, args.tensor_parallel_size) == (1, 2)
    assert (args.max_model_len, args.dtype) == (4096, "bfloat16")
    assert args.api_key is None  # the key travels as VLLM_API_KEY, never in the command
    assert spec.env["VLLM_API_KEY"] == "k" and "k" not in spec.command
    # What the command names inside the container is what is mounted there, read-only.
    assert sorted(spec.mounts) == sorted([(str(base.resolve()), MODEL_MOUNT, "ro"),
                                          (str(lora.resolve()), f"{ADAPTER_MOUNT}/{lora.name}", "ro")])


@pytest.mark.parametrize("argv, problem", [
    (["/m", "--enable-loras"], "unrecognized arguments"),
    (["/m", "--lora-module", "a=/x"], "unrecognized arguments"),  # no abbreviations either
    (["/m", "--max-lora-rank", "12"], "invalid choice"),
    (["/m", "--tensor-parallel-size", "two"], "invalid int value"),
    (["/m", "--lora-modules", "a=/x=y"], "too many values"),
])
def test_the_mirror_parser_refuses_what_vllm_refuses(argv: list[str], problem: str) -> None:
    with pytest.raises((ArgError, ValueError), match=problem):
        vllm_serve_parser().parse_args(argv)


def test_lora_rank_and_names_are_checked_before_anything_starts(tmp_path: Path) -> None:
    from llmops.errors import ProviderError
    from llmops.serve.vllm import check_extra_args, lora_rank, max_lora_rank, vllm_container

    base, lora = adapter(tmp_path, rank=8)
    (lora / "adapter_config.json").write_text(json.dumps({"r": 8, "rank_pattern": {"q_proj": 64}}))
    assert lora_rank(lora) == 64 and max_lora_rank(64) == 64 and max_lora_rank(300) == 320
    with pytest.raises(ProviderError, match="above vLLM's largest"):
        max_lora_rank(1024)
    with pytest.raises(ProviderError, match="cannot name a vLLM LoRA module"):
        vllm_container(model_name="a=b", base_model=base, adapter=lora, gpus=1, api_key="k")
    with pytest.raises(ProviderError, match="serve.gpus of 1 or more"):
        vllm_container(model_name="m", base_model=base, adapter=lora, gpus=0, api_key="k")
    for managed in (["--port", "9"], ["--api-key=x"], ["-tp", "4"], ["--lora-modules", "x=/y"]):
        with pytest.raises(ProviderError, match="which llmops sets itself"):
            check_extra_args(managed, "deployments.d.serve")
    assert check_extra_args(["--enforce-eager"], "d") == ["--enforce-eager"]


def test_the_service_kwargs_request_gpus_healthcheck_readonly_mounts_and_loopback(tmp_path: Path) -> None:
    pytest.importorskip("docker")
    from llmops.runners.docker import ServiceSpec, build_service_kwargs
    from llmops.serve.vllm import vllm_container

    base, lora = adapter(tmp_path)
    spec = vllm_container(model_name="m", base_model=base, adapter=lora, gpus=2, api_key="k")
    kwargs = build_service_kwargs(ServiceSpec(name="vllm-prod", image=spec.image, command=spec.command, port=41234,
                                              container_port=spec.container_port, entrypoint=spec.entrypoint,
                                              mounts=spec.mounts, env=spec.env, gpus=spec.gpus,
                                              healthcheck=spec.healthcheck, health_start_s=300,
                                              health_interval_s=spec.health_interval_s, shm_size=spec.shm_size))
    (request,) = kwargs["device_requests"]  # the Docker SDK's DeviceRequest: `--gpus 2`
    assert (request["Count"], request["Capabilities"], request["Driver"]) == (2, [["gpu"]], "")
    assert kwargs["ports"] == {"8000/tcp": ("127.0.0.1", 41234)}
    assert {(m["Source"], m["Target"], m["ReadOnly"], m["Type"]) for m in kwargs["mounts"]} == {
        (src, dst, True, "bind") for src, dst, _ in spec.mounts}
    health = kwargs["healthcheck"]
    assert health["Test"][:3] == ["CMD", "python3", "-c"] and "/health" in health["Test"][3]
    assert health["StartPeriod"] == 300 * 10**9 and health["Retries"] == 3 and health["Interval"] == 10 * 10**9
    assert kwargs["entrypoint"] == ["vllm", "serve"] and kwargs["shm_size"] == "4g"
    assert kwargs["environment"] == {"VLLM_API_KEY": "k", "HF_HUB_OFFLINE": "1"}  # nothing of this process's
    assert "user" not in kwargs and "working_dir" not in kwargs  # vLLM's image runs as its own user
    no_gpu = build_service_kwargs(ServiceSpec(name="x", image="i", command=[], port=1, container_port=2))
    assert "device_requests" not in no_gpu and "healthcheck" not in no_gpu


# -- validation -----------------------------------------------------------------------------

PROJECT = """\
version: 1
project: t
datasets:
  d: {source: data/d.jsonl}
prompts:
  p: {text: "Q: {{ q }}", variables: [q]}
base_models:
  m: {path: models/base}
finetunes:
  f: {base_model: m, dataset: d, prompt: p}
deployments:
  prod:
    model: f
    serve: SERVE
"""


def validate(project, serve: str, settings: str = "") -> list[str]:
    from llmops.errors import ValidationError
    from llmops.config.validate import load_config

    project.write({"llmops.yaml": settings + PROJECT.replace("SERVE", serve), "data/d.jsonl": '{"q": "a"}\n',
                   "models/base/config.json": "{}"})
    try:
        load_config(project.root)
    except ValidationError as exc:
        return [d.format() for d in exc.diagnostics]
    return []


def test_vllm_settings_are_validated_with_clear_messages(project) -> None:
    assert validate(project, "{port: 8000, engine: vllm, gpus: 1}") == []
    # settings.runner: docker needs no serve.image for vLLM: its image has a default
    assert validate(project, "{port: 8000, engine: vllm, gpus: 1}", "settings: {runner: docker}\n") == []
    assert validate(project, "{port: 8000, engine: builtin}") == []
    (local,) = validate(project, "{port: 8000, engine: vllm, gpus: 1, runner: local}")
    assert "deployments.prod.serve.runner: serve.engine: vllm runs vLLM in a container" in local
    assert "drop serve.runner" in local
    (cpu,) = validate(project, "{port: 8000, engine: vllm}")
    assert "serve.engine: vllm needs serve.gpus of 1 or more" in cpu
    problems = validate(project, '{port: 8000, engine: vllm, gpus: 1, merge: true, vllm_args: ["--port", "1"]}')
    assert any("serve.merge is not supported with serve.engine: vllm" in p for p in problems)
    assert any("serve.vllm_args sets --port, which llmops sets itself" in p for p in problems)
    (typo,) = validate(project, "{port: 8000, engine: vlm, gpus: 1}")
    assert "deployments.prod.serve.engine" in typo and "vllm" in typo


def test_the_schema_documents_engine_builtin_as_the_default() -> None:
    from llmops.config.schema import documented_defaults

    defaults = dict(documented_defaults("deployments"))
    assert defaults[("serve", "engine")] == "builtin"
    assert defaults[("serve", "vllm_args")] == []
    from llmops.config.schema import load_schema
    from llmops.serve.vllm import DEFAULT_IMAGE

    assert DEFAULT_IMAGE in load_schema()["$defs"]["deployment_serve"]["properties"]["image"]["description"]


# -- apply, proxy, store, refresh and down against a real engine -----------------------------


@pytest.fixture(scope="module")
def engine(docker_engine: str) -> str:
    return docker_engine


@pytest.fixture(scope="module")
def standin_image(engine: str, tmp_path_factory) -> str:
    """An image whose `vllm` is `standin_main` (this file) and whose `python3` runs the
    healthcheck: the host's interpreter, mounted read-only (no Python image can be pulled)."""
    import docker

    from dockerd import ensure_base_image

    base = ensure_base_image(engine)
    ctx = tmp_path_factory.mktemp("standin")
    (ctx / "test_vllm.py").write_text(Path(__file__).read_text())
    launcher = (f"#!{sys.executable}\nimport sys\nsys.path.insert(0, '/standin')\n"
                "from test_vllm import standin_main\nsys.exit(standin_main(sys.argv[2:]))\n")  # argv: vllm serve ...
    (ctx / "vllm").write_text(launcher)
    (ctx / "python3").write_text(f"#!{sys.executable}\nimport os, sys\n"
                                 f"os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])\n")
    for f in ("vllm", "python3"):
        (ctx / f).chmod(0o755)
    (ctx / "Dockerfile").write_text(f"FROM {base}\nENV PATH=/usr/local/bin:/usr/bin:/bin\n"
                                    "COPY test_vllm.py /standin/test_vllm.py\nCOPY vllm python3 /usr/local/bin/\n")
    client = docker.DockerClient(base_url=engine)
    try:
        image, _ = client.images.build(path=str(ctx), tag="llmops-test-vllm-standin:latest", rm=True)
    finally:
        client.close()
    return "llmops-test-vllm-standin:latest"


def _containers(engine: str, name: str) -> list:
    import docker

    client = docker.DockerClient(base_url=engine)
    try:
        return client.containers.list(all=True, filters={"label": f"llmops.job=vllm-{name}"})
    finally:
        client.close()


def _post(url: str, body: dict, token: str | None = None) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.mark.docker
def test_apply_serves_vllm_behind_the_proxy_and_down_stops_both(tmp_path: Path, engine: str, standin_image: str,
                                                                monkeypatch) -> None:
    import dataclasses
    import time

    import llmops.serve.vllm as vllm_mod
    from dockerd import python_mounts
    from llmops.errors import ProviderError
    from llmops.monitor.store import open_store
    from llmops.providers.base import ProviderContext
    from llmops.providers.deployments import DeploymentsProvider
    from llmops.serve.control import down, live_endpoint
    from llmops.serve.control import serve_state_file as _serve_state
    from llmops.serve.control import vllm_state_file as _vllm_state
    from llmops.providers.monitors import serving_monitor
    from llmops.runners.docker import DockerRunner
    from llmops.serve.control import server_status
    from llmops.serve.endpoint import free_port

    real = vllm_mod.vllm_container

    def standin_container(**kw):  # the real spec, plus the interpreter the stand-in runs on; no GPU here
        spec = real(**kw)
        assert spec.health_interval_s == vllm_mod.HEALTH_INTERVAL_S
        # Docker runs the first check one interval after the start: a second, not vLLM's ten.
        return dataclasses.replace(spec, mounts=[*spec.mounts, *python_mounts()], gpus=0, health_interval_s=1)

    monkeypatch.setattr(vllm_mod, "vllm_container", standin_container)
    monkeypatch.setenv("DOCKER_HOST", engine)
    base, lora = adapter(tmp_path)
    port = free_port()
    serve = {"engine": "vllm", "port": port, "gpus": 1, "image": standin_image, "startup_timeout": 60}
    spec = {"model": "f", "serve": serve}
    ctx = ProviderContext(root=tmp_path, state_dir=tmp_path / ".llmops", settings={"docker_host": engine},
                          config={"deployments": {"prod": spec}, "monitors": {"prod": {"log_text": True}}})
    provider = DeploymentsProvider(ctx)
    current = {"version": "3", "base_model": "models/base", "adapter": lora.relative_to(tmp_path).as_posix()}
    try:
        out = provider._serve("prod", spec, "support-bot", current)
        # The lock's endpoint is the proxy's, on serve.port; the container's port is another, on loopback.
        assert out["endpoint"] == f"http://127.0.0.1:{port}" == live_endpoint(ctx, "prod")
        assert (out["engine"], out["image"], out["served_model"]) == ("vllm", standin_image, "support-bot")
        assert out["image_digest"].startswith("sha256:")
        (container,) = _containers(engine, "prod")
        container.reload()
        bindings = container.attrs["HostConfig"]["PortBindings"]["8000/tcp"]
        assert [b["HostIp"] for b in bindings] == ["127.0.0.1"] and int(bindings[0]["HostPort"]) != port
        assert all(not m["RW"] for m in container.attrs["Mounts"])
        key = next(e.split("=", 1)[1] for e in container.attrs["Config"]["Env"] if e.startswith("VLLM_API_KEY="))
        assert container.attrs["Config"]["Entrypoint"] == ["vllm", "serve"]

        # Requests go through the proxy to vLLM's LoRA module, and reach the monitor store with feedback.
        status, answer = _post(out["endpoint"] + "/v1/completions", {"model": "support-bot", "prompt": "Hi?"})
        assert status == 200 and answer["choices"][0]["text"] == " stand-in answer"
        assert _post(out["endpoint"] + "/v1/feedback", {"id": answer["id"], "rating": "up"})[0] == 200
        with open_store(serving_monitor(ctx, "prod").store) as store:
            assert store.query("SELECT id, path, status, prompt FROM requests", ()) == [
                (answer["id"], "/v1/completions", 200, "Hi?")]
            assert store.query("SELECT request_id, positive FROM feedback", ()) == [(answer["id"], 1)]
        upstream = json.loads(_vllm_state(ctx, "prod").read_text())["url"]
        assert _post(upstream + "/v1/completions", {"model": "support-bot", "prompt": "x"})[0] == 401  # key only

        # Docker's own healthcheck (python3 -c ... /health) passes in the container.
        runner = DockerRunner(docker_host=engine)
        deadline = time.monotonic() + 30
        while runner.health(container.id) != "healthy" and time.monotonic() < deadline:
            time.sleep(1)
        assert runner.health(container.id) == "healthy"

        # The key is in no state file, log or command line llmops wrote (nor in the outputs for the lock).
        written = [p for p in (tmp_path / ".llmops").rglob("*") if p.is_file() and p.suffix in (".json", ".log")]
        assert key not in json.dumps(out) and all(key not in p.read_text(errors="replace") for p in written)
        proxy_pid = server_status(_serve_state(ctx, "prod")).pid
        assert key.encode() not in Path(f"/proc/{proxy_pid}/cmdline").read_bytes()

        # A missing vLLM image fails with the fix, before the running server is touched.
        with pytest.raises(ProviderError, match=r"docker pull vllm/vllm-openai:v0\.0\.0-missing"):
            provider._serve("prod", {"model": "f", "serve": {**serve, "image": "vllm/vllm-openai:v0.0.0-missing"}},
                            "support-bot", current)
        assert live_endpoint(ctx, "prod") == out["endpoint"] and len(_containers(engine, "prod")) == 1

        # The vLLM container dying is drift that names it; `llmops down` stops both.
        assert provider.refresh("prod", spec, _locked(out)) == []
        container.kill()
        (drift,) = provider.refresh("prod", spec, _locked(out))
        assert "vLLM container" in drift.reason and drift.action == "update"
        down(ctx, "prod")
        assert _containers(engine, "prod") == [] and not server_status(_serve_state(ctx, "prod")).running
        assert not _vllm_state(ctx, "prod").exists() and not _serve_state(ctx, "prod").exists()
    finally:
        down(ctx, "prod")
        for c in _containers(engine, "prod"):
            c.remove(force=True)


def _locked(outputs: dict):
    from llmops.engine.lockfile import LockedResource

    return LockedResource(address="deployments.prod", fingerprint="x", outputs=outputs)
