"""OpenAI API shapes: validating request bodies and building response bodies.

Pure data in, data out (no HTTP, no model): the server parses JSON, calls
`parse_completion_request` / `parse_chat_request`, and builds its answers with the
`*_response` / `*_chunk` helpers. Shapes follow OpenAI's documented API
(https://platform.openai.com/docs/api-reference): unknown fields are ignored, as vLLM does.
`decode_json` turns a body into JSON that can be encoded again (no lone surrogates, no NaN),
and `RequestLimits` bounds what one request may ask for.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

MAX_N = 8
MAX_PROMPTS = 64
MAX_REQUEST_TOKENS = 16384
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # what torch.manual_seed and OpenAI's int64 `seed` accept
MAX_STOP = 4
MAX_LOGPROBS = 5
CHAT_ROLES = ("system", "developer", "user", "assistant")


class RequestError(Exception):
    """A request the server refuses: becomes an OpenAI error body with this HTTP status
    (and `headers`, such as a 405's `Allow`)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class RequestLimits:
    """What one generation request may ask for; beyond any of them it gets a 400 naming the field.

    `max_tokens` bounds each choice; `max_prompts` the prompts of one completions request;
    `max_n` the choices per prompt; `max_request_tokens` the prompt tokens plus prompts x n x
    max_tokens, i.e. the work one request may queue behind the server's generation lock.
    """

    max_tokens: int = 1024
    max_prompts: int = MAX_PROMPTS
    max_n: int = MAX_N
    max_request_tokens: int = MAX_REQUEST_TOKENS


@dataclass
class GenerationRequest:
    """A validated completions or chat request.

    `prompts` are texts for /v1/completions; `messages` the chat for /v1/chat/completions.
    `max_tokens` None means "the server's default, bounded by the context left".
    """

    kind: str  # "completion" | "chat"
    model: str
    prompts: list[str] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    echo: bool = False
    logprobs: int | None = None
    user: str | None = None  # OpenAI's end-user id: the client id for monitoring without X-Client-Id


# What the server reads of a request body. A field it cannot honour is refused (400, naming it)
# rather than silently ignored: a client asking for tools or a JSON schema must not get free text
# that looks like compliance. `None` or a neutral value (0 penalties, {} logit_bias, text format)
# of an unsupported field is accepted, as OpenAI's own clients send some of them by default.
_COMMON_FIELDS = frozenset({"model", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
                            "max_tokens", "user", "metadata", "store", "service_tier"})
_FIELDS = {
    "completion": _COMMON_FIELDS | {"prompt", "echo", "logprobs"},
    "chat": _COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"},
}
_NEUTRAL: dict[str, Any] = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {},
                            "parallel_tool_calls": True, "modalities": ["text"], "response_format": {"type": "text"},
                            "tools": [], "functions": [], "tool_choice": "none", "suffix": ""}
_WHY = {
    "tools": "tool calling", "tool_choice": "tool calling", "functions": "function calling",
    "function_call": "function calling", "parallel_tool_calls": "tool calling",
    "response_format": "structured output (response_format)", "presence_penalty": "presence penalties",
    "frequency_penalty": "frequency penalties", "logit_bias": "logit_bias", "audio": "audio output",
    "modalities": "modalities other than text", "prediction": "predicted outputs",
    "web_search_options": "web search", "reasoning_effort": "reasoning effort", "suffix": "suffix (insertion)",
    "best_of": "best_of",
}


def _refuse_unsupported(body: dict[str, Any], kind: str, req_n: int) -> None:
    for name, value in body.items():
        if value is None:
            continue
        if name in _NEUTRAL and value == _NEUTRAL[name]:
            continue
        if name in _FIELDS[kind] or (name == "best_of" and value in (1, req_n)):  # best_of n: n choices
            continue
        if name in _WHY or name in _NEUTRAL:
            raise _bad(f"This server does not support {_WHY.get(name, name)}: remove '{name}' from the request "
                       "(it would be ignored, and the answer would not do what it asks).", name,
                       "unsupported_parameter")
        raise _bad(f"Unrecognized request argument supplied: {_shown(name)[1:-1]}", name[:100],
                   "unrecognized_parameter")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bad(message: str, param: str | None, code: str | None = None) -> RequestError:
    return RequestError(400, message, param, code)


