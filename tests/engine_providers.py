"""Small providers for engine tests: real files on disk, controllable failures and drift.

`RecordingProvider` writes `out/<kind>.<name>.txt` holding the fingerprint; it fails when
a file `FAIL_<name>` exists in the project, sleeps while `SLOW_<name>` exists, and reports
drift when its output file is gone. When the project has a folder `store/` (a stand-in for a
shared store such as a DVC remote), apply also copies each output there by fingerprint, a
missing output held by the store is a `restore`, and an output made for the same fingerprint
elsewhere is found (`find_existing`).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from llmops.errors import ProviderError
from llmops.providers.base import ApplyRequest, ApplyResult, Drift, Found, Provider

CALLS: list[tuple[str, str]] = []
REQUESTS: dict[str, ApplyRequest] = {}  # the last apply request of each address
_active = 0
_max_active = 0
_lock = threading.Lock()
DWELL = 0.0  # seconds every apply takes (a test that needs applies to overlap sets it)


def reset() -> None:
    global _active, _max_active
    CALLS.clear()
    REQUESTS.clear()
    _active = _max_active = 0


def max_concurrency() -> int:
    return _max_active


class RecordingProvider(Provider):
    kind = "datasets"

    def out(self, name: str) -> Path:
        return self.ctx.root / "out" / f"{self.kind}.{name}.txt"

    def file_inputs(self, name, spec):
        src = spec.get("source")
        return [src] if isinstance(src, str) else []

    def stored(self, name: str, fingerprint: str) -> Path | None:
        store = self.ctx.root / "store"
        if not store.is_dir():
            return None
        return store / f"{self.kind}.{name}.{fingerprint.split(':')[-1][:12]}.txt"

    def refresh(self, name, spec, locked):
        if not self.out(name).exists():
            held = self.stored(name, locked.fingerprint)
            if held is not None and held.is_file():
                return [Drift(f"output missing: out/{self.kind}.{name}.txt; the store holds it", "restore", "missing")]
            return [Drift(f"output missing: out/{self.kind}.{name}.txt", "replace", "missing")]
        return []

    def find_existing(self, name, spec, fingerprint):
        held = self.stored(name, fingerprint)
        if held is not None and held.is_file():
            return Found(f"made elsewhere for this fingerprint: {held.name}", {"file": held.name})
        return None

    def restore(self, request: ApplyRequest) -> ApplyResult:
        CALLS.append((request.address, "restore"))
        held = self.stored(request.name, request.fingerprint)
        if held is None or not held.is_file() or held.read_text() != request.fingerprint:
            raise ProviderError(f"{request.address}: the store no longer holds it")
        out = self.out(request.name)
        out.parent.mkdir(exist_ok=True)
        out.write_text(held.read_text())
        return ApplyResult(outputs={"path": str(out.relative_to(self.ctx.root)),
                                    "upstream": sorted(request.upstream)},
                           inputs={"action": "restore"})

    @classmethod
    def summary(cls, outputs):
        return f"wrote {outputs['path']}" if outputs.get("path") else ""

    def alerts(self, name, spec, locked):
        path = self.ctx.root / f"ALERT_{name}"
        return [path.read_text()] if path.exists() else []

    def apply(self, request: ApplyRequest) -> ApplyResult:
        global _active, _max_active
        with _lock:
            _active += 1
            _max_active = max(_max_active, _active)
        try:
            CALLS.append((request.address, request.action))
            REQUESTS[request.address] = request
            request.log(f"applying {request.action}")
            root = self.ctx.root
            deadline = time.time() + 30  # a loaded CI machine must not outrun a test's signal
            while (root / f"SLOW_{request.name}").exists() and time.time() < deadline:
                if request.cancelled():
                    raise ProviderError(f"{request.address}: cancelled")
                time.sleep(0.05)
            time.sleep(DWELL)
            if (root / f"FAIL_{request.name}").exists():
                raise ProviderError(f"{request.address}: injected failure")
            out = self.out(request.name)
            out.parent.mkdir(exist_ok=True)
            out.write_text(request.fingerprint)
            held = self.stored(request.name, request.fingerprint)
            if held is not None:
                held.write_text(request.fingerprint)
            return ApplyResult(outputs={"path": str(out.relative_to(root)),
                                        "upstream": sorted(request.upstream)},
                               inputs={"action": request.action})
        finally:
            with _lock:
                _active -= 1

    def delete(self, name, locked):
        CALLS.append((f"{self.kind}.{name}", "delete"))
        self.out(name).unlink(missing_ok=True)


def make(kind: str, in_place: frozenset[str] = frozenset(), upstream_change: str = "replace"):
    return type(f"Recording_{kind}", (RecordingProvider,),
                {"kind": kind, "in_place_fields": in_place, "upstream_change": upstream_change})


OVERRIDES = {
    "datasets": make("datasets"),
    "prompts": make("prompts"),
    "base_models": make("base_models"),
    "finetunes": make("finetunes"),
    "evals": make("evals", in_place=frozenset({"thresholds"})),
    "deployments": make("deployments", in_place=frozenset({"alias"}), upstream_change="update"),
}
