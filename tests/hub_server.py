"""A local stand-in for the Hugging Face Hub, for tests that drive the real `huggingface_hub` client.

It speaks the part of the Hub's HTTP API that `huggingface_hub` 2.4.0 uses to check a token, create a
repo, commit files, and download a snapshot:

    GET  /api/whoami-v2
    POST /api/repos/create
    POST /api/validate-yaml
    POST /api/models/{repo}/preupload/{rev}     every file is answered `uploadMode: regular`, so ...
    POST /api/models/{repo}/commit/{rev}        ... its content arrives inline (base64) in the NDJSON body
    GET  /api/models/{repo}[/revision/{rev}]    model info with `sha` and `siblings`
    GET  /api/models/{repo}/tree/{rev}          the file listing (always recursive)
    GET|HEAD /{repo}/resolve/{rev}/{path}       file bytes, with `X-Repo-Commit` and `ETag`

Errors carry `X-Error-Code` / `X-Error-Message` like the real Hub, which is what the client turns
into `RepositoryNotFoundError`, `GatedRepoError` and `RevisionNotFoundError`.

Everything lives in memory: `server.repos["alice/name"]` holds the privacy flag and every commit.
Requests to routes it doesn't know are recorded in `server.unknown_requests` (and answered 404) so a
test can assert the client took no path the stand-in doesn't model.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

# Hub repo ids: `namespace/name`, letters, digits, `-`, `_`, `.` (what the Hub's metadata checker accepts).
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


@dataclass(frozen=True)
class Token:
    """What `/api/whoami-v2` says about a token: its user, and the `auth.accessToken` block."""

    user: str
    role: str = "write"                      # "read" | "write" | "fineGrained"
    scoped_permissions: tuple[str, ...] = ()  # fine-grained tokens: permissions on the user's namespace

    def can_write(self, namespace: str) -> bool:
        if self.role == "fineGrained":
            return namespace == self.user and "repo.write" in self.scoped_permissions
        return self.role == "write" and namespace == self.user


@dataclass
class Commit:
    oid: str
    title: str
    files: dict[str, bytes]  # the whole tree at this commit: path → content


@dataclass
class Repo:
    repo_id: str
    private: bool
    gated: bool = False
    commits: list[Commit] = field(default_factory=list)
    # users whose access request to a gated repo was accepted
    gate_accepted: set[str] = field(default_factory=set)

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    @property
    def files(self) -> dict[str, bytes]:
        return self.head.files


def git_blob_oid(content: bytes) -> str:
    """The git blob sha1 the Hub reports as a regular file's `oid` (and the client recomputes)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubStandIn:
    """Threaded HTTP server on 127.0.0.1 with a free port. Use as a context manager."""

    def __init__(self, tokens: dict[str, Token]):
        self.tokens = dict(tokens)
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []        # (method, path) of every request, in order
        self.unknown_requests: list[tuple[str, str]] = []
        self.authorization_headers: list[str] = []       # what the client sent, to check no token leaked elsewhere
        self.outage_status: int | None = None             # set to e.g. 503: every request fails like a Hub outage
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-stand-in", daemon=True)

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    # --- state helpers for tests ---
    def add_repo(self, repo_id: str, files: dict[str, bytes], *, private: bool = False, gated: bool = False) -> Repo:
        repo = Repo(repo_id, private=private, gated=gated)
        self._commit(repo, "initial commit", files)
        self.repos[repo_id] = repo
        return repo

    def _commit(self, repo: Repo, title: str, changes: dict[str, bytes]) -> Commit:
        tree = dict(repo.files) if repo.commits else {}
        tree.update(changes)
        parent = repo.head.oid if repo.commits else ""
        digest = hashlib.sha1(parent.encode() + title.encode())
        for path in sorted(tree):
            digest.update(path.encode() + b"\0" + git_blob_oid(tree[path]).encode())
        commit = Commit(digest.hexdigest(), title, tree)
        repo.commits.append(commit)
        return commit


# --- HTTP handling ---

class _HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.body = status, message, code, body


