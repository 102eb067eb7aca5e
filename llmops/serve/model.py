"""Loading a causal LM (+ optional PEFT adapter) and generating from it.

Shared by the model server and the local evaluator so both see the same tokenisation,
padding and stopping rules. torch / transformers / peft are imported inside functions only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from llmops.errors import ProviderError


class ModelLoadError(ProviderError):
    """A model or adapter folder cannot be loaded."""


@dataclass
class LoadedModel:
    """A model ready to generate: `tokenizer.padding_side` is left and a pad token exists."""

    model: Any
    tokenizer: Any
    device: str

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)

    @property
    def eos_ids(self) -> set[int]:
        ids = getattr(self.model.generation_config, "eos_token_id", None)
        if ids is None:
            ids = self.tokenizer.eos_token_id
        found = set(ids) if isinstance(ids, (list, tuple)) else ({ids} if ids is not None else set())
        return {int(i) for i in found}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


@dataclass
class Generated:
    """One generated continuation. `finish_reason`: `stop` (end token or stop string) or `length`."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


QUANTIZE = ("none", "int8")


def load_model(model_dir: Path | str, adapter_dir: Path | str | None = None, device: str | None = None,
               merge: bool = False, quantize: str | None = None) -> LoadedModel:
    """Load tokenizer and model from `model_dir`, then the PEFT adapter on top if given.

    The adapter folder's tokenizer is used when it has one (fine-tunes save theirs).
    CPU runs in float32; CUDA uses the dtype the checkpoint was saved in. `merge` folds the
    adapter into the base weights (same answers, no adapter matmuls per token); `quantize:
    int8` (CPU) merges, then quantizes every linear layer's weights to int8 with torch's
    dynamic quantization (activations stay float). Evals load a model the same way, so a
    gate can score exactly what a deployment serves.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():  # said before seconds of importing torch
        raise ModelLoadError(f"cannot load the model in {model_dir}: it holds no config.json; check that it holds "
                             "a saved transformers model")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok_dir = model_dir
    if adapter_dir is not None and (Path(adapter_dir) / "tokenizer_config.json").is_file():
        tok_dir = Path(adapter_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        dtype = "auto" if device.startswith("cuda") else torch.float32
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load the model in {model_dir}: {exc}; check that it holds a saved transformers model"
        ) from None
    if adapter_dir is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(adapter_dir))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"cannot load the adapter in {adapter_dir}: {exc}; check that it holds a saved PEFT adapter"
            ) from None
    model.to(device)
    model.eval()
    model = _compress(model, device, merge, quantize)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, device)


def _compress(model: Any, device: str, merge: bool, quantize: str | None) -> Any:
    quantize = quantize or "none"
    if quantize not in QUANTIZE:
        raise ModelLoadError(f"quantize {quantize!r} is not supported; use one of {', '.join(QUANTIZE)}.")
    if (merge or quantize != "none") and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if quantize == "int8":
        if not device.startswith("cpu"):
            raise ModelLoadError(f"quantize int8 is torch's dynamic quantization, which runs on CPU; this model is on "
                                 f"{device}: serve it unquantized there, or on a CPU deployment.")
        import warnings

        import torch

        with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
            warnings.simplefilter("ignore")
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return model


def generate_batch(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    add_special_tokens: bool = True,
    stop: Sequence[str] = (),
) -> list[Generated]:
    """Generate for a batch of prompts (left-padded). Greedy when temperature is 0.

    Sampling draws from torch's global generator: seed it (`torch.manual_seed`) first for
    reproducible output. Stop strings end generation early and are cut from the text.
    """
    import torch

    tok = lm.tokenizer
    enc = tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=add_special_tokens).to(lm.device)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id}
    kwargs.update(_sampling_kwargs(temperature, top_p))
    if stop:
        kwargs.update(stop_strings=list(stop), tokenizer=tok)
    with torch.inference_mode():
        out = lm.model.generate(**enc, **kwargs)
    width = enc["input_ids"].shape[1]
    prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
    return [
        finish_generated(lm, out[i, width:].tolist(), int(prompt_lens[i]), stop)
        for i in range(len(prompts))
    ]


def finish_generated(lm: LoadedModel, ids: list[int], prompt_tokens: int, stop: Sequence[str]) -> Generated:
    """The answer in the generated token IDS: cut at the first end token or stop string."""
    ends = lm.eos_ids | ({lm.tokenizer.pad_token_id} if lm.tokenizer.pad_token_id is not None else set())
    cut = next((k for k, t in enumerate(ids) if t in ends), None)
    finish = "stop" if cut is not None else "length"
    kept = ids if cut is None else ids[:cut]
    text = lm.tokenizer.decode(kept, skip_special_tokens=True)
    text, hit = cut_at_stop(text, stop)
    if hit:
        finish = "stop"
    return Generated(text, prompt_tokens, len(kept), finish)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string (excluded), and whether one was found."""
    positions = [text.find(s) for s in stop if s and s in text]
    if not positions:
        return text, False
    return text[: min(positions)], True


