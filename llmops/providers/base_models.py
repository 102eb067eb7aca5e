"""The `base_models` provider: a Hugging Face model, a local folder, or a tiny built model.

Three sources, exactly one per resource:
- `hf: ORG/NAME` (+ `revision:`): resolved from the local Hugging Face cache when offline
  (downloaded into that cache when online); the lock pins the commit and the files' sha256.
  The cache is never copied or modified.
- `path: DIR`: a project-relative model folder, used where it is.
- `build: {...}`: a small llama (random init, optionally pre-trained) built by `llmops.train.build` into
  `.llmops/models/NAME/`, its tokenizer trained on the train split of `tokenizer_from`.

Folder hashes are remembered by (size, mtime) in `.llmops/cache/file-hashes.json`, so a plan
does not re-read a multi-gigabyte model folder whose files did not change. Files or folders
whose name starts with "." (`.git`, `.cache`) are not part of a model's content.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmops.errors import ProviderError
from llmops.hashing import file_sha256, is_skipped, sha256_json
from llmops.engine.lockfile import LockedResource
from llmops.providers.base import ApplyRequest, ApplyResult, Drift, ProgressEvent, Provider, ProviderContext

SOURCES: tuple[str, ...] = ("hf", "path", "build")
HASH_CACHE_NAME = "file-hashes.json"
MAX_MODEL_FILES = 100_000  # a model folder holds tens of files; a whole disk does not fit
# A file modified this recently may change again within the same mtime tick; such files are
# hashed every time instead of being remembered (git's "racily clean" problem).
RACY_WINDOW_NS = 2_000_000_000
_TRUE = {"1", "true", "yes", "on"}


def source_of(name: str, spec: dict[str, Any]) -> str:
    """Which of hf / path / build the spec uses; exactly one must be set."""
    found = [s for s in SOURCES if spec.get(s) is not None]
    if len(found) != 1:
        raise ProviderError(
            f"base_models.{name}: needs exactly one of hf, path, build (found {', '.join(found) or 'none'}); "
            "fix llmops.yaml."
        )
    return found[0]


class FileHashCache:
    """sha256 of files, remembered by (size, mtime_ns) in one small JSON file.

    Safe to share between threads of one process; between processes the last writer wins,
    which loses cache entries at worst, never correctness (entries are re-checked by stat).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files_read = 0  # files actually hashed (cache misses), for callers and tests
        self._lock = threading.Lock()
        self._entries: dict[str, list] | None = None

    def _load(self) -> dict[str, list]:
        if self._entries is None:
            try:
                data = json.loads(self.path.read_text())
                self._entries = data.get("files", {}) if data.get("version") == 1 else {}
            except (OSError, ValueError, AttributeError):
                self._entries = {}  # a missing or broken cache is only slower
        return self._entries

    def hash_folder(self, folder: Path, within: Path | None = None) -> dict[str, str]:
        """{relative posix path: sha256} of the files under `folder` (hidden ones skipped).

        Bounded: at most MAX_MODEL_FILES files; a file that is a symlink must resolve to a
        regular file inside `within` (default: `folder`), so a link to /proc/kcore or
        /dev/zero planted in a model folder is refused instead of read."""
        folder = Path(folder).resolve()
        inside = Path(within).resolve() if within is not None else folder
        result: dict[str, str] = {}
        with self._lock:
            entries = self._load()
            changed = False
            seen: set[str] = set()
            now = time.time_ns()
            for count, path in enumerate(sorted(folder.rglob("*"))):
                if count >= MAX_MODEL_FILES:
                    raise ProviderError(f"model folder {folder} has more than {MAX_MODEL_FILES:,} entries; "
                                        "point the base model at the model's own folder")
                rel = path.relative_to(folder)
                if is_skipped(rel) or not path.is_file():
                    continue
                if path.is_symlink():
                    real = path.resolve()
                    if not real.is_relative_to(inside) or not stat.S_ISREG(real.stat().st_mode):
                        raise ProviderError(f"{path} in a model folder links to {real}, outside {inside}; "
                                            "replace the link by the file")
                key = str(path)
                seen.add(key)
                st = path.stat()
                cached = entries.get(key)
                if cached and cached[0] == st.st_size and cached[1] == st.st_mtime_ns:
                    result[rel.as_posix()] = cached[2]
                    continue
                digest = file_sha256(path)
                self.files_read += 1
                result[rel.as_posix()] = digest
                if now - st.st_mtime_ns > RACY_WINDOW_NS:
                    entries[key] = [st.st_size, st.st_mtime_ns, digest]
                    changed = True
                elif entries.pop(key, None) is not None:
                    changed = True
            prefix = str(folder) + os.sep
            for key in [k for k in entries if k.startswith(prefix) and k not in seen]:
                del entries[key]
                changed = True
            if changed:
                self._save(entries)
        return result

    def _save(self, entries: dict[str, list]) -> None:
        from llmops.fsutil import atomic_write_text

        try:
            atomic_write_text(self.path, json.dumps({"version": 1, "files": entries}, sort_keys=True))
        except OSError:
            pass  # the cache is an optimisation; never fail a plan on it