def _make_handler(hub: HubStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # keep test output clean
            pass

        def do_GET(self):
            self._dispatch("GET")

        def do_HEAD(self):
            self._dispatch("HEAD")

        def do_POST(self):
            self._dispatch("POST")

        # --- plumbing ---
        def _dispatch(self, method: str) -> None:
            split = urlsplit(self.path)
            path = unquote(split.path)  # query strings are ignored: listings are always recursive
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else b""
            with hub._lock:
                hub.requests.append((method, path))
                if self.headers.get("Authorization"):
                    hub.authorization_headers.append(self.headers["Authorization"])
            try:
                with hub._lock:
                    status, headers, payload = _route(hub, method, path, body, self._token())
            except _HttpError as e:
                headers = {"X-Error-Message": e.message}
                if e.code:
                    headers["X-Error-Code"] = e.code
                status, payload = e.status, e.body or {"error": e.message}
            if isinstance(payload, (dict, list)):
                payload = json.dumps(payload).encode()
                headers.setdefault("Content-Type", "application/json")
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(payload)

        def _token(self) -> str | None:
            auth = self.headers.get("Authorization", "")
            return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

    return Handler


def _route(hub: HubStandIn, method: str, path: str, body: bytes, token: str | None):
    if hub.outage_status is not None:
        raise _HttpError(hub.outage_status, "Service Unavailable")
    user = _authenticate(hub, token)
    if path == "/api/whoami-v2" and method == "GET":
        return _whoami(user)
    if path == "/api/repos/create" and method == "POST":
        return _create_repo(hub, user, json.loads(body))
    if path == "/api/validate-yaml" and method == "POST":
        return _validate_yaml(json.loads(body))
    if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/(.+)", path):
        repo = _writable_repo(hub, m[1], user)
        if m[2] == "preupload":
            return _preupload(repo, json.loads(body))
        return _commit(hub, repo, body)
    if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path):
        repo = _find_repo(hub, m[1], user)
        return _tree(repo, _resolve_revision(repo, m[2]), (m[3] or "").strip("/"))
    if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path):
        repo = _find_repo(hub, m[1], user)
        return _model_info(repo, _resolve_revision(repo, m[2] or "main"))
    if (m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)) and method in ("GET", "HEAD"):
        repo = _find_repo(hub, m[1], user)
        return _resolve_file(repo, user, _resolve_revision(repo, m[2]), m[3])
    hub.unknown_requests.append((method, path))
    raise _HttpError(404, f"the Hub stand-in has no route for {method} {path}")


def _authenticate(hub: HubStandIn, token: str | None) -> Token | None:
    if token is None:
        return None
    if token not in hub.tokens:
        raise _HttpError(401, INVALID_CREDENTIALS)
    return hub.tokens[token]


def _whoami(user: Token | None):
    if user is None:
        raise _HttpError(401, INVALID_CREDENTIALS)
    access_token: dict = {"displayName": "test token", "role": user.role, "createdAt": "2026-01-01T00:00:00.000Z"}
    if user.role == "fineGrained":
        access_token["fineGrained"] = {
            "canReadGatedRepos": True,
            "global": ["discussion.write", "post.write"],
            "scoped": [{"entity": {"_id": "1", "type": "user", "name": user.user},
                        "permissions": list(user.scoped_permissions)}],
        }
    return 200, {}, {"type": "user", "id": "1", "name": user.user, "fullname": user.user.title(), "orgs": [],
                     "auth": {"type": "access_token", "accessToken": access_token}}


def _create_repo(hub: HubStandIn, user: Token | None, payload: dict):
    if user is None:
        raise _HttpError(401, "You must be authenticated to create a repo")
    namespace = payload.get("organization") or user.user
    repo_id = f"{namespace}/{payload['name']}"
    url = f"{hub.url}/{repo_id}"
    if not user.can_write(namespace):
        raise _HttpError(403, f"You don't have the rights to create a model under the namespace \"{namespace}\"")
    if repo_id in hub.repos:
        raise _HttpError(409, "You already created this model repo", body={"error": "You already created this "
                                                                            "model repo", "url": url})
    private = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
    # The Hub starts every repo with a commit holding `.gitattributes`.
    hub.add_repo(repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                 private=private)
    return 200, {}, {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]}