def _shown(value: Any) -> str:
    """`value` for an error message, cut short: a hostile body must not come back in full."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def decode_json(body: bytes) -> Any:
    """Parse a request body as UTF-8 JSON whose every string and number can be encoded again.

    JSON allows "\\ud800" (a lone UTF-16 surrogate no UTF-8 text can hold) and Python's parser
    takes NaN, Infinity and 1e999; any of them would fail later (tokenizer, response, request
    store), so they are refused here, naming where they are. Raises RequestError (400).
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad(f"The request body is not valid UTF-8 (byte {exc.start}); send JSON encoded as UTF-8.",
                   None) from None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise _bad("We could not parse the JSON body of your request. The body must be valid JSON "
                   "(Content-Type: application/json).", None) from None
    try:  # the common case, checked at C speed; the walk below finds where the problem is
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
        return value
    except (ValueError, UnicodeEncodeError, RecursionError):
        found = _unencodable(value)
    if found is None:  # only nested too deep for the quick check
        return value
    path, problem = found
    path = path if len(path) <= 100 else path[:97] + "..."
    raise _bad(f"Invalid value for '{path or 'body'}': {problem}.", path or None)


def _unencodable(value: Any) -> tuple[str, str] | None:
    """(path like `messages[0].content`, problem) of the first string or number `decode_json` refuses."""
    surrogate = "a lone UTF-16 surrogate (such as \\ud800) is not text; send valid Unicode"
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str) and not _is_text(item):
            return path, surrogate
        if isinstance(item, float) and not math.isfinite(item):
            return path, f"numbers must be finite, got {item!r}"
        if isinstance(item, dict):
            for key in item:
                if not _is_text(key):
                    return path, f"in a key: {surrogate}"
            stack.extend((f"{path}.{key}" if path else key, sub) for key, sub in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", sub) for i, sub in reversed(list(enumerate(item))))
    return None


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _common(body: Any, model_name: str, limits: RequestLimits, kind: str) -> GenerationRequest:
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object.", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("You must provide a model parameter.", "model")
    if model != model_name:
        raise RequestError(404, f"The model `{_shown(model)[1:-1]}` does not exist or you do not have access to it.",
                           "model", "model_not_found")
    req = GenerationRequest(kind=kind, model=model)
    for name, default, lo, hi in (("temperature", 1.0, 0.0, 2.0), ("top_p", 1.0, 0.0, 1.0)):
        value = body.get(name, default)
        value = default if value is None else value
        if not _is_number(value) or not lo <= value <= hi or (name == "top_p" and value == 0):
            bound = "(0, 1]" if name == "top_p" else f"[{lo:g}, {hi:g}]"
            raise _bad(f"Invalid value for '{name}': expected a number in {bound}, got {_shown(value)}.", name)
        setattr(req, name, float(value))
    n = body.get("n", 1)
    n = 1 if n is None else n
    if not _is_int(n) or not 1 <= n <= limits.max_n:
        raise _bad(f"Invalid value for 'n': expected an integer from 1 to {limits.max_n}, got {_shown(n)}.", "n")
    req.n = n
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise _bad(f"Invalid type for 'stream': expected a boolean, got {_shown(stream)}.", "stream")
    req.stream = bool(stream)
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise _bad("Invalid value for 'stream_options': expected {\"include_usage\": boolean}.", "stream_options")
        req.include_usage = bool(options.get("include_usage", False))
    if req.stream and req.n != 1:
        raise _bad("Streaming supports only n = 1.", "n")
    req.stop = _stop(body.get("stop"))
    seed = body.get("seed")
    if seed is not None and not (_is_int(seed) and SEED_MIN <= seed <= SEED_MAX):
        raise _bad(f"Invalid value for 'seed': expected a 64-bit signed integer, got {_shown(seed)}.", "seed")
    req.seed = seed
    req.max_tokens = _max_tokens(body, kind, limits.max_tokens)
    _refuse_unsupported(body, kind, req.n)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad(f"Invalid type for 'user': expected a string, got {_shown(user)}.", "user")
    req.user = user[:128] if user else None
    return req


def _check_asked(req: GenerationRequest, body: dict[str, Any], limits: RequestLimits) -> None:
    """Refuse what cannot fit `max_request_tokens` even before the prompts are tokenized."""
    choices = max(len(req.prompts), 1) * req.n
    if req.max_tokens is None or choices * req.max_tokens <= limits.max_request_tokens:
        return
    name = "max_completion_tokens" if req.kind == "chat" and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    raise _bad(f"This request asks for {choices} completions x {req.max_tokens} tokens = "
               f"{choices * req.max_tokens} tokens; this server allows {limits.max_request_tokens} tokens per "
               "request (prompts included). Send fewer prompts, a smaller n or a smaller max_tokens.",
               name, "request_tokens_exceeded")


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    if isinstance(stop, list) and len(stop) <= MAX_STOP and all(isinstance(s, str) for s in stop):
        return [s for s in stop if s]
    raise _bad(f"Invalid value for 'stop': expected a string or a list of at most {MAX_STOP} strings.", "stop")


def _max_tokens(body: dict[str, Any], kind: str, limit: int) -> int | None:
    name = "max_tokens"
    value = body.get("max_tokens")
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        name, value = "max_completion_tokens", body["max_completion_tokens"]
    if value is None:
        return None
    low = 0 if kind == "completion" and body.get("echo") is True else 1
    if not _is_int(value) or not low <= value <= limit:
        raise _bad(f"Invalid value for '{name}': expected an integer from {low} to {limit}, got {_shown(value)}.",
                   name)
    return value


def parse_completion_request(body: Any, model_name: str, limits: RequestLimits) -> GenerationRequest:
    """Validate a POST /v1/completions body; raises RequestError."""
    req = _common(body, model_name, limits, "completion")
    prompt = body.get("prompt")
    if prompt is None:
        raise _bad("You must provide a prompt parameter.", "prompt")
    if isinstance(prompt, str):
        req.prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        req.prompts = list(prompt)
    else:
        raise _bad("Invalid type for 'prompt': expected a string or a non-empty list of strings.", "prompt")
    if len(req.prompts) > limits.max_prompts:
        raise _bad(f"Too many prompts: {len(req.prompts)}; this server takes at most {limits.max_prompts} per "
                   "request. Split them over several requests.", "prompt")
    if req.stream and len(req.prompts) != 1:
        raise _bad("Streaming supports only one prompt.", "prompt")
    echo = body.get("echo", False)
    if echo is not None and not isinstance(echo, bool):
        raise _bad(f"Invalid type for 'echo': expected a boolean, got {_shown(echo)}.", "echo")
    req.echo = bool(echo)
    logprobs = body.get("logprobs")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS):
        raise _bad(f"Invalid value for 'logprobs': expected an integer from 0 to {MAX_LOGPROBS}.", "logprobs")
    if logprobs is not None and req.stream:
        raise _bad("logprobs are not supported with stream.", "logprobs")
    req.logprobs = logprobs
    if req.max_tokens is None:
        req.max_tokens = 16  # OpenAI's documented default for completions
    _check_asked(req, body, limits)
    return req


