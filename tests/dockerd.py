"""Test helper: find or start a real Docker engine, and make a small local base image.

`ensure_docker()` returns a DOCKER_HOST value for an engine that answers: `$DOCKER_HOST`,
then /var/run/docker.sock, else a private engine started by `.ci/docker-setup.sh` (which
installs docker.io only when `dockerd` is missing). When no engine can run it returns
None and `skip_reason()` says why, so tests skip with that reason and nothing else.

`ensure_base_image(host)` imports, once per content, an image holding just the shared
libraries this interpreter needs (no registry is reachable): containers run the host's
own Python and venv, bind-mounted read-only at the same paths (`python_mounts()`).
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
    """Read-only bind mounts that make this interpreter and its venv work in a container."""
    paths = {os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)}
    return [(p, p, "ro") for p in sorted(paths)]


def _shared_libraries() -> list[str]:
    """Every shared library (as ldd names it) the interpreter and its C modules load."""
    binaries = [os.path.realpath(sys.executable)]
    # DESTSHARED is the base interpreter's lib-dynload (a venv has none of its own).
    dynload = Path(sysconfig.get_config_var("DESTSHARED") or "")
    binaries += [str(p) for p in sorted(dynload.glob("*.so"))]
    done = subprocess.run(["ldd", *binaries], capture_output=True, text=True, check=False)
    libs: set[str] = set()
    for line in done.stdout.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) > parts.index("=>") + 1:
            path = parts[parts.index("=>") + 1]
        elif parts and parts[0].startswith("/") and not parts[0].endswith(":"):
            path = parts[0]  # the loader itself: "/lib64/ld-linux-x86-64.so.2 (0x...)"
        else:
            continue
        # Libraries under the interpreter's own prefix arrive with the bind mount.
        if path.startswith("/") and not path.startswith(os.path.realpath(sys.base_prefix)):
            libs.add(path)
    return sorted(libs)


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
