"""The training loop: a plain torch loop over packed batches (no transformers Trainer).

What makes it fast where it matters (a CUDA GPU): frozen base weights in bf16/fp16 with
autocast, packed rows with no padding between examples, a fused AdamW, the loss computed
only on response tokens in chunks (logits of a whole batch are never held at once),
and optionally regionally compiled decoder layers. It resumes from the newest
checkpoint in its checkpoint folder, restoring optimizer, scheduler and RNG state.
Under `accelerate launch` (WORLD_SIZE > 1) it runs data-parallel with DDP; rank 0 alone
reports and saves.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from llmops.train import checkpoint as ckpt
from llmops.train.data import IGNORE, Row, collate, collate_pairs, epoch_batches
from llmops.train.spec import plan_steps, warmup_steps

Emit = Callable[[dict[str, Any]], None]
CE_CHUNK_TOKENS = 8192


def _loss_module(model: Any, chunk_tokens: int) -> Any:
    """An nn.Module whose forward returns the summed response-token loss of a batch."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    def ce_sum(head: Any, h: Any, y: Any) -> Any:
        # `head` is called as a module: it may carry a LoRA adapter of its own.
        return F.cross_entropy(head(h).float(), y, reduction="sum")

    class CausalLMLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            causal = model.get_base_model()
            cfg = causal.config
            self.fast = (
                hasattr(causal, "model")
                and hasattr(causal, "lm_head")
                and not getattr(cfg, "final_logit_softcapping", None)
                and not getattr(cfg, "logit_scale", None)
            )

        def forward(self, input_ids: Any, labels: Any, **kw: Any) -> Any:
            causal = self.model.get_base_model()
            y = labels[:, 1:].reshape(-1)
            if not self.fast:
                logits = causal(input_ids=input_ids, **kw).logits[:, :-1]
                return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y, reduction="sum")
            hidden = causal.model(input_ids=input_ids, **kw).last_hidden_state
            h = hidden[:, :-1].reshape(-1, hidden.size(-1))
            keep = (y != IGNORE).nonzero(as_tuple=True)[0]
            h, y = h.index_select(0, keep), y.index_select(0, keep)
            head = causal.lm_head
            if h.size(0) <= chunk_tokens:
                return ce_sum(head, h, y)
            total = h.new_zeros((), dtype=torch.float32)
            for s in range(0, h.size(0), chunk_tokens):
                total = total + checkpoint(
                    ce_sum, head, h[s : s + chunk_tokens], y[s : s + chunk_tokens], use_reentrant=False
                )
            return total

    return CausalLMLoss()


def _dpo_loss_module(model: Any, beta: float) -> Any:
    """An nn.Module whose forward returns the summed DPO loss of a batch of pairs (rows
    chosen, rejected, chosen, ... as `collate_pairs` lays them out): -log sigmoid(beta x
    (policy margin - reference margin)), each margin the difference of the two answers'
    summed response-token log-probabilities. The reference is the base model itself, the
    LoRA adapter switched off (peft's `disable_adapter`): no second copy of the weights."""
    import torch
    import torch.nn.functional as F

    def answer_logps(m: Any, input_ids: Any, labels: Any, attention_mask: Any) -> Any:
        logits = m(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
        y = labels[:, 1:]
        keep = y != IGNORE
        picked = torch.gather(F.log_softmax(logits, dim=-1), 2, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * keep).sum(dim=1)

    class DPOLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, labels: Any, attention_mask: Any, **kw: Any) -> Any:
            policy = answer_logps(self.model, input_ids, labels, attention_mask)
            with torch.no_grad(), self.model.disable_adapter():
                reference = answer_logps(self.model, input_ids, labels, attention_mask)
            margin = (policy[0::2] - policy[1::2]) - (reference[0::2] - reference[1::2])
            return -F.logsigmoid(beta * margin).sum()

    return DPOLoss()


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return f


