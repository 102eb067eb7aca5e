"""What a training or eval action will cost, estimated at plan time; what it cost, after apply.

An estimate is scaled from the last run of the same resource recorded in llmops.lock (its
`outputs.cost`: tokens, seconds, device), so it carries what this machine, model and batch
size really do. Without a recorded run it falls back to a stated default per device
(`DEFAULTS`), marked as such: a first estimate is rough, the second is measured.

Pure arithmetic on lock entries and file sizes: nothing here imports torch or reads a model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# Stated defaults, used until a run of the resource is recorded. Training throughput counts
# every token of every step; `overhead_s` is what a job spends outside its steps (start,
# imports, loading, saving, registering).
DEFAULTS: dict[str, dict[str, float]] = {
    "cpu": {"train_tokens_per_s": 5_000.0, "train_overhead_s": 15.0, "gen_tokens_per_s": 300.0, "eval_overhead_s": 3.0},
    "cuda": {"train_tokens_per_s": 50_000.0, "train_overhead_s": 60.0, "gen_tokens_per_s": 3_000.0,
             "eval_overhead_s": 10.0},
}
BYTES_PER_TOKEN = 4.0  # a first guess at tokens from a JSONL file's size, before any run


def actual(device: str, wall_s: float, tokens: int | None = None, train_s: float | None = None,
           gpus: int = 0, **extra: Any) -> dict[str, Any]:
    """The `cost` block apply records in a lock entry's outputs."""
    out: dict[str, Any] = {"device": device, "wall_s": round(float(wall_s), 3)}
    if tokens is not None:
        out["tokens"] = int(tokens)
    if train_s is not None:
        out["train_s"] = round(float(train_s), 3)
    out["gpu_hours"] = round(float(wall_s) * gpus / 3600, 6) if device.startswith("cuda") else 0.0
    out.update({k: v for k, v in extra.items() if v is not None})
    return out


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _file_size(root: Path, rel: Any) -> int | None:
    if not isinstance(rel, str):
        return None
    try:
        return (root / rel).stat().st_size
    except OSError:
        return None


def estimate_finetune(root: Path, training: dict[str, Any], trials: int, gpus: int,
                      locked: dict[str, Any] | None, locked_training: dict[str, Any] | None,
                      dataset: dict[str, Any] | None, source: str | None) -> dict[str, Any]:
    """Tokens, wall seconds and GPU-hours of training with `training` (defaults resolved).

    `locked` is the fine-tune's last lock outputs (and `locked_training` the training settings
    it ran with), `dataset` the dataset's lock outputs now, `source` its source file.
    """
    device = "cuda" if gpus > 0 else "cpu"
    epochs = float(training.get("epochs") or 1)
    max_steps = training.get("max_steps")
    last = (locked or {}).get("cost") or {}
    rows_now = _num(((dataset or {}).get("train") or {}).get("rows"))
    if _num(last.get("tokens")) and _num(last.get("train_s")) and last.get("device", device).split(":")[0] == device:
        rows_then = _num(last.get("train_rows")) or rows_now
        epochs_then = float((locked_training or {}).get("epochs") or epochs)
        scale = (epochs / epochs_then) * ((rows_now / rows_then) if rows_now and rows_then else 1.0)
        if max_steps and _num(last.get("steps")):
            scale = float(max_steps) / float(last["steps"])
        per_trial = float(last["tokens"]) / max(int(last.get("trials") or 1), 1)
        tokens = per_trial * scale * trials
        rate = float(last["tokens"]) / max(float(last["train_s"]), 1e-9)
        overhead = max(float(last.get("wall_s") or 0) - float(last["train_s"]), 0.0)
        basis = f"from the last run: {rate:,.0f} tokens/s on {device}, {overhead:.0f} s outside training"
    else:
        d = DEFAULTS[device]
        size = _file_size(root, ((dataset or {}).get("train") or {}).get("path"))
        if size is None:
            size = _file_size(root, source)
        if size is None:
            return {"device": device, "basis": "unknown until the dataset is prepared"}
        tokens = size / BYTES_PER_TOKEN * epochs * trials
        rate, overhead = d["train_tokens_per_s"], d["train_overhead_s"] * trials
        basis = (f"default for {device} ({rate:,.0f} tokens/s, {overhead:.0f} s overhead; no run recorded yet), "
                 f"tokens guessed from the data's size")
    wall = overhead + tokens / rate
    return {
        "device": device,
        "tokens": int(math.ceil(tokens)),
        "wall_s": round(wall, 1),
        "gpu_hours": round(wall * gpus / 3600, 4) if gpus else 0.0,
        "basis": basis,
    }


