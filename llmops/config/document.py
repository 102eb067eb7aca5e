"""Loading llmops.yaml: YAML with source positions, target overlays, settings defaults.

`load_document` returns the parsed document and a map from document paths (tuples of keys
and list indices) to (line, column), so every later check can point at the exact place.
Nothing here validates beyond YAML syntax and duplicate keys; see `llmops.validate`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmops.errors import Diagnostic, LlmopsError, ValidationError

CONFIG_NAME = "llmops.yaml"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

Path_ = tuple  # a document path: ("finetunes", "lora", "training", "epochs")

DEFAULT_SETTINGS: dict[str, Any] = {
    "tracking_uri": "sqlite:///.llmops/mlflow.db",
    "runner": "local",
    "parallelism": 2,
}


@dataclass
class Document:
    """A parsed YAML file: `data` plus the (line, column) of every node, 1-based."""

    file: str
    data: Any
    positions: dict[tuple, tuple[int, int]] = field(default_factory=dict)
    text: str = ""

    def where(self, path: tuple) -> tuple[int, int]:
        """Position of `path`, or of its closest ancestor that has one."""
        while path:
            pos = self.positions.get(tuple(path))
            if pos:
                return pos
            path = path[:-1]
        return self.positions.get((), (1, 1))

    def diagnostic(self, path: tuple, summary: str, hint: str = "") -> Diagnostic:
        line, col = self.where(path)
        return Diagnostic(
            summary=summary,
            path=".".join(str(p) for p in path),
            file=self.file,
            line=line,
            column=col,
            hint=hint,
        )


# Limits on untrusted input (a pull request's llmops.yaml): aliases are shared nodes in
# YAML, and building the document expands them, so a few hundred bytes of nested aliases
# ("billion laughs") would expand into gigabytes. Legit files use a handful of aliases.
MAX_CONFIG_BYTES = 10_000_000
MAX_ALIAS_USES = 1_000
MAX_NODES = 200_000
MAX_DEPTH = 100

_MERGE_TAG = "tag:yaml.org,2002:merge"
_PLAIN_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}


def load_document(path: Path, display: str | None = None, cache_dir: Path | None = None) -> Document:
    """Parse YAML with positions; syntax errors and duplicate keys raise ValidationError.

    With `cache_dir`, a document that parsed without a problem before is rebuilt from its
    *skeleton* (see `_skeleton`): the shape of the document and, for every scalar, where its
    text is, so the values themselves are read from these very bytes again and never written
    to disk (llmops.yaml may hold passwords in URLs)."""
    display = display or path.name
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise LlmopsError(f"{display}: the file is larger than {MAX_CONFIG_BYTES:,} bytes, the limit for a "
                              "config. Split data out of it (datasets are files under data/).")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LlmopsError(
            f"{display}: file not found. Run `llmops init` to start a project, or pass --config PATH."
        ) from None
    except UnicodeDecodeError as exc:
        raise LlmopsError(f"{display}: not UTF-8 text ({exc.reason} at byte {exc.start}). "
                          "Save it as UTF-8.") from None
    except OSError as exc:
        raise LlmopsError(f"{display}: cannot read it ({exc.strerror}). Check that it is a readable file.") from None
    if cache_dir is None:
        return parse_document(text, display)
    from llmops.digestcache import DigestCache, digest

    cache = DigestCache(cache_dir / "config-skeleton.json")
    key = digest("llmops.yaml skeleton", str(_SKELETON_VERSION), text)
    doc = _from_skeleton(cache.get(key), text, display)
    if doc is None:
        doc, node = _parse(text, display)
        try:
            skeleton = _skeleton(node, text) if node is not None else None
        finally:
            _constructor.constructed_objects.clear()
        rebuilt = _from_skeleton(skeleton, text, display)
        if rebuilt is not None and _same(rebuilt.data, doc.data) and rebuilt.positions == doc.positions:
            cache.put(key, skeleton)  # only one that gives back exactly this parse
        else:
            cache.discard(key)
    cache.save()
    try:  # a reverted earlier cache kept the parsed values, passwords in URLs included
        (cache_dir / "config-parsed.json").unlink(missing_ok=True)
    except OSError:
        pass
    return doc


# --- The parse cache: a skeleton of offsets, never values ----------------------------------
#
# Parsing with positions costs about a second at 10,000 resources, and even libyaml's plain
# load costs half of that; JSON of the same document loads in a tenth. But the parsed values
# must not be written to disk: llmops.yaml may carry credentials (`postgresql://u:pw@host`).
# So the cache holds the document's shape and, per node, its (line, column) and the span of
# its text: a node is [code, line, column, ...]. Codes: 0 mapping [key, value, key, value...],
# 1 sequence [items], 2 null or boolean (the only literal values kept), 3 plain string (the
# span's text), 4 quoted string without escapes (the span less its quotes), 5 int and 6
# float (`int`/`float` of the span), 7 anything else (the span parsed as YAML again). The
# entry is keyed by the digest of the text, written only when rebuilding it from the skeleton
# gives back exactly the full parse, and authenticated (`llmops.digestcache`).

_SKELETON_VERSION = 1
_NULL_OR_BOOL = (type(None), bool)


def _skeleton(node: yaml.Node, text: str) -> list | None:
    """The skeleton of a parsed node tree (see above), or None when a scalar has no span."""
    line, col = node.start_mark.line + 1, node.start_mark.column + 1
    if isinstance(node, yaml.MappingNode):
        items: list = []
        for key_node, value_node in node.value:
            for part in (key_node, value_node):
                sub = _skeleton(part, text)
                if sub is None:
                    return None
                items.append(sub)
        return [0, line, col, items]
    if isinstance(node, yaml.SequenceNode):
        out = [_skeleton(item, text) for item in node.value]
        return None if any(s is None for s in out) else [1, line, col, out]
    value = _constructor.construct_object(node)
    a, b = node.start_mark.index, node.end_mark.index
    span = text[a:b]
    if isinstance(value, _NULL_OR_BOOL):
        return [2, line, col, value]
    if type(value) is str:
        if not node.style and span == value:
            return [3, line, col, a, b]
        if node.style in ("'", '"') and len(span) >= 2 and span[1:-1] == value:
            return [4, line, col, a, b]
    if type(value) is int and _scalar(5, span) == value:
        return [5, line, col, a, b]
    if type(value) is float and _scalar(6, span) == value:
        return [6, line, col, a, b]
    return [7, line, col, a, b]  # checked by the rebuild in load_document


def _scalar(code: int, span: str) -> Any:
    try:
        if code == 3:
            return span
        if code == 4:
            return span[1:-1]
        if code == 5:
            return int(span)
        if code == 6:
            return float(span)
        return yaml.load(span, Loader=_Loader)  # noqa: S506 - the safe loader
    except (ValueError, yaml.YAMLError):
        return _NO_VALUE


_NO_VALUE = object()


class _BadSkeleton(Exception):
    pass


def _from_skeleton(skeleton: Any, text: str, display: str) -> Document | None:
    """The Document a skeleton rebuilds from `text`, or None when it is not a valid skeleton."""
    if not isinstance(skeleton, list):
        return None
    doc = Document(file=display, data=None, text=text)
    try:
        doc.data = _rebuild(skeleton, (), text, doc.positions)
    except (_BadSkeleton, IndexError, TypeError, ValueError, RecursionError):
        return None
    return doc


def _rebuild(node: list, path: tuple, text: str, positions: dict[tuple, tuple[int, int]]) -> Any:
    code, line, col = node[0], node[1], node[2]
    if type(line) is not int or type(col) is not int:
        raise _BadSkeleton
    positions[path] = (line, col)
    if code == 0:
        items, out = node[3], {}
        for i in range(0, len(items), 2):
            key_node = items[i]
            key = _rebuild(key_node, path + ("<key>",), text, positions)
            if type(key) is not str:
                raise _BadSkeleton
            out[key] = _rebuild(items[i + 1], path + (key,), text, positions)
            positions[path + (key,)] = (key_node[1], key_node[2])  # the key's place, as `_build` keeps
        positions.pop(path + ("<key>",), None)
        return out
    if code == 1:
        return [_rebuild(item, path + (i,), text, positions) for i, item in enumerate(node[3])]
    if code == 2:
        if not isinstance(node[3], _NULL_OR_BOOL):
            raise _BadSkeleton
        return node[3]
    if code not in (3, 4, 5, 6, 7) or type(node[3]) is not int or type(node[4]) is not int:
        raise _BadSkeleton
    value = _scalar(code, text[node[3]:node[4]])
    if value is _NO_VALUE:
        raise _BadSkeleton
    return value


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down (1, 1.0 and True are all `==`)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(v, b[k]) for k, v in a.items())
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b) or (a != a and b != b)  # NaN


class _TooBig(Exception):
    """Building the document went past a limit; carries the diagnostic."""

    def __init__(self, diag: Diagnostic) -> None:
        super().__init__(diag.summary)
        self.diag = diag


class _BuildState:
    def __init__(self) -> None:
        self.nodes = 0
        self.alias_uses = 0
        self.seen: set[int] = set()


def parse_document(text: str, display: str) -> Document:
    return _parse(text, display)[0]


def _parse(text: str, display: str) -> tuple[Document, yaml.Node | None]:
    """The Document, and the node tree it was built from (None for an empty file)."""
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = exc.problem or exc.context or "invalid YAML"
        raise ValidationError(
            [Diagnostic(f"YAML syntax error: {problem}", file=display, line=line, column=col,
                        hint="check indentation and quoting around this place")]
        ) from None
    except yaml.YAMLError as exc:
        raise ValidationError([Diagnostic(f"YAML error: {exc}", file=display, line=1, column=1,
                                          hint="check the file's YAML syntax")]) from None
    doc = Document(file=display, data=None, text=text)
    diags: list[Diagnostic] = []
    try:
        doc.data = _build(node, (), doc, diags, _BuildState()) if node is not None else {}
    except _TooBig as exc:
        raise ValidationError([exc.diag]) from None
    finally:
        _constructor.constructed_objects.clear()
    if diags:
        raise ValidationError(diags)
    return doc, node


def _at(doc: Document, node: yaml.Node, path: tuple, summary: str, hint: str) -> Diagnostic:
    return Diagnostic(summary, path=".".join(str(p) for p in path), file=doc.file,
                      line=node.start_mark.line + 1, column=node.start_mark.column + 1, hint=hint)


def _count(node: yaml.Node, path: tuple, doc: Document, state: _BuildState) -> None:
    state.nodes += 1
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        if id(node) in state.seen:  # a second visit of a collection node: an alias use
            state.alias_uses += 1
        state.seen.add(id(node))
    if state.alias_uses > MAX_ALIAS_USES or state.nodes > MAX_NODES:
        raise _TooBig(_at(doc, node, path,
                          f"YAML aliases expand too much (more than {MAX_ALIAS_USES:,} alias uses or "
                          f"{MAX_NODES:,} nodes)", "write the values out instead of nesting `*alias` references"))
    if len(path) > MAX_DEPTH:
        raise _TooBig(_at(doc, node, path[:3], f"the document nests deeper than {MAX_DEPTH} levels",
                          "flatten it; no llmops setting nests this deep"))


def _build(node: yaml.Node, path: tuple, doc: Document, diags: list[Diagnostic], state: _BuildState) -> Any:
    _count(node, path, doc, state)
    doc.positions[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag not in _PLAIN_TAGS:
        diags.append(_at(doc, node, path, f"unsupported YAML tag '{node.tag}'",
                         "remove the tag; llmops.yaml holds plain mappings, lists and scalars"))
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                diags.append(_at(doc, key_node, path, "YAML merge keys (`<<:`) are not supported",
                                 "write the keys out, or use `targets:` overlays for variants"))
                continue
            key = _build(key_node, path + ("<key>",), doc, diags, state)
            if isinstance(key, (dict, list)):
                diags.append(doc.diagnostic(path, "mapping keys must be scalars", "use a plain name as the key"))
                continue
            if not isinstance(key, str):
                diags.append(_at(doc, key_node, path,
                                 f"mapping keys must be strings; found {key!r} ({type(key).__name__})",
                                 f"quote it ('{key}':) or use a name"))
                continue
            if key in out:
                line = key_node.start_mark.line + 1
                first = doc.positions.get(path + (key,), (0, 0))[0]
                diags.append(Diagnostic(
                    f"duplicate key '{key}' (first defined on line {first})",
                    path=".".join(str(p) for p in path + (key,)), file=doc.file, line=line,
                    column=key_node.start_mark.column + 1, hint="remove or rename one of them"))
                continue
            doc.positions[path + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            value = _build(value_node, path + (key,), doc, diags, state)
            # Keep the key's position (more useful than the value's for "unknown key" errors).
            doc.positions[path + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[key] = value
        doc.positions.pop(path + ("<key>",), None)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, path + (i,), doc, diags, state) for i, item in enumerate(node.value)]
    try:
        return _constructor.construct_object(node)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        diags.append(_at(doc, node, path, f"cannot read this value: {problem}",
                         "remove the tag or quote the value"))
        return None


_constructor = yaml.SafeLoader("")  # only its scalar constructors are used


def deep_merge(base: Any, overlay: Any) -> Any:
    """Overlay wins; mappings merge recursively; lists and scalars are replaced."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        merged = dict(base)
        for key, value in overlay.items():
            merged[key] = deep_merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(overlay)


