"""Running an evaluation: a local model (+ adapter) or a live OpenAI-compatible endpoint.

`evaluate` loads the model once, renders every row through the prompt, generates in
left-padded batches (greedy, or sampled with a seed per repeat), measures latency, scores
the reference answers' perplexity, and computes the requested metrics. `evaluate_endpoint`
does the same against what a deployment serves now, one request at a time, for baselines.

Safety metrics get a `generate(prompts) -> texts` callable with the same model and decoding
as the evaluation (and, when sampling, the same seed per repeat). Probes are rendered with
the tokenizer's chat template when it has one (local) or sent as a chat when the eval's
prompt is a chat (endpoint), else as a plain "System/User/Assistant" transcript. The probe
set versions land in `EvalResult.probe_sets` for the lock.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from llmops.errors import ProviderError
from llmops.evals.metrics import Metric, aggregate_repeats, compute_metrics, latency_spread, resolve_metrics
from llmops.evals.safety import SAFETY_METRICS, default_render
from llmops.templating.prompt_template import PromptTemplate, has_chat_template, load_prompt, messages_to_text

DECODING_DEFAULTS: dict[str, Any] = {"max_new_tokens": 32, "temperature": 0.0, "top_p": 1.0, "seed": 0}
EVAL_CLIENT_ID = "llmops-eval"  # X-Client-Id of evaluation traffic, so monitors can tell it apart
Progress = Callable[[int, int], None]


class EvalError(ProviderError):
    """An evaluation could not run (bad rows, unreachable endpoint, model failure)."""


@dataclass
class EvalResult:
    """Metrics of one evaluation.

    `metrics` are means over repeats, `per_metric_std` their sample standard deviations
    (0 with one repeat). `skipped` names metrics that could not be measured, and why.
    `samples` are the rows of the first repeat: prompt, prediction, references, latency.
    """

    metrics: dict[str, float]
    per_metric_std: dict[str, float]
    samples: list[dict[str, Any]]
    decoding: dict[str, Any]
    skipped: dict[str, str] = field(default_factory=dict)
    repeats: int = 1
    probe_sets: dict[str, str] = field(default_factory=dict)  # safety metric -> "NAME/VERSION"
    safety: dict[str, dict[str, Any]] = field(default_factory=dict)  # safety metric -> per-probe details
    latency: dict[str, Any] = field(default_factory=dict)  # sample size and spread (metrics.latency_spread)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decoding_settings(decoding: dict[str, Any] | None) -> dict[str, Any]:
    """The decoding spec with defaults filled in (what the lock records)."""
    out = dict(DECODING_DEFAULTS)
    out.update(decoding or {})
    unknown = set(out) - set(DECODING_DEFAULTS)
    if unknown:
        raise EvalError(f"unknown decoding setting(s) {sorted(unknown)}; known: {sorted(DECODING_DEFAULTS)}")
    if int(out["max_new_tokens"]) < 1 or float(out["temperature"]) < 0 or not 0 < float(out["top_p"]) <= 1:
        raise EvalError(f"decoding {out} is out of range: max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1")
    return out


def _metrics(metrics: Sequence[str | dict[str, Any] | Metric], root: Path) -> list[Metric]:
    return [m if isinstance(m, Metric) else resolve_metrics([m], root)[0] for m in metrics]


def _row_inputs(prompt: PromptTemplate, rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Each row's prompt variables and reference answers; a clear error for the first bad row."""
    inputs, refs = [], []
    for i, row in enumerate(rows):
        missing = [v for v in prompt.variables if v not in row]
        if missing:
            raise EvalError(
                f"evaluation row {i} has no field '{missing[0]}' (a variable of the prompt); fix the dataset or the prompt"
            )
        ref = row.get(prompt.response_field)
        if ref is None:
            raise EvalError(
                f"evaluation row {i} has no field '{prompt.response_field}' (the prompt's response_field); "
                "fix the dataset or set response_field"
            )
        inputs.append({v: row[v] for v in prompt.variables})
        refs.append([ref] if isinstance(ref, str) else [str(r) for r in ref])
    if not inputs:
        raise EvalError("the evaluation set is empty; check the dataset's eval split and `limit`")
    return inputs, refs


def _repeat_count(decoding: dict[str, Any], repeats: int) -> int:
    # Greedy decoding gives the same text every time: one pass is the answer.
    return max(1, int(repeats)) if float(decoding["temperature"]) > 0 else 1