# --- Hugging Face cache -------------------------------------------------------------------


@dataclass(frozen=True)
class HfSnapshot:
    """A model revision found in the Hugging Face cache: its commit and snapshot folder."""

    repo_id: str
    revision: str
    commit: str
    path: Path


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(os.path.expandvars(env)).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hf_offline() -> bool:
    """True when HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE forbid network access."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _is_commit(revision: str) -> bool:
    return len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)


def _prefetch_hint(repo_id: str, revision: str) -> str:
    return (
        f"pre-fetch it on a machine with network access with `hf download {repo_id} --revision {revision}` "
        f"(older huggingface_hub: `huggingface-cli download {repo_id} --revision {revision}`) "
        "and copy the cache here, or point HF_HUB_CACHE at a cache that holds it"
    )


def find_hf_snapshot(repo_id: str, revision: str, cache_dir: Path | None = None) -> HfSnapshot | None:
    """The cached snapshot of `repo_id` at `revision`, or None when the cache lacks it. No network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    cache = Path(cache_dir) if cache_dir is not None else hf_cache_dir()
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=str(cache), local_files_only=True)
    except LocalEntryNotFoundError:  # includes IncompleteSnapshotError
        return None
    except ValueError as exc:  # HFValidationError: not an ORG/NAME id
        raise ProviderError(f"'{repo_id}' is not a valid Hugging Face model id ({exc}); use `hf: ORG/NAME`.") from exc
    path = Path(folder)
    return HfSnapshot(repo_id=repo_id, revision=revision, commit=path.name, path=path)


def resolve_hf_snapshot(
    repo_id: str, revision: str, cache_dir: Path | None = None, allow_download: bool | None = None
) -> HfSnapshot:
    """Find `repo_id@revision` in the cache; download into the cache only when online and allowed.

    Raises ProviderError saying how to pre-fetch when the cache lacks it and the network
    is off or unreachable.
    """
    cache = Path(cache_dir) if cache_dir is not None else hf_cache_dir()
    found = find_hf_snapshot(repo_id, revision, cache)
    if found is not None:
        return found
    if allow_download is None:
        allow_download = not hf_offline()
    if not allow_download:
        raise ProviderError(
            f"Hugging Face model {repo_id} (revision {revision}) is not in the local cache {cache} "
            f"and network access is off (HF_HUB_OFFLINE=1); {_prefetch_hint(repo_id, revision)}."
        )
    return _download_hf_snapshot(repo_id, revision, cache)


def _download_hf_snapshot(repo_id: str, revision: str, cache: Path) -> HfSnapshot:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()  # library code never draws on the terminal
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=str(cache))
    except Exception as exc:  # network, auth, unknown repo or revision: all end the same way
        raise ProviderError(
            f"Hugging Face model {repo_id} (revision {revision}) is not in the local cache {cache} "
            f"and could not be downloaded ({type(exc).__name__}: {exc}); {_prefetch_hint(repo_id, revision)}."
        ) from exc
    finally:
        if not was_disabled:
            enable_progress_bars()
    path = Path(folder)
    return HfSnapshot(repo_id=repo_id, revision=revision, commit=path.name, path=path)


# --- dataset texts --------------------------------------------------------------------------


def _load_train_rows(root: Path, outputs: dict[str, Any]) -> list[dict]:
    from llmops.providers.datasets import load_split

    return load_split(root, outputs, "train")


