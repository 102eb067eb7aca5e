"""A small GitHub REST client: JSON requests, Link-header pagination, clear errors.

Standard library only (urllib), so importing it costs nothing at CLI start-up. Every
failure becomes a `GitHubError` whose message names the endpoint, what GitHub said and
what to do; a rate limit becomes `GitHubRateLimitError`. The token is sent only to the
configured API origin (a `next` link pointing elsewhere is refused) and never appears in
a message.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

from llmops.errors import LlmopsError
from llmops.redact import redact_url

DEFAULT_API_URL = "https://api.github.com"
ACTIONS_BOT_LOGIN = "github-actions[bot]"  # who GITHUB_TOKEN writes as in GitHub Actions
API_VERSION = "2022-11-28"
MAX_PAGES = 100  # 100 pages of 100 items: far beyond any real PR's reviews or comments
MAX_BODY_BYTES = 32 * 1024 * 1024  # a page of 100 items is a few hundred kB
CONNECT_TIMEOUT_S = 10.0  # per connection attempt and per read without progress
DEADLINE_S = 120.0  # all calls of one client (one command) together

_LINK_RE = re.compile(r'<([^>]+)>\s*;\s*rel="([^"]+)"')


class GitHubError(LlmopsError):
    """A GitHub API call failed; `status` is the HTTP status (0: no response)."""

    def __init__(self, message: str, status: int = 0, endpoint: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.endpoint = endpoint


class GitHubRateLimitError(GitHubError):
    """GitHub refused the call because a rate limit was hit; `retry_after` is in seconds."""

    def __init__(self, message: str, status: int, endpoint: str, retry_after: float | None) -> None:
        super().__init__(message, status, endpoint)
        self.retry_after = retry_after


@dataclass
class Response:
    """One HTTP response: status, lower-cased headers, decoded JSON body, Link relations."""

    status: int
    headers: dict[str, str]
    data: Any
    links: dict[str, str] = field(default_factory=dict)


def parse_link_header(value: str | None) -> dict[str, str]:
    """`<url>; rel="next", <url>; rel="last"` -> {"next": url, "last": url}."""
    return {rel: url for url, rel in _LINK_RE.findall(value or "")}


class GitHubClient:
    """Calls the GitHub REST API for one repository (`owner/name`) with a token.

    `max_retry_wait`: a rate-limited call whose reset is at most this many seconds away is
    retried once after waiting (through `sleep`); a longer wait raises at once.
    `timeout` bounds each connect and each read that makes no progress; `deadline` bounds
    all calls of this client together (a server that drips bytes cannot hold CI), and a
    body larger than MAX_BODY_BYTES is refused.
    """

    def __init__(
        self,
        token: str,
        api_url: str = DEFAULT_API_URL,
        repo: str = "",
        *,
        timeout: float = CONNECT_TIMEOUT_S,
        deadline: float = DEADLINE_S,
        max_retry_wait: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
        token_env: str = "",
    ) -> None:
        if not token:
            raise GitHubError(
                "No GitHub token: set GITHUB_TOKEN (in a workflow: `env: GITHUB_TOKEN: ${{ github.token }}`)."
            )
        if repo and not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
            raise GitHubError(f"'{repo}' is not a GitHub repository; use OWNER/NAME (as in GITHUB_REPOSITORY).")
        self.token = token
        self.api_url = (api_url or DEFAULT_API_URL).rstrip("/")
        self.repo = repo
        self.timeout = timeout
        self.deadline = deadline
        self._ends = time.monotonic() + deadline
        self.max_retry_wait = max_retry_wait
        self.sleep = sleep
        self.token_env = token_env  # the variable the token came from (GITHUB_TOKEN: Actions' own)

    def __repr__(self) -> str:  # never show the token
        return f"GitHubClient(api_url={self.api_url!r}, repo={self.repo!r})"

    # -- public verbs -------------------------------------------------------------------

    def get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        return self.request("GET", path, params=params).data

    def post(self, path: str, body: Any) -> Any:
        return self.request("POST", path, body=body).data

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, body=body).data

    def get_paginated(self, path: str, params: Mapping[str, Any] | None = None) -> list[Any]:
        """GET every page of a list endpoint, following `Link: rel="next"`."""
        query = {"per_page": 100, **(params or {})}
        response = self.request("GET", path, params=query)
        items = self._page_items(response, path)
        pages = 1
        while "next" in response.links:
            if pages >= MAX_PAGES:
                raise GitHubError(
                    f"GitHub API GET {path} returned more than {MAX_PAGES} pages; "
                    "this looks like a pagination loop: report it with the endpoint above.",
                    endpoint=path,
                )
            response = self.request("GET", response.links["next"])
            items.extend(self._page_items(response, path))
            pages += 1
        return items

    def repository(self) -> dict[str, Any]:
        """`GET /repos/OWNER/NAME` (the repository, with its `default_branch`)."""
        data = self.get(self.repo_path(""))
        if not isinstance(data, dict) or not data.get("default_branch"):
            raise GitHubError(f"GitHub API GET /repos/{self.repo} gave no default_branch; check GITHUB_API_URL "
                              "and GITHUB_REPOSITORY.", endpoint=f"GET /repos/{self.repo}")
        return data

    def login(self, env: Mapping[str, str] | None = None) -> str:
        """The login this token writes as (a comment's `user.login`).

        LLMOPS_GITHUB_LOGIN wins (e.g. `my-app[bot]` for a GitHub App token); else `GET /user`,
        which answers for a user's token; an installation token (GITHUB_TOKEN in Actions) gets
        403 there and writes as `github-actions[bot]`.
        """
        env = os.environ if env is None else env
        if env.get("LLMOPS_GITHUB_LOGIN", "").strip():
            return env["LLMOPS_GITHUB_LOGIN"].strip()
        try:
            user = self.get("/user")
        except GitHubError as err:
            if err.status != 403 or isinstance(err, GitHubRateLimitError):
                raise
            if self.token_env == "GITHUB_TOKEN":
                return ACTIONS_BOT_LOGIN
            raise GitHubError(
                "This token cannot say who it is (GET /user: 403, an app installation token?); set "
                "LLMOPS_GITHUB_LOGIN to the login its comments show, such as `APP-SLUG[bot]`.",
                err.status, err.endpoint,
            ) from None
        login = user.get("login") if isinstance(user, dict) else None
        if not login:
            raise GitHubError("GitHub API GET /user gave no login; check GITHUB_API_URL.", endpoint="GET /user")
        return str(login)

    def repo_path(self, suffix: str) -> str:
        """`pulls/3` -> `/repos/OWNER/NAME/pulls/3` for this client's repository."""
        if not self.repo:
            raise GitHubError("No GitHub repository: set GITHUB_REPOSITORY=OWNER/NAME or settings.github.repository.")
        suffix = suffix.lstrip("/")
        return f"/repos/{self.repo}/{suffix}" if suffix else f"/repos/{self.repo}"

    # -- plumbing -------------------------------------------------------------------------

    def request(
        self, method: str, path: str, *, params: Mapping[str, Any] | None = None, body: Any = None
    ) -> Response:
        """One call; `path` is API-relative (`/repos/...`) or an absolute URL on the API origin."""
        url = self._url(path, params)
        try:
            return self._send(method, url, body)
        except GitHubRateLimitError as err:
            if err.retry_after is None or err.retry_after > self.max_retry_wait:
                raise
            self.sleep(max(err.retry_after, 0.0))
        return self._send(method, url, body)  # once more; a second limit raises

    def _url(self, path: str, params: Mapping[str, Any] | None) -> str:
        if path.startswith(("http://", "https://")):
            ours, theirs = urllib.parse.urlsplit(self.api_url), urllib.parse.urlsplit(path)
            if (ours.scheme, ours.netloc) != (theirs.scheme, theirs.netloc):
                raise GitHubError(
                    f"GitHub returned a link to {redact_url(f'{theirs.scheme}://{theirs.netloc}')}, outside the API "
                    f"at {redact_url(self.api_url)}; refusing to send the token there. Check GITHUB_API_URL."
                )
            url = path
        else:
            url = self.api_url + "/" + path.lstrip("/")
        if params:
            sep = "&" if urllib.parse.urlsplit(url).query else "?"
            url += sep + urllib.parse.urlencode(params)
        return url

    def _send(self, method: str, url: str, body: Any) -> Response:
        endpoint = f"{method} {urllib.parse.urlsplit(url).path}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Accept", "application/vnd.github+json")
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("X-GitHub-Api-Version", API_VERSION)
        req.add_header("User-Agent", "llmops")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self._timeout(endpoint)) as resp:  # noqa: S310 (API URL)
                status, headers, raw = resp.status, _lower(resp.headers), self._read(resp, endpoint)
        except urllib.error.HTTPError as err:
            raise _http_error(endpoint, err.code, _lower(err.headers), self._read(err, endpoint)) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise GitHubError(
                f"Cannot reach the GitHub API for {endpoint} at {redact_url(self.api_url)}: {reason}. "
                "Check the network and GITHUB_API_URL, then re-run.",
                endpoint=endpoint,
            ) from None
        try:
            payload = json.loads(raw) if raw.strip() else None
        except ValueError:
            raise GitHubError(
                f"GitHub API {endpoint} answered {status} with a body that is not JSON; "
                "check GITHUB_API_URL points at the REST API (e.g. https://api.github.com).",
                status,
                endpoint,
            ) from None
        return Response(status, headers, payload, parse_link_header(headers.get("link")))

    def _timeout(self, endpoint: str) -> float:
        left = self._ends - time.monotonic()
        if left <= 0:
            raise GitHubError(
                f"GitHub API calls at {redact_url(self.api_url)} took more than {self.deadline:g}s in all "
                f"(stopped before {endpoint}); the API is too slow or unreachable: re-run later.",
                endpoint=endpoint,
            )
        return min(self.timeout, left)

    def _read(self, resp: Any, endpoint: str) -> bytes:
        """The body, in chunks, within the deadline and MAX_BODY_BYTES."""
        chunks: list[bytes] = []
        size = 0
        while True:
            self._timeout(endpoint)
            chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(65536)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise GitHubError(f"GitHub API {endpoint} sent more than {MAX_BODY_BYTES:,} bytes; refusing it.",
                                  endpoint=endpoint)
            chunks.append(chunk)

    @staticmethod
    def _page_items(response: Response, path: str) -> list[Any]:
        if not isinstance(response.data, list):
            raise GitHubError(
                f"GitHub API GET {path} did not return a list; check GITHUB_API_URL and the repository name.",
                response.status,
                path,
            )
        return list(response.data)