def sequence_nll(
    lm: LoadedModel,
    prefixes: Sequence[str],
    continuations: Sequence[str],
    *,
    batch_size: int = 8,
    add_special_tokens: bool = True,
) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of each continuation's tokens after its prefix,
    and the number of continuation tokens: perplexity = exp(nll / tokens).

    The continuation is tokenised on its own and appended to the prefix's tokens; sequences
    longer than the model's context keep their last tokens.
    """
    import torch

    tok = lm.tokenizer
    total, count = 0.0, 0
    for start in range(0, len(prefixes), batch_size):
        seqs, labels = [], []
        for prefix, cont in zip(prefixes[start : start + batch_size], continuations[start : start + batch_size]):
            p_ids = lm.encode(prefix, add_special_tokens)
            c_ids = lm.encode(cont, add_special_tokens=False)
            ids = (p_ids + c_ids)[-lm.max_positions :]
            lab = ([-100] * len(p_ids) + c_ids)[-lm.max_positions :]
            seqs.append(ids)
            labels.append(lab)
        width = max(len(s) for s in seqs)
        # Right padding keeps real tokens at positions 0..n-1 without passing position ids.
        pad = tok.pad_token_id
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=lm.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=lm.device)
        target = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels], device=lm.device)
        with torch.inference_mode():
            logits = lm.model(input_ids=input_ids, attention_mask=mask).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += float(loss)
        count += int((target[:, 1:] != -100).sum())
    if math.isnan(total):
        raise ProviderError("the model's log-likelihood is NaN; check the model weights and precision")
    return total, count


class TokenStream:
    """Generate for one prompt, yielding text deltas as they come (for server-sent events).

    Iterate it once; afterwards `result` holds the whole `Generated`. Stop strings are
    held back until it is clear they are not the start of a stop string, and never sent.
    Closing the iterator early (client gone) stops generation at the next token.
    """

    def __init__(self, lm: LoadedModel, prompt: str, *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, add_special_tokens: bool = True, stop: Sequence[str] = ()) -> None:
        self.lm = lm
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.add_special_tokens = add_special_tokens
        self.stop = [s for s in stop if s]
        self.result: Generated | None = None

    def __iter__(self) -> Iterator[str]:
        import threading

        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        lm, tok = self.lm, self.lm.tokenizer
        enc = tok([self.prompt], return_tensors="pt", add_special_tokens=self.add_special_tokens).to(lm.device)
        width = enc["input_ids"].shape[1]
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        cancel = threading.Event()

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        kwargs = _sampling_kwargs(self.temperature, self.top_p)
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                with torch.inference_mode():
                    box["out"] = lm.model.generate(
                        **enc, **kwargs, max_new_tokens=self.max_new_tokens, pad_token_id=tok.pad_token_id,
                        streamer=streamer, stopping_criteria=StoppingCriteriaList([_Cancelled()]),
                    )
            except BaseException as exc:  # re-raised in the consumer's thread below
                box["error"] = exc
                streamer.end()

        thread = threading.Thread(target=work, name="llmops-generate", daemon=True)
        thread.start()
        hold = max((len(s) for s in self.stop), default=1) - 1
        text, sent, hit = "", 0, False
        try:
            for piece in streamer:
                text += piece
                cut, hit = cut_at_stop(text, self.stop)
                upto = len(cut) if hit else len(text) - hold
                if upto > sent:
                    yield text[sent:upto]
                    sent = upto
                if hit:
                    break
            final, hit = cut_at_stop(text, self.stop)
            if len(final) > sent:
                yield final[sent:]
        finally:
            cancel.set()
            thread.join()
        if "error" in box:
            raise box["error"]
        done = finish_generated(lm, box["out"][0, width:].tolist(), width, self.stop)
        reason = "stop" if hit else done.finish_reason
        self.result = Generated(final, width, done.completion_tokens, reason)


def _sampling_kwargs(temperature: float, top_p: float) -> dict[str, Any]:
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def token_logprobs(
    lm: LoadedModel, ids: list[int], top: int = 0
) -> tuple[list[float | None], list[dict[str, float] | None]]:
    """Log-probability of each token given those before it (None for the first), and the
    `top` most likely tokens at each position ({token text: logprob}; None for the first)."""
    import torch

    ids = ids[-lm.max_positions :]
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([ids], device=lm.device)).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    values: list[float | None] = [None]
    tops: list[dict[str, float] | None] = [None]
    for i in range(1, len(ids)):
        values.append(float(logp[i - 1, ids[i]]))
        if top:
            best = torch.topk(logp[i - 1], top)
            tops.append({lm.tokenizer.decode([int(t)]): float(v) for v, t in zip(best.values, best.indices)})
    return values, tops
