"""Prompts: versioned by content and registered in MLflow's prompt registry.

A prompt's fingerprint covers its template files (and static includes); apply registers
the template as a new prompt version only when its content digest differs from the latest
registered one, then points the alias of the current target (`--target NAME`, or
`default`; `LLMOPS_PROMPT_ALIAS` overrides both, for a pull request's CI job) at it. Refresh reads the alias back: moved by hand, it is drift.
"""

from __future__ import annotations

from typing import Any

from llmops.errors import ProviderError
from llmops.engine.lockfile import LockedResource
from llmops.providers.base import ApplyRequest, ApplyResult, Drift, Provider
from llmops.providers.tracking_store import TrackingStore

PROMPT_ALIAS_ENV = "LLMOPS_PROMPT_ALIAS"


class PromptsProvider(TrackingStore, Provider):
    kind = "prompts"
    heavy_modules = ("mlflow",)

    @classmethod
    def summary(cls, outputs: dict[str, Any]) -> str:
        if not outputs.get("version"):
            return ""
        return f"registered version {outputs['version']} (alias {outputs.get('alias')})"

    def file_inputs(self, name: str, spec: dict[str, Any]) -> list[str]:
        """The template files the prompt reads (its own and static includes). Compiling every
        template on every plan dominated plan time at scale, so the list is cached by the
        digest of the spec and kept while the sha256 of every file the compile asked for
        (found or not) is unchanged (see `llmops.digestcache`)."""
        import json

        from llmops.digestcache import DigestCache, digest
        from llmops.templating.prompt_template import PromptError, load_prompt, template_stamp

        if self._files_cache is None:
            self._files_cache = DigestCache(self.ctx.state_dir / "cache" / "prompt-files.json")
        key = digest("prompt-files", json.dumps(spec, sort_keys=True, default=repr))
        hit = self._files_cache.get(key)
        if (isinstance(hit, dict) and isinstance(hit.get("deps"), dict) and isinstance(hit.get("files"), list)
                and all(isinstance(f, str) for f in hit["files"])
                and all(template_stamp(self.ctx.root, rel) == stamp for rel, stamp in hit["deps"].items())):
            return list(hit["files"])
        reads: set[str] = set()
        try:
            files = load_prompt(spec, self.ctx.root, reads=reads).files()
        except PromptError:
            self._files_cache.discard(key)
            rel = spec.get("template")
            return [rel] if isinstance(rel, str) else []
        self._files_cache.put(key, {"files": files,
                                    "deps": {rel: template_stamp(self.ctx.root, rel) for rel in sorted(reads)}})
        return files

    _files_cache: Any = None

    def plan_done(self) -> None:
        super().plan_done()
        if self._files_cache is not None:
            self._files_cache.save()
            self._files_cache = None

    def _alias(self) -> str:
        """`LLMOPS_PROMPT_ALIAS` (a pull request's CI job sets `pr-N`, so a candidate never moves
        an alias anyone reads), else the target's name, else `default`."""
        import os
        import re

        alias = os.environ.get(PROMPT_ALIAS_ENV, "").strip()
        if alias and not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", alias):
            raise ProviderError(f"{PROMPT_ALIAS_ENV}={alias[:80]!r} is not a prompt alias: use lower-case letters, "
                                "digits, '-' and '_' (e.g. pr-42).")
        return alias or self.ctx.target or "default"

    def _client(self):
        from llmops.integrations.mlflow import client

        return client(self.ctx.root, self.ctx.settings)

    def apply(self, request: ApplyRequest) -> ApplyResult:
        from llmops.templating.prompt_template import PromptError, load_prompt

        try:
            prompt = load_prompt(request.spec, self.ctx.root, request.name)
        except PromptError as exc:
            raise ProviderError(exc.message) from None
        digest = prompt.digest()
        if prompt.is_chat:
            template: Any = [{"role": s.role, "content": s.source} for s in prompt.sources]
        else:
            template = prompt.sources[0].source
        client = self._client()
        version = self._find_version(client, request.name, digest)
        if version is None:
            try:
                pv = client.register_prompt(
                    name=request.name,
                    template=template,
                    commit_message=f"llmops apply ({request.address}, {digest[:19]})",
                    tags={"llmops.digest": digest, "llmops.address": request.address},
                )
            except Exception as exc:  # noqa: BLE001 - MLflow raises many types; name the place
                raise ProviderError(f"cannot register the prompt in MLflow: {exc}") from exc
            version = int(pv.version)
        alias = self._alias()
        client.set_prompt_alias(request.name, alias, version)
        return ApplyResult(
            outputs={
                "name": request.name,
                "version": version,
                "uri": f"prompts:/{request.name}/{version}",
                "alias": alias,
                "digest": digest,
                "files": prompt.files(),
            },
            inputs={"digest": digest},
        )

    def _find_version(self, client, name: str, digest: str) -> int | None:
        """The newest registered version with this content digest (re-apply registers nothing)."""
        try:
            found = client.search_prompt_versions(name)
        except Exception:  # noqa: BLE001 - no such prompt yet
            return None
        # MLflow 3 returns a PagedList here; older 3.x a response object with .prompt_versions
        versions = list(getattr(found, "prompt_versions", found))
        for pv in sorted(versions, key=lambda v: int(v.version), reverse=True):
            if (pv.tags or {}).get("llmops.digest") == digest:
                return int(pv.version)
        return None

    def refresh(self, name: str, spec: dict[str, Any], locked: LockedResource) -> list[Drift]:
        from llmops.integrations.mlflow import display_uri, not_found, registry_uri, store_error

        out = locked.outputs
        if "version" not in out:
            return [Drift("no registered prompt version recorded", "replace", "missing")]
        alias = out.get("alias", self._alias())
        live = self.bulk("aliases", self._bulk_aliases)
        if live is not None and live.get(name, {}).get(str(alias)) == str(out["version"]):
            return []  # in sync; anything else is asked about singly, as before
        client = self._client()
        uri = registry_uri(self.ctx.root, self.ctx.settings)
        try:
            pv = client.get_prompt_version_by_alias(name, alias)
        except Exception as exc:  # noqa: BLE001 - MlflowException, or a transport error of a dead server
            if not not_found(exc):
                raise store_error(uri, exc) from exc
            if self._version_gone(client, name, int(out["version"])):
                # A deleted local MLflow database, say: register it again (same content digest).
                return [Drift(f"prompt {name} v{out['version']} is not in the prompt registry {display_uri(uri)}: "
                              "it will be registered again", "update", "missing")]
            return [Drift(f"prompt alias {alias} of {name} is missing in the registry", "update", "missing")]
        if int(pv.version) != int(out["version"]):
            return [Drift(f"prompt alias {alias} -> v{pv.version}, lock says v{out['version']}", "update")]
        return []

    def _bulk_aliases(self) -> dict[str, dict[str, str]] | None:
        """{prompt: {alias: version}} of every prompt the lock holds: one registry search."""
        from llmops.integrations.mlflow import bulk_aliases, registry_uri

        names = [name for name, _, locked in self.refreshing if "version" in locked.outputs]
        return bulk_aliases(self._client, names, prompts=True, uri=registry_uri(self.ctx.root, self.ctx.settings))

    def _version_gone(self, client, name: str, version: int) -> bool:
        from llmops.integrations.mlflow import not_found

        try:
            client.get_prompt_version(name, version)
        except Exception as exc:  # noqa: BLE001 - as above; refresh already reached the registry
            return not_found(exc)
        return False

    def delete(self, name: str, locked: LockedResource) -> None:
        alias = locked.outputs.get("alias")
        if alias:
            try:
                self._client().delete_prompt_alias(name, alias)
            except Exception:  # noqa: BLE001 - already gone: nothing to undo; history stays in MLflow
                pass
