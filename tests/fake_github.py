"""A fake GitHub REST API on 127.0.0.1 for tests (http.server in a thread).

It answers the endpoints llmops uses with the documented response shapes
(https://docs.github.com/en/rest): the repository (`default_branch`), pulls (author, base
ref/sha, head sha, merge commit), a pull's commits, pull reviews (`user`, `state`,
`commit_id`), commits/{sha}/pulls, issue comments (`user.login`), team memberships and
`GET /user`, with `per_page`/`page` pagination and `Link` headers, bearer-token checks, and
injectable failures (`fail(...)`) such as rate limits.

The token has an identity, `login` (`github-actions[bot]` by default, like GITHUB_TOKEN in
Actions): comments it creates are written by it, editing anyone else's comment is a 403 as on
GitHub, and `GET /user` answers 403 "Resource not accessible by integration" unless
`user_endpoint` is set (a user's personal token).
Only the GitHub API is faked; the HTTP traffic and the client are real.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

TOKEN = "ghs_fake_token_for_tests"
_EPOCH = datetime(2024, 5, 1, 9, 0, tzinfo=timezone.utc)
_NOT_FOUND = {"message": "Not Found", "documentation_url": "https://docs.github.com/rest"}


def _user(login: str, kind: str = "User") -> dict[str, Any]:
    return {"login": login, "id": abs(hash(login)) % 10**8, "type": kind, "site_admin": False}


@dataclass
class Fault:
    """An injected failure: requests matching `method` and `path` (regex) get this answer."""

    method: str
    path: str
    status: int
    body: Any
    headers: dict[str, str]
    times: int


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any = None


@dataclass
class FakeGitHub:
    """State of one fake repository plus the server that serves it (`url`, `repo`)."""

    repo: str = "acme/support"
    token: str = TOKEN
    login: str = "github-actions[bot]"  # who the token writes as
    user_endpoint: bool = False  # GET /user answers (a user's token) or 403s (an installation token)
    default_branch: str = "main"
    default_per_page: int = 30
    pulls: dict[int, dict[str, Any]] = field(default_factory=dict)
    reviews: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    comments: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    commit_pulls: dict[str, list[int]] = field(default_factory=dict)
    pr_commits: dict[int, list[str]] = field(default_factory=dict)
    teams: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    _next_id: int = 1000
    _clock: int = 0
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- set-up helpers -----------------------------------------------------------------

    def add_pr(
        self,
        number: int,
        head_sha: str,
        merge_sha: str | None = None,
        merged: bool = True,
        author: str = "dev",
        base_ref: str = "main",
        base_sha: str = "b" * 40,
        commits: list[str] | None = None,
    ) -> dict:
        """A pull request from `author` into `base_ref` (whose tip was `base_sha`); `commits` are
        its branch's commits (default: just `head_sha`). Merged: closed with `merge_sha` as its
        merge (or squash) commit. GitHub associates each of these commits with the pull."""
        pr = {
            "url": f"{self.url}/repos/{self.repo}/pulls/{number}",
            "id": 500000 + number,
            "number": number,
            "state": "closed" if merged else "open",
            "title": f"Change #{number}",
            "user": _user(author),
            "head": {"ref": f"feature-{number}", "sha": head_sha, "repo": {"full_name": self.repo}},
            "base": {"ref": base_ref, "sha": base_sha, "repo": {"full_name": self.repo}},
            "merged_at": self._timestamp() if merged else None,
            "merge_commit_sha": merge_sha,
            "html_url": f"https://github.com/{self.repo}/pull/{number}",
        }
        self.pulls[number] = pr
        self.reviews.setdefault(number, [])
        self.comments.setdefault(number, [])
        self.pr_commits[number] = list(commits or [head_sha])
        for sha in dict.fromkeys([*self.pr_commits[number], head_sha, merge_sha]):
            if sha:
                self.associate(sha, number)
        return pr

    def associate(self, sha: str, number: int) -> None:
        """GitHub lists pull `number` for commit `sha` (commits/{sha}/pulls)."""
        if number not in self.commit_pulls.setdefault(sha, []):
            self.commit_pulls[sha].append(number)

    def push(self, number: int, new_head: str) -> None:
        """A new commit on the PR branch: the head sha moves."""
        self.pulls[number]["head"]["sha"] = new_head
        self.pr_commits.setdefault(number, []).append(new_head)
        self.associate(new_head, number)

    def add_review(self, number: int, login: str, state: str, commit_id: str | None = None) -> dict:
        review = {
            "id": self._new_id(),
            "node_id": "PRR_fake",
            "user": _user(login),
            "body": "",
            "state": state,
            "html_url": f"https://github.com/{self.repo}/pull/{number}#pullrequestreview",
            "pull_request_url": f"{self.url}/repos/{self.repo}/pulls/{number}",
            "author_association": "MEMBER",
            "submitted_at": None if state == "PENDING" else self._timestamp(),
            "commit_id": commit_id or self.pulls[number]["head"]["sha"],
        }
        self.reviews[number].append(review)
        return review

    def add_comment(self, number: int, body: str, login: str = "someone") -> dict:
        return self._store_comment(number, body, _user(login))

    def set_team(self, org: str, slug: str, members: dict[str, str]) -> None:
        """members: login -> "active" | "pending"."""
        self.teams[(org, slug)] = members

    def fail(
        self,
        method: str,
        path: str,
        status: int,
        message: str = "",
        headers: dict[str, str] | None = None,
        times: int = 1,
        body: Any = None,
    ) -> None:
        """The next `times` requests matching METHOD and the PATH regex get `status` (and `body`)."""
        answer = body if body is not None else {"message": message or "fake failure"}
        self.faults.append(Fault(method, path, status, answer, headers or {}, times))

    def rate_limit(self, method: str, path: str, retry_after: int | None = None, times: int = 1) -> None:
        """A primary rate limit (403, remaining 0) or, with retry_after, a secondary one (429)."""
        reset = str(int(time.time()) + 3600)
        headers = {"x-ratelimit-limit": "5000", "x-ratelimit-remaining": "0", "x-ratelimit-reset": reset, "x-ratelimit-resource": "core"}
        if retry_after is not None:
            headers = {"retry-after": str(retry_after)}
            self.fail(method, path, 429, "You have exceeded a secondary rate limit.", headers, times)
        else:
            self.fail(method, path, 403, "API rate limit exceeded for installation.", headers, times)

    def issue_comments(self, number: int) -> list[dict[str, Any]]:
        return self.comments.get(number, [])

    # -- server ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the fake first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeGitHub":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                fake._handle(self, "GET")

            def do_POST(self) -> None:
                fake._handle(self, "POST")

            def do_PATCH(self) -> None:
                fake._handle(self, "PATCH")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # -- request handling ---------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        req = Request(method, parts.path, parse_qs(parts.query), {k.lower(): v for k, v in h.headers.items()})
        with self._lock:
            self.requests.append(req)
            status, body, headers = self._answer(req, raw)
        data = b"" if body is None else json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json; charset=utf-8")
        h.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            h.send_header(key, value)
        h.end_headers()
        h.wfile.write(data)

    def _answer(self, req: Request, raw: bytes) -> tuple[int, Any, dict[str, str]]:
        for fault in self.faults:
            if fault.times > 0 and fault.method == req.method and re.fullmatch(fault.path, req.path):
                fault.times -= 1
                return fault.status, fault.body, fault.headers
        if req.headers.get("authorization") != f"Bearer {self.token}":
            return 401, {"message": "Bad credentials", "documentation_url": "https://docs.github.com/rest"}, {}
        try:
            req.body = json.loads(raw) if raw else None
        except ValueError:
            return 400, {"message": "Problems parsing JSON"}, {}
        return self._route(req)

    def _route(self, req: Request) -> tuple[int, Any, dict[str, str]]:
        repo = re.escape(self.repo)
        routes = [
            ("GET", rf"/repos/{repo}/commits/(\w+)/pulls", self._commit_pulls),
            ("GET", rf"/repos/{repo}", self._repository),
            ("GET", r"/user", self._authenticated_user),
            ("GET", rf"/repos/{repo}/pulls/(\d+)", self._pull),
            ("GET", rf"/repos/{repo}/pulls/(\d+)/commits", self._pull_commits),
            ("GET", rf"/repos/{repo}/pulls/(\d+)/reviews", self._reviews),
            ("GET", rf"/repos/{repo}/issues/(\d+)/comments", self._list_comments),
            ("POST", rf"/repos/{repo}/issues/(\d+)/comments", self._create_comment),
            ("PATCH", rf"/repos/{repo}/issues/comments/(\d+)", self._update_comment),
            ("GET", r"/orgs/([\w.-]+)/teams/([\w.-]+)/memberships/([\w.-]+)", self._membership),
        ]
        for method, pattern, handler in routes:
            match = re.fullmatch(pattern, req.path)
            if match and method == req.method:
                return handler(req, *match.groups())
        return 404, _NOT_FOUND, {}

    def _commit_pulls(self, req: Request, sha: str) -> tuple[int, Any, dict[str, str]]:
        return self._page(req, [self.pulls[n] for n in self.commit_pulls.get(sha, [])])

    def _repository(self, req: Request) -> tuple[int, Any, dict[str, str]]:
        owner, _, name = self.repo.partition("/")
        return 200, {
            "id": 4242, "name": name, "full_name": self.repo, "owner": _user(owner, "Organization"),
            "private": True, "default_branch": self.default_branch,
            "html_url": f"https://github.com/{self.repo}", "url": f"{self.url}/repos/{self.repo}",
        }, {}

    def _authenticated_user(self, req: Request) -> tuple[int, Any, dict[str, str]]:
        if not self.user_endpoint:
            return 403, {"message": "Resource not accessible by integration",
                         "documentation_url": "https://docs.github.com/rest/users/users#get-the-authenticated-user",
                         "status": "403"}, {}
        return 200, _user(self.login), {}

    def _pull_commits(self, req: Request, number: str) -> tuple[int, Any, dict[str, str]]:
        if int(number) not in self.pulls:
            return 404, _NOT_FOUND, {}
        commits = [{"sha": sha, "node_id": "C_fake", "commit": {"message": f"commit {sha[:7]}"},
                    "author": self.pulls[int(number)]["user"], "parents": []}
                   for sha in self.pr_commits.get(int(number), [])]
        return self._page(req, commits)

    def _pull(self, req: Request, number: str) -> tuple[int, Any, dict[str, str]]:
        pr = self.pulls.get(int(number))
        return (200, pr, {}) if pr else (404, _NOT_FOUND, {})

    def _reviews(self, req: Request, number: str) -> tuple[int, Any, dict[str, str]]:
        if int(number) not in self.pulls:
            return 404, _NOT_FOUND, {}
        return self._page(req, self.reviews[int(number)])

    def _list_comments(self, req: Request, number: str) -> tuple[int, Any, dict[str, str]]:
        if int(number) not in self.pulls:
            return 404, _NOT_FOUND, {}
        return self._page(req, self.comments[int(number)])

    def _create_comment(self, req: Request, number: str) -> tuple[int, Any, dict[str, str]]:
        if int(number) not in self.pulls:
            return 404, _NOT_FOUND, {}
        problem = self._check_body(req.body)
        if problem:
            return problem
        return 201, self._store_comment(int(number), req.body["body"], self._token_user()), {}

    def _update_comment(self, req: Request, comment_id: str) -> tuple[int, Any, dict[str, str]]:
        problem = self._check_body(req.body)
        if problem:
            return problem
        for comments in self.comments.values():
            for comment in comments:
                if comment["id"] == int(comment_id):
                    if comment["user"]["login"] != self.login:  # GitHub: only its author may edit it
                        return 403, {"message": "Resource not accessible by integration",
                                     "documentation_url": "https://docs.github.com/rest/issues/comments#update-an-issue-comment"}, {}
                    comment["body"] = req.body["body"]
                    comment["updated_at"] = self._timestamp()
                    return 200, comment, {}
        return 404, _NOT_FOUND, {}

    def _membership(self, req: Request, org: str, slug: str, login: str) -> tuple[int, Any, dict[str, str]]:
        state = self.teams.get((org, slug), {}).get(login)
        if state is None:
            return 404, _NOT_FOUND, {}
        return 200, {"url": f"{self.url}{req.path}", "role": "member", "state": state}, {}

    # -- helpers --------------------------------------------------------------------------

    @staticmethod
    def _check_body(body: Any) -> tuple[int, Any, dict[str, str]] | None:
        if not isinstance(body, dict) or not isinstance(body.get("body"), str):
            return 422, {"message": "Invalid request.\n\n\"body\" wasn't supplied."}, {}
        if len(body["body"]) > 65536:
            return 422, {"message": "Validation Failed", "errors": [{"resource": "IssueComment", "code": "custom", "field": "body", "message": "body is too long (maximum is 65536 characters)"}]}, {}
        return None

    def _page(self, req: Request, items: list[Any]) -> tuple[int, Any, dict[str, str]]:
        per_page = min(int(req.query.get("per_page", [self.default_per_page])[0]), 100)
        page = int(req.query.get("page", ["1"])[0])
        last = max(1, -(-len(items) // per_page))
        links = []

        def link(n: int, rel: str) -> str:
            return f'<{self.url}{req.path}?per_page={per_page}&page={n}>; rel="{rel}"'

        if page < last:
            links += [link(page + 1, "next"), link(last, "last")]
        if page > 1:
            links += [link(1, "first"), link(page - 1, "prev")]
        headers = {"Link": ", ".join(links)} if links else {}
        return 200, items[(page - 1) * per_page : page * per_page], headers

    def _store_comment(self, number: int, body: str, user: dict[str, Any]) -> dict[str, Any]:
        comment_id = self._new_id()
        now = self._timestamp()
        comment = {
            "id": comment_id,
            "node_id": "IC_fake",
            "url": f"{self.url}/repos/{self.repo}/issues/comments/{comment_id}",
            "html_url": f"https://github.com/{self.repo}/pull/{number}#issuecomment-{comment_id}",
            "issue_url": f"{self.url}/repos/{self.repo}/issues/{number}",
            "body": body,
            "user": user,
            "created_at": now,
            "updated_at": now,
            "author_association": "NONE",
        }
        self.comments.setdefault(number, []).append(comment)
        return comment

    def _token_user(self) -> dict[str, Any]:
        return _user(self.login, "Bot" if self.login.endswith("[bot]") else "User")

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _timestamp(self) -> str:
        """Strictly increasing ISO-8601 times, one minute apart, as GitHub writes them."""
        self._clock += 1
        return (_EPOCH + timedelta(minutes=self._clock)).strftime("%Y-%m-%dT%H:%M:%SZ")
