"""Small base models built from a config: a tokenizer trained on project text, a seeded
random init and, with `pretrain:`, a short full-weight pre-training on that same text.

`build_tiny_model` is deterministic: the same build spec and the same texts give the same
files, bit for bit (weights come from a seeded init and a pre-training whose batch order,
dropout-free model and single CPU thread fix every floating-point sum; the tokenizer comes
from a deterministic BPE trainer). Everything a test needs is built here, never downloaded.

Pre-training is what makes the base worth fine-tuning: it learns the project's words (and
their spelling, so sampled answers read as words) from every text field of the train split,
each field a document on its own. It never sees a prompt template, so question -> answer is
left for the fine-tune to teach.

The saved folder loads with `AutoModelForCausalLM.from_pretrained(folder)` and
`AutoTokenizer.from_pretrained(folder)`. The tokenizer prepends `<|bos|>` to every encoded
text (as Llama's does); callers that train a causal LM append `<|eos|>` themselves.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llmops.errors import ProviderError
from llmops.fsutil import atomic_folder, atomic_write_text
from llmops.hashing import folder_hashes

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD)
ARCHITECTURES: tuple[str, ...] = ("llama",)
# 256 byte symbols of the ByteLevel alphabet plus the special tokens.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

BUILD_DEFAULTS: dict[str, Any] = {
    "architecture": "llama",
    "hidden_size": 64,
    "layers": 2,
    "heads": 4,
    "intermediate_size": 128,
    "vocab_size": 512,
    "max_position_embeddings": 512,
    "seed": 0,
}
# `pretrain:` is off when absent; these fill in what a given `pretrain:` leaves out.
PRETRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 20,
    "learning_rate": 3.0e-3,
    "batch_size": 8,
    "max_seq_length": 128,
    "warmup_steps": 10,
}
# torch's init draws from the process-global RNG: two builds seeding it at once from two
# threads (parallel apply) would interleave draws and lose determinism.
_INIT_LOCK = threading.Lock()
_INT_KEYS = ("hidden_size", "layers", "heads", "intermediate_size", "vocab_size", "max_position_embeddings")


def resolve_build_spec(build_spec: dict[str, Any]) -> dict[str, Any]:
    """The build spec with defaults filled in; raises ProviderError on impossible sizes."""
    spec = {**BUILD_DEFAULTS, **{k: v for k, v in build_spec.items() if v is not None}}
    where = "build"
    if spec["architecture"] not in ARCHITECTURES:
        raise ProviderError(
            f"{where}: architecture '{spec['architecture']}' is not supported; use one of {', '.join(ARCHITECTURES)}."
        )
    for key in _INT_KEYS:
        value = spec[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ProviderError(f"{where}.{key}: must be a positive integer, got {value!r}; fix llmops.yaml.")
    if spec["hidden_size"] % spec["heads"]:
        raise ProviderError(
            f"{where}: hidden_size {spec['hidden_size']} is not divisible by heads {spec['heads']}; "
            "choose sizes where hidden_size % heads == 0."
        )
    if spec["vocab_size"] < MIN_VOCAB_SIZE:
        raise ProviderError(
            f"{where}.vocab_size: {spec['vocab_size']} is too small for a byte-level tokenizer "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens); use at least {MIN_VOCAB_SIZE}."
        )
    if isinstance(spec["seed"], bool) or not isinstance(spec["seed"], int):
        raise ProviderError(f"{where}.seed: must be an integer, got {spec['seed']!r}; fix llmops.yaml.")
    if spec.get("pretrain") is not None:
        spec["pretrain"] = resolve_pretrain(spec["pretrain"])
    return spec


def resolve_pretrain(pretrain: Any) -> dict[str, Any]:
    """The `pretrain:` block with defaults filled in; raises ProviderError on bad values."""
    where = "build.pretrain"
    if not isinstance(pretrain, dict):
        raise ProviderError(f"{where}: must be a mapping such as {{epochs: 20}}, got {pretrain!r}; fix llmops.yaml.")
    unknown = sorted(set(pretrain) - set(PRETRAIN_DEFAULTS))
    if unknown:
        raise ProviderError(f"{where}: unknown field {unknown[0]!r}; use {', '.join(PRETRAIN_DEFAULTS)}.")
    out = {**PRETRAIN_DEFAULTS, **{k: v for k, v in pretrain.items() if v is not None}}
    for key in ("epochs", "batch_size", "max_seq_length"):
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 1:
            raise ProviderError(f"{where}.{key}: must be a positive integer, got {out[key]!r}; fix llmops.yaml.")
    if isinstance(out["warmup_steps"], bool) or not isinstance(out["warmup_steps"], int) or out["warmup_steps"] < 0:
        raise ProviderError(f"{where}.warmup_steps: must be an integer >= 0, got {out['warmup_steps']!r}.")
    lr = out["learning_rate"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < 1:
        raise ProviderError(f"{where}.learning_rate: must be a number between 0 and 1, got {lr!r}; fix llmops.yaml.")
    return out


def build_tiny_model(build_spec: dict[str, Any], texts: Iterable[str], out_dir: Path) -> dict[str, Any]:
    """Build a tiny model + tokenizer from `build_spec` and `texts` into `out_dir`.

    `out_dir` is replaced as a whole: the files are written to a temporary sibling folder
    first, so a failed build never leaves a half-written model. Returns
    `{"files": {relative posix path: sha256}, "spec": resolved spec}`, plus `"pretrain"`
    (steps, tokens, seconds, first and last loss) when the spec pre-trains.
    """
    spec = resolve_build_spec(build_spec)
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ProviderError(
            "build: the tokenizer_from dataset has no text to train a tokenizer on; "
            "give it rows with string fields."
        )
    out_dir = Path(out_dir)
    with build_lock(out_dir):
        remove_stale_temps(out_dir)
        with atomic_folder(out_dir) as tmp, _no_progress_bars():
            tokenizer = _train_tokenizer(texts, spec)
            tokenizer.save_pretrained(str(tmp))
            _portable_tokenizer_class(tmp)
            model = _init_model(spec, tokenizer)
            stats = _pretrain(model, tokenizer, texts, spec) if spec.get("pretrain") else None
            model.save_pretrained(str(tmp))
            files = folder_hashes(tmp)  # save_pretrained writes no hidden files: all of them
    return {"files": files, "spec": spec, **({"pretrain": stats} if stats else {})}


# --- temp folders of killed builds --------------------------------------------------------
#
# A build writes `.NAME.tmp-XXXX` beside `NAME` (llmops.fsutil.atomic_folder) while it holds
# `.NAME.build.lock` (flock). A build that was killed leaves its temp folder, never the lock:
# the kernel drops a flock when its process dies. So whoever holds the lock knows that every
# temp folder of NAME is a dead build's: the next build removes them, and so does apply's warm-up
# (`remove_stale_builds`), which skips a NAME whose lock another process holds right now.


def _lock_path(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.build.lock"


def _temps(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.parent.glob(f".{out_dir.name}.tmp-*") if p.is_dir())


@contextlib.contextmanager
def build_lock(out_dir: Path, wait: bool = True):
    """Hold `out_dir`'s build lock (waiting for another build of it, or, with wait=False,
    yielding False at once when one runs). The lock file stays: deleting a flocked file would
    let a third process lock a new file beside it."""
    import fcntl
    import os

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(_lock_path(out_dir), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the flock


def remove_stale_temps(out_dir: Path) -> list[Path]:
    """Remove the temp folders of killed builds of `out_dir`; the caller holds its build lock."""
    import shutil

    stale = _temps(out_dir)
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def remove_stale_builds(models_dir: Path) -> list[Path]:
    """`remove_stale_temps` for every model folder under `models_dir` with a temp folder and no
    build running (in this process or another); returns what was removed."""
    import re

    removed: list[Path] = []
    names = {m.group(1) for p in Path(models_dir).glob(".*.tmp-*") if (m := re.match(r"^\.(.+)\.tmp-", p.name))}
    for name in sorted(names):
        out_dir = Path(models_dir) / name
        with build_lock(out_dir, wait=False) as held:
            if held:
                removed += remove_stale_temps(out_dir)
    return removed


def _train_tokenizer(texts: list[str], spec: dict[str, Any]):
    """A byte-level BPE tokenizer trained on `texts`, wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec["vocab_size"],
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=spec["max_position_embeddings"],
        padding_side="right",
    )