def _content(value: Any, i: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value
    ):
        return "".join(p["text"] for p in value)
    raise _bad(f"Invalid value for 'messages[{i}].content': expected a string or a list of text parts.",
               f"messages[{i}].content")


def parse_chat_request(body: Any, model_name: str, limits: RequestLimits) -> GenerationRequest:
    """Validate a POST /v1/chat/completions body; raises RequestError."""
    req = _common(body, model_name, limits, "chat")
    messages = body.get("messages")
    if messages is None:
        raise _bad("You must provide a messages parameter.", "messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("Invalid type for 'messages': expected a non-empty list of messages.", "messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in CHAT_ROLES:
            raise _bad(f"Invalid value for 'messages[{i}].role': expected one of {', '.join(CHAT_ROLES)}.",
                       f"messages[{i}].role")
        role = "system" if msg["role"] == "developer" else msg["role"]
        req.messages.append({"role": role, "content": _content(msg.get("content"), i)})
    if body.get("logprobs") or body.get("top_logprobs"):
        name = "logprobs" if body.get("logprobs") else "top_logprobs"
        raise _bad("logprobs are not supported for chat completions by this server.", name, "unsupported_parameter")
    _check_asked(req, body, limits)
    return req


# --- responses ----------------------------------------------------------------------------


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(rid: str, model: str, choices: list[dict[str, Any]], use: dict[str, int]) -> dict[str, Any]:
    """`choices` items: {text, index, logprobs, finish_reason}."""
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}


def chat_response(rid: str, model: str, texts: list[tuple[str, str]], use: dict[str, int]) -> dict[str, Any]:
    """`texts`: (content, finish_reason) per choice."""
    choices = [
        {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason}
        for i, (text, reason) in enumerate(texts)
    ]
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}


def stream_chunk(kind: str, rid: str, model: str, created: int, text: str | None, finish_reason: str | None,
                 first: bool = False) -> dict[str, Any]:
    """One server-sent event body; `text` None with a finish_reason closes the choice."""
    if kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def usage_chunk(kind: str, rid: str, model: str, created: int, use: dict[str, int]) -> dict[str, Any]:
    """The final chunk sent when `stream_options.include_usage` is true (empty choices)."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def models_response(model: str, created: int, served: dict[str, Any] | None = None) -> dict[str, Any]:
    """The one served model; `served` (registered version, alias, adapter sha256, prompt) rides
    along as an `llmops` field, which OpenAI clients ignore."""
    entry: dict[str, Any] = {"id": model, "object": "model", "created": created, "owned_by": "llmops"}
    if served:
        entry["llmops"] = served
    return {"object": "list", "data": [entry]}
