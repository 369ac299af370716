"""A small Hugging Face Hub-compatible HTTP server for tests, built on the standard library.

It speaks the subset of the Hub's HTTP API that the installed `huggingface_hub` client calls
(checked against its source): `GET /api/models` (search, filter, pipeline_tag,
num_parameters, sort, limit), `GET /api/models/{repo}[/revision/{rev}]` (siblings with size,
blobId and LFS sha256 when `blobs=True`), `GET /api/models/{repo}/tree/{rev}[/{path}]`
(`recursive=True`), and `HEAD`/`GET /{repo}/resolve/{rev}/{path}` with ETag, X-Repo-Commit,
X-Linked-Etag/X-Linked-Size, Content-Length and Range (206). Private and gated repos answer
401/403 with the Hub's `X-Error-Code`/`X-Error-Message` headers.

Fault injection (per file, keyed by `(repo_id, path)`): drop the connection after N bytes,
answer 500 N times, sleep per chunk, serve a body whose size or bytes differ from the Hub's
metadata, or a Content-Length header that lies about the body. Every request is logged (method, path, Range, whether a token came) — never the token.

Repos are built from local folders or `{path: bytes}` dicts; nothing here knows about the app.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".npz")
CHUNK = 4096


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _safetensors_params(data: bytes) -> dict[str, int]:
    """Parameter count per dtype, read from a safetensors header (as the Hub reports it)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    out: dict[str, int] = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        numel = 1
        for d in t["shape"]:
            numel *= d
        out[t["dtype"]] = out.get(t["dtype"], 0) + numel
    return out


@dataclass
class Repo:
    repo_id: str
    files: dict[str, bytes]
    commit: str
    private: bool = False
    gated: bool = False
    tokens: set[str] = field(default_factory=set)  # tokens allowed to read a private/gated repo
    tags: list[str] = field(default_factory=list)
    downloads: int = 0
    likes: int = 0
    last_modified: str = "2024-01-01T00:00:00.000Z"
    pipeline_tag: str | None = "text-generation"
    n_params: int | None = None  # overrides the count taken from safetensors headers

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES) or len(self.files[path]) > 10_000

    def etag(self, path: str) -> str:
        data = self.files[path]
        return hashlib.sha256(data).hexdigest() if self.is_lfs(path) else git_blob_sha1(data)

    def safetensors_info(self) -> dict | None:
        params: dict[str, int] = {}
        for path, data in self.files.items():
            if path.endswith(".safetensors"):
                for k, v in _safetensors_params(data).items():
                    params[k] = params.get(k, 0) + v
        if not params:
            return None
        return {"parameters": params, "total": self.n_params or sum(params.values())}

    def total_params(self) -> int | None:
        if self.n_params:
            return self.n_params
        st = self.safetensors_info()
        return st["total"] if st else None


