"""A fake Hugging Face Hub, in process, for tests: never the Hub, and no network.

``FakeHub(root)`` answers, through an ``httpx2.MockTransport`` that huggingface_hub is
given with :func:`huggingface_hub.set_client_factory`, the few HTTP endpoints that
``create_repo``, ``model_info``/``repo_info``/``resolve_revision``, ``list_repo_tree``,
``get_paths_info``, ``upload_folder``/``upload_file``/``create_commit`` (preupload, the
plain LFS batch protocol, NDJSON commit) and ``snapshot_download``/``hf_hub_download``
(resolve) call. ``HF_HUB_DISABLE_XET=1`` is required: the Xet protocol is not faked.

Its state (repos, commits, refs, blobs, a request log, injected faults) lives in a folder
under a file lock, so several processes (Snakemake jobs) share one fake: the workflow
tests activate it in every Python process through ``tests/_fakehub_site/sitecustomize.py``
and ``MERGEBAKE_FAKE_HUB=<state folder>``.

Simplifications: model repos only; commits are a linear history per branch; a file is
stored with LFS when its name looks binary (``*.safetensors`` ...) or it exceeds 10 MiB;
no pagination; no pull requests.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

import httpx2

ENV = "MERGEBAKE_FAKE_HUB"
TOKEN_ENV = "MERGEBAKE_FAKE_HUB_TOKEN"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".model", ".gguf", ".png", ".h5")
LFS_MIN_BYTES = 10 * 1024 * 1024
_SHA1 = re.compile(r"^[0-9a-f]{40}$")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


def _is_lfs(path: str, size: int) -> bool:
    return path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_BYTES


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class FakeHub:
    """The fake's state in folder ``root``; ``token`` is the one write token it accepts."""

    def __init__(
        self, root: str | os.PathLike, *, token: str | None = None, user: str = "fake-user"
    ):
        self.root = Path(root)
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        (self.root / "repos").mkdir(exist_ok=True)
        self.token, self.user = token, user

    # ------------------------------------------------------------------ state

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / "lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _repo_file(self, repo: str) -> Path:
        return self.root / "repos" / repo / "repo.json"

    def _load(self, repo: str) -> dict[str, Any] | None:
        p = self._repo_file(repo)
        return json.loads(p.read_text()) if p.is_file() else None

    def _save(self, repo: str, state: dict[str, Any]) -> None:
        p = self._repo_file(repo)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        os.replace(tmp, p)

    def _put_object(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        p = self.root / "objects" / sha
        if not p.exists():
            tmp = p.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, p)
        return sha

    def _object(self, sha256: str) -> bytes:
        return (self.root / "objects" / sha256).read_bytes()

    def _has_object(self, sha256: str) -> bool:
        return (self.root / "objects" / sha256).is_file()

    def _entry(self, path: str, data: bytes) -> dict[str, Any]:
        sha = self._put_object(data)
        lfs = _is_lfs(path, len(data))
        blob = git_blob_id(_lfs_pointer(sha, len(data)) if lfs else data)
        return {"sha256": sha, "size": len(data), "lfs": lfs, "blob_id": blob}

    def _new_commit(
        self,
        state: dict,
        branch: str,
        files: dict,
        summary: str,
        description: str = "",
        added=(),
        deleted=(),
    ) -> str:
        parent = state["refs"].get(branch)
        n = len(state["commits"])
        oid = hashlib.sha1(
            json.dumps([parent, files, summary, n], sort_keys=True).encode()
        ).hexdigest()
        state["commits"][oid] = {
            "oid": oid,
            "parent": parent,
            "summary": summary,
            "description": description,
            "files": files,
            "added": sorted(added),
            "deleted": sorted(deleted),
            "n": n,
            "date": f"2026-01-01T00:{n // 60 % 60:02d}:{n % 60:02d}.000Z",
        }
        state["refs"][branch] = oid
        return oid

    def _log(self, request: httpx2.Request) -> None:
        with open(self.root / "requests.jsonl", "a") as fh:
            fh.write(
                json.dumps({"pid": os.getpid(), "method": request.method, "path": request.url.path})
                + "\n"
            )

    # ------------------------------------------------------------------ seeding + inspection

    def create(self, repo: str, *, private: bool = False, gated: bool = False) -> None:
        """Create ``repo`` with an initial commit holding ``.gitattributes``."""
        with self._locked():
            if self._load(repo) is not None:
                return
            state = {"private": private, "gated": gated, "refs": {}, "commits": {}, "tags": {}}
            files = {
                ".gitattributes": self._entry(
                    ".gitattributes", b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
                )
            }
            self._new_commit(state, "main", files, "initial commit", added=list(files))
            self._save(repo, state)

    def seed(
        self,
        repo: str,
        files: dict[str, bytes],
        *,
        message: str = "seed",
        branch: str = "main",
        private: bool = False,
        gated: bool = False,
    ) -> str:
        """Commit ``files`` to ``repo`` (created when missing) directly; returns the oid."""
        self.create(repo, private=private, gated=gated)
        with self._locked():
            state = self._load(repo)
            head = state["refs"].get(branch) or state["refs"]["main"]
            tree = dict(state["commits"][head]["files"])
            for path, data in files.items():
                tree[path] = self._entry(path, data)
            oid = self._new_commit(state, branch, tree, message, added=list(files))
            self._save(repo, state)
        return oid

    def tag(self, repo: str, name: str, oid: str) -> None:
        with self._locked():
            state = self._load(repo)
            state["tags"][name] = oid
            self._save(repo, state)

    def fail_next(self, kind: str, times: int = 1, status: int = 503) -> None:
        """Make the next ``times`` requests of ``kind`` (e.g. ``commit``) fail with ``status``."""
        with self._locked():
            p = self.root / "faults.json"
            faults = json.loads(p.read_text()) if p.is_file() else {}
            faults[kind] = {"times": times, "status": status}
            p.write_text(json.dumps(faults))

    def _fault(self, kind: str) -> int | None:
        p = self.root / "faults.json"
        if not p.is_file():
            return None
        with self._locked():
            faults = json.loads(p.read_text())
            f = faults.get(kind)
            if not f or f["times"] <= 0:
                return None
            f["times"] -= 1
            p.write_text(json.dumps(faults))
            return f["status"]

    def history(self, repo: str, branch: str = "main") -> list[dict[str, Any]]:
        """Commits of ``branch``, oldest first: ``{oid, summary, description, added, deleted}``."""
        state = self._load(repo)
        out, oid = [], state["refs"].get(branch)
        while oid:
            c = state["commits"][oid]
            out.append({k: c[k] for k in ("oid", "summary", "description", "added", "deleted")})
            oid = c["parent"]
        return out[::-1]

    def files(self, repo: str, revision: str = "main") -> dict[str, bytes]:
        """``{path: content}`` of ``repo`` at ``revision``."""
        state = self._load(repo)
        tree = state["commits"][self._resolve(state, revision)]["files"]
        return {p: self._object(e["sha256"]) for p, e in tree.items()}

    def head(self, repo: str, branch: str = "main") -> str:
        return self._load(repo)["refs"][branch]

    def is_private(self, repo: str) -> bool:
        return self._load(repo)["private"]

    def requests(self) -> list[dict[str, Any]]:
        p = self.root / "requests.jsonl"
        return [json.loads(line) for line in p.read_text().splitlines()] if p.is_file() else []

    # ------------------------------------------------------------------ transport

    def transport(self) -> httpx2.MockTransport:
        return httpx2.MockTransport(self.handle)

    def client_factory(self):
        """A factory for :func:`huggingface_hub.set_client_factory`: the fake transport."""
        from huggingface_hub.utils._http import hf_request_event_hook

        def factory() -> httpx2.Client:
            return httpx2.Client(
                transport=self.transport(),
                follow_redirects=True,
                timeout=None,
                event_hooks={"request": [hf_request_event_hook]},
            )

        return factory

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        self._log(request)
        try:
            return self._dispatch(request)
        except HubError as e:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            return httpx2.Response(e.status, headers=headers, json={"error": e.message, **e.extra})

    # ------------------------------------------------------------------ helpers

    def _authed(self, request: httpx2.Request) -> bool:
        auth = request.headers.get("authorization", "")
        return self.token is not None and auth == f"Bearer {self.token}"

    def _need_write(self, request: httpx2.Request) -> None:
        if not self._authed(request):
            raise HubError(401, "Invalid credentials in Authorization header")

    def _read_state(self, request: httpx2.Request, repo: str) -> dict[str, Any]:
        state = self._load(repo)
        if state is None or (state["private"] and not self._authed(request)):
            raise HubError(
                401 if not self._authed(request) else 404, "Repository not found", "RepoNotFound"
            )
        if state.get("gated") and not self._authed(request):
            raise HubError(401, "Access to this gated repo is restricted", "GatedRepo")
        return state

    @staticmethod
    def _resolve(state: dict[str, Any], rev: str) -> str:
        if rev in state["refs"]:
            return state["refs"][rev]
        if rev in state.get("tags", {}):
            return state["tags"][rev]
        if _SHA1.match(rev) and rev in state["commits"]:
            return rev
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    @staticmethod
    def _tree_entry(path: str, e: dict[str, Any]) -> dict[str, Any]:
        out = {"type": "file", "oid": e["blob_id"], "size": e["size"], "path": path}
        if e["lfs"]:
            out["lfs"] = {"oid": e["sha256"], "size": e["size"], "pointerSize": 134}
        return out

    def _last_commit(self, state: dict, oid: str, path: str) -> dict[str, str]:
        c = state["commits"][oid]
        while c["parent"] and state["commits"][c["parent"]]["files"].get(path) == c["files"].get(
            path
        ):
            c = state["commits"][c["parent"]]
        return {"id": c["oid"], "title": c["summary"], "date": c["date"]}

    def _listing(
        self, state: dict, oid: str, path: str, recursive: bool, expand: bool
    ) -> list[dict[str, Any]]:
        files = state["commits"][oid]["files"]
        prefix = f"{path.strip('/')}/" if path else ""
        if path and path in files:
            raise HubError(400, f"{path} is a file, not a folder")
        under = {p: e for p, e in files.items() if p.startswith(prefix)}
        if path and not under:
            raise HubError(404, f"{path} does not exist at {oid}", "EntryNotFound")
        out: dict[str, dict[str, Any]] = {}
        for p, e in sorted(under.items()):
            rest = p[len(prefix) :]
            parts = rest.split("/")
            for i in range(1, len(parts)):
                d = prefix + "/".join(parts[:i])
                if recursive or i == 1:
                    out.setdefault(
                        d,
                        {"type": "directory", "oid": git_blob_id(d.encode()), "size": 0, "path": d},
                    )
            if recursive or len(parts) == 1:
                out[p] = self._tree_entry(p, e)
                if expand:
                    out[p]["lastCommit"] = self._last_commit(state, oid, p)
        return list(out.values())

    # ------------------------------------------------------------------ routes

    def _dispatch(self, request: httpx2.Request) -> httpx2.Response:
        raw = request.url.raw_path.decode().split("?")[0]
        seg = [s for s in raw.split("/") if s]
        m = request.method
        base = f"{request.url.scheme}://{request.url.netloc.decode()}"

        if seg[:2] == ["api", "whoami-v2"]:
            if not self._authed(request):
                raise HubError(401, "Invalid credentials in Authorization header")
            return httpx2.Response(
                200,
                json={
                    "type": "user",
                    "name": self.user,
                    "auth": {"accessToken": {"role": "write"}},
                },
            )
        if seg[:3] == ["api", "repos", "create"] and m == "POST":
            return self._create_repo(request, base)
        if seg[:2] == ["api", "validate-yaml"] and m == "POST":
            return self._validate_yaml(request)
        if seg and seg[0] == "__fake_lfs__":
            return self._lfs_object(request, seg)
        if len(seg) >= 4 and seg[0] == "api" and seg[1] == "models":
            repo = f"{unquote(seg[2])}/{unquote(seg[3])}"
            rest = seg[4:]
            if not rest and m == "GET":
                return self._model_info(request, repo, "main")
            if rest[:1] == ["revision"] and m == "GET":
                return self._model_info(request, repo, unquote(rest[1]))
            if rest[:1] == ["tree"] and m == "GET":
                return self._tree(request, repo, unquote(rest[1]), unquote("/".join(rest[2:])))
            if rest[:1] == ["paths-info"] and m == "POST":
                return self._paths_info(request, repo, unquote(rest[1]))
            if rest[:1] == ["preupload"] and m == "POST":
                return self._preupload(request, repo, unquote(rest[1]))
            if rest[:1] == ["commit"] and m == "POST":
                return self._commit(request, repo, unquote(rest[1]), base)
        if (
            len(seg) >= 2
            and seg[1].endswith(".git")
            and seg[2:] == ["info", "lfs", "objects", "batch"]
        ):
            return self._lfs_batch(request, f"{unquote(seg[0])}/{unquote(seg[1])[:-4]}", base)
        if len(seg) >= 5 and seg[2] == "resolve" and m in ("GET", "HEAD"):
            repo = f"{unquote(seg[0])}/{unquote(seg[1])}"
            return self._resolve_file(request, repo, unquote(seg[3]), unquote("/".join(seg[4:])))
        raise HubError(404, f"the fake Hub has no route for {m} {raw}")

    def _create_repo(self, request: httpx2.Request, base: str) -> httpx2.Response:
        self._need_write(request)
        body = json.loads(request.read())
        if body.get("type", "model") != "model":
            raise HubError(400, "the fake Hub only has model repos")
        repo = f"{body.get('organization') or self.user}/{body['name']}"
        if self._load(repo) is not None:
            raise HubError(409, "You already created this model repo", url=f"{base}/{repo}")
        self.create(repo, private=body.get("visibility") == "private" or bool(body.get("private")))
        return httpx2.Response(200, json={"url": f"{base}/{repo}", "name": repo})

    def _validate_yaml(self, request: httpx2.Request) -> httpx2.Response:
        import yaml

        content = json.loads(request.read())["content"]
        m = re.match(r"^\s*---\s*\n(.*?)\n---\s*\n", content, re.S)
        try:
            meta = yaml.safe_load(m.group(1)) if m else {}
        except yaml.YAMLError as e:
            return httpx2.Response(400, json={"errors": [{"message": str(e)}]})
        if not isinstance(meta, dict):
            return httpx2.Response(400, json={"errors": [{"message": "not a mapping"}]})
        return httpx2.Response(200, json={"errors": [], "warnings": []})

    def _model_info(self, request: httpx2.Request, repo: str, rev: str) -> httpx2.Response:
        state = self._read_state(request, repo)
        oid = self._resolve(state, rev)
        files = state["commits"][oid]["files"]
        return httpx2.Response(
            200,
            json={
                "id": repo,
                "modelId": repo,
                "sha": oid,
                "private": state["private"],
                "gated": bool(state.get("gated")),
                "disabled": False,
                "tags": [],
                "lastModified": state["commits"][oid]["date"],
                "siblings": [{"rfilename": p} for p in sorted(files)],
            },
        )

    def _tree(self, request: httpx2.Request, repo: str, rev: str, path: str) -> httpx2.Response:
        state = self._read_state(request, repo)
        oid = self._resolve(state, rev)
        q = parse_qs(request.url.query.decode())
        recursive = q.get("recursive", ["False"])[0].lower() == "true"
        expand = q.get("expand", ["False"])[0].lower() == "true"
        return httpx2.Response(200, json=self._listing(state, oid, path, recursive, expand))

    def _paths_info(self, request: httpx2.Request, repo: str, rev: str) -> httpx2.Response:
        state = self._read_state(request, repo)
        oid = self._resolve(state, rev)
        form = parse_qs(request.read().decode())
        files = state["commits"][oid]["files"]
        out = []
        for p in form.get("paths", []):
            if p in files:
                out.append(self._tree_entry(p, files[p]))
            elif any(f.startswith(p.rstrip("/") + "/") for f in files):
                out.append(
                    {"type": "directory", "oid": git_blob_id(p.encode()), "size": 0, "path": p}
                )
        return httpx2.Response(200, json=out)

    def _preupload(self, request: httpx2.Request, repo: str, rev: str) -> httpx2.Response:
        self._need_write(request)
        state = self._read_state(request, repo)
        if "create_pr" in parse_qs(request.url.query.decode()):
            raise HubError(400, "the fake Hub has no pull requests")
        files = state["commits"][self._resolve(state, rev)]["files"]
        out = []
        for f in json.loads(request.read())["files"]:
            lfs = _is_lfs(f["path"], f["size"])
            entry = {
                "path": f["path"],
                "uploadMode": "lfs" if lfs else "regular",
                "shouldIgnore": False,
            }
            remote = files.get(f["path"])
            if remote is not None:
                entry["oid"] = remote["sha256"] if lfs else remote["blob_id"]
            out.append(entry)
        return httpx2.Response(200, json={"files": out, "commitOid": self._resolve(state, rev)})

    def _lfs_batch(self, request: httpx2.Request, repo: str, base: str) -> httpx2.Response:
        self._need_write(request)
        self._read_state(request, repo)
        body = json.loads(request.read())
        objects = []
        for o in body["objects"]:
            obj = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if not self._has_object(o["oid"]):
                obj["actions"] = {
                    "upload": {"href": f"{base}/__fake_lfs__/{o['oid']}", "header": {}},
                    "verify": {"href": f"{base}/__fake_lfs__/verify", "header": {}},
                }
            objects.append(obj)
        return httpx2.Response(200, json={"transfer": "basic", "objects": objects})

    def _lfs_object(self, request: httpx2.Request, seg: list[str]) -> httpx2.Response:
        if seg[1:] == ["verify"] and request.method == "POST":
            body = json.loads(request.read())
            if not self._has_object(body["oid"]):
                raise HubError(404, "object not uploaded")
            return httpx2.Response(200, json={})
        if request.method == "PUT":
            status = self._fault("lfs")
            if status:
                raise HubError(status, "fake transient LFS failure")
            data = request.read()
            if hashlib.sha256(data).hexdigest() != seg[1]:
                raise HubError(400, "sha256 mismatch")
            self._put_object(data)
            return httpx2.Response(200)
        raise HubError(405, "method not allowed")

    def _commit(self, request: httpx2.Request, repo: str, rev: str, base: str) -> httpx2.Response:
        self._need_write(request)
        status = self._fault("commit")
        if status:
            raise HubError(status, "fake transient commit failure")
        if "create_pr" in parse_qs(request.url.query.decode()):
            raise HubError(400, "the fake Hub has no pull requests")
        lines = [json.loads(x) for x in request.read().decode().splitlines() if x.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        with self._locked():
            state = self._read_state(request, repo)
            head = self._resolve(state, rev)
            if rev not in state["refs"]:
                raise HubError(400, "commits go to a branch")
            if header.get("parentCommit") and header["parentCommit"] != head:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(state["commits"][head]["files"])
            added, deleted = [], []
            for x in lines:
                v = x["value"]
                if x["key"] == "file":
                    tree[v["path"]] = self._entry(v["path"], base64.b64decode(v["content"]))
                    added.append(v["path"])
                elif x["key"] == "lfsFile":
                    if not self._has_object(v["oid"]):
                        raise HubError(
                            422, f"LFS object {v['oid']} of {v['path']} was never uploaded"
                        )
                    data = self._object(v["oid"])
                    tree[v["path"]] = {
                        "sha256": v["oid"],
                        "size": len(data),
                        "lfs": True,
                        "blob_id": git_blob_id(_lfs_pointer(v["oid"], len(data))),
                    }
                    added.append(v["path"])
                elif x["key"] == "deletedFile":
                    if v["path"] not in tree:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                    del tree[v["path"]]
                    deleted.append(v["path"])
                elif x["key"] == "deletedFolder":
                    prefix = v["path"].rstrip("/") + "/"
                    gone = [p for p in tree if p.startswith(prefix)]
                    for p in gone:
                        del tree[p]
                    deleted += gone
            oid = self._new_commit(
                state, rev, tree, header["summary"], header.get("description", ""), added, deleted
            )
            self._save(repo, state)
        return httpx2.Response(
            200,
            json={
                "success": True,
                "commitOid": oid,
                "commitUrl": f"{base}/{repo}/commit/{oid}",
                "hookOutput": "",
                "pullRequestUrl": None,
            },
        )

    def _resolve_file(
        self, request: httpx2.Request, repo: str, rev: str, path: str
    ) -> httpx2.Response:
        state = self._read_state(request, repo)
        oid = self._resolve(state, rev)
        e = state["commits"][oid]["files"].get(path)
        if e is None:
            raise HubError(404, "Entry not found", "EntryNotFound")
        headers = {
            "X-Repo-Commit": oid,
            "ETag": f'"{e["blob_id"]}"',
            "Content-Length": str(e["size"]),
            "Content-Type": "application/octet-stream",
        }
        if e["lfs"]:
            headers.update({"X-Linked-Etag": f'"{e["sha256"]}"', "X-Linked-Size": str(e["size"])})
        body = b"" if request.method == "HEAD" else self._object(e["sha256"])
        return httpx2.Response(200, headers=headers, content=body)


def install(hub: FakeHub) -> None:
    """Route every huggingface_hub request of this process to ``hub`` (never the network)."""
    from huggingface_hub import constants, set_client_factory

    if not constants.HF_HUB_DISABLE_XET:
        raise RuntimeError("the fake Hub needs HF_HUB_DISABLE_XET=1 (Xet is not faked)")
    set_client_factory(hub.client_factory())


def install_from_env() -> FakeHub | None:
    """Install the fake named by ``MERGEBAKE_FAKE_HUB`` (its state folder), if set."""
    root = os.environ.get(ENV)
    if not root:
        return None
    hub = FakeHub(root, token=os.environ.get(TOKEN_ENV))
    install(hub)
    return hub
