"""A small local server speaking the part of the Hugging Face Hub HTTP API that huggingface_hub uses to
create a repo, upload a folder in one commit, and download files / snapshots.

Uploads follow the Hub's two branches: ``preupload`` answers ``lfs`` for weight files (as the Hub's
``.gitattributes`` does) and ``regular`` for the rest; LFS files then go through the git-lfs batch API (basic
transfer: one PUT per object, then verify) and the commit names them by ``lfsFile`` oid, which must have been
uploaded. An object the server already holds gets no upload action. Downloads of LFS files carry the
``X-Linked-Etag``/``X-Linked-Size`` headers the Hub sends. The xet storage protocol is not spoken: tests turn it
off in the client (``HF_HUB_DISABLE_XET``), which then uses LFS, as it does wherever ``hf_xet`` is missing.

State is in memory. ``fail_commits = n`` makes the next ``n`` commit requests answer 500 (to test error
handling; huggingface_hub itself retries a few times with back-off).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".onnx")


def is_lfs_path(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    lfs_files: set[str] = field(default_factory=set)
    commits: list[str] = field(default_factory=list)
    pull_requests: list[dict[str, bytes]] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.commits[-1] if self.commits else "0" * 40


class HubState:
    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.fail_commits = 0
        self.requests: list[str] = []
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, shared by all repos (content-addressed)
        self.lfs_uploads: list[str] = []  # oids received by PUT, in order
        self.lock = threading.Lock()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Handler(BaseHTTPRequestHandler):
    state: HubState

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    # ------------------------------------------------------------------------------------------ helpers
    def _authorised(self) -> bool:
        return self.headers.get("authorization", "") == f"Bearer {self.state.token}"

    def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None,
              raw: bytes | None = None, head: bool = False) -> None:
        payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        if raw is None:
            self.send_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(payload)

    def _error(self, status: int, message: str, code: str | None = None, head: bool = False) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers, head=head)

    def _body(self) -> bytes:
        length = int(self.headers.get("content-length", "0"))
        return self.rfile.read(length) if length else b""

    def _repo(self, repo_id: str, write: bool = False) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            return None
        if (repo.private or write) and not self._authorised():
            return None
        return repo

    # ------------------------------------------------------------------------------------------ routes
    def do_POST(self) -> None:
        path = unquote(urlparse(self.path).path)
        self.state.requests.append(f"POST {path}")
        body = self._body()
        if path == "/api/repos/create":
            if not self._authorised():
                return self._error(401, "Invalid credentials in Authorization header")
            data = json.loads(body)
            repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
            with self.state.lock:
                if repo_id in self.state.repos:
                    return self._send(409, {"error": "You already created this model repo",
                                            "url": f"http://{self.headers['host']}/{repo_id}"},
                                      {"X-Error-Message": "You already created this model repo"})
                self.state.repos[repo_id] = Repo(private=bool(data.get("private")))
            return self._send(200, {"url": f"http://{self.headers['host']}/{repo_id}", "name": repo_id})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/discussions", path)
        if match:
            repo = self._repo(match.group(1), write=True)
            if repo is None:
                return self._error(401, "Repository not found", "RepoNotFound")
            with self.state.lock:
                repo.pull_requests.append({})
                return self._send(200, {"num": len(repo.pull_requests)})
        if path == "/api/validate-yaml":
            return self._send(200, {"errors": [], "warnings": []})
        match = re.fullmatch(r"/api/models/(.+?)/(preupload|commit)/(.+)", path)
        if match:
            repo_id, action, _revision = match.groups()
            repo = self._repo(repo_id, write=True)
            if repo is None:
                return self._error(401 if repo_id in self.state.repos else 404, "Repository not found",
                                   "RepoNotFound")
            if action == "preupload":
                files = json.loads(body)["files"]
                return self._send(200, {"files": [{"path": f["path"], "shouldIgnore": False, "oid": None,
                                                   "uploadMode": "lfs" if is_lfs_path(f["path"]) else "regular"}
                                                  for f in files]})
            return self._commit(repo_id, repo, body)
        match = re.fullmatch(r"/(.+?)\.git/info/lfs/objects/batch", path)
        if match:
            return self._lfs_batch(match.group(1), json.loads(body))
        match = re.fullmatch(r"/lfs/verify/([0-9a-f]{64})", path)
        if match:
            data = json.loads(body)
            stored = self.state.lfs_objects.get(match.group(1))
            if stored is None or len(stored) != data.get("size") or data.get("oid") != match.group(1):
                return self._error(422, "LFS object missing or wrong size")
            return self._send(200, {})
        return self._error(404, f"no route for POST {path}")

    def _lfs_batch(self, repo_id: str, request: dict[str, Any]) -> None:
        if self._repo(repo_id, write=True) is None:
            return self._error(401, "Repository not found", "RepoNotFound")
        if request.get("operation") != "upload" or "basic" not in request.get("transfers", []):
            return self._error(400, "only basic uploads are supported")
        host = f"http://{self.headers['host']}"
        objects = []
        for item in request["objects"]:
            entry: dict[str, Any] = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            if item["oid"] not in self.state.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{host}/lfs/upload/{item['oid']}", "header": {}},
                                    "verify": {"href": f"{host}/lfs/verify/{item['oid']}", "header": {}}}
            objects.append(entry)
        return self._send(200, {"transfer": "basic", "objects": objects})

    def do_PUT(self) -> None:
        path = unquote(urlparse(self.path).path)
        self.state.requests.append(f"PUT {path}")
        match = re.fullmatch(r"/lfs/upload/([0-9a-f]{64})", path)
        if match is None:
            return self._error(404, f"no route for PUT {path}")
        data = self._body()
        if _sha(data) != match.group(1):
            return self._error(400, "content does not match its oid")
        with self.state.lock:
            self.state.lfs_objects[match.group(1)] = data
            self.state.lfs_uploads.append(match.group(1))
        return self._send(200, {})

    def _commit(self, repo_id: str, repo: Repo, body: bytes) -> None:
        if self.state.fail_commits > 0:
            self.state.fail_commits -= 1
            return self._error(500, "Internal Error - We're working hard to fix this as soon as possible!")
        changes: dict[str, bytes] = {}
        lfs_paths = set()
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "file":
                changes[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                stored = self.state.lfs_objects.get(value["oid"])
                if stored is None or len(stored) != value.get("size", len(stored)):
                    return self._error(400, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                changes[value["path"]] = stored
                lfs_paths.add(value["path"])
        revision = unquote(urlparse(self.path).path).split("/commit/", 1)[1]
        with self.state.lock:
            digest = hashlib.sha1(repo.sha.encode() + json.dumps(sorted(changes)).encode()).hexdigest()
            if parse_qs(urlparse(self.path).query).get("create_pr") == ["1"]:  # open a PR holding this commit
                repo.pull_requests.append({})
                revision = f"refs/pr/{len(repo.pull_requests)}"
            if revision.startswith("refs/pr/"):
                number = int(revision.rsplit("/", 1)[1])
                repo.pull_requests[number - 1].update(changes)
                return self._send(200, {"commitUrl": f"http://{self.headers['host']}/{repo_id}/commit/{digest}",
                                        "commitOid": digest,
                                        "pullRequestUrl": f"http://{self.headers['host']}/{repo_id}/discussions/"
                                                          f"{number}"})
            repo.files.update(changes)
            repo.lfs_files = (repo.lfs_files - set(changes)) | lfs_paths
            repo.commits.append(digest)
        return self._send(200, {"commitUrl": f"http://{self.headers['host']}/{repo_id}/commit/{digest}",
                                "commitOid": digest})

    def _info(self, repo_id: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return self._error(401, "Repository not found", "RepoNotFound")
        return self._send(200, {"id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": repo.private,
                                "siblings": [{"rfilename": name} for name in sorted(repo.files)]})

    def _tree(self, repo_id: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return self._error(401, "Repository not found", "RepoNotFound")
        return self._send(200, [{"type": "file", "path": name, "size": len(data), "oid": _sha(data)[:40]}
                                for name, data in sorted(repo.files.items())])

    def _resolve(self, repo_id: str, filename: str, head: bool) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return self._error(401, "Repository not found", "RepoNotFound", head=head)
        if filename not in repo.files:
            return self._error(404, "Entry not found", "EntryNotFound", head=head)
        data = repo.files[filename]
        headers = {"ETag": f'"{_sha(data)}"', "X-Repo-Commit": repo.sha, "Content-Type": "application/octet-stream"}
        if filename in repo.lfs_files:  # what the Hub sends for LFS files (the client keys its cache on it)
            headers.update({"X-Linked-Etag": f'"{_sha(data)}"', "X-Linked-Size": str(len(data))})
        return self._send(200, headers=headers, raw=data, head=head)

    def _get(self, head: bool) -> None:
        path = unquote(urlparse(self.path).path)
        self.state.requests.append(f"{'HEAD' if head else 'GET'} {path}")
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/discussions/(\d+)", path)
        if match:
            number = int(match.group(2))
            return self._send(200, {
                "num": number, "title": "surgeon upload", "status": "draft", "isPullRequest": True,
                "createdAt": "2026-01-01T00:00:00.000Z", "author": {"name": "surgeon"},
                "repo": {"name": match.group(1), "type": "model"}, "events": [],
                "changes": {"base": "refs/heads/main"}, "filesWithConflicts": []})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/.*)?", path)
        if match:
            return self._tree(match.group(1))
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
        if match:
            return self._info(match.group(1))
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if match:
            return self._resolve(match.group(1), match.group(3), head)
        return self._error(404, f"no route for {path}", head=head)

    def do_GET(self) -> None:
        self._get(head=False)

    def do_HEAD(self) -> None:
        self._get(head=True)


class LocalHub:
    """Context manager: a running server and its base URL."""

    def __init__(self, token: str = "hf_test_token") -> None:
        self.state = HubState(token)
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LocalHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