def _lower(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in (headers.items() if headers else [])}


def _http_error(endpoint: str, status: int, headers: dict[str, str], raw: bytes) -> GitHubError:
    """Turn an HTTP error into a message that says what went wrong and what to do."""
    try:
        said = json.loads(raw).get("message", "")
    except (ValueError, AttributeError):
        said = raw.decode("utf-8", "replace")[:200]
    said = f" ({said})" if said else ""
    limited = status == 429 or (status == 403 and (headers.get("x-ratelimit-remaining") == "0" or "retry-after" in headers))
    if limited:
        wait = _retry_after(headers)
        when = f"retry in {wait:.0f} s" if wait is not None else "retry later"
        return GitHubRateLimitError(
            f"GitHub API rate limit hit on {endpoint}: HTTP {status}{said}; {when}. Nothing was approved "
            "or changed: wait and re-run, or use a token with a higher limit.",
            status,
            endpoint,
            wait,
        )
    hints = {
        401: "the token is missing, expired or invalid: check GITHUB_TOKEN",
        403: "the token lacks permission: give the workflow `permissions: pull-requests: write` "
        "(and a token with read:org for team approvers)",
        404: "not found, or the token cannot see it: check GITHUB_REPOSITORY, the number or sha, "
        "and the token's access",
        422: "GitHub rejected the request: check the body (comments are limited to 65,536 characters)",
    }
    hint = hints.get(status) or ("GitHub had a server error: re-run later" if status >= 500 else "see GitHub's message")
    return GitHubError(f"GitHub API {endpoint} failed: HTTP {status}{said}; {hint}.", status, endpoint)


