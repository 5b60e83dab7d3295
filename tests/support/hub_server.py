"""A small Hugging Face Hub stand-in served on 127.0.0.1 from a thread, for push/load tests.

It speaks the HTTP API that huggingface_hub 2.4 uses (read from its
``hf_api.py``, ``_commit_api.py``, ``lfs.py`` and ``file_download.py``):

    GET  /api/whoami-v2                              who the token belongs to
    POST /api/repos/create                           409 when it exists
    POST /api/validate-yaml                          a subset of the Hub's card checks
    GET  /api/models/<repo>[/revision/<rev>]         model_info / repo_info (sha, private, siblings)
    GET  /api/models/<repo>/tree/<rev>[/<path>]      list_repo_tree (recursive or not)
    GET  /api/models/<repo>/refs, /commits/<rev>     list_repo_refs, list_repo_commits
    POST /api/models/<repo>/branch/<branch>          create_branch
    POST /api/models/<repo>/preupload/<rev>          upload mode per file (lfs for binaries), remote oid
    POST /api/models/<repo>/paths-info/<rev>         get_paths_info (CommitOperationCopy)
    POST /api/models/<repo>/commit/<rev>             ndjson: file / lfsFile / deletedFile / deletedFolder,
                                                     parentCommit checked (412 when the head moved)
    POST /<repo>.git/info/lfs/objects/batch          LFS batch: basic or multipart upload actions
    PUT  /lfs-upload/<oid>, /lfs-part/<oid>/<n>      LFS content; POST /lfs-complete/<oid>, /lfs-verify
    HEAD/GET /<repo>/resolve/<rev>/<path>            downloads (X-Repo-Commit, ETag, X-Linked-Etag)

Repositories are versioned (each commit a full file map), private repos
answer 401 without the token, and every request is recorded (method, path,
headers without Authorization, body) so tests can check what went over the
wire. huggingface_hub reads ``HF_ENDPOINT`` when it is imported, so a process
that loads models through transformers/PEFT must get ``HF_ENDPOINT`` (and
``HF_HUB_DISABLE_XET=1``: the stand-in has no Xet storage) in its environment
before it starts; ``HfApi(endpoint=server.url)`` works in any process.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from _hub_store import GITATTRIBUTES, Blob, Repo, card_errors, is_lfs

__all__ = ["HubServer", "Recorded", "child_env", "use_in_process"]


@dataclass
class Recorded:
    """One request as the stand-in received it (the Authorization header is kept out of ``headers``)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    authorized: bool


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class HubServer:
    """The stand-in. ``with HubServer(token=...) as hub:`` serves on ``hub.url`` until the block ends."""

    def __init__(self, token: str, user: str = "alice", orgs: dict[str, str] | None = None,
                 token_role: str = "write", multipart_chunk: int | None = None):
        self.token, self.user, self.token_role = token, user, token_role
        self.orgs = {"tunekit-org": "write", "readonly-org": "read"} if orgs is None else orgs
        self.multipart_chunk = multipart_chunk  # LFS files larger than this go up in parts
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # uploaded LFS content by sha256
        self.parts: dict[tuple[str, int], bytes] = {}
        self.requests: list[Recorded] = []
        self.lock = threading.RLock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # ------------------------------------------------------------- test helpers
    def create(self, repo_id: str, private: bool = False) -> Repo:
        """A repository with the Hub's initial commit (``.gitattributes``)."""
        repo = Repo(repo_id, private)
        repo.add_commit("main", {".gitattributes": Blob(GITATTRIBUTES, lfs=False)}, "initial commit")
        self.repos[repo_id] = repo
        return repo

    def seed(self, repo_id: str, files: dict[str, bytes] | Path, private: bool = False,
             title: str = "seed") -> Repo:
        """A repository holding ``files`` (a mapping, or every file of a folder) on main."""
        if isinstance(files, Path):
            files = {str(p.relative_to(files)): p.read_bytes() for p in sorted(files.rglob("*")) if p.is_file()}
        repo = self.repos.get(repo_id) or self.create(repo_id, private)
        tree = dict(repo.resolve("main").files)
        tree.update({path: Blob(data, lfs=is_lfs(path, data)) for path, data in files.items()})
        repo.add_commit("main", tree, title)
        return repo

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return {p: b.content for p, b in self.repos[repo_id].resolve(revision).files.items()}

    def head(self, repo_id: str, branch: str = "main") -> str:
        return self.repos[repo_id].branches[branch]

    # ------------------------------------------------------------- auth
    def authorized(self, headers) -> bool:
        return headers.get("authorization") == f"Bearer {self.token}"

    def can_write(self, namespace: str) -> bool:
        return namespace == self.user or self.orgs.get(namespace) in ("write", "admin")

    def repo_for(self, repo_id: str, headers, write: bool = False) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self.authorized(headers)):
            raise HubError(401 if not self.authorized(headers) else 404, "Repository not found", "RepoNotFound")
        if write and not (self.authorized(headers) and self.token_role == "write"
                          and self.can_write(repo_id.split("/")[0])):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo



    # ------------------------------------------------------------- API: account and repos
    def whoami(self, req: Request):
        if not self.authorized(req.headers):
            raise HubError(401, "Invalid credentials in Authorization header")
        orgs = [{"name": name, "roleInOrg": role} for name, role in self.orgs.items()]
        return 200, {"type": "user", "name": self.user, "orgs": orgs,
                     "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": self.token_role}}}

    def create_repo(self, req: Request):
        payload = req.json()
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        if not (self.authorized(req.headers) and self.can_write(repo_id.split("/")[0])):
            raise HubError(403, f"You don't have the rights to create a model under the namespace "
                                f"{repo_id.split('/')[0]!r}")
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo")
        self.create(repo_id, private=payload.get("visibility", "public") != "public" or bool(payload.get("private")))
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def validate_yaml(self, req: Request):
        errors = card_errors(req.json()["content"])
        if errors:
            return 400, {"errors": [{"message": e} for e in errors]}
        return 200, {"warnings": []}

    def model_info(self, req: Request, repo_id: str, revision: str = "main"):
        repo = self.repo_for(repo_id, req.headers)
        commit = self._commit(repo, revision)
        siblings = [{"rfilename": p, **({"size": len(b.content), "blobId": b.entry(p)["oid"]}
                                         if "blobs" in req.query else {})} for p, b in sorted(commit.files.items())]
        return 200, {"id": repo_id, "modelId": repo_id, "sha": commit.sha, "private": repo.private,
                     "lastModified": commit.date, "createdAt": repo.history(revision)[-1].date,
                     "siblings": siblings, "tags": [], "downloads": 0, "likes": 0}

    def refs(self, req: Request, repo_id: str):
        repo = self.repo_for(repo_id, req.headers)
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha} for b, sha in repo.branches.items()]
        return 200, {"branches": branches, "converts": [], "tags": [], "pullRequests": []}

    def commits(self, req: Request, repo_id: str, revision: str):
        repo = self.repo_for(repo_id, req.headers)
        self._commit(repo, revision)
        return 200, [{"id": c.sha, "title": c.title, "message": c.message, "date": c.date,
                      "authors": [{"user": self.user}]} for c in repo.history(revision)]

    def create_branch(self, req: Request, repo_id: str, branch: str):
        repo = self.repo_for(repo_id, req.headers, write=True)
        branch = unquote(branch)
        if branch in repo.branches:
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        start = self._commit(repo, req.json().get("startingPoint") or "main")
        repo.branches[branch] = start.sha
        return 200, {}

    def tree(self, req: Request, repo_id: str, revision: str, path: str = ""):
        commit = self._commit(self.repo_for(repo_id, req.headers), revision)
        prefix = unquote(path).strip("/")
        recursive = req.query.get("recursive", ["false"])[0].lower() == "true"
        entries, folders = [], set()
        for name, blob in sorted(commit.files.items()):
            if prefix and not name.startswith(prefix + "/"):
                continue
            rest = name[len(prefix) + 1:] if prefix else name
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(filter(None, [prefix, *parts[:depth]]))
                if folder not in folders and (recursive or depth == 1):
                    folders.add(folder)
                    entries.append({"type": "directory", "path": folder, "size": 0,
                                    "oid": hashlib.sha1(folder.encode()).hexdigest()})
            if recursive or len(parts) == 1:
                entries.append(blob.entry(name))
        if prefix and not entries:
            raise HubError(404, f"{prefix} does not exist on {revision}", "EntryNotFound")
        return 200, entries

    def paths_info(self, req: Request, repo_id: str, revision: str):
        commit = self._commit(self.repo_for(repo_id, req.headers), revision)
        paths = parse_qs(req.body.decode()).get("paths", [])
        return 200, [commit.files[p].entry(p) for p in paths if p in commit.files]

    def _commit(self, repo: Repo, revision: str):
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {unquote(revision)}", "RevisionNotFound")
        return commit

    # ------------------------------------------------------------- API: uploads
    def preupload(self, req: Request, repo_id: str, revision: str):
        commit = self._commit(self.repo_for(repo_id, req.headers, write=True), revision)
        out = []
        for item in req.json()["files"]:
            sample = base64.b64decode(item["sample"])
            lfs = is_lfs(item["path"], sample)
            remote = commit.files.get(item["path"])
            same_mode = remote is not None and remote.lfs == lfs
            out.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        **({"oid": remote.oid()} if same_mode else {})})
        return 200, {"files": out}

    def lfs_batch(self, req: Request, repo_id: str):
        self.repo_for(repo_id, req.headers, write=True)
        objects = []
        for obj in req.json()["objects"]:
            oid, size = obj["oid"], obj["size"]
            entry = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.blobs:
                entry["actions"] = {"upload": self._upload_action(oid, size),
                                    "verify": {"href": f"{self.url}/lfs-verify"}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}

    def _upload_action(self, oid: str, size: int) -> dict:
        chunk = self.multipart_chunk
        if chunk is None or size <= chunk:
            return {"href": f"{self.url}/lfs-upload/{oid}"}
        parts = -(-size // chunk)
        header = {f"{n:05d}": f"{self.url}/lfs-part/{oid}/{n}" for n in range(1, parts + 1)}
        return {"href": f"{self.url}/lfs-complete/{oid}", "header": {"chunk_size": str(chunk), **header}}

    def _store_blob(self, oid: str, content: bytes) -> None:
        if hashlib.sha256(content).hexdigest() != oid:
            raise HubError(400, f"content does not match sha256 {oid}")
        self.blobs[oid] = content

    def lfs_upload(self, req: Request, oid: str):
        self._store_blob(oid, req.body)
        return 200, {}

    def lfs_part(self, req: Request, oid: str, number: str):
        self.parts[(oid, int(number))] = req.body
        return 200, {}, {"ETag": f'"{hashlib.md5(req.body).hexdigest()}"'}

    def lfs_complete(self, req: Request, oid: str):
        parts = sorted(req.json()["parts"], key=lambda p: p["partNumber"])
        self._store_blob(oid, b"".join(self.parts.pop((oid, p["partNumber"])) for p in parts))
        return 200, {}

    def lfs_verify(self, req: Request):
        payload = req.json()
        if payload["oid"] not in self.blobs or len(self.blobs[payload["oid"]]) != payload["size"]:
            raise HubError(404, f"object {payload['oid']} was not uploaded")
        return 200, {}

    def commit(self, req: Request, repo_id: str, revision: str):
        repo = self.repo_for(repo_id, req.headers, write=True)
        if "create_pr" in req.query:
            raise HubError(400, "the stand-in does not open pull requests")
        branch = unquote(revision)
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        header = lines[0]["value"]
        head = repo.branches[branch]
        parent = header.get("parentCommit")
        if parent and not head.startswith(parent):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[head].files)
        for line in lines[1:]:
            self._apply(files, line["key"], line["value"])
        commit = repo.add_commit(branch, files, header["summary"], header.get("description", ""))
        return 200, {"success": True, "commitOid": commit.sha, "commitUrl": f"{self.url}/{repo_id}/commit/{commit.sha}",
                     "hookOutput": "", "pullRequestUrl": None}

    def _apply(self, files: dict[str, Blob], key: str, value: dict) -> None:
        path = value["path"]
        if key == "file":
            files[path] = Blob(base64.b64decode(value["content"]), lfs=False)
        elif key == "lfsFile":
            if value["oid"] not in self.blobs:
                raise HubError(422, f"LFS object {value['oid']} of {path} was never uploaded")
            files[path] = Blob(self.blobs[value["oid"]], lfs=True)
        elif key == "deletedFile":
            if path not in files:
                raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            del files[path]
        elif key == "deletedFolder":
            for name in [n for n in files if n.startswith(path.rstrip("/") + "/")]:
                del files[name]
        else:
            raise HubError(400, f"unknown commit operation {key!r}")

    # ------------------------------------------------------------- downloads
    def resolve(self, req: Request, repo_id: str, revision: str, path: str):
        commit = self._commit(self.repo_for(repo_id, req.headers), revision)
        name = unquote(path)
        blob = commit.files.get(name)
        if blob is None:
            raise HubError(404, "Entry not found", "EntryNotFound")
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{blob.entry(name)["oid"]}"'}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.content))})
        return 200, blob.content, headers