def _samples(
    prompts: list[str], preds: list[str], refs: list[list[str]], lat: list[float], toks: list[int]
) -> list[dict[str, Any]]:
    return [
        {"index": i, "prompt": p, "prediction": y, "references": r, "latency_ms": round(ms, 3), "completion_tokens": n}
        for i, (p, y, r, ms, n) in enumerate(zip(prompts, preds, refs, lat, toks))
    ]


def evaluate(
    model_dir: Path | str,
    adapter_dir: Path | str | None,
    rows: Sequence[dict[str, Any]],
    prompt_spec: dict[str, Any],
    root: Path | str,
    metrics: Sequence[str | dict[str, Any] | Metric],
    decoding: dict[str, Any] | None = None,
    batch_size: int = 8,
    repeats: int = 1,
    *,
    prompt_name: str = "",
    progress: Progress | None = None,
    device: str | None = None,
    served_as: dict[str, Any] | None = None,
) -> EvalResult:
    """Evaluate a local model (and PEFT adapter) on `rows` with the given prompt and metrics.

    `served_as` ({merge, quantize}) loads it as a deployment with those `serve:` settings
    serves it, so the gates score what is served."""
    import warnings

    # transformers' deprecation notices are for its own API users, not for llmops' users.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
    from llmops.serve.model import load_model, sequence_nll

    root = Path(root)
    if batch_size < 1:
        raise EvalError(f"batch_size must be at least 1, got {batch_size}")
    settings = decoding_settings(decoding)
    metric_objs = _metrics(metrics, root)
    prompt = load_prompt(prompt_spec, root, prompt_name)
    inputs, refs = _row_inputs(prompt, rows)
    served_as = served_as or {}
    lm = load_model(model_dir, adapter_dir, device, merge=bool(served_as.get("merge")),
                    quantize=served_as.get("quantize"))
    prompts = [prompt.render(v, lm.tokenizer) for v in inputs]
    add_special = not (prompt.is_chat and has_chat_template(lm.tokenizer))
    extras: dict[str, Any] = {"prompts": prompts, "rows": list(rows)}
    if any(m.name == "perplexity" for m in metric_objs):
        extras["nll_sum"], extras["nll_tokens"] = sequence_nll(
            lm, prompts, [r[0] for r in refs], batch_size=batch_size, add_special_tokens=add_special
        )
    model = _LocalModel(lm, prompts, settings, batch_size, add_special)
    return _evaluate(model, metric_objs, refs, extras, settings, repeats, progress)


