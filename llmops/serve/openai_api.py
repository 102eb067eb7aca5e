"""OpenAI API shapes: validating request bodies and building response bodies.

Pure data in, data out (no HTTP, no model): the server parses JSON, calls
`parse_completion_request` / `parse_chat_request`, and builds its answers with the
`*_response` / `*_chunk` helpers. Shapes follow OpenAI's documented API
(https://platform.openai.com/docs/api-reference): unknown fields are ignored, as vLLM does.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

MAX_N = 8
MAX_STOP = 4
MAX_LOGPROBS = 5
CHAT_ROLES = ("system", "developer", "user", "assistant")


class RequestError(Exception):
    """A request the server refuses: becomes an OpenAI error body with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bad(message: str, param: str | None, code: str | None = None) -> RequestError:
    return RequestError(400, message, param, code)


def _common(body: Any, model_name: str, max_tokens_limit: int, kind: str) -> GenerationRequest:
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object.", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("You must provide a model parameter.", "model")
    if model != model_name:
        raise RequestError(404, f"The model `{model}` does not exist or you do not have access to it.",
                           "model", "model_not_found")
    req = GenerationRequest(kind=kind, model=model)
    for name, default, lo, hi in (("temperature", 1.0, 0.0, 2.0), ("top_p", 1.0, 0.0, 1.0)):
        value = body.get(name, default)
        value = default if value is None else value
        if not _is_number(value) or not lo <= value <= hi or (name == "top_p" and value == 0):
            bound = "(0, 1]" if name == "top_p" else f"[{lo:g}, {hi:g}]"
            raise _bad(f"Invalid value for '{name}': expected a number in {bound}, got {value!r}.", name)
        setattr(req, name, float(value))
    n = body.get("n", 1)
    n = 1 if n is None else n
    if not _is_int(n) or not 1 <= n <= MAX_N:
        raise _bad(f"Invalid value for 'n': expected an integer from 1 to {MAX_N}, got {n!r}.", "n")
    req.n = n
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise _bad(f"Invalid type for 'stream': expected a boolean, got {stream!r}.", "stream")
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
    if seed is not None and not _is_int(seed):
        raise _bad(f"Invalid type for 'seed': expected an integer, got {seed!r}.", "seed")
    req.seed = seed
    req.max_tokens = _max_tokens(body, kind, max_tokens_limit)
    return req


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
        raise _bad(f"Invalid value for '{name}': expected an integer from {low} to {limit}, got {value!r}.", name)
    return value


def parse_completion_request(body: Any, model_name: str, max_tokens_limit: int) -> GenerationRequest:
    """Validate a POST /v1/completions body; raises RequestError."""
    req = _common(body, model_name, max_tokens_limit, "completion")
    prompt = body.get("prompt")
    if prompt is None:
        raise _bad("You must provide a prompt parameter.", "prompt")
    if isinstance(prompt, str):
        req.prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        req.prompts = list(prompt)
    else:
        raise _bad("Invalid type for 'prompt': expected a string or a non-empty list of strings.", "prompt")
    if req.stream and len(req.prompts) != 1:
        raise _bad("Streaming supports only one prompt.", "prompt")
    echo = body.get("echo", False)
    if echo is not None and not isinstance(echo, bool):
        raise _bad(f"Invalid type for 'echo': expected a boolean, got {echo!r}.", "echo")
    req.echo = bool(echo)
    logprobs = body.get("logprobs")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS):
        raise _bad(f"Invalid value for 'logprobs': expected an integer from 0 to {MAX_LOGPROBS}.", "logprobs")
    if logprobs is not None and req.stream:
        raise _bad("logprobs are not supported with stream.", "logprobs")
    req.logprobs = logprobs
    if req.max_tokens is None:
        req.max_tokens = 16  # OpenAI's documented default for completions
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


def parse_chat_request(body: Any, model_name: str, max_tokens_limit: int) -> GenerationRequest:
    """Validate a POST /v1/chat/completions body; raises RequestError."""
    req = _common(body, model_name, max_tokens_limit, "chat")
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
    if body.get("logprobs"):
        raise _bad("logprobs are not supported for chat completions by this server.", "logprobs")
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


def models_response(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "llmops"}]}
