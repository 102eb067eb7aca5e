"""Training throughput: llmops' own LoRA loop vs a plain transformers Trainer + peft.

Both train the same random-init Llama-shaped model (default: ~1.1B parameters: hidden
2048, 22 layers, 32 heads, 4 KV heads, intermediate 5632, vocab 32000), the same LoRA
(r=16 on all linear layers), bf16 on a GPU, the same batch size (8 sequences of up to
2048 tokens) and the same synthetic data: prompt+response examples whose lengths are
spread over 1/16..1 of the sequence length (`--data varlen`), or all full length
(`--data full`, which takes packing's advantage away). After `--warmup` steps, `--steps`
steps are timed; the figure is real (non-padding) tokens per second of wall time.

Our loop uses what `llmops.train.loop` uses on CUDA: packed rows with per-example
position ids (no padding between examples, attention kept inside each example), fused
AdamW, the loss only over response tokens in chunks, bf16 weights with autocast, and
regionally compiled decoder layers (`--no-compile` to turn that off). The baseline is
`Trainer` with `bf16=True`, its default optimizer, and batches padded to their longest
example. `--small` runs a tiny shape on the CPU as a smoke check (numbers meaningless).

    python bench/train_throughput.py               # on a GPU
    python bench/train_throughput.py --small       # anywhere
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BIG = {"hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
       "intermediate_size": 5632, "vocab_size": 32000, "seq": 2048, "batch": 8}
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 128, "vocab_size": 512, "seq": 128, "batch": 4}
LR = 2e-4


def make_examples(shape: dict[str, Any], n: int, full: bool, seed: int = 0) -> list[Any]:
    """Synthetic examples: random tokens, the first ~30% a prompt (no loss), the rest a response."""
    from llmops.train.data import IGNORE, Example

    rng = random.Random(seed)
    seq, vocab = shape["seq"], shape["vocab_size"]
    out = []
    for _ in range(n):
        length = seq if full else rng.randint(max(8, seq // 16), seq)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        cut = max(1, int(length * 0.3))
        out.append(Example(ids, [IGNORE] * cut + ids[cut:]))
    return out


def make_model(shape: dict[str, Any], device: str, dtype: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
            "vocab_size")
    config = LlamaConfig(**{k: shape[k] for k in keys}, max_position_embeddings=shape["seq"],
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def adapter_and_training(shape: dict[str, Any], steps: int, cuda: bool) -> tuple[dict, dict]:
    from llmops.train.spec import resolve_adapter, resolve_training

    adapter = resolve_adapter({"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"})
    training = resolve_training(
        {"max_steps": steps, "batch_size": shape["batch"], "max_seq_length": shape["seq"], "packing": True,
         "precision": "bf16" if cuda else "fp32", "learning_rate": LR, "save_steps": 10**9}
    )
    return adapter, training


def rate(times: list[float], tokens: list[int], warmup: int) -> float:
    """Tokens per second over the steps after `warmup` (time from the end of the last warm-up step)."""
    return sum(tokens[warmup:]) / (times[-1] - times[warmup - 1])


def run_ours(shape: dict[str, Any], examples: list[Any], args: argparse.Namespace, device: str) -> dict[str, Any]:
    import torch

    from llmops.train.data import make_rows
    from llmops.train.loop import LoopSpec, peak_memory_mb, train
    from llmops.train.model import add_adapter

    cuda = device.startswith("cuda")
    adapter, training = adapter_and_training(shape, args.warmup + args.steps, cuda)
    model = add_adapter(make_model(shape, device, torch.bfloat16 if cuda else torch.float32), adapter, training, device)
    rows = make_rows(examples, shape["seq"], packing=True)
    times: list[float] = []
    tokens: list[int] = []

    def on_event(event: dict[str, Any]) -> None:
        if event["event"] == "step":  # the loop has synchronised (loss.item()) before this
            times.append(time.perf_counter())
            tokens.append(event["tokens"])

    with tempfile.TemporaryDirectory() as tmp:
        spec = LoopSpec(training, rows, Path(tmp), device, pad_id=0, compile=cuda and not args.no_compile)
        train(model, spec, on_event)
    out = {"tokens_per_s": rate(times, tokens, args.warmup), "peak_memory_mb": peak_memory_mb(device)}
    del model
    return out


def run_trainer(shape: dict[str, Any], examples: list[Any], args: argparse.Namespace, device: str) -> dict[str, Any]:
    import torch
    from peft import get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from llmops.train.loop import peak_memory_mb
    from llmops.train.model import lora_config

    cuda = device.startswith("cuda")
    adapter, _ = adapter_and_training(shape, args.warmup + args.steps, cuda)
    model = get_peft_model(make_model(shape, device, torch.bfloat16 if cuda else torch.float32), lora_config(adapter))
    data = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    batch_tokens: list[int] = []
    times: list[float] = []

    def collate(batch: list[dict]) -> dict[str, Any]:
        width = max(len(b["input_ids"]) for b in batch)
        batch_tokens.append(sum(len(b["input_ids"]) for b in batch))
        pad = [width - len(b["input_ids"]) for b in batch]
        return {
            "input_ids": torch.tensor([b["input_ids"] + [0] * p for b, p in zip(batch, pad)]),
            "labels": torch.tensor([b["labels"] + [-100] * p for b, p in zip(batch, pad)]),
            "attention_mask": torch.tensor([[1] * len(b["input_ids"]) + [0] * p for b, p in zip(batch, pad)]),
        }

    class Clock(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=shape["batch"], max_steps=args.warmup + args.steps,
            learning_rate=LR, bf16=cuda, use_cpu=not cuda, logging_steps=10**6, save_strategy="no",
            report_to=[], remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True, seed=0,
        )
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        Trainer(model=model, args=targs, train_dataset=data, data_collator=collate, callbacks=[Clock()]).train()
    out = {
        "tokens_per_s": rate(times, batch_tokens[: len(times)], args.warmup),
        "peak_memory_mb": peak_memory_mb(device),
    }
    del model
    return out


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny shape on the CPU (smoke check)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; --small 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; --small 2)")
    parser.add_argument("--data", choices=["varlen", "full", "both"], default="varlen")
    parser.add_argument("--no-compile", action="store_true", help="do not torch.compile our decoder layers")
    parser.add_argument("--only", choices=["ours", "trainer"], help="run one side only")
    args = parser.parse_args()

    import torch

    cuda = torch.cuda.is_available() and not args.small
    device = "cuda:0" if cuda else "cpu"
    shape = SMALL if args.small else BIG
    args.steps = args.steps or (5 if args.small else 20)
    args.warmup = args.warmup or (2 if args.small else 5)
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    print(f"device: {name}; shape: {json.dumps(shape)}; steps: {args.warmup} warm-up + {args.steps} timed", flush=True)
    for data in (["varlen", "full"] if args.data == "both" else [args.data]):
        examples = make_examples(shape, (args.warmup + args.steps) * shape["batch"] * 3, full=data == "full")
        results = {}
        for side, fn in (("ours", run_ours), ("trainer", run_trainer)):
            if args.only and args.only != side:
                continue
            results[side] = fn(shape, examples, args, device)
            free(device)
            r = results[side]
            print(
                f"[{data}] {side:8s} {r['tokens_per_s']:12.0f} tokens/s   peak {r['peak_memory_mb']:9.0f} MiB",
                flush=True,
            )
        if len(results) == 2:
            ratio = results["ours"]["tokens_per_s"] / results["trainer"]["tokens_per_s"]
            print(f"[{data}] ratio ours/trainer: {ratio:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