class _LocalModel:
    """A model loaded here: batches of `batch_size`, seeded per repeat; a row's latency is
    its batch's wall time (every row of a batch waits for all of it)."""

    def __init__(self, lm: Any, prompts: list[str], settings: dict[str, Any], batch_size: int,
                 add_special: bool) -> None:
        self.lm, self.shown, self.settings = lm, prompts, settings
        self.batch_size, self.add_special = batch_size, add_special
        self.skipped: dict[str, str] = {}

    def warm_up(self) -> None:
        """Untimed: the first generation pays for lazy allocation and kernel selection."""
        from llmops.serve.model import generate_batch

        if self.shown:
            generate_batch(self.lm, self.shown[:1], max_new_tokens=1, temperature=0.0, top_p=1.0,
                           add_special_tokens=self.add_special)

    def generation_pass(self, repeat: int, progress: Progress | None,
                        runs: int) -> tuple[list[str], list[float], list[int], float]:
        import torch

        torch.manual_seed(int(self.settings["seed"]) + repeat)
        return _local_pass(self.lm, self.shown, self.settings, self.batch_size, self.add_special, progress,
                           repeat, runs)

    def probes(self, repeat: int) -> tuple[Callable[[str, str], str], Callable[[list[str]], list[str]]]:
        render, probe_special = _local_probe_render(self.lm.tokenizer)
        return render, _local_generate(self.lm, self.settings, self.batch_size, probe_special)

    def latency(self, latencies: list[float], runs: int) -> dict[str, Any]:
        return latency_spread(latencies, runs * -(-len(self.shown) // self.batch_size))


def _evaluate(model: Any, metric_objs: list[Metric], refs: list[list[str]], extras: dict[str, Any],
              settings: dict[str, Any], repeats: int, progress: Progress | None) -> EvalResult:
    """The one evaluation loop, over a model here (`_LocalModel`) or behind an endpoint
    (`_EndpointModel`): each repeat generates for every row, scores every metric, and the
    repeats are aggregated (mean and spread); the first repeat's rows are the samples."""
    runs = _repeat_count(settings, repeats)
    timed = _wants_latency(metric_objs)
    if timed:
        model.warm_up()
    results, samples, skipped, safety, latencies = [], [], {}, {}, []
    for r in range(runs):
        preds, lat, toks, seconds = model.generation_pass(r, progress, runs)
        latencies += lat
        run_extras = dict(extras, latency_ms=lat, completion_tokens=toks, generation_seconds=seconds, safety={})
        if _wants_safety(metric_objs):
            run_extras["render"], run_extras["generate"] = model.probes(r)
        values, skipped = compute_metrics(metric_objs, preds, refs, run_extras)
        results.append(values)
        if r == 0:
            samples, safety = _samples(model.shown, preds, refs, lat, toks), run_extras["safety"]
    skipped.update(model.skipped)
    mean, std = aggregate_repeats(results)
    result = _result(mean, std, samples, settings, skipped, runs, safety)
    if timed:
        result.latency = model.latency(latencies, runs)
    return result


def _result(mean: dict[str, float], std: dict[str, float], samples: list[dict[str, Any]], settings: dict[str, Any],
            skipped: dict[str, str], runs: int, safety: dict[str, tuple[str, dict[str, Any]]]) -> EvalResult:
    return EvalResult(mean, std, samples, settings, skipped, runs,
                      probe_sets={k: label for k, (label, _) in sorted(safety.items())},
                      safety={k: details for k, (_, details) in sorted(safety.items())})


def _wants_latency(metrics: Sequence[Metric]) -> bool:
    return any(m.name.startswith("latency_") for m in metrics)


def _wants_safety(metrics: Sequence[Metric]) -> bool:
    return any(m.name in SAFETY_METRICS for m in metrics)


def _local_probe_render(tokenizer: Any) -> tuple[Callable[[str, str], str], bool]:
    """(render(system, user), add_special_tokens) for safety probes on a local model."""
    if not has_chat_template(tokenizer):
        return default_render, True

    def render(system: str, user: str) -> str:
        chat = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        try:
            return messages_to_text(chat, tokenizer)
        except Exception:  # noqa: BLE001 - templates that refuse a system turn: fold it into the user's
            merged = f"{system}\n\n{user}" if system else user
            return messages_to_text([{"role": "user", "content": merged}], tokenizer)

    return render, False


def _fit_prompt(lm: Any, prompt: str, max_new_tokens: int, add_special: bool) -> str:
    """The prompt, cut from the left when it and the completion would overflow the model's context."""
    room = max(1, lm.max_positions - max_new_tokens)
    ids = lm.encode(prompt, add_special)
    if len(ids) <= room:
        return prompt
    return lm.tokenizer.decode(ids[-room:], skip_special_tokens=True)


def _local_generate(lm: Any, settings: dict[str, Any], batch_size: int,
                    add_special: bool) -> Callable[[list[str]], list[str]]:
    """`generate(prompts) -> texts` on the loaded model with the evaluation's decoding."""
    from llmops.serve.model import generate_batch

    max_new = int(settings["max_new_tokens"])

    def generate(prompts: list[str]) -> list[str]:
        texts: list[str] = []
        for start in range(0, len(prompts), batch_size):
            batch = [_fit_prompt(lm, p, max_new, add_special) for p in prompts[start : start + batch_size]]
            out = generate_batch(lm, batch, max_new_tokens=max_new, temperature=float(settings["temperature"]),
                                 top_p=float(settings["top_p"]), add_special_tokens=add_special)
            texts += [g.text for g in out]
        return texts

    return generate


def _local_pass(
    lm: Any, prompts: list[str], settings: dict[str, Any], batch_size: int, add_special: bool,
    progress: Progress | None, repeat: int, runs: int,
) -> tuple[list[str], list[float], list[int], float]:
    """One generation pass over all prompts in batches: texts, per-row latency (the batch's
    wall time: every row of a batch waits for all of it), completion tokens, total seconds."""
    from llmops.serve.model import generate_batch

    preds: list[str] = []
    lat: list[float] = []
    toks: list[int] = []
    seconds = 0.0
    for start in range(0, len(prompts), batch_size):
        t0 = time.perf_counter()
        out = generate_batch(
            lm, prompts[start : start + batch_size], max_new_tokens=int(settings["max_new_tokens"]),
            temperature=float(settings["temperature"]), top_p=float(settings["top_p"]), add_special_tokens=add_special,
        )
        elapsed = time.perf_counter() - t0
        seconds += elapsed
        preds += [g.text for g in out]
        toks += [g.completion_tokens for g in out]
        lat += [elapsed * 1000.0] * len(out)
        if progress:
            progress(repeat * len(prompts) + len(preds), runs * len(prompts))
    return preds, lat, toks, seconds


# --- a live endpoint ---------------------------------------------------------------------


@dataclass
class _Endpoint:
    base_url: str
    api_key: str | None
    timeout: float

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        url = self.base_url.rstrip("/") + path
        data = json.dumps(body).encode("utf-8") if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        req.add_header("X-Client-Id", EVAL_CLIENT_ID)
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            raise _EndpointHTTPError(exc.code, _error_message(exc), url) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise EvalError(f"cannot reach {url}: {reason}; is the deployment running?") from None


class _EndpointHTTPError(EvalError):
    def __init__(self, status: int, detail: str, url: str) -> None:
        self.status = status
        super().__init__(f"{url} answered HTTP {status}: {detail}")


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read().decode("utf-8"))["error"]["message"])
    except (ValueError, KeyError, TypeError, OSError):
        return str(exc.reason)


