"""Secrets out of what people see: the one module that redacts; every message, lock entry,
report and log line that may quote a URL or a secret goes through it.

ONE policy for a URL with credentials (`redact_url`): a store URL
(`postgresql://user:PASSWORD@host/db`) keeps its scheme, user, host, port, path and query, so a
message still says which store it means; only the password becomes `***`. On http(s) the
whole user part is hidden (`https://TOKEN@host` carries a token as its user name). A URL
without credentials, or a string that is not a URL, is returned unchanged. This is the form
llmops.lock and fingerprints already hold (through `redact_spec`), so it stays as it is:
another one would change the fingerprint of every resource with a password in a URL.
`redact_urls(text)` applies it to every URL in a free text (a tool's error message).

A webhook URL is a secret as a whole (Slack's and Teams' carry the token in the path): only
its scheme, host and port are shown. `redact_spec` applies both to a resource's settings, and
hides the value of any key named like a credential; it is what the lock, plans (terminal,
JSON, markdown, saved file) and fingerprints see, so changing a password rebuilds nothing
and is recorded nowhere.

`mask_env_values(text)` hides the value of every environment variable in a text (a rendered
template shown in a diagnostic may have read a token from the environment).
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def redact_url(url: str) -> str:
    """`url` with any password replaced by `***`."""
    if not isinstance(url, str) or not _SCHEME.match(url):
        return url
    try:
        parts = urlsplit(url)
        password, port = parts.password, parts.port
    except ValueError:  # an unparsable netloc (e.g. a bad port): hide everything before the host
        return re.sub(r"//[^@/]*@", "//***@", url)
    web = parts.scheme.lower() in ("http", "https")
    if password is None and not (web and parts.username):
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if port:
        host += f":{port}"
    user = f"{parts.username}:***@" if parts.username and not web else "***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+")


def redact_urls(text: str) -> str:
    """`text` with every URL in it redacted by `redact_url` (DVC's messages quote remote URLs)."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def mask_env_values(text: str, min_length: int = 7) -> str:
    """`text` with the value of every environment variable of at least `min_length`
    characters replaced by `***` (longest first, so a value inside another goes too)."""
    for value in sorted({v for v in os.environ.values() if len(v) >= min_length}, key=len, reverse=True):
        if value in text:
            text = text.replace(value, "***")
    return text


def redact_webhook(url: str) -> str:
    """`scheme://host[:port]/...`: the path and query of a webhook are its secret."""
    if not isinstance(url, str) or not _SCHEME.match(url):
        return "***" if url else url
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "?", parts.port
    except ValueError:
        return url.split("://", 1)[0] + "://***"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{f':{port}' if port else ''}/..."


_CREDENTIAL_WORDS = frozenset({"password", "passwd", "secret", "token", "apikey", "credential", "credentials"})


def _is_credential_key(key: str) -> bool:
    """`auth_token`, `api_key`, `db-password`: yes; `max_tokens`, `tokenizer_from`: no."""
    words = re.split(r"[_\-.]+", key.lower())
    joined = "".join(words)
    return bool(_CREDENTIAL_WORDS.intersection(words)) or joined.endswith(("apikey", "privatekey"))


def redact_spec(value: Any, key: str = "") -> Any:
    """`value` (a resource's settings) with every URL redacted and credential-named keys hidden.

    Keys ending in `_env` name an environment variable, not a secret, and are kept.
    """
    if isinstance(value, dict):
        return {k: redact_spec(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_spec(v, key) for v in value]
    if not isinstance(value, str):
        return value
    if key and not key.lower().endswith("_env"):
        if "webhook" in key.lower():
            return redact_webhook(value)
        if _is_credential_key(key):
            return "***"
    return redact_url(value)