def apply_target(doc: Document, target: str | None) -> Document:
    """Return a document with `targets.TARGET` deep-merged over the rest (and `targets` kept)."""
    if not target:
        return doc
    data = doc.data if isinstance(doc.data, dict) else {}
    targets = data.get("targets") or {}
    if not isinstance(targets, dict) or target not in targets:
        names = ", ".join(sorted(targets)) if isinstance(targets, dict) and targets else "none defined"
        raise LlmopsError(f"{doc.file}: unknown target '{target}' (targets: {names}). "
                          "Define it under `targets:` or drop --target.")
    overlay = targets[target] or {}
    if not isinstance(overlay, dict):
        raise LlmopsError(f"{doc.file}: targets.{target} must be a mapping.")
    merged = deep_merge({k: v for k, v in data.items() if k != "targets"}, overlay)
    merged["targets"] = targets
    positions = dict(doc.positions)
    prefix = ("targets", target)
    for path, pos in doc.positions.items():
        if path[:2] == prefix and len(path) > 2:
            positions[path[2:]] = pos
    return Document(file=doc.file, data=merged, positions=positions, text=doc.text)


# Environment variables MLflow users already set, used where llmops.yaml (after the target
# overlay) says nothing: the file wins, then the environment, then the embedded default.
_SETTINGS_FROM_ENV = {"tracking_uri": "MLFLOW_TRACKING_URI", "registry_uri": "MLFLOW_REGISTRY_URI"}


def resolved_settings(data: dict[str, Any]) -> dict[str, Any]:
    import os

    settings = dict(DEFAULT_SETTINGS)
    given = (data.get("settings") or {}) if isinstance(data, dict) else {}
    given = given if isinstance(given, dict) else {}
    for key, var in _SETTINGS_FROM_ENV.items():
        if given.get(key) is None and os.environ.get(var, "").strip():
            settings[key] = os.environ[var].strip()
    settings.update(given)
    return settings