def _validate_yaml(payload: dict):
    """Like the Hub: model-card metadata must be a mapping whose `datasets` / `base_model` are repo ids."""
    content = payload.get("content", "")
    errors = []
    if content.startswith("---"):
        meta = yaml.safe_load(content.split("---", 2)[1]) or {}
        if not isinstance(meta, dict):
            errors.append("metadata must be a mapping")
        else:
            for key in ("datasets", "base_model"):
                values = meta.get(key) or []
                for i, v in enumerate(values if isinstance(values, list) else [values]):
                    if not (isinstance(v, str) and REPO_ID.fullmatch(v)):
                        errors.append(f'"{key}[{i}]" must be a Hub repo id (got {v!r})')
    if errors:
        return 400, {"X-Error-Message": "Invalid metadata in README.md"}, {
            "errors": [{"message": m} for m in errors], "warnings": []}
    return 200, {}, {"errors": [], "warnings": []}


def _find_repo(hub: HubStandIn, repo_id: str, user: Token | None) -> Repo:
    repo = hub.repos.get(repo_id)
    if repo is None or (repo.private and (user is None or repo_id.split("/")[0] != user.user)):
        raise _HttpError(404, "Repository not found", code="RepoNotFound")
    return repo


def _writable_repo(hub: HubStandIn, repo_id: str, user: Token | None) -> Repo:
    repo = _find_repo(hub, repo_id, user)
    if user is None or not user.can_write(repo_id.split("/")[0]):
        raise _HttpError(403, "You don't have write access to this repo", code="Forbidden")
    return repo


def _resolve_revision(repo: Repo, revision: str) -> Commit:
    if revision == "main":
        return repo.head
    for commit in repo.commits:
        if commit.oid == revision:
            return commit
    raise _HttpError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")


def _preupload(repo: Repo, payload: dict):
    files = []
    for f in payload["files"]:
        existing = repo.files.get(f["path"])
        files.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                      "oid": git_blob_oid(existing) if existing is not None else None})
    return 200, {}, {"files": files, "commitOid": repo.head.oid}


def _commit(hub: HubStandIn, repo: Repo, body: bytes):
    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
    header = next(line["value"] for line in lines if line["key"] == "header")
    changes: dict[str, bytes] = {}
    for line in lines:
        if line["key"] == "file":
            assert line["value"]["encoding"] == "base64"
            changes[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        elif line["key"] != "header":
            raise _HttpError(400, f"the Hub stand-in only takes inline files, not {line['key']}")
    commit = hub._commit(repo, header["summary"], changes)
    return 200, {}, {"success": True, "commitOid": commit.oid, "commitUrl": f"{hub.url}/{repo.repo_id}/commit/"
                     f"{commit.oid}", "pullRequestUrl": None}


def _model_info(repo: Repo, commit: Commit):
    return 200, {}, {"id": repo.repo_id, "modelId": repo.repo_id, "sha": commit.oid, "private": repo.private,
                     "gated": "manual" if repo.gated else False, "disabled": False,
                     "lastModified": "2026-01-01T00:00:00.000Z", "tags": [],
                     "siblings": [{"rfilename": p} for p in sorted(commit.files)]}


def _tree(repo: Repo, commit: Commit, under: str):
    prefix = f"{under}/" if under else ""
    return 200, {}, [{"type": "file", "oid": git_blob_oid(content), "size": len(content), "path": p}
                     for p, content in sorted(commit.files.items()) if p.startswith(prefix)]


def _resolve_file(repo: Repo, user: Token | None, commit: Commit, path: str):
    if repo.gated and (user is None or user.user not in repo.gate_accepted):
        raise _HttpError(401 if user is None else 403,
                         f"Access to model {repo.repo_id} is restricted and you are not in the authorized list. "
                         f"Visit https://huggingface.co/{repo.repo_id} to ask for access.", code="GatedRepo")
    if path not in commit.files:
        raise _HttpError(404, "Entry not found", code="EntryNotFound")
    content = commit.files[path]
    return 200, {"X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_oid(content)}"',
                 "Content-Type": "application/octet-stream"}, content
