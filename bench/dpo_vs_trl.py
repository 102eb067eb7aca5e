"""`method: dpo` in our loop against TRL's DPOTrainer: same pairs, model, adapter and steps.

The guide says: use TRL for preference training unless a benchmark shows why not. This is
that benchmark. Both sides train a LoRA adapter (the example's r/alpha, all linear layers)
on the same tiny llama (the example's shape, built here from the tickets) with the same
preference pairs (ticket answers chosen, a refusal rejected), batch size, learning rate,
beta, steps, fp32 and torch thread count, the reference being the base with the adapter
switched off on both sides. Printed side by side: steady-state pairs/s and tokens/s (steps
2..N, timed between step ends), wall time including set-up (TRL tokenizes its dataset; we
encode the pairs), and the first and last step's loss (both must start at log 2 = 0.693).
Rounds alternate which side runs first.

TRL is not a dependency of llmops. Install it beside the project's packages, e.g.
    .venv/bin/pip install --target /tmp/trl-site --no-deps trl==1.16.0 datasets==5.2.0 \
        dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0
    PYTHONPATH=/tmp/trl-site .venv/bin/python bench/dpo_vs_trl.py [--steps 30] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
PROMPT = "### Question:\n{question}\n### Answer:\n"
REJECTED = "No idea, sorry."
ADAPTER = {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}


def build_base(out: Path, hidden: int, layers: int) -> None:
    from llmops.train.build import build_tiny_model

    rows = [json.loads(line) for line in (REPO / "example-project/data/tickets.jsonl").read_text().splitlines()]
    texts = [t for r in rows for t in (r["question"], r["answer"])]
    spec = {"architecture": "llama", "hidden_size": hidden, "layers": layers, "heads": 4,
            "intermediate_size": 2 * hidden, "vocab_size": 2048, "max_position_embeddings": 256, "seed": 13}
    build_tiny_model(spec, texts, out)


def pairs(n: int) -> list[dict[str, str]]:
    rows = [json.loads(line) for line in (REPO / "example-project/data/tickets.jsonl").read_text().splitlines()]
    return [{"prompt": PROMPT.format(question=r["question"]), "chosen": r["answer"], "rejected": REJECTED}
            for r in rows[:n]]


def training(steps: int, batch: int) -> dict:
    from llmops.train.spec import resolve_training

    return resolve_training({"max_steps": steps, "batch_size": batch, "learning_rate": 5e-4, "seed": 0,
                             "max_seq_length": 256, "lr_scheduler": "constant", "dpo_beta": 0.1})


def tokens_per_pair(base: Path, data: list[dict[str, str]]) -> float:
    """Real (unpadded) tokens of a pair's two sequences, as our encoding counts them."""
    from transformers import AutoTokenizer

    from llmops.train.data import encode_example

    tok = AutoTokenizer.from_pretrained(str(base))
    n = [len(encode_example(tok, d["prompt"], d["chosen"], 256)) + len(encode_example(tok, d["prompt"], d["rejected"], 256))
         for d in data]
    return statistics.mean(n)


def run_ours(base: Path, data: list[dict[str, str]], steps: int, batch: int, work: Path) -> dict:
    import torch
    from transformers import AutoTokenizer

    from llmops.train.data import encode_example, pair_rows
    from llmops.train.loop import LoopSpec, train
    from llmops.train.model import load_model

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(base))
    t = training(steps, batch)
    model = load_model(base, ADAPTER, t, "cpu")
    ex = [(encode_example(tok, d["prompt"], d["chosen"], 256), encode_example(tok, d["prompt"], d["rejected"], 256))
          for d in data]
    spec = LoopSpec(training=t, rows=pair_rows(ex), method="dpo", checkpoint_dir=work / "ckpt", device="cpu",
                    pad_id=tok.pad_token_id)
    ends: list[float] = []
    losses: list[float] = []

    def emit(event: dict) -> None:
        if event.get("event") == "step":
            ends.append(time.perf_counter())
            losses.append(event["loss"])

    torch.manual_seed(0)
    train(model, spec, emit)
    return {"wall": time.perf_counter() - t0, "ends": ends, "losses": losses}


