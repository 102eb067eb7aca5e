"""A documented default written out or left out is the same resource: same fingerprint, same
lock spec. One row per default the schema documents, for every kind; and the defaults the
code applies are the ones the schema documents."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from llmops.engine.fingerprint import fingerprint, locked_spec
from llmops.config.schema import KIND_DEFS, documented_defaults

BASE: dict[str, dict[str, Any]] = {
    "datasets": {"source": "data/d.jsonl"},
    "prompts": {"text": "Q: {{ q }}", "variables": ["q"]},
    "base_models": {"hf": "org/model"},
    "finetunes": {"base_model": "m", "dataset": "d", "prompt": "p"},
    "evals": {"model": "f", "dataset": "d", "metrics": ["exact_match"]},
    "deployments": {"model": "f"},
    "monitors": {"deployment": "prod"},
}
ROWS = [(kind, path, default) for kind in KIND_DEFS for path, default in documented_defaults(kind)]


def _with(spec: dict[str, Any], path: tuple[Any, ...], leaf: Any = None, write_leaf: bool = True) -> dict[str, Any]:
    """`spec` with the containers along `path` created, and the leaf written when asked."""
    out = copy.deepcopy(spec)
    node: Any = out
    for here, nxt in zip(path, path[1:]):
        if isinstance(node, list):
            while len(node) <= here:
                node.append({})
            node = node[here]
            continue
        node = node.setdefault(here, [] if isinstance(nxt, int) else {})
    last = path[-1]
    if write_leaf:
        if isinstance(node, list):
            node.append(copy.deepcopy(leaf))
        else:
            node[last] = copy.deepcopy(leaf)
    elif isinstance(node, list):
        node.append({})
    return out


def _fp(kind: str, spec: dict[str, Any]) -> str:
    return fingerprint(kind, spec, {}, {})


def test_every_kind_documents_defaults():
    assert {kind for kind, _, _ in ROWS} == set(KIND_DEFS), "a kind lost its documented defaults"
    assert len(ROWS) >= 60


@pytest.mark.parametrize("kind, path, default", ROWS, ids=[f"{k}.{'.'.join(map(str, p))}" for k, p, _ in ROWS])
def test_a_default_written_out_is_the_same_resource(kind, path, default):
    left_out = _with(BASE[kind], path, write_leaf=False) if len(path) > 1 else BASE[kind]
    written = _with(BASE[kind], path, default)
    assert written != left_out
    assert _fp(kind, written) == _fp(kind, left_out)
    assert locked_spec(written, kind) == locked_spec(left_out, kind)


def test_a_value_other_than_the_default_still_changes_the_fingerprint():
    base = BASE["finetunes"]
    assert _fp("finetunes", {**base, "training": {"lr_scheduler": "cosine"}}) != _fp("finetunes", base)
    assert _fp("finetunes", {**base, "training": {"epochs": 2}}) != _fp("finetunes", base)
    # YAML types count: `true` is not the default `0` of a count, `1.0` is the default `1`
    assert _fp("finetunes", {**base, "resources": {"gpus": False}}) != _fp("finetunes", base)
    assert _fp("finetunes", {**base, "training": {"epochs": 1.0}}) == _fp("finetunes", base)


def test_the_code_applies_the_documented_defaults():
    """The schema's defaults are the ones training, building and evaluation use."""
    from llmops.evals.runner import DECODING_DEFAULTS
    from llmops.train.build import BUILD_DEFAULTS
    from llmops.train.spec import ADAPTER_DEFAULTS, SELECT_DEFAULTS, TRAINING_DEFAULTS

    documented = {path: default for kind, path, default in ROWS}
    for prefix, code in ((("training",), TRAINING_DEFAULTS), (("adapter",), ADAPTER_DEFAULTS),
                         (("select",), SELECT_DEFAULTS), (("decoding",), DECODING_DEFAULTS),
                         (("build",), BUILD_DEFAULTS)):
        for key, value in code.items():
            if value is None:
                continue
            assert documented.get(prefix + (key,)) == value, (prefix + (key,), value, documented.get(prefix + (key,)))
