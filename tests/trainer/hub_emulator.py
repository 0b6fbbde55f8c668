"""An in-process emulation of the Hugging Face Hub endpoints that a push and a download use.

Enough of the Hub's HTTP API for the real ``huggingface_hub`` client to create a repository
and a branch, commit files (regular files inline in the NDJSON commit, large and binary
files through the Git LFS batch API, as the Hub's preupload endpoint decides) and download
them back with ``hf_hub_download`` / ``from_pretrained``. The state (repositories, branches,
commits with sha1 ids, LFS objects) lives in memory and is open to assertions.

Uploads through Xet storage cannot be emulated here: the test fixture sets
``HF_HUB_DISABLE_XET`` (a documented huggingface_hub switch) so the client uses the Git LFS
protocol, which the Hub still accepts. Everything above the transport is the same code path.

Only model repositories exist; requests are authenticated with ``Authorization: Bearer``.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

# The Hub's default .gitattributes for models sends these to LFS (abridged).
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.onnx", "*.msgpack",
                "*.parquet", "*.zip", "*.tar.*", "*.npy", "*.npz")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
INITIAL_COMMIT = "initial commit"


class HubError(Exception):
    def __init__(self, status: HTTPStatus, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass(frozen=True)
class Blob:
    content: bytes
    lfs: bool

    @property
    def oid(self) -> str:
        """What the Hub reports as a file's oid: sha256 for LFS files, git's blob sha1 otherwise."""
        if self.lfs:
            return hashlib.sha256(self.content).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(self.content) + self.content).hexdigest()


@dataclass(frozen=True)
class Commit:
    oid: str
    parent: str | None
    summary: str
    description: str
    files: dict[str, Blob]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)

    def commit(self, revision: str) -> Commit:
        oid = self.branches.get(revision, revision)
        if oid not in self.commits:
            raise HubError(HTTPStatus.NOT_FOUND, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[oid]

    def add_commit(self, branch: str, summary: str, description: str, files: dict[str, Blob]) -> Commit:
        parent = self.branches.get(branch)
        digest = hashlib.sha1(f"{parent}\n{summary}\n{description}\n".encode())
        for path in sorted(files):
            digest.update(f"{path} {files[path].oid}\n".encode())
        commit = Commit(digest.hexdigest(), parent, summary, description, files)
        self.commits[commit.oid] = commit
        self.branches[branch] = commit.oid
        return commit

    def history(self, revision: str) -> list[Commit]:
        """Commits reachable from ``revision``, newest first."""
        commits, commit = [], self.commit(revision)
        while True:
            commits.append(commit)
            if commit.parent is None:
                return commits
            commit = self.commits[commit.parent]


class HubEmulator:
    """A threaded HTTP server speaking the Hub API subset; use as a context manager."""

    def __init__(self, token: str, user: str = "test-user", orgs: tuple[str, ...] = ("test-org",)):
        self.token, self.user, self.orgs = token, user, orgs
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, uploaded but maybe not committed
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.emulator = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubEmulator:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    # --- request handling: (method, path regex) -> handler(params, body, authorized) --------

    def handle(self, method: str, path: str, body: bytes, authorization: str | None) -> tuple[int, dict, bytes]:
        authorized = authorization == f"Bearer {self.token}"
        for route_method, pattern, handler in _ROUTES:
            match = pattern.fullmatch(path)
            if match and method in (route_method, "HEAD" if route_method == "GET" else route_method):
                params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                with self._lock:
                    return handler(self, params, body, authorized)
        raise HubError(HTTPStatus.NOT_FOUND, f"no route for {method} {path}")

    def _require_auth(self, authorized: bool) -> None:
        if not authorized:
            raise HubError(HTTPStatus.UNAUTHORIZED, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str, authorized: bool, write: bool = False) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            # The Hub does not reveal whether a private repository exists.
            raise HubError(HTTPStatus.UNAUTHORIZED if not authorized else HTTPStatus.NOT_FOUND,
                           "Repository Not Found", "RepoNotFound")
        if write:
            self._require_auth(authorized)
        return repo

    def whoami(self, _params, _body, authorized):
        self._require_auth(authorized)
        return _json({"type": "user", "name": self.user, "orgs": [{"name": o} for o in self.orgs],
                      "auth": {"accessToken": {"role": "write"}}})

    def create_repo(self, _params, body, authorized):
        self._require_auth(authorized)
        payload = json.loads(body)
        namespace = payload.get("organization") or self.user
        repo_id = f"{namespace}/{payload['name']}"
        if payload.get("type", "model") != "model":
            raise HubError(HTTPStatus.BAD_REQUEST, "only model repositories are emulated")
        if namespace not in (self.user, *self.orgs):
            raise HubError(HTTPStatus.FORBIDDEN, f"You don't have the rights to create a model under {namespace}")
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:
            return _json({"error": "You already created this model repo", "url": url}, HTTPStatus.CONFLICT)
        repo = Repo(repo_id, private=payload.get("visibility", "public") != "public")
        repo.add_commit("main", INITIAL_COMMIT, "", {".gitattributes": Blob(GITATTRIBUTES, lfs=False)})
        self.repos[repo_id] = repo
        return _json({"url": url, "name": repo_id, "id": repo_id})

    def create_branch(self, params, body, authorized):
        repo = self._repo(params["repo"], authorized, write=True)
        if params["branch"] in repo.branches:
            return _json({"error": "Reference already exists"}, HTTPStatus.CONFLICT)
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        repo.branches[params["branch"]] = repo.commit(start).oid
        return _json({})

    def preupload(self, params, body, authorized):
        repo = self._repo(params["repo"], authorized, write=True)
        existing = repo.commit(params["revision"]).files
        files = []
        for file in json.loads(body)["files"]:
            path, sample = file["path"], base64.b64decode(file["sample"])
            lfs = (any(fnmatch.fnmatch(path, p) for p in LFS_PATTERNS)
                   or file["size"] >= LFS_SIZE_THRESHOLD or b"\0" in sample)
            blob = existing.get(path)
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": blob.oid if blob else None})
        return _json({"files": files, "commitOid": repo.commit(params["revision"]).oid})

    def lfs_batch(self, params, body, authorized):
        self._repo(params["repo"], authorized, write=True)
        payload = json.loads(body)
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(HTTPStatus.BAD_REQUEST, "only basic LFS uploads are emulated")
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.lfs_objects:  # no actions: the Hub already has the content
                entry["actions"] = {"upload": {"href": f"{self.endpoint}/lfs-objects/{obj['oid']}"}}
            objects.append(entry)
        return _json({"transfer": "basic", "objects": objects})

    def lfs_upload(self, params, body, _authorized):
        # Like a pre-signed storage URL: the href itself is the credential.
        if hashlib.sha256(body).hexdigest() != params["oid"]:
            raise HubError(HTTPStatus.BAD_REQUEST, "content does not match its sha256")
        self.lfs_objects[params["oid"]] = body
        return _json({})

    def commit(self, params, body, authorized):
        repo = self._repo(params["repo"], authorized, write=True)
        branch = params["revision"]
        if branch not in repo.branches:
            raise HubError(HTTPStatus.NOT_FOUND, f"Invalid rev id: {branch}", "RevisionNotFound")
        files = dict(repo.commit(branch).files)
        header = None
        for line in body.splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                files[value["path"]] = Blob(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    raise HubError(HTTPStatus.UNPROCESSABLE_ENTITY, f"LFS object {value['oid']} was not uploaded")
                files[value["path"]] = Blob(self.lfs_objects[value["oid"]], lfs=True)
            elif key == "deletedFile":
                files.pop(value["path"], None)
            else:
                raise HubError(HTTPStatus.BAD_REQUEST, f"unsupported commit operation {key!r}")
        if header is None:
            raise HubError(HTTPStatus.BAD_REQUEST, "commit without a header")
        if header.get("parentCommit") not in (None, repo.branches[branch]):
            raise HubError(HTTPStatus.PRECONDITION_FAILED, "A commit has happened since. Please refresh and try again.")
        commit = repo.add_commit(branch, header["summary"], header.get("description", ""), files)
        return _json({"commitUrl": f"{self.endpoint}/{repo.repo_id}/commit/{commit.oid}",
                      "commitOid": commit.oid, "success": True, "pullRequestUrl": None})

    def validate_yaml(self, _params, body, _authorized):
        """The client checks README.md metadata before committing it."""
        content = json.loads(body)["content"]
        match = re.match(r"---\n(.*?)\n---\n", content, re.S)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as error:
            metadata = str(error)
        if not isinstance(metadata, dict):
            return _json({"errors": [{"message": f"metadata must be a mapping: {metadata}"}]}, HTTPStatus.BAD_REQUEST)
        return _json({"errors": [], "warnings": []})

    def model_info(self, params, _body, authorized):
        repo = self._repo(params["repo"], authorized)
        commit = repo.commit(params.get("revision") or "main")
        return _json({"id": repo.repo_id, "modelId": repo.repo_id, "sha": commit.oid, "private": repo.private,
                      "disabled": False, "gated": False, "tags": [], "downloads": 0, "likes": 0,
                      "siblings": [{"rfilename": p} for p in sorted(commit.files)]})

    def refs(self, params, _body, authorized):
        repo = self._repo(params["repo"], authorized)
        return _json({"branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": oid}
                                   for n, oid in sorted(repo.branches.items())],
                      "tags": [], "converts": []})

    def tree(self, params, _body, authorized):
        repo = self._repo(params["repo"], authorized)
        files = repo.commit(params["revision"]).files
        prefix = (params.get("path") or "").strip("/")
        entries, directories = [], set()
        for path, blob in sorted(files.items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1:] if prefix else path
            if "/" in rest:  # the listing is not recursive: show the sub-directory once
                directories.add(f"{prefix}/{rest.split('/')[0]}".strip("/"))
                continue
            entry = {"type": "file", "oid": blob.oid, "size": len(blob.content), "path": path}
            if blob.lfs:
                entry["lfs"] = {"oid": blob.oid, "size": len(blob.content), "pointerSize": 134}
            entries.append(entry)
        if prefix and not entries and not directories:
            raise HubError(HTTPStatus.NOT_FOUND, f"{prefix} does not exist on {params['revision']}", "EntryNotFound")
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(directories)]
        return _json(entries)

    def resolve(self, params, _body, authorized):
        repo = self._repo(params["repo"], authorized)
        commit = repo.commit(params["revision"])
        blob = commit.files.get(params["path"])
        if blob is None:
            raise HubError(HTTPStatus.NOT_FOUND, "Entry not found", "EntryNotFound")
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{blob.oid}"', "Content-Type": "application/octet-stream"}
        if blob.lfs:
            headers |= {"X-Linked-Etag": f'"{blob.oid}"', "X-Linked-Size": str(len(blob.content))}
        return HTTPStatus.OK, headers, blob.content


_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_ROUTES = [
    ("GET", re.compile(r"/api/whoami-v2"), HubEmulator.whoami),
    ("POST", re.compile(r"/api/repos/create"), HubEmulator.create_repo),
    ("POST", re.compile(rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)"), HubEmulator.create_branch),
    ("POST", re.compile(rf"/api/models/{_REPO}/preupload/(?P<revision>[^/]+)"), HubEmulator.preupload),
    ("POST", re.compile(rf"/{_REPO}\.git/info/lfs/objects/batch"), HubEmulator.lfs_batch),
    ("PUT", re.compile(r"/lfs-objects/(?P<oid>[0-9a-f]{64})"), HubEmulator.lfs_upload),
    ("POST", re.compile(r"/api/validate-yaml"), HubEmulator.validate_yaml),
    ("POST", re.compile(rf"/api/models/{_REPO}/commit/(?P<revision>[^/]+)"), HubEmulator.commit),
    ("GET", re.compile(rf"/api/models/{_REPO}(?:/revision/(?P<revision>[^/]+))?"), HubEmulator.model_info),
    ("GET", re.compile(rf"/api/models/{_REPO}/refs"), HubEmulator.refs),
    ("GET", re.compile(rf"/api/models/{_REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.+))?"), HubEmulator.tree),
    ("GET", re.compile(rf"/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)"), HubEmulator.resolve),
]


def _json(value, status: HTTPStatus = HTTPStatus.OK) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(value).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _serve(self) -> None:
        body = self._read_body()
        try:
            status, headers, payload = self.server.emulator.handle(
                self.command, urlsplit(self.path).path, body, self.headers.get("Authorization"))
        except HubError as error:
            status, headers, payload = _json({"error": error.message}, error.status)
            headers |= {"X-Error-Message": error.message, **({"X-Error-Code": error.code} if error.code else {})}
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(payload))}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return b"".join(chunks)

    do_GET = do_HEAD = do_POST = do_PUT = _serve

    def log_message(self, *args) -> None:  # keep test output clean
        pass