_REPO = r"(?P<repo_id>[\w.-]+/[\w.-]+)"
_REV = r"(?P<revision>[^/]+)"
ROUTES: list[tuple[str, re.Pattern, str]] = [  # (method, path, HubServer method name)
    (m, re.compile(p + "$"), f) for m, p, f in [
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", rf"/api/models/{_REPO}", "model_info"),
        ("GET", rf"/api/models/{_REPO}/revision/{_REV}", "model_info"),
        ("GET", rf"/api/models/{_REPO}/refs", "refs"),
        ("GET", rf"/api/models/{_REPO}/commits/{_REV}", "commits"),
        ("POST", rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", "create_branch"),
        ("GET", rf"/api/models/{_REPO}/tree/{_REV}(?:/(?P<path>.*))?", "tree"),
        ("POST", rf"/api/models/{_REPO}/paths-info/{_REV}", "paths_info"),
        ("POST", rf"/api/models/{_REPO}/preupload/{_REV}", "preupload"),
        ("POST", rf"/api/models/{_REPO}/commit/{_REV}", "commit"),
        ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "lfs_upload"),
        ("PUT", r"/lfs-part/(?P<oid>[0-9a-f]{64})/(?P<number>\d+)", "lfs_part"),
        ("POST", r"/lfs-complete/(?P<oid>[0-9a-f]{64})", "lfs_complete"),
        ("POST", r"/lfs-verify", "lfs_verify"),
        ("GET", rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)", "resolve"),
    ]
]


