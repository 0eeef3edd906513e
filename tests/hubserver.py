"""A Hub-compatible HTTP server on 127.0.0.1 for tests: enough of the Hugging Face Hub API for the real
`huggingface_hub` client to create a repo and a branch, upload regular and LFS files, and commit
(HF_HUB_DISABLE_XET=1). Commits are atomic: a commit whose LFS objects are not all uploaded is refused,
and nothing of a failed request is visible.

Faults for retry tests: `server.fail(method, path_regex, action, times)` where action is "500" (answer
500), "429:N" (answer 429 Too Many Requests with `Retry-After: N`) or "drop" (read part of the request
body, then close the connection without an answer).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool
    branches: dict[str, list[dict]] = field(default_factory=lambda: {"main": []})  # branch -> commits
    files: dict[str, dict[str, dict]] = field(default_factory=lambda: {"main": {}})  # branch -> path -> info


class HubServer:
    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.faults: list[list] = []  # [method, regex, action, remaining]
        self.requests: list[str] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def fail(self, method: str, path_regex: str, action: str, times: int = 1) -> None:
        self.faults.append([method, re.compile(path_regex), action, times])

    def commits(self, repo_id: str, branch: str = "main") -> list[dict]:
        return self.repos[repo_id].branches.get(branch, [])

    def file(self, repo_id: str, path: str, branch: str = "main") -> bytes:
        info = self.repos[repo_id].files[branch][path]
        return self.lfs[info["sha256"]] if "sha256" in info else info["content"]

    def _fault(self, method: str, path: str) -> str | None:
        with self.lock:
            for fault in self.faults:
                if fault[0] == method and fault[1].search(path) and fault[3] > 0:
                    fault[3] -= 1
                    return fault[2]
        return None


def _handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, payload=None, content_type: str = "application/json",
                  headers: dict[str, str] | None = None) -> None:
            data = b"" if payload is None else (payload if isinstance(payload, bytes) else json.dumps(payload).encode())
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") != f"Bearer {hub.token}":
                self._body()
                self._send(401, {"error": "Invalid credentials"})
                return False
            return True

        def _route(self, method: str) -> None:
            path = self.path.split("?")[0]
            hub.requests.append(f"{method} {path}")
            action = hub._fault(method, path)
            if action == "drop":
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(min(length, 1024))
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if action == "500":
                self._body()
                self._send(500, {"error": "Internal Error (injected)"})
                return
            if action and action.startswith("429:"):
                self._body()
                self._send(429, {"error": "Too Many Requests (injected)"}, headers={"Retry-After": action[4:]})
                return
            if path.startswith("/lfs/"):  # upload targets handed out by the batch answer carry no auth
                return self._lfs_object(method, path)
            if not self._authorized():
                return
            for pattern, fn in ROUTES:
                m = re.fullmatch(pattern, path)
                if m and fn.__name__.startswith(method.lower()):
                    return fn(self, *m.groups())
            self._body()
            self._send(404, {"error": f"no route {method} {path}"})

        def do_GET(self):
            self._route("GET")

        def do_POST(self):
            self._route("POST")

        def do_PUT(self):
            self._route("PUT")

        # --- endpoints -------------------------------------------------------------------------------
        def post_create_repo(self):
            body = json.loads(self._body())
            repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
            with hub.lock:
                if repo_id in hub.repos:
                    return self._send(409, {"error": "You already created this model repo",
                                            "url": f"{hub.url}/{repo_id}"})
                hub.repos[repo_id] = Repo(private=body.get("visibility") == "private" or bool(body.get("private")))
            self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def post_branch(self, repo_id, branch):
            self._body()
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._send(404, {"error": "Repository not found"})
            with hub.lock:
                if branch in repo.branches:
                    return self._send(409, {"error": "Reference already exists"})
                repo.branches[branch] = list(repo.branches["main"])
                repo.files[branch] = dict(repo.files["main"])
            self._send(200, {})

        def post_preupload(self, repo_id, revision):
            body = json.loads(self._body())
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._send(404, {"error": "Repository not found"})
            existing = repo.files.get(revision, {})
            files = []
            for f in body["files"]:
                lfs = f["size"] > 1_000_000 or f["path"].endswith((".safetensors", ".gguf", ".bin"))
                info = existing.get(f["path"])
                oid = None if info is None else info.get("sha256") if lfs else info.get("sha1")
                files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                              "oid": oid})
            self._send(200, {"files": files})

        def post_lfs_batch(self, repo_id):
            body = json.loads(self._body())
            objects = []
            for o in body["objects"]:
                entry = {"oid": o["oid"], "size": o["size"]}
                if o["oid"] not in hub.lfs:
                    entry["actions"] = {"upload": {"href": f"{hub.url}/lfs/{o['oid']}"},
                                        "verify": {"href": f"{hub.url}/lfs/{o['oid']}/verify"}}
                objects.append(entry)
            self._send(200, {"transfer": "basic", "objects": objects}, "application/vnd.git-lfs+json")

        def _lfs_object(self, method, path):
            oid = path.split("/")[2]
            data = self._body()
            if method == "PUT":
                if hashlib.sha256(data).hexdigest() != oid:
                    return self._send(400, {"error": "sha256 mismatch"})
                with hub.lock:
                    hub.lfs[oid] = data
                return self._send(200, {})
            if path.endswith("/verify"):
                return self._send(200 if oid in hub.lfs else 404, {})
            self._send(404, {})

        def post_commit(self, repo_id, revision):
            lines = [json.loads(x) for x in self._body().decode().splitlines() if x.strip()]
            repo = hub.repos.get(repo_id)
            if repo is None or revision not in repo.branches:
                return self._send(404, {"error": "Repository or revision not found"})
            header = next(x["value"] for x in lines if x["key"] == "header")
            changes = {}
            for x in lines:
                v = x["value"]
                if x["key"] == "file":
                    content = base64.b64decode(v["content"])
                    changes[v["path"]] = {"sha1": git_blob_sha1(content), "content": content, "size": len(content)}
                elif x["key"] == "lfsFile":
                    if v["oid"] not in hub.lfs:  # all or nothing
                        return self._send(422, {"error": f"LFS object {v['oid']} of {v['path']} was not uploaded"})
                    changes[v["path"]] = {"sha256": v["oid"], "size": v["size"]}
            with hub.lock:
                sha = hashlib.sha1(json.dumps([header, sorted(changes)], sort_keys=True).encode()
                                   + str(len(hub.requests)).encode()).hexdigest()
                repo.files[revision] = {**repo.files[revision], **changes}
                repo.branches[revision].append({"oid": sha, "title": header["summary"], "files": sorted(changes)})
            self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha})

        def post_validate_yaml(self):
            self._body()
            self._send(200, {"errors": [], "warnings": []})

        def get_repo_info(self, repo_id, revision=None):
            repo = hub.repos.get(repo_id)
            branch = revision or "main"
            if repo is None or branch not in repo.branches:
                return self._send(404, {"error": "Repository not found"})
            commits = repo.branches[branch]
            self._send(200, {"id": repo_id, "modelId": repo_id, "private": repo.private,
                             "sha": commits[-1]["oid"] if commits else "0" * 40,
                             "siblings": [{"rfilename": p} for p in sorted(repo.files[branch])]})

    ROUTES = [
        (r"/api/repos/create", Handler.post_create_repo),
        (r"/api/models/([^/]+/[^/]+)/branch/([^/]+)", Handler.post_branch),
        (r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", Handler.post_preupload),
        (r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", Handler.post_lfs_batch),
        (r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", Handler.post_commit),
        (r"/api/validate-yaml", Handler.post_validate_yaml),
        (r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", Handler.get_repo_info),
        (r"/api/models/([^/]+/[^/]+)", Handler.get_repo_info),
    ]
    return Handler