def _endpoint_nll(ep: _Endpoint, model: str, prompts: list[str], refs: list[list[str]]) -> tuple[float, int]:
    """Reference log-likelihood through `echo` + `logprobs` on /v1/completions (max_tokens 0)."""
    total, count = 0.0, 0
    for prompt, ref in zip(prompts, refs):
        body = {"model": model, "prompt": prompt + ref[0], "max_tokens": 0, "echo": True, "logprobs": 0}
        lp = ep.call("POST", "/v1/completions", body)["choices"][0].get("logprobs") or {}
        offsets, values = lp.get("text_offset"), lp.get("token_logprobs")
        if offsets is None or values is None:
            raise EvalError("the endpoint returned no token logprobs for echo=true")
        for off, value in zip(offsets, values):
            if off >= len(prompt) and value is not None:
                total -= float(value)
                count += 1
    return total, count


def evaluate_endpoint(
    base_url: str,
    rows: Sequence[dict[str, Any]],
    prompt_spec: dict[str, Any],
    root: Path | str,
    metrics: Sequence[str | dict[str, Any] | Metric],
    decoding: dict[str, Any] | None = None,
    repeats: int = 1,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    timeout: float = 120.0,
    prompt_name: str = "",
    progress: Progress | None = None,
    api: str | None = None,
) -> EvalResult:
    """Evaluate what an OpenAI-compatible server serves (`base_url` without `/v1`).

    Text prompts go to POST /v1/completions, chat prompts to /v1/chat/completions (the
    server applies its own chat template). With `api="chat"`, a text prompt with one
    declared variable is sent as chat instead, that variable as the user's message: what a
    chat client sends to an llmops server, which puts it through the same prompt. Requests
    are sent one at a time so each latency is one request's. Perplexity needs `echo` +
    `logprobs` support; without it the metric is reported under `skipped`.
    """
    root = Path(root)
    settings = decoding_settings(decoding)
    metric_objs = _metrics(metrics, root)
    prompt = load_prompt(prompt_spec, root, prompt_name)
    if api not in (None, "completions", "chat"):
        raise EvalError(f"api {api!r} is not completions or chat")
    if api == "chat" and not prompt.is_chat and len(prompt.variables) != 1:
        raise EvalError(f"api chat sends a text prompt's one variable as the user message; prompt "
                        f"{prompt_name or 'this prompt'} declares {len(prompt.variables)}: use api completions")
    if api == "completions" and prompt.is_chat:
        raise EvalError("a chat prompt is evaluated through /v1/chat/completions: drop `api: completions`")
    as_chat = api == "chat" and not prompt.is_chat
    inputs, refs = _row_inputs(prompt, rows)
    ep = _Endpoint(base_url, api_key, timeout)
    if model_name is None:
        listed = ep.call("GET", "/v1/models").get("data") or []
        if not listed:
            raise EvalError(f"{base_url}/v1/models lists no model; pass the model name")
        model_name = str(listed[0]["id"])
    extras: dict[str, Any] = {"rows": list(rows)}
    texts = [] if prompt.is_chat else [prompt.render(v) for v in inputs]
    model = _EndpointModel(ep, model_name, prompt, inputs, texts, settings, as_chat)
    if any(m.name == "perplexity" for m in metric_objs):
        if prompt.is_chat:
            model.skipped["perplexity"] = ("metric perplexity of an endpoint needs a text prompt (chat templates "
                                           "live in the server)")
        else:
            try:
                extras["nll_sum"], extras["nll_tokens"] = _endpoint_nll(ep, model_name, texts, refs)
            except _EndpointHTTPError as exc:
                model.skipped["perplexity"] = f"metric perplexity: the endpoint cannot score text ({exc.message})"
    return _evaluate(model, metric_objs, refs, extras, settings, repeats, progress)


