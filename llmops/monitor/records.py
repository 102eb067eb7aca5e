"""Turning a server's request record into one stored row, without keeping texts unless asked.

The server's `on_request(record)` hook hands over a flat dict (see `llmops.serve.server`):
`id`, `time`, `path`, `client` (or `client_id`), `status`, `error`, `latency_ms`,
`prompt_tokens`, `completion_tokens`, `prompt` (texts or chat messages), `completion`.
`record_to_row` derives what monitoring needs from the texts *at write time* — length in
characters and in words, a bag of hashed word buckets (for token-frequency drift), the
number of prompt-injection patterns — so the texts themselves are stored only with
`log_text: true`. A bag of 256 hash buckets cannot be turned back into the prompt.

`client_id` picks the id a request is attributed to: the `X-Client-Id` header, else a
short hash of the bearer token (never the token), else the remote address.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Mapping
from typing import Any

TOKEN_BUCKETS = 256
MAX_BAG_TOKENS = 512  # words hashed per prompt; long prompts are sampled by their first words
WORD_PATTERN = re.compile(r"\w+|[^\w\s]", re.UNICODE)

# Phrases typical of prompt-injection and jailbreak attempts (case-insensitive).
INJECTION_PATTERNS: tuple[str, ...] = (
    r"\bignore\b.{0,40}\b(previous|prior|above|earlier|all|your)\b.{0,20}\b(instructions?|rules|prompt|directions)",
    r"\bdisregard\b.{0,40}\b(instructions?|rules|prompt|guidelines)",
    r"\bforget\b.{0,30}\b(instructions?|rules|everything)\b",
    r"\b(reveal|print|show|repeat|output)\b.{0,30}\b(system|hidden|initial)\s+(prompt|instructions?|message)",
    r"\byou are (now )?(dan|in developer mode|jailbroken|unrestricted)\b",
    r"\b(developer|god|jailbreak) mode\b",
    r"\bpretend\b.{0,30}\b(no|without)\b.{0,20}\b(rules|restrictions|limits|filters)",
    r"\bdo anything now\b",
    r"\boverride\b.{0,30}\b(safety|instructions?|rules|policy)",
    r"</?\s*(system|im_start|im_end)\s*>|\[/?INST\]",
)
_INJECTION = [re.compile(p, re.IGNORECASE | re.DOTALL) for p in INJECTION_PATTERNS]

ROW_FIELDS = ("id", "ts", "client", "path", "status", "error", "latency_ms", "prompt_tokens",
              "completion_tokens", "prompt_chars", "prompt_words", "injection", "token_bag",
              "prompt", "completion", "inputs")


def words(text: str) -> list[str]:
    """The word/punctuation units used for lengths and token-frequency drift (lower-cased)."""
    return WORD_PATTERN.findall(text.lower())


def bucket_of(word: str) -> int:
    """A stable (process-independent) hash bucket of one word."""
    return zlib.crc32(word.encode("utf-8")) % TOKEN_BUCKETS


def token_bag(units: list[str]) -> bytes:
    """Sorted bucket ids of the first `MAX_BAG_TOKENS` units: a bag of words with no order or text."""
    return bytes(sorted(bucket_of(w) for w in units[:MAX_BAG_TOKENS]))


def injection_count(text: str) -> int:
    """How many distinct injection patterns the text matches."""
    return sum(1 for pat in _INJECTION if pat.search(text))


def prompt_text(prompt: Any) -> str:
    """One text from a completions prompt (str or list of str) or a chat (list of messages)."""
    if prompt is None:
        return ""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Mapping):
        content = prompt.get("content", "")
        if isinstance(content, list):  # OpenAI text parts
            return "\n".join(str(p.get("text", "")) if isinstance(p, Mapping) else str(p) for p in content)
        return str(content)
    if isinstance(prompt, (list, tuple)):
        return "\n".join(prompt_text(p) for p in prompt)
    return str(prompt)


def client_id(headers: Mapping[str, str], remote_addr: str, bearer_token: str | None = None) -> str:
    """The client a request is attributed to; a token is hashed so it never reaches the store."""
    lowered = {k.lower(): v for k, v in headers.items()}
    given = (lowered.get("x-client-id") or "").strip()
    if given:
        return given[:128]
    if bearer_token:
        return "token:" + hashlib.sha256(bearer_token.encode("utf-8")).hexdigest()[:12]
    return remote_addr


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def record_to_row(record: Mapping[str, Any], log_text: bool = False) -> tuple:
    """The stored row (in `ROW_FIELDS` order) for one server record.

    The request id is the id the client saw (`response_id` when the server sets it,
    else `id`), so feedback can name it.
    """
    text = prompt_text(record.get("prompt"))
    units = words(text) if text else []
    completion = prompt_text(record.get("completion")) if record.get("completion") is not None else None
    rid = str(record.get("response_id") or record.get("id") or "")
    error = record.get("error")
    return (
        rid,
        _float(record.get("time")) or 0.0,
        str(record.get("client_id") or record.get("client") or ""),
        str(record.get("path") or ""),
        _int(record.get("status")),
        None if error is None else str(error)[:1000],
        _float(record.get("latency_ms")),
        _int(record.get("prompt_tokens")),
        _int(record.get("completion_tokens")),
        len(text),
        len(units),
        injection_count(text) if text else 0,
        token_bag(units),
        text if log_text and text else None,
        completion if log_text else None,
        _inputs(record.get("inputs")) if log_text else None,
    )


def _inputs(value: Any) -> str | None:
    """The prompt variables the request filled (JSON), as the server recovered them."""
    if not isinstance(value, Mapping) or not value:
        return None
    import json

    return json.dumps({str(k): v for k, v in value.items()}, ensure_ascii=False, sort_keys=True)
