"""The JSON schema of llmops.yaml (shipped in the package) and the defaults it documents.

`without_defaults(kind, spec)` drops every value that equals the default the schema documents
for it, recursively (training options, prepare steps, decoding...), so a default written out
and a default left out are the same resource: fingerprints and the lock see the normalised
spec. An object property whose documented default is `{}` (`training`, `adapter`, ...) is
dropped once nothing but defaults is left in it. `documented_defaults(kind)` lists them all
(the table the tests check). Standard library only: plan and validate import it.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from llmops.engine.addrs import KINDS

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "llmops.schema.json"

# The $defs entry of each resource kind.
KIND_DEFS = {kind: kind[:-1] for kind in KINDS}  # "base_models" -> "base_model"


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    """`node` with its `$ref`s followed (local `#/$defs/...` only), merged over the target."""
    seen = 0
    while isinstance(node, dict) and "$ref" in node and seen < 20:
        target = load_schema()["$defs"][node["$ref"].rsplit("/", 1)[1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        if isinstance(target.get("properties"), dict) and isinstance(node.get("properties"), dict):
            props = dict(target["properties"])  # `base_model` adds `required` to its fields' `build`
            for key, extra in node["properties"].items():
                props[key] = {**props.get(key, {}), **extra} if isinstance(extra, dict) else extra
            merged["properties"] = props
        node = merged
        seen += 1
    return node


def _same(value: Any, default: Any) -> bool:
    """Equal as YAML values: `1` and `1.0` are, `true` and `1` are not."""
    if isinstance(value, bool) or isinstance(default, bool):
        return type(value) is type(default) and value == default
    if isinstance(value, (int, float)) and isinstance(default, (int, float)):
        return float(value) == float(default)
    return type(value) is type(default) and value == default


def _strip(value: Any, node: dict[str, Any]) -> Any:
    node = _resolve(node)
    if isinstance(value, dict):
        props = node.get("properties") or {}
        out: dict[str, Any] = {}
        for key, item in value.items():
            sub = _resolve(props.get(key) or {})
            if not sub:
                out[key] = item
                continue
            item = _strip(item, sub)
            if "default" in sub and _same(item, sub["default"]):
                continue
            out[key] = item
        return out
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        return [_strip(item, node["items"]) for item in value]
    return value


def kind_fields(kind: str) -> frozenset[str]:
    """The top-level fields a `kind` resource's spec may have."""
    return frozenset(_resolve({"$ref": f"#/$defs/{KIND_DEFS[kind]}"}).get("properties") or {})


def without_defaults(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """`spec` of a `kind` resource without the values that equal their documented default."""
    name = KIND_DEFS.get(kind)
    if name is None or not isinstance(spec, dict):
        return spec
    return _strip(spec, {"$ref": f"#/$defs/{name}"})


def documented_defaults(kind: str) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """(path inside a `kind` spec, default) for every default the schema documents; list
    items are path element 0 (`("prepare", 0, "split", "seed")`)."""

    def walk(node: dict[str, Any], path: tuple[Any, ...], depth: int) -> Iterator[tuple[tuple[Any, ...], Any]]:
        node = _resolve(node)
        if depth > 8:
            return
        for key, sub in (node.get("properties") or {}).items():
            sub = _resolve(sub)
            if "default" in sub:
                yield path + (key,), sub["default"]
            if sub.get("properties"):
                yield from walk(sub, path + (key,), depth + 1)
            items = _resolve(sub.get("items") or {}) if isinstance(sub.get("items"), dict) else {}
            if items.get("properties"):
                yield from walk(items, path + (key, 0), depth + 1)

    name = KIND_DEFS.get(kind)
    if name is not None:
        yield from walk({"$ref": f"#/$defs/{name}"}, (), 0)


@lru_cache(maxsize=None)
def defaults_by_path(kind: str) -> dict[str, Any]:
    """`documented_defaults(kind)` as {"training.lr_scheduler": "linear", "prepare.0.split.seed": 0}."""
    return {".".join(str(p) for p in path): default for path, default in documented_defaults(kind)}