@dataclass
class Request:
    headers: dict[str, str]
    body: bytes
    query: dict[str, list[str]]

    def json(self):
        return json.loads(self.body or b"{}")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without this, Nagle + delayed ACKs add ~40 ms each.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _body(self) -> bytes:
        if (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().strip() or b"0", 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self, method: str) -> None:
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        req = Request(headers, self._body(), parse_qs(url.query))
        with hub.lock:
            hub.requests.append(Recorded(method, self.path, {k: v for k, v in headers.items()
                                                              if k != "authorization"},
                                         req.body, hub.authorized(headers)))
            try:
                status, body, extra = self._dispatch(hub, "GET" if method == "HEAD" else method, url.path, req)
            except HubError as err:
                status, body = err.status, {"error": err.message}
                extra = {"X-Error-Message": err.message, **({"X-Error-Code": err.code} if err.code else {})}
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        content_type = "application/octet-stream" if isinstance(body, bytes) else "application/json"
        for key, value in {"Content-Type": content_type, "Content-Length": str(len(data)), **extra}.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    @staticmethod
    def _dispatch(hub: HubServer, method: str, path: str, req: Request):
        for route_method, pattern, name in ROUTES:
            match = pattern.match(path)
            if route_method == method and match:
                out = getattr(hub, name)(req, **{k: v for k, v in match.groupdict().items() if v is not None})
                return (*out, {}) if len(out) == 2 else out
        raise HubError(404, f"the stand-in has no route {method} {path}")

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")


def use_in_process(monkeypatch, hub: HubServer) -> None:
    """Point this process's pushes at ``hub``: tunekit reads HF_ENDPOINT and the token per call, and the
    import-time flags huggingface_hub already read (offline mode, Xet) are patched for the test."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", hub.token)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


def child_env(hub: HubServer, hf_home: Path) -> dict[str, str]:
    """The environment of a child process whose huggingface_hub (imported fresh) talks only to ``hub``."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=hub.token, HF_HUB_DISABLE_XET="1", HF_HOME=str(hf_home),
               HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    return env