def texts_of_rows(rows: list[dict]) -> list[str]:
    """Every string field value of every row, in row order; fields starting with `_` (such as
    the `_source` provenance of a dataset with `sources:`) are bookkeeping, not text."""
    return [v for row in rows for k, v in row.items() if isinstance(v, str) and not str(k).startswith("_")]


def model_folder(root: Path, outputs: dict[str, Any], inputs: dict[str, Any] | None = None) -> Path | None:
    """The folder holding a locked base model on *this* machine, or None when it is gone.

    For `hf:` the locked commit is looked up in the current Hugging Face cache (the locked
    absolute path is only where it was on the machine that applied); for build/path the
    project-relative `path` is joined to `root`.
    """
    if outputs.get("source") == "hf":
        repo = (inputs or {}).get("hf")
        commit = outputs.get("commit")
        found = find_hf_snapshot(repo, commit) if repo and commit else None
        # Never the locked absolute path itself: the lock is content a pull request can
        # write, and `path: /` would have plan hash the whole filesystem.
        return found.path if found is not None else None
    rel = outputs.get("path")
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute():
        return None
    base = Path(root).resolve()
    folder = (base / rel).resolve()
    if folder == base or not folder.is_relative_to(base):
        return None  # a lock naming a folder outside the project (or the project itself)
    return folder if folder.is_dir() else None


# --- provider -------------------------------------------------------------------------------


