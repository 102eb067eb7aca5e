"""Training checkpoints: adapter weights, optimizer, scheduler, RNG state and position.

A checkpoint is a folder `step-NNNNNNNN/` holding `state.pt`. It is written to a
temporary sibling and renamed into place, so a job killed while saving leaves either
the previous checkpoint or the new one, never a torn one. Only the newest is kept.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "step-"


@dataclass
class Position:
    """Where training stands: optimizer steps done, and the next micro-batch of an epoch."""

    step: int = 0
    epoch: int = 0
    micro: int = 0


def latest(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    if not checkpoint_dir.is_dir():
        return None
    found = sorted(
        (p for p in checkpoint_dir.iterdir() if p.name.startswith(PREFIX) and (p / "state.pt").is_file()),
        key=lambda p: int(p.name[len(PREFIX) :]),
    )
    return found[-1] if found else None


def save(
    checkpoint_dir: Path,
    pos: Position,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    scaler: Any = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    import torch

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "position": vars(pos).copy(),
        "adapter": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": _rng_state(),
        "extra": extra or {},
    }
    from llmops.fsutil import atomic_folder

    final = checkpoint_dir / f"{PREFIX}{pos.step:08d}"
    with atomic_folder(final) as tmp:
        torch.save(state, tmp / "state.pt")
    for old in checkpoint_dir.iterdir():
        if old != final and (old.name.startswith(PREFIX) or old.name.startswith(f".{PREFIX}")):
            shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path, model: Any, optimizer: Any, scheduler: Any, scaler: Any = None) -> tuple[Position, dict]:
    """Restore everything saved in `path`; returns the position and the extra data."""
    import torch

    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["adapter"].items():
            params[name].copy_(value.to(params[name].device))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    return Position(**state["position"]), state.get("extra", {})


def clear(checkpoint_dir: Path) -> None:
    shutil.rmtree(checkpoint_dir, ignore_errors=True)


def _rng_state() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