def estimate_pretrain(epochs: int, locked: dict[str, Any] | None, locked_epochs: int | None,
                      rows_now: int | None, rows_then: int | None, text_bytes: int | None) -> dict[str, Any]:
    """A `build.pretrain` (one CPU thread): scaled from the last build's `outputs.pretrain`,
    else the CPU default over the text's size."""
    last = (locked or {}).get("pretrain") or {}
    if _num(last.get("tokens")) and _num(last.get("seconds")):
        scale = epochs / float(locked_epochs or epochs)
        if rows_now and rows_then:
            scale *= rows_now / rows_then
        tokens = float(last["tokens"]) * scale
        rate = float(last["tokens"]) / max(float(last["seconds"]), 1e-9)
        basis = f"from the last build: {rate:,.0f} tokens/s on one cpu thread"
        wall = tokens / rate
    elif text_bytes:
        tokens = text_bytes / BYTES_PER_TOKEN * epochs
        rate = DEFAULTS["cpu"]["train_tokens_per_s"] / 2  # one thread
        wall = tokens / rate
        basis = f"default for one cpu thread ({rate:,.0f} tokens/s; no build recorded yet), tokens guessed from the data's size"
    else:
        return {"device": "cpu", "basis": "unknown until the dataset is prepared"}
    return {"device": "cpu", "tokens": int(math.ceil(tokens)), "wall_s": round(wall, 1), "gpu_hours": 0.0,
            "basis": basis}


def estimate_eval(rows_now: int | None, repeats: int, max_new_tokens: int,
                  locked: dict[str, Any] | None) -> dict[str, Any]:
    """Generated tokens (at most) and wall seconds of running an eval over `rows_now` rows."""
    last = (locked or {}).get("cost") or {}
    device = str(last.get("device") or "cpu").split(":")[0]
    if rows_now is None:
        rows_now = int(_num((locked or {}).get("rows")) or 0) or None
    if rows_now is None:
        return {"device": device, "basis": "unknown until the dataset is prepared"}
    tokens = rows_now * repeats * max_new_tokens
    then = _num(last.get("rows"))
    if _num(last.get("wall_s")) and then:
        scale = (rows_now * repeats) / (then * max(int(last.get("repeats") or 1), 1))
        wall = float(last["wall_s"]) * scale
        basis = f"from the last run: {float(last['wall_s']):.1f} s for {int(then)} rows on {device}"
    else:
        d = DEFAULTS.get(device, DEFAULTS["cpu"])
        wall = d["eval_overhead_s"] + tokens / d["gen_tokens_per_s"]
        basis = f"default for {device} ({d['gen_tokens_per_s']:,.0f} generated tokens/s; no run recorded yet)"
    return {"device": device, "tokens": int(tokens), "wall_s": round(wall, 1), "gpu_hours": 0.0, "basis": basis}


def describe(cost: dict[str, Any]) -> str:
    """`~150,000 tokens, ~12 s, 0 GPU-hours (from the last run: ...)`."""
    if "wall_s" not in cost:
        return str(cost.get("basis") or "unknown")
    gpu = f"{cost['gpu_hours']:.3g} GPU-hours" if cost.get("gpu_hours") else "0 GPU-hours"
    return f"~{cost['tokens']:,} tokens, ~{duration(cost['wall_s'])}, {gpu} ({cost.get('basis', '')})"


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def total(costs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The sum of several estimates (those with numbers), or None when none has any."""
    known = [c for c in costs if "wall_s" in c]
    if not known:
        return None
    return {
        "actions": len(known),
        "tokens": sum(int(c["tokens"]) for c in known),
        "wall_s": round(sum(float(c["wall_s"]) for c in known), 1),
        "gpu_hours": round(sum(float(c.get("gpu_hours") or 0) for c in known), 4),
    }


def describe_total(total: dict[str, Any]) -> str:
    gpu = f"{total['gpu_hours']:.3g} GPU-hours" if total["gpu_hours"] else "0 GPU-hours"
    n = total["actions"]
    return (f"Estimated cost: ~{total['tokens']:,} tokens, ~{duration(total['wall_s'])}, {gpu} "
            f"over {n} training/eval action{'s' if n != 1 else ''}.")
