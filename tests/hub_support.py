"""A stand-in for the Hugging Face Hub on 127.0.0.1, serving repos from memory in the Hub's URL
layout (the endpoints and headers huggingface_hub 2.5 reads), so the real client code runs
end to end without internet:

  GET  /api/models/{repo}[/revision/{rev}][?blobs=true] model_info / repo_info: sha, siblings
  GET  /api/models/{repo}/tree/{rev}?recursive=...      list_repo_tree (snapshot_download)
  HEAD /{repo}/resolve/{rev}/{file}                     X-Repo-Commit, ETag, Content-Length
  GET  /{repo}/resolve/{rev}/{file}                     the bytes; `Range: bytes=N-` -> 206

Errors carry the Hub's X-Error-Code header (RepoNotFound, RevisionNotFound, EntryNotFound).
`drop_after[file] = n` makes the next full GET of `file` send n bytes of the body and close the
connection, as a flaky network does; a file in `fail_get` answers every GET with a 500 (an
outage mid-download). Every request is logged in `requests`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    files: dict[str, bytes]
    revisions: dict[str, str] = field(default_factory=dict)  # branch/tag -> commit

    def commit(self, rev: str) -> str | None:
        if rev in self.revisions.values():
            return rev
        return self.revisions.get(rev)


def repo_from_folder(folder: Path, commit: str, extra: dict[str, bytes] | None = None) -> Repo:
    files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
    return Repo({**files, **(extra or {})}, {"main": commit})


class FakeHub:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self.drop_after: dict[str, int] = {}
        self.fail_get: set[str] = set()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def file_requests(self) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if "/resolve/" in r[1]]


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _handler(hub: FakeHub):
    api = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+))?$")
    resolve = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_HEAD(self):
            self._serve(body=False)

        def do_GET(self):
            self._serve(body=True)

        def _serve(self, body: bool):
            path = unquote(urlsplit(self.path).path)
            with hub.lock:
                hub.requests.append((self.command, path, self.headers.get("Range")))
            if m := api.match(path):
                return self._api(*m.groups())
            if m := resolve.match(path):
                return self._file(*m.groups(), body=body)
            self._error(404, "RepoNotFound")

        def _lookup(self, repo_id: str, rev: str) -> tuple[Repo, str] | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound")
                return None
            commit = repo.commit(rev)
            if commit is None:
                self._error(404, "RevisionNotFound")
                return None
            return repo, commit

        def _api(self, repo_id: str, kind: str | None, rev: str | None):
            kind, rev = kind or "revision", rev or "main"
            found = self._lookup(repo_id, rev)
            if found is None:
                return
            repo, commit = found
            if kind == "revision":
                doc = {"id": repo_id, "sha": commit, "private": False,
                       "siblings": [{"rfilename": n, "size": len(d),
                                     "blobId": hashlib.sha1(d).hexdigest()}
                                    for n, d in repo.files.items()]}
            else:
                doc = [{"type": "file", "path": n, "size": len(d),
                        "oid": hashlib.sha1(d).hexdigest()} for n, d in repo.files.items()]
            data = json.dumps(doc).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _file(self, repo_id: str, rev: str, name: str, body: bool):
            found = self._lookup(repo_id, rev)
            if found is None:
                return
            repo, commit = found
            if name not in repo.files:
                return self._error(404, "EntryNotFound")
            if body and name in hub.fail_get:
                return self._error(500, "InternalError")
            data = repo.files[name]
            start = 0
            if m := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or ""):
                start = int(m[1])
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{_etag(data)}"')
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if not body:
                return
            with hub.lock:
                cut = hub.drop_after.pop(name, None) if not start else None
            if cut is not None:  # half the body, then the connection drops
                self.wfile.write(data[:cut])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self.wfile.write(data[start:])

        def _error(self, status: int, code: str):
            data = json.dumps({"error": code}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

    return Handler