@dataclass
class LoopSpec:
    """What one training run needs besides the model: data, settings and where to save."""

    training: dict[str, Any]
    rows: list[Row]
    checkpoint_dir: Path
    device: str
    pad_id: int
    compile: bool = False
    method: str = "sft"  # "dpo": `rows` are (chosen, rejected) pairs of rows


@dataclass
class LoopResult:
    steps: int
    losses: list[float]
    per_epoch: int
    resumed_from: int
    tokens_per_s: float
    peak_memory_mb: float
    tokens: int = 0  # every token of every step this process ran (padding included)


class _Dist:
    """Rank facts from the environment `accelerate launch` / torchrun set."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.main = self.rank == 0

    def setup(self, device: str) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def shard(self, batches: list) -> list:
        if self.world == 1:
            return batches
        usable = len(batches) // self.world * self.world or len(batches)
        return batches[: usable][self.rank :: self.world] or batches[:1]


class _Stepper:
    """Optimizer, schedule, loss scaling and (under DDP) the wrapped model: one optimizer step at a time."""

    def __init__(self, model: Any, spec: LoopSpec, dist: _Dist, total: int) -> None:
        import torch

        from llmops.train.model import compute_dtype

        t, device = spec.training, spec.device
        cuda = device.startswith("cuda")
        dtype = compute_dtype(t["precision"], device)
        self.device, self.dist = device, dist
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.trainable, lr=float(t["learning_rate"]), weight_decay=0.0, fused=cuda or None)
        schedule = lr_lambda(t["lr_scheduler"], warmup_steps(t, total), total)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule)
        self.scaler = torch.amp.GradScaler("cuda") if cuda and dtype == torch.float16 else None
        self.autocast = torch.autocast(device.split(":")[0], dtype=dtype) if dtype else contextlib.nullcontext()
        if spec.compile:
            _compile_layers(model)
        if spec.method == "dpo":
            self.runner: Any = _dpo_loss_module(model, float(t.get("dpo_beta", 0.1)))
        else:
            self.runner = _loss_module(model, CE_CHUNK_TOKENS)
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [torch.device(device).index] if cuda else None
            self.runner = DistributedDataParallel(self.runner, device_ids=ids)

    def step(self, window: list[dict[str, Any]]) -> tuple[float, float]:
        """Forward/backward every micro-batch of `window`, then one optimizer step: (loss, lr used)."""
        import torch

        n_labels = max(1, sum(b["n_labels"] for b in window))
        loss_sum = torch.zeros((), device=self.device)
        scaler = self.scaler
        for i, b in enumerate(window):
            last = self.dist.world == 1 or i == len(window) - 1
            with contextlib.nullcontext() if last else self.runner.no_sync():
                with self.autocast:
                    part = self.runner(**_to_device(b, self.device))
                scaled = part / n_labels
                (scaler.scale(scaled) if scaler else scaled).backward()
            loss_sum += part.detach()
        if scaler:
            scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        if scaler:
            scaler.step(self.opt)
            scaler.update()
        else:
            self.opt.step()
        lr = self.opt.param_groups[0]["lr"]
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss_sum.item()) / n_labels, lr  # .item() waits for the GPU: step timings are real


def train(model: Any, spec: LoopSpec, emit: Emit, tag: dict[str, Any] | None = None) -> LoopResult:
    """Train `model` (a peft model) per `spec`, resuming from its newest checkpoint."""
    t, tag = spec.training, tag or {}
    dist = _Dist()
    dist.setup(spec.device)
    packed = bool(t["packing"])
    bs, accum, seed = int(t["batch_size"]), int(t["gradient_accumulation_steps"]), int(t["seed"])
    per_epoch, total, save_every = plan_steps(t, len(dist.shard(epoch_batches(spec.rows, bs, seed, 0))))
    stepper = _Stepper(model, spec, dist, total)
    pos = ckpt.Position()
    found = ckpt.latest(spec.checkpoint_dir)
    if found is not None:
        pos, _ = ckpt.load(found, model, stepper.opt, stepper.sched, stepper.scaler)
        if dist.main:
            emit({"event": "resume", "step": pos.step, "total": total, **tag})
    resumed_from = pos.step
    model.train()
    _reset_peak_memory(spec.device)
    # Compiled layers want one shape: packed rows are then padded to the full length.
    pad_to = int(t["max_seq_length"]) if (packed and spec.compile) else None
    losses: list[float] = []
    rate = 0.0
    timed = [0.0, 0.0]  # tokens, seconds of every step but this process's first (compile, warm-up)
    seen = 0
    while pos.step < total:
        batches = dist.shard(epoch_batches(spec.rows, bs, seed, pos.epoch))
        while pos.micro < len(batches) and pos.step < total:
            start = time.perf_counter()
            chunk = batches[pos.micro : pos.micro + accum]
            if spec.method == "dpo":
                window = [collate_pairs(b, spec.pad_id) for b in chunk]
            else:
                window = [collate(b, spec.pad_id, packed, pad_to) for b in chunk]
            loss, lr = stepper.step(window)
            elapsed = max(time.perf_counter() - start, 1e-9)
            n_tokens = sum(b["n_tokens"] for b in window) * dist.world
            rate = n_tokens / elapsed
            seen += n_tokens
            if losses:
                timed[0], timed[1] = timed[0] + n_tokens, timed[1] + elapsed
            losses.append(loss)
            pos.micro, pos.step = pos.micro + len(window), pos.step + 1
            epoch_done = pos.micro >= len(batches)
            if epoch_done:
                pos.epoch, pos.micro = pos.epoch + 1, 0
            if pos.step % save_every == 0 and pos.step < total:
                if dist.main:
                    ckpt.save(spec.checkpoint_dir, pos, model, stepper.opt, stepper.sched, stepper.scaler)
                dist.barrier()
            if dist.main:
                step = {"step": pos.step, "total": total, "epoch": pos.epoch, "loss": loss, "lr": lr}
                emit({"event": "step", **step, "tokens_per_s": rate, "tokens": n_tokens, **tag})
            if epoch_done:
                break  # the next epoch's batches, in its own order
    mean_rate = timed[0] / timed[1] if timed[1] else rate
    return LoopResult(pos.step, losses, per_epoch, resumed_from, mean_rate, peak_memory_mb(spec.device), seen)


def evaluate(model: Any, rows: list[Row], training: dict[str, Any], device: str, pad_id: int) -> float | None:
    """Mean response-token loss over `rows` (None when there are none)."""
    import torch

    from llmops.train.model import compute_dtype

    if not rows:
        return None
    dtype = compute_dtype(training["precision"], device)
    loss_mod = _loss_module(model, CE_CHUNK_TOKENS)
    packed = bool(training["packing"])
    bs = int(training["batch_size"])
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for s in range(0, len(rows), bs):
                b = collate(rows[s : s + bs], pad_id, packed)
                ctx = torch.autocast(device.split(":")[0], dtype=dtype) if dtype else contextlib.nullcontext()
                with ctx:
                    total += float(loss_mod(**_to_device(b, device)).item())
                count += b["n_labels"]
    finally:
        model.train(was_training)
    return total / max(1, count)


def _to_device(batch: dict[str, Any], device: str) -> dict[str, Any]:
    non_blocking = device.startswith("cuda")
    return {
        k: v.pin_memory().to(device, non_blocking=True) if non_blocking else v.to(device)
        for k, v in batch.items()
        if k not in ("n_tokens", "n_labels")
    }


def _compile_layers(model: Any) -> None:
    """Compile each decoder layer on its own (regional compilation: fast to compile, no graph breaks)."""
    causal = model.get_base_model()
    layers = getattr(getattr(causal, "model", None), "layers", None)
    if layers is None:
        return
    for layer in layers:
        layer.compile()


def _reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