def _init_model(spec: dict[str, Any], tokenizer):
    """A LlamaForCausalLM with seeded random weights; the global RNG is left untouched."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec["vocab_size"],
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["heads"],
        max_position_embeddings=spec["max_position_embeddings"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def _pretrain(model: Any, tokenizer: Any, texts: list[str], spec: dict[str, Any]) -> dict[str, Any]:
    """Full-weight causal-LM training of `model` on `texts` (each `BOS text EOS`, packed).

    Deterministic on a CPU: one torch thread (a thread count changes how sums are split),
    a seeded batch order, no dropout, torch's global RNG forked. Leaves the model in eval mode.
    """
    import math
    import time

    import torch

    from llmops.train.data import IGNORE, Example, collate, epoch_batches, make_rows

    cfg = spec["pretrain"]
    max_len = min(cfg["max_seq_length"], spec["max_position_embeddings"])
    examples = []
    for text in texts:
        ids = (list(tokenizer(text)["input_ids"]) + [tokenizer.eos_token_id])[:max_len]
        if len(ids) > 1:
            examples.append(Example(ids, [IGNORE] + ids[1:]))
    rows = make_rows(examples, max_len, packing=True)
    steps_per_epoch = math.ceil(len(rows) / cfg["batch_size"])
    total = max(1, cfg["epochs"] * steps_per_epoch)
    warmup = cfg["warmup_steps"]

    def schedule(step: int) -> float:  # linear warm-up, then linear decay to 0
        return min(1.0, (step + 1) / (warmup + 1)) * max(0.0, 1.0 - step / total)

    losses: list[float] = []
    start = time.perf_counter()
    threads = torch.get_num_threads()
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.set_num_threads(1)
        try:
            torch.manual_seed(spec["seed"])
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=cfg["learning_rate"], weight_decay=0.0)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
            for epoch in range(cfg["epochs"]):
                for batch in epoch_batches(rows, cfg["batch_size"], spec["seed"], epoch):
                    t = collate(batch, tokenizer.pad_token_id, packed=True)
                    loss = model(input_ids=t["input_ids"], position_ids=t["position_ids"], labels=t["labels"]).loss
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    losses.append(float(loss.detach()))
        finally:
            torch.set_num_threads(threads)
            model.eval()
    return {
        "steps": len(losses),
        "tokens": cfg["epochs"] * sum(len(ex) for ex in examples),
        "seconds": round(time.perf_counter() - start, 3),
        "first_loss": round(losses[0], 4) if losses else None,
        "last_loss": round(losses[-1], 4) if losses else None,
    }


def _portable_tokenizer_class(folder: Path) -> None:
    """Name the tokenizer class `PreTrainedTokenizerFast`, which transformers 4 and 5 both load.

    transformers 5 writes its new class name `TokenizersBackend`, unknown to transformers 4
    (which a training image may still run).
    """
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def _no_progress_bars():
    """Silence transformers' tqdm bars while saving: library code never writes to the terminal."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


