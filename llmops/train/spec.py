"""The training job's spec: defaults for `adapter`/`training`, sweep grids, and the job file.

A fine-tune's `adapter`, `training` and `sweep` sections (docs/config-reference.md,
"finetunes.NAME") are resolved here into complete dicts, the same way in the provider
(which fingerprints and describes them) and in the job (which trains with them).
Pure Python: no torch here.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

from llmops.errors import ProviderError

ADAPTER_DEFAULTS: dict[str, Any] = {
    "type": "lora",
    "r": 8,
    "alpha": 16,
    "dropout": 0.05,
    "target_modules": "all-linear",
}

TRAINING_DEFAULTS: dict[str, Any] = {
    "epochs": 1,
    "max_steps": None,
    "learning_rate": 2e-4,
    "lr_scheduler": "linear",
    "warmup_steps": 0,
    "warmup_ratio": None,
    "batch_size": 8,
    "gradient_accumulation_steps": 1,
    "max_seq_length": 256,
    "packing": False,
    "gradient_checkpointing": False,
    "precision": "fp32",
    "seed": 0,
    "save_steps": None,
    "dpo_beta": 0.1,
}
METHODS = ("sft", "dpo")

SELECT_DEFAULTS: dict[str, Any] = {"metric": "eval_loss", "mode": "min"}

# Checkpoints are saved at least this often (in optimizer steps) when save_steps is unset.
DEFAULT_SAVE_EVERY = 50


def resolve_adapter(adapter: dict[str, Any] | None) -> dict[str, Any]:
    """The adapter section with defaults filled in."""
    out = {**ADAPTER_DEFAULTS, **{k: v for k, v in (adapter or {}).items() if v is not None}}
    if out["type"] not in ("lora", "qlora"):
        raise ProviderError(f"adapter.type: '{out['type']}' is not supported; use lora or qlora.")
    return out


def resolve_training(training: dict[str, Any] | None) -> dict[str, Any]:
    """The training section with defaults filled in."""
    out = {**TRAINING_DEFAULTS, **{k: v for k, v in (training or {}).items() if v is not None}}
    if out["lr_scheduler"] not in ("linear", "cosine", "constant"):
        raise ProviderError(
            f"training.lr_scheduler: '{out['lr_scheduler']}' is not supported; use linear, cosine or constant."
        )
    if out["precision"] not in ("fp32", "bf16", "fp16"):
        raise ProviderError(f"training.precision: '{out['precision']}' is not supported; use fp32, bf16 or fp16.")
    return out


def resolve_select(select: dict[str, Any] | None) -> dict[str, Any]:
    out = {**SELECT_DEFAULTS, **(select or {})}
    if out["mode"] not in ("min", "max"):
        raise ProviderError(f"select.mode: '{out['mode']}' is not supported; use min or max.")
    return out


def expand_sweep(sweep: dict[str, list[Any]] | None) -> list[dict[str, Any]]:
    """Every combination of a sweep grid, in a stable order: [{param_path: value}, ...].

    No sweep is one trial with no overrides. Keys are sorted so that reordering the YAML
    does not renumber trials.
    """
    if not sweep:
        return [{}]
    keys = sorted(sweep)
    for key in keys:
        section, _, field = key.partition(".")
        if section not in ("adapter", "training") or not field:
            raise ProviderError(
                f"sweep: '{key}' is not a parameter path; use adapter.FIELD or training.FIELD "
                "(e.g. training.learning_rate)."
            )
        if not isinstance(sweep[key], list) or not sweep[key]:
            raise ProviderError(f"sweep.{key}: give a non-empty list of values to try.")
    return [dict(zip(keys, values)) for values in itertools.product(*(sweep[k] for k in keys))]


def trial_config(adapter: dict[str, Any], training: dict[str, Any], overrides: dict[str, Any]) -> tuple[dict, dict]:
    """Resolved (adapter, training) of one trial: the base sections with its overrides applied."""
    sections = {"adapter": dict(adapter), "training": dict(training)}
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        sections[section][field] = value
    return resolve_adapter(sections["adapter"]), resolve_training(sections["training"])


def plan_steps(training: dict[str, Any], batches_per_epoch: int) -> tuple[int, int, int]:
    """(optimizer steps per epoch, total optimizer steps, checkpoint interval)."""
    accum = max(1, int(training["gradient_accumulation_steps"]))
    per_epoch = max(1, math.ceil(batches_per_epoch / accum))
    if training.get("max_steps"):
        total = int(training["max_steps"])
    else:
        total = max(1, math.ceil(float(training["epochs"]) * per_epoch))
    save_every = training.get("save_steps") or min(per_epoch, DEFAULT_SAVE_EVERY)
    return per_epoch, total, int(save_every)


def warmup_steps(training: dict[str, Any], total: int) -> int:
    if training.get("warmup_ratio"):
        return int(math.ceil(float(training["warmup_ratio"]) * total))
    return int(training.get("warmup_steps") or 0)


def read_job_spec(path: Path) -> dict[str, Any]:
    """Load the job spec JSON written by the finetunes provider."""
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ProviderError(f"{path}: cannot read the training job spec ({exc}); re-run `llmops apply`.") from exc
    for key in ("base_model", "train_path", "output_dir", "checkpoint_dir"):
        if key not in spec:
            raise ProviderError(f"{path}: the training job spec lacks '{key}'; re-run `llmops apply`.")
    return spec