class BaseModelsProvider(Provider):
    """Plans and applies `base_models.*` (hf, path or build)."""

    kind = "base_models"
    heavy_modules = ("torch", "tokenizers", "transformers", "transformers.models.llama.modeling_llama")

    @classmethod
    def summary(cls, outputs: dict[str, Any]) -> str:
        if not outputs.get("path"):
            return ""
        commit = f" (commit {outputs['commit'][:12]})" if outputs.get("commit") else ""
        return f"{outputs.get('source', 'model')} at {outputs['path']}{commit}"

    def __init__(self, ctx: ProviderContext) -> None:
        super().__init__(ctx)
        self.hashes = FileHashCache(ctx.state_dir / "cache" / HASH_CACHE_NAME)

    def _build_dir(self, name: str) -> Path:
        return self.ctx.state_dir / "models" / name

    def preflight(self) -> None:
        """Remove what killed builds left (`.NAME.tmp-*`), even of models this apply does
        not build again; a build running elsewhere keeps its lock and its folder."""
        super().preflight()
        from llmops.train.build import remove_stale_builds

        for path in remove_stale_builds(self.ctx.state_dir / "models"):
            address = f"{self.kind}.{path.name.split('.')[1]}"  # `.NAME.tmp-XXXX`
            self.ctx.log(address, f"removed {path.name}, left by a build that was killed")

    def _path_folder(self, name: str, spec: dict[str, Any]) -> Path:
        folder = self.ctx.root / spec["path"]
        if not folder.is_dir():
            raise ProviderError(
                f"path '{spec['path']}' is not a folder in {self.ctx.root}; "
                "fix `path:` in llmops.yaml or create the model folder."
            )
        return folder

    def content_fingerprint(self, name: str, spec: dict[str, Any]) -> str | None:
        """Hash of what the model *is*: folder files for `path:`, resolved commit for `hf:`.

        None for `build:` (its content follows from spec + upstream dataset). An `hf:` model
        missing from the cache hashes as "unresolved", so the plan shows a change and apply
        explains how to pre-fetch it.
        """
        source = source_of(name, spec)
        if source == "path":
            try:
                folder = self._path_folder(name, spec)
            except ProviderError as exc:
                raise ProviderError(f"base_models.{name}: {exc.message}") from exc
            return sha256_json({"files": self.hashes.hash_folder(folder, self.ctx.root)}, ensure_ascii=True)
        if source == "hf":
            revision = str(spec.get("revision") or "main")
            if _is_commit(revision):
                return sha256_json({"commit": revision}, ensure_ascii=True)
            found = find_hf_snapshot(spec["hf"], revision)
            commit = found.commit if found else f"unresolved:{spec['hf']}@{revision}"
            return sha256_json({"commit": commit}, ensure_ascii=True)
        return None

    def describe(self, name: str, spec: dict[str, Any], locked: LockedResource | None) -> dict[str, Any]:
        if source_of(name, spec) == "hf" and locked is not None and locked.outputs.get("commit"):
            return {"commit": locked.outputs["commit"]}
        return {}

    def estimate(self, name: str, spec: dict[str, Any], locked: LockedResource | None,
                 upstream: dict[str, LockedResource | None]) -> dict[str, Any] | None:
        """Only a `build:` with `pretrain:` trains; other sources cost a download or nothing."""
        build = spec.get("build") if isinstance(spec.get("build"), dict) else {}
        if not isinstance(build.get("pretrain"), dict):
            return None
        from llmops.engine.cost import estimate_pretrain
        from llmops.train.build import PRETRAIN_DEFAULTS

        def epochs(block: Any) -> int:
            value = (block or {}).get("epochs") if isinstance(block, dict) else None
            return int(value) if isinstance(value, int) and not isinstance(value, bool) else PRETRAIN_DEFAULTS["epochs"]

        then = ((locked.spec or {}).get("build") or {}).get("pretrain") if locked else None
        dataset = upstream.get(f"datasets.{build.get('tokenizer_from')}")
        train = (dataset.outputs.get("train") or {}) if dataset else {}
        source = self.ctx.spec_of(f"datasets.{build.get('tokenizer_from')}").get("source")
        size = None
        for rel in (train.get("path"), source):  # the prepared split, else (before any apply) the source
            if size is None and isinstance(rel, str):
                try:
                    size = (self.ctx.root / rel).stat().st_size
                except OSError:
                    size = None
        rows_then = locked.inputs.get("rows") if locked else None
        rows_now = train.get("rows")
        if not (isinstance(rows_now, int) and isinstance(rows_then, int)):
            rows_now = rows_then = None
        return estimate_pretrain(epochs(build.get("pretrain")), locked.outputs if locked else None,
                                 epochs(then) if locked else None, rows_now, rows_then, size)

    def apply(self, request: ApplyRequest) -> ApplyResult:
        source = source_of(request.name, request.spec)
        if source == "build":
            return self._apply_build(request)
        if source == "path":
            folder = self._path_folder(request.name, request.spec)
            files = self.hashes.hash_folder(folder, self.ctx.root)
            return ApplyResult(outputs={"source": "path", "path": request.spec["path"], "files": files})
        revision = str(request.spec.get("revision") or "main")
        snap = resolve_hf_snapshot(request.spec["hf"], revision)
        files = self.hashes.hash_folder(snap.path, _hf_repo_dir(snap.path))
        return ApplyResult(
            outputs={"source": "hf", "path": str(snap.path), "files": files, "commit": snap.commit},
            inputs={"hf": snap.repo_id, "revision": revision, "commit": snap.commit},
        )

    def _apply_build(self, request: ApplyRequest) -> ApplyResult:
        from llmops.train.build import build_tiny_model

        build = dict(request.spec["build"])
        dataset = build.get("tokenizer_from")
        if not dataset:
            raise ProviderError("build needs `tokenizer_from: DATASET`; fix llmops.yaml.")
        upstream = request.upstream.get(f"datasets.{dataset}")
        if upstream is None:
            raise ProviderError(
                f"the lock has no entry for datasets.{dataset} (tokenizer_from); "
                f"apply it first with `llmops apply --target datasets.{dataset}`."
            )
        try:
            texts = texts_of_rows(_load_train_rows(self.ctx.root, upstream.outputs))
        except (OSError, ValueError) as exc:
            raise ProviderError(
                f"cannot read the train split of datasets.{dataset} ({exc}); "
                f"re-create it with `llmops apply --replace datasets.{dataset}`."
            ) from exc
        except ProviderError as exc:
            raise ProviderError(f"datasets.{dataset}: {exc.message}") from exc
        what = "building and pre-training" if build.get("pretrain") is not None else "building"
        request.progress(ProgressEvent(message=f"{what} a model from {len(texts)} texts of datasets.{dataset}"))
        out_dir = self._build_dir(request.name)
        built = build_tiny_model(build, texts, out_dir)
        rel = out_dir.relative_to(self.ctx.root).as_posix()
        texts_digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()
        outputs: dict[str, Any] = {"source": "build", "path": rel, "files": built["files"]}
        if "pretrain" in built:
            stats = built["pretrain"]
            outputs["pretrain"] = stats
            request.log(f"pre-trained {stats['steps']} steps on {stats['tokens']:,} tokens in "
                                          f"{stats['seconds']:.1f} s (loss {stats['first_loss']} -> {stats['last_loss']})")
        inputs: dict[str, Any] = {"tokenizer_from": f"datasets.{dataset}", "texts": len(texts),
                                  "texts_sha256": texts_digest}
        rows = (upstream.outputs.get("train") or {}).get("rows")
        if isinstance(rows, int):
            inputs["rows"] = rows  # what a pre-training estimate scales by
        return ApplyResult(outputs=outputs, inputs=inputs)

    def refresh(self, name: str, spec: dict[str, Any], locked: LockedResource) -> list[Drift]:
        out = locked.outputs
        folder = model_folder(self.ctx.root, out, locked.inputs)
        if folder is None:
            if out.get("source") == "hf":
                repo = locked.inputs.get("hf") or spec.get("hf")
                return [Drift(f"the Hugging Face cache no longer has {repo} at commit {out.get('commit')}; the "
                              "pinned commit will be fetched into it and its files verified", "restore", "missing")]
            if out.get("source") == "build":
                return [Drift(f"model folder {out.get('path')} is missing; the build is deterministic: it will be "
                              "built again and verified against the locked sha256 of every file", "restore", "missing")]
            return [Drift(f"model folder {out.get('path')} is missing", code="missing")]
        within = _hf_repo_dir(folder) if out.get("source") == "hf" else self.ctx.root
        drifts = _files_drift(out.get("files", {}), self.hashes.hash_folder(folder, within))
        if drifts and out.get("source") == "build":
            return [Drift(drifts[0].reason + "; it will be built again and verified", "restore")]
        return drifts

    def restore(self, request: ApplyRequest) -> ApplyResult:
        """Bring back the locked model: rebuild a (bit-for-bit reproducible) `build:`, fetch the
        pinned commit of an `hf:` model; either way every file must hash as the lock says."""
        before = request.before
        if before is None:
            raise ProviderError(f"{request.address}: nothing is recorded in llmops.lock to restore; run `llmops apply`.")
        source = before.outputs.get("source")
        if source == "build":
            result = self._apply_build(request)
        elif source == "hf":
            snap = resolve_hf_snapshot(str(before.inputs.get("hf")), str(before.outputs.get("commit")))
            result = ApplyResult(outputs={**before.outputs, "path": str(snap.path),
                                          "files": self.hashes.hash_folder(snap.path, _hf_repo_dir(snap.path))},
                                 inputs=dict(before.inputs))
        else:
            raise ProviderError(f"{request.address}: model folder {before.outputs.get('path')} is missing; "
                                "put it back (it is yours, llmops does not copy `path:` models).")
        drift = _files_drift(before.outputs.get("files", {}), result.outputs.get("files", {}))
        if drift:
            raise ProviderError(f"{request.address}: the restored model does not match llmops.lock: {drift[0].reason}; "
                                f"run `llmops apply --replace {request.address}` to rebuild it and what uses it.")
        return result

    def delete(self, name: str, locked: LockedResource) -> None:
        if locked.outputs.get("source") != "build":
            return  # the hf cache and user folders are not ours to remove
        folder = self._build_dir(name)
        if folder.is_dir():
            shutil.rmtree(folder)


def _hf_repo_dir(snapshot: Path) -> Path:
    """`models--ORG--NAME/` of a snapshot folder `.../snapshots/COMMIT`: its files link to `blobs/`."""
    return Path(snapshot).parent.parent


def _files_drift(locked_files: dict[str, str], live: dict[str, str]) -> list[Drift]:
    """One Drift naming the files that were added, removed or changed since apply."""
    changed = sorted(p for p in locked_files.keys() & live.keys() if locked_files[p] != live[p])
    missing = sorted(locked_files.keys() - live.keys())
    added = sorted(live.keys() - locked_files.keys())
    parts = []
    for label, names in (("changed", changed), ("missing", missing), ("new", added)):
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            parts.append(f"{label}: {shown}")
    return [Drift("model files differ from the lock (" + "; ".join(parts) + ")")] if parts else []
