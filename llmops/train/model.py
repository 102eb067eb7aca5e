"""Loading the base model with a LoRA/QLoRA adapter, and exporting what training made.

Frozen base weights are kept in the training precision on a GPU (bf16/fp16: half the
memory and no per-step casts); the adapter's weights stay fp32. QLoRA loads the base in
4-bit NF4 through bitsandbytes, which needs a CUDA GPU.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from llmops.errors import ProviderError
from llmops.hashing import file_sha256, folder_sha256


def pick_device() -> str:
    import os

    import torch

    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return f"cuda:{local}"
    return "cpu"


def compute_dtype(precision: str, device: str) -> Any:
    """The autocast dtype for `precision` on `device`, or None for fp32.

    fp16 needs a GPU; on a CPU it falls back to fp32 (bf16 works on both).
    """
    import torch

    if precision == "bf16":
        if device.startswith("cuda") and not torch.cuda.is_bf16_supported():
            raise ProviderError("training.precision: bf16 is not supported by this GPU; use fp16 or fp32.")
        return torch.bfloat16
    if precision == "fp16" and device.startswith("cuda"):
        return torch.float16
    return None


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(folder: Path, adapter: dict[str, Any], training: dict[str, Any], device: str) -> Any:
    """The base model from `folder` with a fresh, seeded adapter; only the adapter trains."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = compute_dtype(training["precision"], device)
    kwargs: dict[str, Any] = {"attn_implementation": "sdpa"}
    if adapter["type"] == "qlora":
        kwargs.update(_qlora_kwargs(device, dtype or torch.bfloat16))
    elif device.startswith("cuda") and dtype is not None:
        kwargs["dtype"] = dtype
    else:
        kwargs["dtype"] = torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    return add_adapter(model, adapter, training, device)


def add_adapter(model: Any, adapter: dict[str, Any], training: dict[str, Any], device: str) -> Any:
    """`model` (a transformers causal LM) moved to `device`, with a seeded LoRA adapter from `adapter`."""
    import torch
    from peft import get_peft_model

    if adapter["type"] != "qlora":
        model.to(device)
    model.config.use_cache = False
    if training["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if adapter["type"] == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(training["gradient_checkpointing"])
        )
    targets = adapter["target_modules"]
    config = lora_config(adapter)
    torch.manual_seed(int(training["seed"]))
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise ProviderError(
            f"adapter.target_modules {targets}: {exc}; name modules that exist in the base model."
        ) from exc


def lora_config(adapter: dict[str, Any]) -> Any:
    from peft import LoraConfig

    targets = adapter["target_modules"]
    return LoraConfig(
        r=int(adapter["r"]),
        lora_alpha=int(adapter["alpha"]),
        lora_dropout=float(adapter["dropout"]),
        target_modules=targets if isinstance(targets, list) else "all-linear",
        task_type="CAUSAL_LM",
    )


def _qlora_kwargs(device: str, dtype: Any) -> dict[str, Any]:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ProviderError(
            "adapter.type qlora needs the bitsandbytes package and a CUDA GPU; install bitsandbytes "
            "in the training environment or use adapter.type: lora."
        ) from exc
    if not device.startswith("cuda"):
        raise ProviderError(
            "adapter.type qlora needs a CUDA GPU and none is visible; set resources.gpus and run where "
            "a GPU is, or use adapter.type: lora."
        )
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    return {"quantization_config": quant, "device_map": {"": device}, "dtype": dtype}


def trainable_state(model: Any) -> dict[str, Any]:
    """The adapter's trainable tensors by name (what a checkpoint must keep)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_adapter(model: Any, tokenizer: Any, out: Path) -> dict[str, Any]:
    """Save the adapter (safetensors) and tokenizer under `out`; returns their hashes."""
    adapter_dir, tok_dir = out / "adapter", out / "tokenizer"
    for d in (adapter_dir, tok_dir):
        shutil.rmtree(d, ignore_errors=True)
    # A LoRA on lm_head leaves the base weights as they are: never copy them into the adapter.
    model.save_pretrained(str(adapter_dir), safe_serialization=True, save_embedding_layers=False)
    tokenizer.save_pretrained(str(tok_dir))
    weights = adapter_dir / "adapter_model.safetensors"
    return {
        "adapter": {"path": str(adapter_dir), "sha256": file_sha256(weights)},
        "tokenizer": {"path": str(tok_dir), "sha256": folder_sha256(tok_dir)},
    }


def save_merged(base_folder: Path, adapter_dir: Path, tokenizer: Any, out: Path) -> dict[str, Any]:
    """Merge the adapter into a fresh copy of the base model and save it under `out`.

    The base is reloaded in full precision on the CPU so a QLoRA adapter merges into
    real weights, not quantized ones.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_folder), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    shutil.rmtree(out, ignore_errors=True)
    merged.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return {"path": str(out), "sha256": folder_sha256(out)}
