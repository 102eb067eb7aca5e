"""Secrets out of what people see: store URLs are shown without their password.

A store URL (`postgresql://user:PASSWORD@host/db`) keeps its scheme, user, host, port and path,
so a message still says which store it means; only the password becomes `***`. On http(s) the
whole user part is hidden (`https://TOKEN@host` carries a token as its user name). A string
that is not a URL is returned unchanged.
"""

from __future__ import annotations

import re
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
