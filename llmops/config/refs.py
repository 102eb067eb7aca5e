"""Cross references between resources: which fields name which kinds.

This is configuration semantics shared by validation (unknown names, did-you-mean) and the
graph (dependency edges). A reference either is a plain name, looked up in the allowed
kinds in order, or an explicit address `kind.name`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from llmops.engine.addrs import KIND_ORDER


@dataclass(frozen=True)
class Reference:
    path: tuple  # path inside the resource spec, e.g. ("gates", 0)
    value: str
    kinds: tuple[str, ...]  # kinds a plain name is looked up in, in order
    explicit_kinds: tuple[str, ...]  # kinds allowed in an explicit `kind.name`
    edge: bool = True  # False: validated but not a dependency (an eval's baseline)


def _ref(path, value, kinds, explicit=None, edge=True) -> Reference | None:
    if not isinstance(value, str):
        return None
    return Reference(tuple(path), value, tuple(kinds), tuple(explicit or kinds), edge)


def references(kind: str, name: str, spec: Any) -> Iterator[Reference]:
    """All references made by one resource (malformed fields are skipped: the schema reports them)."""
    if not isinstance(spec, dict):
        return
    refs: list[Reference | None] = []
    if kind == "base_models":
        build = spec.get("build")
        if isinstance(build, dict):
            refs.append(_ref(("build", "tokenizer_from"), build.get("tokenizer_from"), ["datasets"]))
    elif kind == "finetunes":
        refs.append(_ref(("base_model",), spec.get("base_model"), ["base_models"]))
        refs.append(_ref(("dataset",), spec.get("dataset"), ["datasets"]))
        refs.append(_ref(("prompt",), spec.get("prompt"), ["prompts"]))
    elif kind == "evals":
        refs.append(_ref(("model",), spec.get("model"), ["finetunes", "base_models"],
                         ["finetunes", "base_models", "deployments"]))
        refs.append(_ref(("dataset",), spec.get("dataset"), ["datasets"]))
        refs.append(_ref(("prompt",), spec.get("prompt"), ["prompts"]))
        baseline = spec.get("baseline")
        if isinstance(baseline, dict):
            refs.append(_ref(("baseline", "deployment"), baseline.get("deployment"), ["deployments"], edge=False))
        else:
            refs.append(_ref(("baseline",), baseline, ["deployments"], edge=False))
        compare = spec.get("compare_to")
        if isinstance(compare, dict):
            refs.append(_ref(("compare_to", "eval"), compare.get("eval"), ["evals"]))
        else:
            refs.append(_ref(("compare_to",), compare, ["evals"]))
    elif kind == "deployments":
        refs.append(_ref(("model",), spec.get("model"), ["finetunes", "base_models"]))
        gates = spec.get("gates")
        if isinstance(gates, list):
            refs.extend(_ref(("gates", i), g, ["evals"]) for i, g in enumerate(gates))
    elif kind == "monitors":
        refs.append(_ref(("deployment",), spec.get("deployment", name), ["deployments"]))
    for r in refs:
        if r is not None:
            yield r


def resolve(ref: Reference, names: dict[str, Any]) -> str | None:
    """The address a reference points to, or None when it names nothing.

    `names` maps kind -> collection of resource names.
    """
    kind, sep, rest = ref.value.partition(".")
    if sep and kind in KIND_ORDER:
        return ref.value if kind in ref.explicit_kinds and rest in names.get(kind, ()) else None
    for k in ref.kinds:
        if ref.value in names.get(k, ()):
            return f"{k}.{ref.value}"
    return None
