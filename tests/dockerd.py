"""Test helper: find or start a real Docker engine, and make a small local base image.

`ensure_docker()` returns a DOCKER_HOST value for an engine that answers: `$DOCKER_HOST`,
then /var/run/docker.sock, else a private engine started by `.ci/docker-setup.sh` (which
installs docker.io only when `dockerd` is missing). When no engine can run it returns
None and `skip_reason()` says why, so tests skip with that reason and nothing else.

`ensure_base_image(host)` imports, once per content, an image holding just the system
shared libraries this interpreter and the venv's compiled modules (torch, tokenizers, ...)
need (no registry is reachable): containers run the host's own Python and venv, and the
editable llmops source, bind-mounted read-only at the same paths (`python_mounts()`).
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETUP_SCRIPT = REPO / ".ci" / "docker-setup.sh"
BASE_REPOSITORY = "llmops-test-base"

_state: dict[str, str | None] = {}
_libs: dict[str, list[str]] = {}


def _answers(host: str) -> bool:
    import docker

    if host.startswith("unix://") and not os.path.exists(host[len("unix://"):]):
        return False
    try:
        client = docker.DockerClient(base_url=host, timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # any failure means "not this engine"
        return False


def ensure_docker() -> str | None:
    """A DOCKER_HOST value for a running engine, or None (see `skip_reason()`)."""
    if "host" in _state:
        return _state["host"]
    host = _find_or_start()
    _state["host"] = host
    return host


def skip_reason() -> str:
    """Why `ensure_docker()` returned None (empty when it found an engine)."""
    return _state.get("reason") or ""


def _find_or_start() -> str | None:
    candidates = [os.environ.get("DOCKER_HOST", ""), "unix:///var/run/docker.sock"]
    for host in filter(None, candidates):
        if _answers(host):
            return host
    try:
        done = subprocess.run(["bash", str(SETUP_SCRIPT)], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _state["reason"] = f"{SETUP_SCRIPT.name} could not run: {exc}"
        return None
    exports = [line for line in done.stdout.splitlines() if line.startswith("export DOCKER_HOST=")]
    if done.returncode != 0 or not exports:
        tail = " | ".join(done.stderr.strip().splitlines()[-4:])
        _state["reason"] = f"no Docker engine could be started ({SETUP_SCRIPT.name} exit {done.returncode}): {tail}"
        return None
    host = exports[-1].split("=", 1)[1].strip()
    if not _answers(host):
        _state["reason"] = f"{SETUP_SCRIPT.name} reported {host}, but it does not answer"
        return None
    return host


def python_mounts() -> list[tuple[str, str, str]]:
    """Read-only bind mounts that make this interpreter, its venv and llmops work in a container.

    llmops is installed editable: its import hook points at the source folder, which
    must therefore be there too (at the same path) unless it lies inside the venv.
    """
    import llmops

    paths = {os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)}
    source = os.path.realpath(Path(llmops.__file__).parent)
    if not any(_under(source, p) for p in paths):
        paths.add(source)
    return [(p, p, "ro") for p in sorted(paths)]


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _compiled_modules() -> list[str]:
    """The interpreter, its lib-dynload modules, and every compiled file in the venv's site-packages.

    All of site-packages rather than only what training imports: its system-library
    closure is just a few more files (libstdc++, libgcc_s, ...), and no list of packages
    has to be kept in step with what torch, tokenizers or MLflow happen to load.
    """
    binaries = [os.path.realpath(sys.executable)]
    # DESTSHARED is the base interpreter's lib-dynload (a venv has none of its own).
    dynload = Path(sysconfig.get_config_var("DESTSHARED") or "")
    binaries += [str(p) for p in sorted(dynload.glob("*.so"))]
    site_dirs = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    for site_dir in sorted(site_dirs):
        for root, _, files in os.walk(site_dir):
            binaries += [os.path.join(root, f) for f in sorted(files) if f.endswith(".so") or ".so." in f]
    return binaries


def _shared_libraries() -> list[str]:
    """Every system shared library (as ldd names it) the interpreter and compiled modules load.

    Libraries inside the bind-mounted folders (the venv's torch/lib, ...) are left out.
    """
    if "libs" in _libs:
        return _libs["libs"]
    done = subprocess.run(["ldd", *_compiled_modules()], capture_output=True, text=True, check=False)
    mounted = [source for source, _, _ in python_mounts()]
    libs: set[str] = set()
    for line in done.stdout.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) > parts.index("=>") + 1:
            path = parts[parts.index("=>") + 1]
        elif parts and parts[0].startswith("/") and not parts[0].endswith(":"):
            path = parts[0]  # the loader itself: "/lib64/ld-linux-x86-64.so.2 (0x...)"
        else:
            continue
        # Libraries under the interpreter's prefix or the venv arrive with the bind mounts.
        if path.startswith("/") and not any(_under(os.path.realpath(path), m) for m in mounted):
            libs.add(path)
    _libs["libs"] = sorted(libs)
    return _libs["libs"]


def _root_tar(libs: list[str]) -> bytes:
    """A root file system: the libraries (dereferenced), /tmp, and a passwd for root."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        tmp = tarfile.TarInfo("tmp")
        tmp.type, tmp.mode = tarfile.DIRTYPE, 0o1777
        tar.addfile(tmp)
        for name, text in {"etc/passwd": "root:x:0:0:root:/tmp:/bin/sh\n", "etc/group": "root:x:0:\n"}.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(text), 0o644
            tar.addfile(info, io.BytesIO(text.encode()))
        for lib in libs:
            info = tar.gettarinfo(os.path.realpath(lib), arcname=lib.lstrip("/"))
            with open(lib, "rb") as handle:
                tar.addfile(info, handle)
    return data.getvalue()


def ensure_base_image(host: str) -> str:
    """Tag of a local image that can run this interpreter (imported once per content)."""
    import docker

    libs = _shared_libraries()
    key = hashlib.sha256("\n".join(f"{p}:{os.path.getsize(p)}" for p in libs).encode()).hexdigest()[:12]
    tag = f"{BASE_REPOSITORY}:{key}"
    client = docker.DockerClient(base_url=host, timeout=120)
    try:
        try:
            client.images.get(tag)
            return tag
        except docker.errors.ImageNotFound:
            pass
        client.api.import_image_from_data(_root_tar(libs), repository=BASE_REPOSITORY, tag=key)
        client.images.get(tag)  # fails loudly if the import did not produce it
        return tag
    finally:
        client.close()


def tiny_project(host: str, project: str, finetune: str) -> dict:
    """llmops.yaml (as a dict) of a tiny project whose containers run this interpreter.

    One dataset (the example's tickets), one prompt, a 1-layer built model and one LoRA
    fine-tune of 4 steps named `finetune`; callers add runners, evals and deployments.
    """
    return {
        "version": 1,
        "project": project,
        "settings": {
            "docker_host": host,
            "docker": {"python": sys.executable, "mounts": [":".join(m) for m in python_mounts()]},
        },
        "datasets": {"tickets": {"source": "data/tickets.jsonl",
                                 "prepare": [{"split": {"eval_fraction": 0.1, "seed": 13}}]}},
        "prompts": {"support": {"template": "prompts/support.j2", "variables": ["question"],
                                "response_field": "answer"}},
        "base_models": {"tiny": {"build": {
            "architecture": "llama", "hidden_size": 32, "layers": 1, "heads": 2, "intermediate_size": 64,
            "vocab_size": 300, "max_position_embeddings": 128, "tokenizer_from": "tickets", "seed": 13}}},
        "finetunes": {finetune: {
            "base_model": "tiny", "dataset": "tickets", "prompt": "support",
            "adapter": {"type": "lora", "r": 4, "alpha": 8},
            "training": {"max_steps": 4, "batch_size": 4, "max_seq_length": 64, "learning_rate": 1.0e-2,
                         "seed": 13}}},
    }
