"""Validation of a parsed llmops.yaml: schema, references, cycles, files, prompt examples.

All problems are collected as Diagnostics (never stopping at the first) and raised together
as one ValidationError. `load_config` is the single entry point the rest of llmops uses.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from llmops.engine.addrs import KINDS, address_sort_key
from llmops.config.document import CONFIG_NAME, Document, apply_target, load_document, resolved_settings
from llmops.digestcache import cache_secret
from llmops.errors import Diagnostic, ValidationError
from llmops.engine.graph import Graph
from llmops.config.refs import references, resolve
from llmops.config.schema import SCHEMA_PATH, load_schema



@dataclass
class Resource:
    address: str
    kind: str
    name: str
    spec: dict[str, Any]


@dataclass
class Config:
    """A valid, target-resolved llmops.yaml.

    `resources` is keyed by address in document order; `deps` holds each resource's
    upstream addresses (dependency edges only; an eval's baseline is not one).
    """

    root: Path
    doc: Document
    target: str | None
    settings: dict[str, Any]
    resources: dict[str, Resource] = field(default_factory=dict)
    deps: dict[str, list[str]] = field(default_factory=dict)

    @property
    def data(self) -> dict[str, Any]:
        return self.doc.data

    def graph(self) -> Graph:
        return Graph(self.deps)


def load_config(root: Path, target: str | None = None, config_name: str = CONFIG_NAME) -> Config:
    """Parse, overlay the target, and validate; raise ValidationError with every problem."""
    doc = load_document(root / config_name, display=config_name, cache_dir=_cache_dir(root))
    doc = apply_target(doc, target)
    cache = _CheckCache(root)
    key = cache.key("schema", doc.text, str(target), _schema_stamp())
    diags = cache.get(key)
    if diags is None:
        diags = cache.put(key, check_schema(doc) + _check_numbers(doc) + _check_other_targets(doc, target))
    config = Config(root=root, doc=doc, target=target,
                    settings=resolved_settings(doc.data if isinstance(doc.data, dict) else {}))
    if isinstance(doc.data, dict):
        _collect_resources(config)
        diags += _check_references(config)
        diags += _check_cycles(config)
        diags += _check_files(config)
        diags += _check_prompts(config, cache)
        diags += _check_combinations(config)
    cache.save()
    if diags:
        diags.sort(key=lambda d: (d.line, d.column))
        raise ValidationError(diags)
    return config


@lru_cache(maxsize=1)
def _validator():
    from jsonschema import Draft202012Validator

    schema = load_schema()
    return Draft202012Validator(schema)


def check_schema(doc: Document) -> list[Diagnostic]:
    if not isinstance(doc.data, dict):
        return [doc.diagnostic((), "the file must be a mapping with `version`, `project` and resource kinds")]
    out: list[Diagnostic] = []
    for error in _validator().iter_errors(doc.data):
        out.extend(_schema_diagnostics(doc, error))
    # jsonschema can report the same place twice through different branches.
    unique: dict[tuple, Diagnostic] = {}
    for d in out:
        unique.setdefault((d.path, d.summary), d)
    return list(unique.values())


def _schema_diagnostics(doc: Document, error) -> list[Diagnostic]:
    from jsonschema.exceptions import best_match

    path = tuple(error.absolute_path)
    exclusive = _exclusive_keys(error)
    if exclusive is not None and isinstance(error.instance, dict):
        present = [k for k in exclusive if k in error.instance]
        found = f" (found {', '.join(present)})" if present else " (found none)"
        return [doc.diagnostic(path, f"needs exactly one of {', '.join(exclusive)}{found}",
                               "keep only one of them" if present else f"add one of {', '.join(exclusive)}")]
    if error.validator == "maxProperties" and error.validator_value == 1 and isinstance(error.instance, dict):
        return [doc.diagnostic(path, f"each step has exactly one key; found {', '.join(map(str, error.instance))}",
                               "split it into one list item per step")]
    if error.validator in ("oneOf", "anyOf") and error.context:
        deepest = best_match(error.context)
        return _schema_diagnostics(doc, deepest)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = list((error.schema.get("properties") or {}).keys())
        out = []
        for key in error.instance:
            if key in known:
                continue
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else (
                f"allowed keys: {', '.join(known)}" if known else "")
            out.append(doc.diagnostic(path + (key,), f"unknown key '{key}'", hint))
        return out or [doc.diagnostic(path, error.message)]
    if error.validator == "propertyNames":
        return [doc.diagnostic(path, f"invalid name: {error.message}",
                               "names use lowercase letters, digits, '-' and '_'")]
    if error.validator == "required":
        return [doc.diagnostic(path, error.message, "add the missing key")]
    return [doc.diagnostic(path, error.message)]


def _exclusive_keys(error) -> list[str] | None:
    """For `oneOf: [{required: [a]}, {required: [b]}, ...]`: the keys [a, b, ...]."""
    if error.validator != "oneOf" or not isinstance(error.validator_value, list):
        return None
    keys = []
    for branch in error.validator_value:
        req = branch.get("required") if isinstance(branch, dict) else None
        if not (isinstance(req, list) and len(req) == 1):
            return None
        keys.append(req[0])
    return keys


def _collect_resources(config: Config) -> None:
    for kind in KINDS:
        block = config.data.get(kind)
        if not isinstance(block, dict):
            continue
        for name, spec in block.items():
            addr = f"{kind}.{name}"
            config.resources[addr] = Resource(addr, kind, str(name), spec if isinstance(spec, dict) else {})


def _names(config: Config) -> dict[str, set[str]]:
    names: dict[str, set[str]] = {k: set() for k in KINDS}
    for r in config.resources.values():
        names[r.kind].add(r.name)
    return names


def _check_references(config: Config) -> list[Diagnostic]:
    names = _names(config)
    diags: list[Diagnostic] = []
    for addr, r in config.resources.items():
        deps: list[str] = []
        for ref in references(r.kind, r.name, r.spec):
            target = resolve(ref, names)
            if target is None:
                path = (r.kind, r.name) + ref.path
                if ref.path == ("deployment",) and "deployment" not in r.spec:
                    path = (r.kind, r.name)
                candidates = [n for k in ref.kinds for n in names.get(k, ())]
                close = difflib.get_close_matches(ref.value.split(".")[-1], candidates, n=1)
                hint = f"did you mean '{close[0]}'?" if close else (
                    f"define it under `{ref.kinds[0]}:`")
                kinds = " or ".join(k.rstrip("s").replace("_", " ") for k in ref.explicit_kinds)
                diags.append(config.doc.diagnostic(path, f"unknown {kinds} '{ref.value}'", hint))
            elif ref.edge and target != addr:
                deps.append(target)
        config.deps[addr] = sorted(set(deps), key=address_sort_key)
    return diags


def _check_cycles(config: Config) -> list[Diagnostic]:
    cycle = Graph(config.deps).find_cycle()
    if not cycle:
        return []
    kind, _, name = cycle[0].partition(".")
    return [config.doc.diagnostic((kind, name), f"dependency cycle: {' -> '.join(cycle)}",
                                  "break the cycle: a resource cannot depend on itself through others")]


_FILE_FIELDS = {"datasets": ("source", "file"), "prompts": ("template", "file"), "base_models": ("path", "dir")}


def _check_numbers(doc: Document) -> list[Diagnostic]:
    """`.inf` and `.nan` pass every JSON-schema bound (nan compares false), so refuse them here."""
    out: list[Diagnostic] = []

    def walk(value: Any, path: tuple) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            out.append(doc.diagnostic(path, f"{value} is not a finite number", "write a finite number"))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, path + (k,))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, path + (i,))

    walk(doc.data, ())
    return out


def _check_other_targets(doc: Document, selected: str | None) -> list[Diagnostic]:
    """Schema problems that only an overlay other than the selected one brings in."""
    data = doc.data if isinstance(doc.data, dict) else {}
    targets = data.get("targets")
    if not isinstance(targets, dict):
        return []
    base = {(d.path, d.summary) for d in check_schema(doc) + _check_numbers(doc)}
    out: list[Diagnostic] = []
    for name in targets:
        if name == selected or not isinstance(targets[name], dict):
            continue  # the selected overlay is the document itself; a non-mapping is a schema error
        merged = apply_target(doc, str(name))
        for d in check_schema(merged) + _check_numbers(merged):
            if (d.path, d.summary) not in base:
                out.append(Diagnostic(f"with --target {name}: {d.summary}", d.path, d.file, d.line, d.column,
                                      d.hint or f"fix targets.{name} or the field it overlays"))
    return out


def _inside_project(root: Path, rel: str, base: Path | None = None) -> str | None:
    """Why `rel` may not be used as a project file (None: it may): absolute, or resolving
    (symlinks included) outside the project folder. `base`: `root.resolve()`, when the
    caller checks many files."""
    if Path(rel).is_absolute() or rel.startswith("~"):
        return "is absolute; paths are relative to the project folder"
    try:
        real = (root / rel).resolve()
        base = base or root.resolve()
    except (OSError, RuntimeError):
        return "cannot be resolved (a symlink loop?)"
    if not real.is_relative_to(base):
        return "resolves outside the project folder (a symlink or `..`)"
    if real == base:
        return "is the project folder itself"
    if any(part.startswith(".") for part in real.relative_to(base).parts):
        return "is under a hidden folder (.git, .llmops, ...), which llmops reads only for itself"
    return None


def _check_files(config: Config) -> list[Diagnostic]:
    diags = []
    try:
        base = config.root.resolve()
    except (OSError, RuntimeError):
        base = None
    for r in config.resources.values():
        field_kind = _FILE_FIELDS.get(r.kind)
        if not field_kind:
            continue
        key, what = field_kind
        places = [((r.kind, r.name, key), r.spec.get(key))]
        if r.kind == "datasets" and isinstance(r.spec.get("sources"), list):
            places += [((r.kind, r.name, "sources", i), rel) for i, rel in enumerate(r.spec["sources"])]
        for where, rel in places:
            if isinstance(rel, str):
                diags += _check_file(config, r.kind, where, rel, what, base)
    return diags


def _check_file(config: Config, kind: str, where: tuple, rel: str, what: str,
                base: Path | None = None) -> list[Diagnostic]:
    from llmops.templating.prompt_template import PromptError, template_path

    shown = rel if len(rel) <= 120 else rel[:117] + "..."
    problem = _inside_project(config.root, rel, base)
    if problem:
        return [config.doc.diagnostic(where, f"{what} {shown} {problem}",
                                      "name a file inside the project, not a link to one outside")]
    if kind == "prompts":
        try:
            template_path(config.root, rel)
        except PromptError as exc:
            if "not found" not in exc.summary:
                return [config.doc.diagnostic(where, exc.summary, exc.hint)]
    p = config.root / rel
    ok = p.is_file() if what == "file" else p.is_dir()
    if not ok:
        exists_as = " (it is a folder)" if what == "file" and p.is_dir() else ""
        return [config.doc.diagnostic(where, f"{what} not found: {shown}{exists_as}",
                                      f"paths are relative to the project folder {config.root}")]
    return []


def _check_combinations(config: Config) -> list[Diagnostic]:
    """Settings that are each valid but do not work together."""
    diags = []
    watched: dict[str, str] = {}  # deployment -> the first monitor watching it
    for r in config.resources.values():
        spec = r.spec
        if r.kind == "monitors":
            from llmops.monitor.spec import monitor_deployment

            deployment = monitor_deployment(r.name, spec)
            if deployment in watched:  # its server logs to one store: which monitor's would be a guess
                diags.append(config.doc.diagnostic(
                    (r.kind, r.name, "deployment") if "deployment" in spec else (r.kind, r.name),
                    f"deployments.{deployment} is already watched by monitors.{watched[deployment]}, and a "
                    "server logs requests to one store",
                    "keep one monitor per deployment: merge the two, or point this one at another deployment"))
            watched.setdefault(deployment, r.name)
            drift = spec.get("drift") if isinstance(spec.get("drift"), dict) else {}
            if drift.get("embedding_model") and not spec.get("log_text"):
                diags.append(config.doc.diagnostic(
                    (r.kind, r.name, "drift", "embedding_model"),
                    "embedding drift needs the prompt texts, which are only stored with log_text: true",
                    "add `log_text: true` to this monitor, or drop embedding_model"))
        if r.kind == "evals":
            diags += _check_custom_metrics(config, r)
            diags += _check_gated_metrics(config, r)
            diags += _check_compare_to(config, r)
        if r.kind == "deployments" and isinstance(spec.get("serve"), dict):
            serve = spec["serve"]
            host = serve.get("host", "127.0.0.1")
            if isinstance(host, str) and host not in LOOPBACK_HOSTS and not serve.get("auth_token_env"):
                diags.append(config.doc.diagnostic(
                    (r.kind, r.name, "serve", "host"),
                    f"serve.host {host} opens the model to the network without authentication",
                    "set serve.auth_token_env to the variable holding a bearer token, or serve on 127.0.0.1"))
            runner = serve.get("runner") or config.settings.get("runner")
            if serve.get("engine") == "vllm":  # its image has a default; it always runs on Docker
                from llmops.serve.vllm import serve_problems

                diags += [config.doc.diagnostic((r.kind, r.name, "serve", *where), summary, hint)
                          for where, summary, hint in serve_problems(serve)]
            elif runner == "docker" and not serve.get("image"):
                diags.append(config.doc.diagnostic(
                    (r.kind, r.name, "serve"), "serving with runner docker needs serve.image",
                    "build one with `docker build -f templates/Dockerfile.serve -t IMAGE .` and name it here"))
    return diags + _check_deployment_clashes(config)


def _check_deployment_clashes(config: Config) -> list[Diagnostic]:
    """Two deployments cannot serve on one host:port, nor move one model's alias."""
    diags: list[Diagnostic] = []
    ports: dict[tuple[str, int], str] = {}
    aliases: dict[tuple[str, str], str] = {}
    for r in config.resources.values():
        if r.kind != "deployments":
            continue
        serve = r.spec.get("serve")
        if isinstance(serve, dict) and isinstance(serve.get("port"), int) and serve["port"]:
            key = (str(serve.get("host", "127.0.0.1")), serve["port"])
            if key in ports:
                diags.append(config.doc.diagnostic(
                    (r.kind, r.name, "serve", "port"), f"port {key[1]} on {key[0]} is also served by "
                    f"deployments.{ports[key]}", "give each deployment its own serve.port"))
            ports.setdefault(key, r.name)
        model = r.spec.get("model")
        if isinstance(model, str):
            mkey = (model.rpartition(".")[2], str(r.spec.get("alias", "production")))
            if mkey in aliases:
                diags.append(config.doc.diagnostic(
                    (r.kind, r.name, "alias"), f"model '{mkey[0]}' alias '{mkey[1]}' is also moved by "
                    f"deployments.{aliases[mkey]}", "give one of them another alias, or merge the two"))
            aliases.setdefault(mkey, r.name)
    return diags


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def _check_gated_metrics(config: Config, r: Resource) -> list[Diagnostic]:
    """A threshold or regression limit on a metric the eval does not compute never gates."""
    metrics = r.spec.get("metrics") if isinstance(r.spec.get("metrics"), list) else []
    measured = {m if isinstance(m, str) else m.get("name") for m in metrics if isinstance(m, (str, dict))}
    shown = ", ".join(sorted(str(m) for m in measured if m)) or "none"
    gated: list[tuple[tuple, str]] = []
    thresholds = r.spec.get("thresholds")
    if isinstance(thresholds, dict):
        gated += [(("thresholds", name), name) for name in thresholds]
    baseline = r.spec.get("baseline")
    if isinstance(baseline, dict):
        for limit in ("max_drop", "max_rise"):
            if isinstance(baseline.get(limit), dict):
                gated += [(("baseline", limit, name), name) for name in baseline[limit]]
    compare = r.spec.get("compare_to")
    if isinstance(compare, dict) and isinstance(compare.get("min_gain"), dict):
        gated += [(("compare_to", "min_gain", name), name) for name in compare["min_gain"]]
    return [config.doc.diagnostic((r.kind, r.name, *where), f"gate on metric '{name}', which this eval does not compute",
                                  f"add {name} to metrics, or remove the gate (metrics: {shown})")
            for where, name in gated if name not in measured]


def _check_compare_to(config: Config, r: Resource) -> list[Diagnostic]:
    """`compare_to` names another eval of the same rows that computes the compared metrics."""
    compare = r.spec.get("compare_to")
    name = compare.get("eval") if isinstance(compare, dict) else compare
    if not isinstance(name, str):
        return []
    where = ("compare_to", "eval") if isinstance(compare, dict) else ("compare_to",)
    other = config.resources.get(name if name.startswith("evals.") else f"evals.{name}")
    if other is None:
        return []  # an unknown name is reported with the other references
    if other.name == r.name:
        return [config.doc.diagnostic((r.kind, r.name, *where), "an eval cannot be compared to itself",
                                      "name the eval of the base model (or another model) to compare with")]
    if other.spec.get("dataset") != r.spec.get("dataset"):
        return [config.doc.diagnostic(
            (r.kind, r.name, *where), f"evals.{other.name} scores dataset '{other.spec.get('dataset')}', this eval "
            f"'{r.spec.get('dataset')}': their metrics are not comparable", "compare two evals of the same dataset")]
    gains = compare.get("min_gain") if isinstance(compare, dict) else None
    metrics = other.spec.get("metrics") if isinstance(other.spec.get("metrics"), list) else []
    measured = {m if isinstance(m, str) else m.get("name") for m in metrics if isinstance(m, (str, dict))}
    return [config.doc.diagnostic((r.kind, r.name, "compare_to", "min_gain", metric),
                                  f"gain gate on '{metric}', which evals.{other.name} does not compute",
                                  f"add {metric} to evals.{other.name}.metrics")
            for metric in (gains if isinstance(gains, dict) else {}) if metric not in measured]


def _find_module(module: str, root: Path) -> bool:
    """Whether `module` can be imported from the project or the environment, found without
    running any of its code: `importlib.util.find_spec('a.b')` would import package `a`,
    and a pull request's `a/__init__.py` must not run in a check."""
    import sys
    from importlib.machinery import PathFinder

    parts = module.split(".")
    if not all(p.isidentifier() for p in parts):
        return False
    if module in sys.modules:
        return True
    loaded = sys.modules.get(parts[0])
    spec = loaded.__spec__ if loaded is not None and getattr(loaded, "__spec__", None) else None
    if spec is None:
        spec = PathFinder.find_spec(parts[0], [str(root), *sys.path])
        if spec is None:
            try:  # built-in and frozen modules: found by name, nothing is executed
                spec = importlib.util.find_spec(parts[0]) if parts[0] in sys.builtin_module_names else None
            except (ImportError, ValueError):
                spec = None
    for i in range(1, len(parts)):
        locations = spec.submodule_search_locations if spec is not None else None
        if not locations:
            return False
        spec = PathFinder.find_spec(".".join(parts[: i + 1]), list(locations))
    return spec is not None


def _check_custom_metrics(config: Config, r: Resource) -> list[Diagnostic]:
    """A custom metric's module must be findable (found, not imported: validate runs no PR code)."""
    diags: list[Diagnostic] = []
    metrics = r.spec.get("metrics")
    for i, metric in enumerate(metrics if isinstance(metrics, list) else []):
        target = metric.get("python") if isinstance(metric, dict) else None
        if not isinstance(target, str) or ":" not in target:
            continue
        module = target.partition(":")[0]
        found = _find_module(module, config.root)
        if not found:
            diags.append(config.doc.diagnostic(
                (r.kind, r.name, "metrics", i, "python"), f"module '{module}' of custom metric not found",
                f"put {module.replace('.', '/')}.py in the project folder, or install the package that has it"))
    return diags


def _schema_stamp() -> str:
    st = SCHEMA_PATH.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


class _CheckCache:
    """Results of the slow, pure checks (schema, prompt rendering), keyed by their inputs.

    Stored in `.llmops/cache/checks.json`; only this run's keys are kept. Validating a big
    unchanged project then costs parsing plus the cheap cross-reference checks.

    The file sits in the checkout, where a pull request can commit one: keys are an HMAC
    under a secret kept outside the project (`$XDG_CACHE_HOME/llmops/checks.key`, made on
    first use), so a planted entry never matches and a planted file only costs a recheck.
    A prompt's entry also records the sha256 of every template file its check read
    (includes too, even dynamic ones), and counts only while those files are unchanged.
    Without a writable cache folder there is no caching.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / ".llmops" / "cache" / "checks.json"
        self.secret = cache_secret()
        try:
            self.old = json.loads(self.path.read_text()) if self.secret and self.path.is_file() else {}
        except (OSError, ValueError):
            self.old = {}
        if not isinstance(self.old, dict):
            self.old = {}
        self.new: dict[str, dict] = {}

    def key(self, *parts: str) -> str:
        import hashlib
        import hmac

        return hmac.new(self.secret or b"-", "\0".join(parts).encode(), hashlib.sha256).hexdigest()

    def get(self, key: str) -> list[Diagnostic] | None:
        from llmops.templating.prompt_template import template_stamp

        hit = self.old.get(key)
        if not self.secret or not isinstance(hit, dict) or not isinstance(hit.get("diags"), list):
            return None
        deps = hit.get("deps") or {}
        if not isinstance(deps, dict) or any(template_stamp(self.root, rel) != stamp for rel, stamp in deps.items()):
            return None
        try:
            found = [Diagnostic(**d) for d in hit["diags"]]
        except TypeError:
            return None
        self.new[key] = hit
        return found

    def put(self, key: str, diags: list[Diagnostic], reads: set[str] = frozenset()) -> list[Diagnostic]:
        from llmops.templating.prompt_template import template_stamp

        deps = {rel: template_stamp(self.root, rel) for rel in sorted(reads)}
        self.new[key] = {"deps": deps, "diags": [d.to_dict() for d in diags]}
        return list(diags)

    def save(self) -> None:
        if not self.secret or self.new == self.old:
            return
        from llmops.fsutil import atomic_write_text

        try:
            atomic_write_text(self.path, json.dumps(self.new, sort_keys=True))
        except OSError:
            pass


def _cache_dir(root: Path) -> Path | None:
    """`.llmops/cache` of the project when it may be written (an existing state folder, or a
    project folder we can create it in); None: no caching."""
    state = root / ".llmops"
    return state / "cache" if state.is_dir() or os.access(root, os.W_OK) else None


def _check_prompts(config: Config, cache: _CheckCache) -> list[Diagnostic]:
    from llmops.templating.prompt_template import PromptError, check_prompt, template_path

    diags: list[Diagnostic] = []
    # Templates may include files under the folder of any declared template (not the root).
    dirs = sorted({t.replace("\\", "/").rpartition("/")[0] for r in config.resources.values()
                   if r.kind == "prompts" and isinstance(t := r.spec.get("template"), str)} - {""})
    for r in config.resources.values():
        if r.kind != "prompts":
            continue
        rel = r.spec.get("template")
        if isinstance(rel, str):
            try:
                template_path(config.root, rel)
            except PromptError:
                continue  # already reported by _check_files
        key = cache.key("prompt", r.name, json.dumps(r.spec, sort_keys=True, default=str), *dirs)
        found = cache.get(key)
        if found is None:
            reads: set[str] = set()
            found = cache.put(key, check_prompt(r.name, r.spec, config.root, template_dirs=dirs, reads=reads), reads)
        for d in found:
            if not d.file or not d.line:
                pos = config.doc.diagnostic(("prompts", r.name), d.summary, d.hint)
                d = Diagnostic(d.summary, d.path or pos.path, pos.file, pos.line, pos.column, d.hint)
            diags.append(d)
    return diags