def _retry_after(headers: dict[str, str]) -> float | None:
    """Seconds to wait, from `retry-after` or `x-ratelimit-reset` (epoch seconds)."""
    if headers.get("retry-after", "").strip().isdigit():
        return float(headers["retry-after"])
    reset = headers.get("x-ratelimit-reset", "").strip()
    if reset.isdigit():
        return max(0.0, int(reset) - datetime.now(timezone.utc).timestamp())
    return None


def client_from_env(env: Mapping[str, str] | None = None, settings: Mapping[str, Any] | None = None) -> GitHubClient:
    """A client from GITHUB_TOKEN, GITHUB_REPOSITORY and GITHUB_API_URL.

    The repository is GITHUB_REPOSITORY and the API URL GITHUB_API_URL when set (GitHub
    Actions always sets both), then `settings.github.repository` / `api_url`: llmops.yaml is
    content a pull request can change, and it must not be able to send the token to a server
    of its choosing, nor have approvals read from a repository whose reviews it controls.
    LLMOPS_GITHUB_TOKEN wins over GITHUB_TOKEN (for a token that may read org teams).
    """
    env = os.environ if env is None else env
    gh = dict((settings or {}).get("github") or {})
    token_env = "LLMOPS_GITHUB_TOKEN" if env.get("LLMOPS_GITHUB_TOKEN") else "GITHUB_TOKEN"
    token = env.get(token_env) or ""
    repo = env.get("GITHUB_REPOSITORY") or gh.get("repository") or ""
    api_url = env.get("GITHUB_API_URL") or gh.get("api_url") or DEFAULT_API_URL
    if not repo:
        raise GitHubError("No GitHub repository: set GITHUB_REPOSITORY=OWNER/NAME or settings.github.repository.")
    return GitHubClient(token, api_url, repo, token_env=token_env)
