"""`serve.engine: vllm`: vLLM's OpenAI-compatible server in a container, behind our logging proxy.

`vllm_container(...)` is the container the Docker runner starts (`DockerRunner.run_service`):
the image's `vllm serve` with the base model and the fine-tune's adapter mounted read-only,
the adapter served as a LoRA module named after the registered model, the GPUs as a device
request, tensor parallel over them, a Docker healthcheck on `/health`, and the port published
on 127.0.0.1 only. A random key (`VLLM_API_KEY`, which vLLM reads when `--api-key` is not
given) makes the container answer only the proxy (`llmops.serve.proxy`), which runs as a local
process on `serve.host:serve.port`, logs every request to the monitor store and serves feedback.

The flags are those of vLLM's documented CLI (`vllm serve --help`; defined in
vllm/engine/arg_utils.py and vllm/entrypoints/openai/cli_args.py of vllm-project/vllm); no
vLLM image can be pulled where this was written, so tests/test_vllm.py checks the arguments
against a parser mirroring those definitions (and a stand-in server that parses them with it),
not against a running vLLM.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmops.errors import ProviderError

DEFAULT_IMAGE = "vllm/vllm-openai:v0.22.1"  # pinned: `latest` would change what is served under the same lock
ENTRYPOINT = ["vllm", "serve"]  # the image's own entrypoint, set explicitly so a custom image behaves alike
CONTAINER_PORT = 8000  # vLLM's default --port
MODEL_MOUNT = "/llmops/model"
ADAPTER_MOUNT = "/llmops/adapters"
API_KEY_ENV = "VLLM_API_KEY"
# vllm/config/lora.py: MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
SHM_SIZE = "4g"  # vLLM's Docker guide: --ipc=host or --shm-size (PyTorch shares tensors through /dev/shm)
HEALTH_INTERVAL_S = 10
# Flags llmops sets itself; `serve.vllm_args` may not repeat them (the container would not
# match the lock, or answer without the key the proxy holds).
MANAGED_FLAGS = ("--host", "--port", "--model", "--served-model-name", "--enable-lora", "--no-enable-lora",
                 "--lora-modules", "--max-lora-rank", "--max-loras", "--tensor-parallel-size", "-tp", "--api-key",
                 "--uds")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class VllmContainer:
    """What the Docker runner needs to start vLLM: image, entrypoint, arguments, read-only
    mounts (host path, container path), environment, GPUs, healthcheck (and its interval: Docker
    API 1.41 engines run the first check only after one interval)."""

    image: str
    command: list[str]
    mounts: list[tuple[str, str, str]]
    env: dict[str, str]
    gpus: int
    entrypoint: list[str] = field(default_factory=lambda: list(ENTRYPOINT))
    container_port: int = CONTAINER_PORT
    healthcheck: list[str] = field(default_factory=list)
    health_interval_s: float = HEALTH_INTERVAL_S
    shm_size: str = SHM_SIZE


def lora_rank(adapter_dir: Path | str) -> int:
    """The largest LoRA rank of a PEFT adapter folder (`r`, or its `rank_pattern`'s largest)."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ProviderError(f"cannot read the adapter's {path} ({exc}); re-apply the fine-tune.") from None
    ranks = [config.get("r")] + list((config.get("rank_pattern") or {}).values())
    ranks = [int(r) for r in ranks if isinstance(r, int) and not isinstance(r, bool) and r > 0]
    if not ranks:
        raise ProviderError(f"{path} names no LoRA rank (`r`); serve.engine: vllm serves LoRA adapters only.")
    return max(ranks)


def max_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that fits an adapter of `rank`."""
    for allowed in MAX_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ProviderError(f"the adapter's LoRA rank {rank} is above vLLM's largest --max-lora-rank "
                        f"{MAX_LORA_RANKS[-1]}; train with a smaller `r` or use serve.engine: builtin.")


def vllm_args(model_name: str, adapter_name: str, rank: int, gpus: int, extra: list[str] | None = None) -> list[str]:
    """`vllm serve` arguments after the entrypoint: the base model (mounted), every interface
    inside the container on port 8000, the adapter as LoRA module `model_name` (what clients
    send as `model`), the base model under `model_name-base`."""
    return [MODEL_MOUNT, "--host", "0.0.0.0", "--port", str(CONTAINER_PORT),
            "--served-model-name", f"{model_name}-base",
            "--enable-lora", "--lora-modules", f"{model_name}={ADAPTER_MOUNT}/{adapter_name}",
            "--max-lora-rank", str(max_lora_rank(rank)), "--max-loras", "1",
            "--tensor-parallel-size", str(max(1, gpus)), *(extra or [])]


def _managed_flag(extra: list[str]) -> str | None:
    for arg in extra:
        flag = arg.split("=", 1)[0]
        if flag in MANAGED_FLAGS:
            return flag
    return None


def check_extra_args(extra: Any, where: str) -> list[str]:
    """`serve.vllm_args` as a list of strings, refusing flags llmops sets itself."""
    if extra is None:
        return []
    if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
        raise ProviderError(f"llmops.yaml: {where}.vllm_args must be a list of strings such as "
                            "[\"--max-model-len\", \"4096\"].")
    flag = _managed_flag(extra)
    if flag:
        raise ProviderError(f"llmops.yaml: {where}.vllm_args sets {flag}, which llmops sets itself; remove it "
                            "(the model, adapter, port, GPUs and key come from the deployment).")
    return list(extra)


def serve_problems(serve: dict[str, Any]) -> list[tuple[tuple[str, ...], str, str]]:
    """Why a `serve:` block with `engine: vllm` cannot be served, for `llmops validate`: one
    `(field under serve, summary, hint)` per problem (each value alone passed the schema)."""
    problems: list[tuple[tuple[str, ...], str, str]] = []
    if serve.get("runner") == "local":
        problems.append((("runner",), "serve.engine: vllm runs vLLM in a container, not with serve.runner: local",
                         "drop serve.runner (vLLM always uses the Docker runner) or use serve.engine: builtin"))
    gpus = serve.get("gpus", 0)
    if isinstance(gpus, int) and gpus < 1:
        problems.append((("gpus",) if "gpus" in serve else (), "serve.engine: vllm needs serve.gpus of 1 or more",
                         "vLLM's image serves on CUDA GPUs: set serve.gpus, or use serve.engine: builtin on a CPU"))
    for key, off in (("merge", False), ("quantize", "none")):
        if serve.get(key, off) != off:
            problems.append(((key,), f"serve.{key} is not supported with serve.engine: vllm",
                             f"vLLM serves the adapter as a LoRA module on the base model; drop serve.{key}"))
    extra = serve.get("vllm_args")
    flag = _managed_flag(extra) if isinstance(extra, list) and all(isinstance(a, str) for a in extra) else None
    if flag:
        problems.append((("vllm_args",), f"serve.vllm_args sets {flag}, which llmops sets itself",
                         "remove it: the model, adapter, port, GPUs and key come from the deployment"))
    return problems


def vllm_container(*, model_name: str, base_model: Path | str, adapter: Path | str, gpus: int, api_key: str,
                   image: str | None = None, extra_args: list[str] | None = None) -> VllmContainer:
    """The container serving `adapter` on `base_model` (host folders, mounted read-only)."""
    if not _SAFE_NAME.match(model_name) or "=" in model_name:
        raise ProviderError(f"the registered model name {model_name!r} cannot name a vLLM LoRA module "
                            "(letters, digits, '.', '_' and '-' only); rename the fine-tune's registered model.")
    if gpus < 1:
        raise ProviderError("serve.engine: vllm needs serve.gpus of 1 or more (vLLM's image serves on CUDA GPUs).")
    base, lora = Path(base_model).resolve(), Path(adapter).resolve()
    adapter_name = lora.name if _SAFE_NAME.match(lora.name) else "adapter"  # no '=' or ',' for --lora-modules
    probe = (f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{CONTAINER_PORT}/health', "
             "timeout=5)")
    return VllmContainer(
        image=image or DEFAULT_IMAGE,
        command=vllm_args(model_name, adapter_name, lora_rank(lora), gpus, extra_args),
        mounts=[(str(base), MODEL_MOUNT, "ro"), (str(lora), f"{ADAPTER_MOUNT}/{adapter_name}", "ro")],
        # The model is a local folder: nothing is fetched from the Hub.
        env={API_KEY_ENV: api_key, "HF_HUB_OFFLINE": "1"},
        gpus=int(gpus),
        healthcheck=["CMD", "python3", "-c", probe],
    )


def wait_vllm_healthy(runner: Any, container: str, url: str, timeout: float) -> None:
    """Poll the container's published `URL/health` (vLLM answers 200 once the model is loaded)
    while the container runs. A container that exits, or no answer within `timeout` seconds,
    fails with its last output in the message; the caller removes it."""
    import time

    from llmops.serve.endpoint import HTTP_ERRORS, ServeError, get_json

    deadline = time.monotonic() + timeout
    last = ""
    while True:
        if not runner.is_running(container):
            problem = f"the vLLM container {container[:12]} exited while starting"
            break
        try:
            get_json(url + "/health", timeout=5.0)
            return
        except ValueError:  # vLLM's /health answers 200 with an empty body
            return
        except HTTP_ERRORS as exc:
            last = str(getattr(exc, "reason", exc)) or type(exc).__name__
        if time.monotonic() >= deadline:
            problem = (f"the vLLM container's {url}/health did not answer within {timeout:g}s (last error: {last}); "
                       "a large model may need a longer serve.startup_timeout")
            break
        time.sleep(1.0)
    output = runner.logs(container).rstrip()
    raise ServeError(f"{problem}; its output ends with:\n{output or '(no output)'}")