def run_trl(base: Path, data: list[dict[str, str]], steps: int, batch: int, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from llmops.train.model import lora_config

    ends: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001 - transformers' callback shape
            ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    t = training(steps, batch)
    args = DPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=batch, max_steps=steps,
                     learning_rate=t["learning_rate"], lr_scheduler_type="constant", beta=t["dpo_beta"],
                     max_length=256, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                     dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=1.0, weight_decay=0.0,
                     optim="adamw_torch", gradient_checkpointing=False)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(data), processing_class=tok,
                         peft_config=lora_config(ADAPTER), callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)  # its per-step log lines; the Clock keeps the losses
    trainer.train()
    return {"wall": time.perf_counter() - t0, "ends": ends, "losses": losses}


def import_seconds(stmt: str) -> float:
    """Seconds `stmt` takes in a fresh interpreter that has torch, transformers and peft loaded (best of 3)."""
    import subprocess
    import sys

    code = ("import time, torch, transformers, peft\nt = time.perf_counter()\n" + stmt +
            "\nprint(time.perf_counter() - t)")
    runs = [float(subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True,
                                 check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout)
            for _ in range(3)]
    return min(runs)


def steady(ends: list[float], batch: int) -> float:
    """Pairs per second over steps 2..N (the first step carries warm-up)."""
    gaps = [b - a for a, b in zip(ends, ends[1:])]
    return batch * len(gaps) / sum(gaps) if gaps else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--pairs", type=int, default=120)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128, help="the example's base is 128 wide, 2 layers")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides (our job uses 1 for small models)")
    args = p.parse_args()
    import datasets
    import torch
    import transformers
    import trl

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="llmops-dpo-vs-trl-"))
    base = work / "base"
    build_base(base, args.hidden, args.layers)
    data = pairs(args.pairs)
    per_pair = tokens_per_pair(base, data)
    results: dict[str, list[dict]] = {"llmops": [], "trl": []}
    sides = {"llmops": run_ours, "trl": run_trl}
    for r in range(args.rounds):
        order = ("llmops", "trl") if r % 2 == 0 else ("trl", "llmops")
        for side in order:
            results[side].append(sides[side](base, data, args.steps, args.batch, work / f"{side}-{r}"))
    print(f"DPO, {args.steps} steps x {args.batch} pairs, tiny llama (hidden {args.hidden}, {args.layers} layers), LoRA r=8 all-linear, "
          f"fp32, {args.threads} torch thread(s), CPU; trl {trl.__version__}, torch {torch.__version__}; "
          f"{per_pair:.0f} real tokens per pair; {args.rounds} round(s), median")
    print(f"{'':10}{'pairs/s':>10}{'tokens/s':>11}{'wall s':>9}{'loss 1st':>10}{'loss last':>11}")
    med = {}
    for side, runs in results.items():
        rate = statistics.median(steady(x["ends"], args.batch) for x in runs)
        wall = statistics.median(x["wall"] for x in runs)
        med[side] = rate
        first, last = runs[0]["losses"][0], runs[0]["losses"][-1]
        print(f"{side:10}{rate:10.1f}{rate * per_pair:11.0f}{wall:9.1f}{first:10.3f}{last:11.3f}")
    imports = {"llmops": import_seconds("import llmops.train.loop, llmops.train.data"),
               "trl": import_seconds("from trl import DPOConfig, DPOTrainer")}
    print("import on top of torch + transformers + peft: " + ", ".join(f"{k} {v:.2f} s" for k, v in imports.items()))
    print(f"llmops / trl steady-state throughput: {med['llmops'] / med['trl']:.2f}x "
          f"(log 2 = {math.log(2):.3f}: both first losses should equal it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