class _EndpointModel:
    """What an endpoint serves: one request at a time, so each latency is one request's."""

    def __init__(self, ep: _Endpoint, model_name: str, prompt: PromptTemplate, inputs: list[dict[str, Any]],
                 texts: list[str], settings: dict[str, Any], as_chat: bool) -> None:
        self.ep, self.model_name, self.prompt, self.inputs, self.texts = ep, model_name, prompt, inputs, texts
        self.settings, self.as_chat = settings, as_chat
        self.shown = texts or [json.dumps(prompt.render_parts(v)) for v in inputs]
        self.skipped: dict[str, str] = {}

    def warm_up(self) -> None:
        """Nothing: the server warmed up when it started."""

    def generation_pass(self, repeat: int, progress: Progress | None,
                        runs: int) -> tuple[list[str], list[float], list[int], float]:
        preds, lat, toks = _endpoint_pass(self.ep, self.model_name, self.prompt, self.inputs, self.texts,
                                          self.settings, repeat, progress, runs, self.as_chat)
        return preds, lat, toks, sum(lat) / 1000.0

    def probes(self, repeat: int) -> tuple[Callable[[str, str], str], Callable[[list[str]], list[str]]]:
        render = _chat_probe_render if self.prompt.is_chat else default_render
        return render, _endpoint_generate(self.ep, self.model_name, self.settings, repeat, self.prompt.is_chat)

    def latency(self, latencies: list[float], runs: int) -> dict[str, Any]:
        return latency_spread(latencies, len(latencies))  # one request, one timing


def _chat_probe_render(system: str, user: str) -> str:
    """A probe as a JSON chat; `_endpoint_generate` sends it to /v1/chat/completions."""
    return json.dumps(([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}])


def _decoding_body(model: str, settings: dict[str, Any], repeat: int) -> dict[str, Any]:
    return {"model": model, "max_tokens": int(settings["max_new_tokens"]),
            "temperature": float(settings["temperature"]), "top_p": float(settings["top_p"]),
            "seed": int(settings["seed"]) + repeat}


def _endpoint_generate(ep: _Endpoint, model: str, settings: dict[str, Any], repeat: int,
                       chat: bool) -> Callable[[list[str]], list[str]]:
    """`generate(prompts) -> texts` through the endpoint, one request per prompt."""
    common = _decoding_body(model, settings, repeat)

    def generate(prompts: list[str]) -> list[str]:
        texts = []
        for p in prompts:
            if chat:
                out = ep.call("POST", "/v1/chat/completions", dict(common, messages=json.loads(p)))
                texts.append(out["choices"][0]["message"]["content"] or "")
            else:
                texts.append(ep.call("POST", "/v1/completions", dict(common, prompt=p))["choices"][0]["text"])
        return texts

    return generate


def _endpoint_pass(
    ep: _Endpoint, model: str, prompt: PromptTemplate, inputs: list[dict[str, Any]], texts: list[str],
    settings: dict[str, Any], repeat: int, progress: Progress | None, runs: int, as_chat: bool = False,
) -> tuple[list[str], list[float], list[int]]:
    common = _decoding_body(model, settings, repeat)
    preds, lat, toks = [], [], []
    for i, variables in enumerate(inputs):
        t0 = time.perf_counter()
        if as_chat:
            messages = [{"role": "user", "content": str(variables[prompt.variables[0]])}]
            out = ep.call("POST", "/v1/chat/completions", dict(common, messages=messages))
            text = out["choices"][0]["message"]["content"] or ""
        elif prompt.is_chat:
            parts = prompt.render_parts(variables)
            messages = [{"role": role, "content": parts[role]} for role in ("system", "user") if role in parts]
            out = ep.call("POST", "/v1/chat/completions", dict(common, messages=messages))
            text = out["choices"][0]["message"]["content"] or ""
        else:
            out = ep.call("POST", "/v1/completions", dict(common, prompt=texts[i]))
            text = out["choices"][0]["text"]
        lat.append((time.perf_counter() - t0) * 1000.0)
        preds.append(text)
        usage = out.get("usage") or {}
        toks.append(int(usage.get("completion_tokens", len(text.split()))))
        if progress:
            progress(repeat * len(inputs) + i + 1, runs * len(inputs))
    return preds, lat, toks

