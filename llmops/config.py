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


def load_document(path: Path, display: str | None = None) -> Document:
    """Parse YAML with positions; syntax errors and duplicate keys raise ValidationError."""
    display = display or path.name
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LlmopsError(
            f"{display}: file not found. Run `llmops init` to start a project, or pass --config PATH."
        ) from None
    except UnicodeDecodeError as exc:
        raise LlmopsError(f"{display}: not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    return parse_document(text, display)


def parse_document(text: str, display: str) -> Document:
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
        raise ValidationError([Diagnostic(f"YAML error: {exc}", file=display, line=1, column=1)]) from None
    doc = Document(file=display, data=None, text=text)
    diags: list[Diagnostic] = []
    doc.data = _build(node, (), doc, diags) if node is not None else {}
    _constructor.constructed_objects.clear()
    if diags:
        raise ValidationError(diags)
    return doc


def _build(node: yaml.Node, path: tuple, doc: Document, diags: list[Diagnostic]) -> Any:
    doc.positions[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _build(key_node, path + ("<key>",), doc, diags)
            if isinstance(key, (dict, list)):
                diags.append(doc.diagnostic(path, "mapping keys must be scalars"))
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
            value = _build(value_node, path + (key,), doc, diags)
            # Keep the key's position (more useful than the value's for "unknown key" errors).
            doc.positions[path + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[key] = value
        doc.positions.pop(path + ("<key>",), None)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, path + (i,), doc, diags) for i, item in enumerate(node.value)]
    return _constructor.construct_object(node)


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