class HubServer:
    """Start with `start()`; `url` is the value for HF_ENDPOINT; `stop()` shuts it down."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.log: list[dict] = []
        self.drop_after: dict[tuple[str, str], list[int]] = {}  # key -> [bytes, times]
        self.fail_500: dict[tuple[str, str], int] = {}
        self.slow: dict[tuple[str, str], float] = {}  # seconds of sleep per 4 KiB chunk
        self.wrong_size: dict[tuple[str, str], int] = {}  # bytes added to (or cut from) the body
        self.corrupt: set[tuple[str, str]] = set()  # flip one byte: same size, wrong hash
        self.lie_length: dict[
            tuple[str, str], int
        ] = {}  # Content-Length header off by N (body right)
        self.lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- repos ---------------------------------------------------------------------------
    def add_repo(self, repo_id: str, source: Path | dict[str, bytes], **meta) -> Repo:
        if isinstance(source, dict):
            files = dict(source)
        else:
            root = Path(source)
            files = {
                p.relative_to(root).as_posix(): p.read_bytes()
                for p in sorted(root.rglob("*"))
                if p.is_file()
            }
        commit = hashlib.sha1(
            repo_id.encode()
            + b"".join(k.encode() + git_blob_sha1(v).encode() for k, v in sorted(files.items()))
        ).hexdigest()
        repo = Repo(repo_id=repo_id, files=files, commit=commit, **meta)
        self.repos[repo_id] = repo
        return repo

    def requests_for(self, path: str, method: str = "GET") -> list[dict]:
        with self.lock:
            return [r for r in self.log if r["path"].endswith(path) and r["method"] == method]

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> HubServer:
        handler = type("BoundHandler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()


_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_INFO = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?$")
_TREE = re.compile(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$")
_SIZE = re.compile(r"^([\d.]+)([KMBT]?)$")


def _flag(query: dict, name: str) -> bool:
    return query.get(name, [""])[0].lower() in ("true", "1")


def _parse_count(text: str) -> float:
    m = _SIZE.match(text.strip().upper())
    if not m:
        return 0
    return float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[m.group(2)]


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    # -- plumbing ------------------------------------------------------------------------------
    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[7:] if auth.startswith("Bearer ") else None

    def _send(
        self, status: int, body: bytes = b"", headers: dict | None = None, ctype="application/json"
    ):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode())

    def _error(self, status: int, code: str | None, message: str) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers)

    def _check_access(self, repo: Repo | None, repo_id: str, for_files: bool) -> bool:
        """Answer 401/403/404 the way the Hub does; True when the request may go on."""
        token = self._token()
        if repo is None:
            self._error(401 if token is None else 404, "RepoNotFound", "Repository not found")
            return False
        if repo.private and token not in repo.tokens:
            self._error(401 if token is None else 404, "RepoNotFound", "Repository not found")
            return False
        if repo.gated and for_files and token not in repo.tokens:
            if token is None:
                self._error(
                    401,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted. You must have "
                    "access to it and be authenticated to access it. Please log in.",
                )
            else:
                self._error(
                    403,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted and you are not "
                    f"in the authorized list. Visit {self.hub.url}/{repo_id} to ask for access.",
                )
            return False
        return True

    def _record(self, path: str) -> None:
        with self.hub.lock:
            self.hub.log.append(
                {
                    "method": self.command,
                    "path": path,
                    "range": self.headers.get("Range"),
                    "auth": self._token() is not None,
                    "time": time.monotonic(),
                }
            )

    # -- routes ----------------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = parse_qs(parts.query)
        self._record(path)
        try:
            if path == "/api/models":
                return self._list(query)
            if m := _TREE.match(path):
                return self._tree(m.group(1), m.group(2), m.group(3) or "", query)
            if m := _INFO.match(path):
                return self._info(m.group(1), m.group(2), query)
            if m := _RESOLVE.match(path):
                return self._resolve(m.group(1), m.group(2), m.group(3))
            self._error(404, None, "Not found")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _summary(self, repo: Repo, blobs: bool) -> dict:
        siblings = []
        for p, data in sorted(repo.files.items()):
            s: dict = {"rfilename": p}
            if blobs:
                s["size"] = len(data)
                s["blobId"] = git_blob_sha1(data)
                if repo.is_lfs(p):
                    s["lfs"] = {
                        "size": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(),
                        "pointerSize": 134,
                    }
            siblings.append(s)
        config = None
        if "config.json" in repo.files:
            try:
                config = json.loads(repo.files["config.json"])
            except ValueError:
                config = None
        out = {
            "_id": repo.commit[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": repo.commit,
            "lastModified": repo.last_modified,
            "createdAt": repo.last_modified,
            "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": repo.downloads,
            "likes": repo.likes,
            "tags": repo.tags,
            "pipeline_tag": repo.pipeline_tag,
            "library_name": "transformers",
            "siblings": siblings,
            "config": config,
        }
        if st := repo.safetensors_info():
            out["safetensors"] = st
        if any(p.endswith(".gguf") for p in repo.files):
            out["gguf"] = {"total": repo.total_params() or 0}
        return out

    def _list(self, query: dict) -> None:
        token = self._token()
        repos = [r for r in self.hub.repos.values() if not r.private or token in r.tokens]
        if search := query.get("search", [""])[0].lower():
            repos = [r for r in repos if search in r.repo_id.lower()]
        for f in query.get("filter", []):
            repos = [r for r in repos if f in r.tags or f == r.pipeline_tag]
        if pt := query.get("pipeline_tag", [None])[0]:
            repos = [r for r in repos if r.pipeline_tag == pt]
        if num := query.get("num_parameters", [None])[0]:
            for cond in num.split(","):
                kind, _, value = cond.partition(":")
                bound = _parse_count(value)
                if kind == "min":
                    repos = [r for r in repos if (r.total_params() or 0) >= bound]
                elif kind == "max":
                    repos = [r for r in repos if (r.total_params() or 0) <= bound]
        sort = query.get("sort", [None])[0]
        key = {
            "downloads": lambda r: r.downloads,
            "likes": lambda r: r.likes,
            "lastModified": lambda r: r.last_modified,
        }.get(sort)
        if key:
            repos.sort(key=key, reverse=True)
        if limit := query.get("limit", [None])[0]:
            repos = repos[: int(limit)]
        full = "siblings" in query.get("expand", []) or _flag(query, "full")
        items = []
        for r in repos:
            s = self._summary(r, blobs=False)
            if not full:
                s.pop("siblings")
            items.append(s)
        self._json(items)

    def _info(self, repo_id: str, revision: str | None, query: dict) -> None:
        repo = self.hub.repos.get(repo_id)
        if not self._check_access(repo, repo_id, for_files=False):
            return
        if revision not in (None, "main", repo.commit):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        self._json(self._summary(repo, blobs=_flag(query, "blobs")))

    def _tree(self, repo_id: str, revision: str, sub: str, query: dict) -> None:
        repo = self.hub.repos.get(repo_id)
        if not self._check_access(repo, repo_id, for_files=False):
            return
        if revision not in ("main", repo.commit):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        recursive = _flag(query, "recursive")
        prefix = sub.rstrip("/") + "/" if sub else ""
        entries, dirs = [], set()
        for p, data in sorted(repo.files.items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix) :]
            parts = rest.split("/")
            for i in range(1, len(parts)):
                d = prefix + "/".join(parts[:i])
                if d not in dirs and (recursive or i == 1):
                    dirs.add(d)
                    entries.append(
                        {
                            "type": "directory",
                            "oid": hashlib.sha1(d.encode()).hexdigest(),
                            "size": 0,
                            "path": d,
                        }
                    )
            if recursive or len(parts) == 1:
                e = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": p}
                if repo.is_lfs(p):
                    e["lfs"] = {
                        "oid": hashlib.sha256(data).hexdigest(),
                        "size": len(data),
                        "pointerSize": 134,
                    }
                entries.append(e)
        self._json(entries)

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        hub = self.hub
        repo = hub.repos.get(repo_id)
        if not self._check_access(repo, repo_id, for_files=True):
            return
        if revision not in ("main", repo.commit):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        if path not in repo.files:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}")
        key = (repo_id, path)
        with hub.lock:
            if hub.fail_500.get(key, 0) > 0:
                hub.fail_500[key] -= 1
                fail = True
            else:
                fail = False
        if fail:
            return self._error(
                500, None, "Internal Error - We're working hard to fix this as soon as possible!"
            )

        true_data = repo.files[path]
        data = true_data
        if key in hub.wrong_size:
            delta = hub.wrong_size[key]
            data = data + b"\0" * delta if delta > 0 else data[:delta]
        if key in hub.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        etag = repo.etag(path)
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": repo.commit, "Accept-Ranges": "bytes"}
        if repo.is_lfs(path):
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(len(true_data))

        start, end, status = 0, len(data) - 1, 200
        rng = self.headers.get("Range")
        if rng and (m := re.match(r"bytes=(\d+)-(\d*)", rng)):
            start = int(m.group(1))
            end = min(int(m.group(2)), len(data) - 1) if m.group(2) else len(data) - 1
            if start >= len(data):
                headers["Content-Range"] = f"bytes */{len(data)}"
                return self._send(416, b"", headers)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        body = data[start : end + 1]

        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body) + hub.lie_length.get(key, 0)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        if key in hub.lie_length:  # send the true body, then hang up short of the promised length
            self.wfile.write(body)
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return

        drop_at = None
        with hub.lock:
            if key in hub.drop_after and hub.drop_after[key][1] > 0:
                hub.drop_after[key][1] -= 1
                drop_at = hub.drop_after[key][0]
        delay = hub.slow.get(key, 0.0)
        sent = 0
        while sent < len(body):
            n = CHUNK if drop_at is None else min(CHUNK, drop_at - sent)
            if n <= 0:
                # Cut the connection mid-body, as a flaky network would.
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(body[sent : sent + n])
            sent += n
            if delay:
                self.wfile.flush()
                time.sleep(delay)


# -- pytest helpers -------------------------------------------------------------------------------
def safetensors_bytes(tensors: dict) -> bytes:
    """A safetensors file (bytes) holding these numpy arrays."""
    from safetensors.numpy import save

    return save(tensors)


def hub_env(monkeypatch, tmp_path: Path, server: HubServer) -> Path:
    """Point the real client at `server`; a private HF cache and LATENT_HOME. Returns the cache."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("LATENT_HOME", str(tmp_path / "latent-home"))
    monkeypatch.setenv("LATENT_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    return cache


def wait_bytes(manager, job_id: str, n: int, timeout: float = 20.0) -> None:
    """Block until a job has `n` bytes (fails the test instead of hanging)."""
    deadline = time.monotonic() + timeout
    while manager.job(job_id).bytes_done < n:
        job = manager.job(job_id)
        assert job.status in ("queued", "running"), (job.status, job.error)
        assert time.monotonic() < deadline, f"stuck at {job.bytes_done} bytes"
        time.sleep(0.01)
