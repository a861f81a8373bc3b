"""Publish merged cells to the Hub results repo, or write receipts of what would be sent.

Every cell goes to ``<repo>/<size>-<variant>/<group>__<method>/`` with its model card as
``README.md`` (:mod:`mergebake.modelcard`); the repo's own ``README.md`` holds the grid
table (:func:`publish_readme`). With ``hub.enabled: false`` (the demo) nothing is sent:
the card is written locally and the receipt lists what an upload would send.

With it on, :func:`upload_cell`:

1. ``create_repo(repo, private=..., exist_ok=True)``; a public repo is refused when
   ``hub.private`` is true (nothing is uploaded to it);
2. lists the cell's folder on the Hub at the current head and compares every file with the
   local one (LFS files by sha256, others by git blob sha1); files that are already there
   with the same content are not sent again, and remote files the cell no longer has are
   deleted;
3. if anything differs, one ``upload_folder`` call (``allow_patterns`` = the changed files,
   ``delete_patterns`` = the stale ones) makes one commit whose message names the cell and
   its recipe; an unchanged cell makes no commit at all;
4. retries transient failures (connection errors, timeouts, HTTP 408/409/429/5xx) with
   exponential backoff (:func:`mergebake.hub.with_retries`), starting again from step 1
   so that a retry after a commit that did land sends nothing twice;
5. writes the receipt (repo, path, commit oid, url, file list with sha256) only after the
   commit succeeded.

The token comes from huggingface_hub (``HF_TOKEN`` or ``hf auth login``) and is never
passed, logged or recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import MergebakeError
from .hub import BACKOFF_S, RETRIES, commit_url, hub_url, with_retries
from .outputs import atomic_file, link_or_copy, recorded_sha256, sha256_file, write_json

log = logging.getLogger(__name__)
README = "README.md"


def payload_files(cell_dir: Path) -> dict[str, Path]:
    """Files of a cell folder to publish: every regular file, hidden ones left out.

    Hidden names (e.g. Snakemake's ``.snakemake_timestamp``) are bookkeeping, not model.
    """
    cell_dir = Path(cell_dir)
    out = {}
    for p in sorted(cell_dir.rglob("*")):
        rel = p.relative_to(cell_dir)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out[rel.as_posix()] = p
    return out


def git_blob_sha1(path: Path) -> str:
    """Git's blob id of a file: sha1 of ``b"blob <size>\\0" + content`` (the Hub's oid)."""
    h = hashlib.sha1()
    h.update(f"blob {Path(path).stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        while chunk := fh.read(16 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def _fnmatch_escape(name: str) -> str:
    """``name`` as an fnmatch pattern matching only itself (huggingface_hub filters)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _cell_recipe(cell_dir: Path) -> tuple[str | None, dict[str, Any]]:
    prov = Path(cell_dir) / "provenance.json"
    if not prov.is_file():
        return None, {}
    params = json.loads(prov.read_text()).get("params", {})
    template = params.get("recipe_template")
    return (Path(template).stem if template else None), params.get("parameters") or {}


def _fmt_value(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt_value(x)}" for k, x in sorted(v.items())) + "}"
    return json.dumps(v) if isinstance(v, str | bool) or v is None else str(v)


def default_commit_message(path_in_repo: str, cell_dir: Path) -> str:
    """``Upload <base>/<group>__<method>: <group> merged with <method> (recipe ...; params)``."""
    group, _, method = path_in_repo.rsplit("/", 1)[-1].partition("__")
    recipe, params = _cell_recipe(cell_dir)
    bits = [f"recipe {recipe or method}"]
    if params:
        bits.append(", ".join(f"{k}={_fmt_value(v)}" for k, v in sorted(params.items())))
    return f"Upload {path_in_repo}: {group} merged with {method} ({'; '.join(bits)})"


def _remote_files(api: Any, repo: str, folder: str, revision: str) -> dict[str, Any]:
    """``{path relative to folder: RepoFile}`` of the files under ``folder`` at ``revision``."""
    from huggingface_hub.errors import RemoteEntryNotFoundError

    prefix = f"{folder.strip('/')}/" if folder else ""
    try:
        entries = list(
            api.list_repo_tree(
                repo, path_in_repo=folder or None, recursive=True, expand=True, revision=revision
            )
        )
    except RemoteEntryNotFoundError:
        return {}
    out = {}
    for f in entries:
        if hasattr(f, "blob_id") and f.path.startswith(prefix):  # RepoFile, not RepoFolder
            out[f.path[len(prefix) :]] = f
    return out


def _last_commit(remote: dict[str, Any], head: str) -> str:
    """The newest commit that touched any of the folder's files (else ``head``).

    An unchanged cell records the commit its content came from, not the repo head, so the
    repo README's links do not change when nothing in the cell did.
    """
    commits = [f.last_commit for f in remote.values() if getattr(f, "last_commit", None)]
    return max(commits, key=lambda c: c.date).oid if commits else head


def _same(remote: Any, local: Path, sha256: str) -> bool:
    if remote is None:
        return False
    lfs = getattr(remote, "lfs", None)
    if lfs is not None:
        return lfs.sha256 == sha256
    return remote.blob_id == git_blob_sha1(local)


def _stage(files: dict[str, Path], where: Path) -> Path:
    """A folder beside the receipt with ``files`` hard-linked (or copied) in."""
    stage = where.parent / f".{where.name}.upload-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    for rel, src in files.items():
        dst = stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(src, dst)
    return stage


def _check_visibility(info: Any, repo: str, private: bool) -> None:
    if private and getattr(info, "private", None) is False:
        raise MergebakeError(
            f"hub.private is true but the Hub repo {repo!r} is public; nothing was uploaded. "
            "Make the repo private in its settings on the Hub, or set hub.private: false"
        )


def _commit_info(result: Any, repo: str, head: str | None) -> tuple[str | None, str | None]:
    if result is None:  # unchanged: ``head`` is the commit the content came from
        return head, commit_url(repo, head) if head else None
    oid = getattr(result, "oid", None)
    return oid, getattr(result, "commit_url", None) or (commit_url(repo, oid) if oid else None)


def gguf_entries(
    gguf: Sequence[str | os.PathLike], path_in_repo: str, repo: str | None
) -> list[dict[str, Any]]:
    """What the receipt and model card say of each GGUF file of a cell.

    ``gguf`` are files written by :func:`mergebake.export.export_gguf`, each with its
    sidecar ``<file>.json``; ``path_in_repo`` the cell's folder (the file goes to
    ``<path_in_repo>/<file name>``) and ``repo`` the repo it goes to. Each entry:
    ``{type, file, repo, path_in_repo, bytes, sha256, checked_by, check}`` with ``check``
    the llama.cpp logit comparison of the sidecar (top-1 agreement, max |Δlogit| and
    tolerances per prompt). The sidecar's sha256 is taken without reading the file while
    the file has the recorded size and is no newer than its sidecar; otherwise the file is
    hashed and must match. Raises :class:`MergebakeError` naming a GGUF without a sidecar,
    or whose sidecar does not describe it (size or sha256 differ: rerun its export job).
    """
    out = []
    for f in gguf:
        f = Path(f)
        side = Path(f"{f}.json")
        try:
            info = json.loads(side.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise MergebakeError(
                f"{side}: cannot read the GGUF's check record ({e}); rerun its export job"
            ) from e
        st, side_mtime = f.stat(), side.stat().st_mtime_ns
        size = st.st_size
        if info.get("bytes") == size and st.st_mtime_ns <= side_mtime and info.get("sha256"):
            # the export's own hash (sidecar written after the file, file unchanged since:
            # the rule of mergebake.outputs.file_manifest); a GGUF is gigabytes
            digest = info["sha256"]
        else:
            digest = sha256_file(f)
        if info.get("bytes") != size or info.get("sha256") != digest:
            raise MergebakeError(
                f"{f}: its sidecar {side.name} describes another file (bytes/sha256 differ); "
                "rerun its export job"
            )
        conv = info.get("converter") or {}
        out.append(
            {
                "type": info["type"],
                "file": f.name,
                "repo": repo,
                "path_in_repo": f"{path_in_repo}/{f.name}",
                "bytes": size,
                "sha256": digest,
                "checked_by": f"llama.cpp ({conv.get('package')} {conv.get('version')})",
                "check": (info.get("check") or {}).get("logits"),
            }
        )
    return out


def upload_cell(
    cell_dir: Path,
    receipt: Path,
    *,
    repo: str | None,
    path_in_repo: str,
    enabled: bool = False,
    private: bool = True,
    card: str | None = None,
    card_out: Path | None = None,
    summary: dict[str, Any] | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    retries: int = RETRIES,
    backoff: float = BACKOFF_S,
    sleep: Callable[[float], None] = time.sleep,
    api: Any = None,
    gguf: Sequence[str | os.PathLike] = (),
    gguf_repo: str | None = None,
    subfolders: Mapping[str, Path] | None = None,
) -> dict[str, Any]:
    """Publish ``cell_dir`` (plus model card ``card`` as README.md) to ``repo/path_in_repo``.

    ``gguf``: the cell's GGUF files (with their ``.json`` sidecars); they go into the
    cell's folder of ``repo`` in the same commit, or, with ``gguf_repo``, into
    ``gguf_repo/path_in_repo`` in a commit of their own (same rules: only changed files
    are sent, stale ones under that folder deleted). The receipt then has ``gguf``
    (:func:`gguf_entries`) and, with ``gguf_repo``, ``gguf_commit``/``gguf_url``/
    ``gguf_changed``.

    With ``enabled`` false, sends nothing. Either way writes ``card`` to ``card_out`` and the
    receipt JSON to ``receipt`` (atomically; only after a successful commit when enabled)
    and returns it: ``{repo, path_in_repo, dry_run, private, commit, url, folder_url,
    commit_message, files: {path: {bytes, sha256}}, changed, deleted, unchanged, summary}``.
    ``changed``/``deleted`` are the files the commit added or replaced / removed (dry run:
    every file / none); ``unchanged`` is true when the Hub already held exactly these files
    and no commit was made (``commit`` is then the last commit that changed them).

    ``subfolders`` maps a folder name to a local folder published beside the model under
    ``<path_in_repo>/<name>/`` (an adapter-space cell's merged adapter: ``{"adapter":
    results/adapters/...}``); its files are in the manifest as ``<name>/<file>``.

    Raises :class:`MergebakeError` when ``cell_dir`` or a subfolder is missing, ``repo``
    is unset while enabled, a public repo would receive a private cell, or the upload fails (after
    retrying transient failures; see :func:`mergebake.hub.with_retries`).
    """
    cell_dir, receipt = Path(cell_dir), Path(receipt)
    if not cell_dir.is_dir():
        raise MergebakeError(f"{cell_dir}: merged cell folder not found; build it first")
    if enabled and not repo:
        raise MergebakeError("hub.repo is not set; name the results repo (owner/name)")
    files = payload_files(cell_dir)
    for name, folder in (subfolders or {}).items():
        if not Path(folder).is_dir():
            raise MergebakeError(f"{folder}: folder to upload as {name}/ not found; build it")
        clash = [rel for rel in files if rel.split("/")[0] == name]
        if clash:
            raise MergebakeError(f"{cell_dir}: already holds {clash[0]}; cannot add {name}/")
        files.update({f"{name}/{rel}": p for rel, p in payload_files(Path(folder)).items()})
    gguf_files = {}
    for f in gguf:
        gguf_files[Path(f).name] = Path(f)
        gguf_files[f"{Path(f).name}.json"] = Path(f"{f}.json")
    gguf_info = gguf_entries(gguf, path_in_repo, gguf_repo or repo) if gguf else None
    if not gguf_repo:
        files.update(gguf_files)
    # The cell's (and each subfolder's) own output record spares hashing it again, and so
    # does each GGUF's sidecar.
    digests: dict[Path, str] = {
        gguf_files[e["file"]]: e["sha256"] for e in (gguf_info or []) if e["file"] in gguf_files
    }
    for folder in (cell_dir, *map(Path, (subfolders or {}).values())):
        local = payload_files(folder)
        for rel, d in recorded_sha256(folder, local).items():
            digests[local[rel]] = d
    manifest = {
        rel: {"bytes": p.stat().st_size, "sha256": digests.get(p) or sha256_file(p)}
        for rel, p in files.items()
    }
    if card is not None:
        card_bytes = card.encode()
        manifest[README] = {
            "bytes": len(card_bytes),
            "sha256": hashlib.sha256(card_bytes).hexdigest(),
        }
        if card_out is not None:
            with atomic_file(card_out, "wb") as fh:
                fh.write(card_bytes)
    message = commit_message or default_commit_message(path_in_repo, cell_dir)
    record: dict[str, Any] = {
        "repo": repo,
        "path_in_repo": path_in_repo,
        "dry_run": not enabled,
        "private": private,
        "commit": None,
        "url": None,
        "folder_url": hub_url(repo, path_in_repo) if repo else None,
        "commit_message": message,
        "files": dict(sorted(manifest.items())),
        "changed": sorted(manifest),
        "deleted": [],
        "unchanged": False,
        "summary": summary,
    }
    if gguf_info is not None:
        record["gguf"] = gguf_info
        if gguf_repo:
            record.update(gguf_repo=gguf_repo, gguf_commit=None, gguf_url=None)
            record["gguf_changed"] = sorted(gguf_files)
    if enabled:
        from huggingface_hub import HfApi

        api = api or HfApi()
        # The card replaces a README.md the cell may hold (never written through its link).
        stage_files = {k: v for k, v in files.items() if card is None or k != README}
        extra = {README: card_bytes} if card is not None else {}
        result, head, changed, stale = _commit_folder(
            api, stage_files, extra, manifest, receipt,
            repo=repo, path_in_repo=path_in_repo, private=private, message=message,
            description=commit_description, what=f"upload of {cell_dir} to {repo}/{path_in_repo}",
            retries=retries, backoff=backoff, sleep=sleep,
        )  # fmt: skip
        oid, url = _commit_info(result, repo, head)
        record.update(
            commit=oid,
            url=url,
            changed=changed,
            deleted=stale,
            unchanged=result is None,
            folder_url=hub_url(repo, path_in_repo, rev=oid) if oid else None,
        )
        log.info(
            "%s/%s: %s %s",
            repo,
            path_in_repo,
            "unchanged at" if result is None else "committed",
            oid,
        )
        if gguf_repo and gguf_files:
            gmanifest = {
                rel: {"bytes": p.stat().st_size, "sha256": digests.get(p) or sha256_file(p)}
                for rel, p in gguf_files.items()
            }
            gresult, ghead, gchanged, _ = _commit_folder(
                api, gguf_files, {}, gmanifest, receipt,
                repo=gguf_repo, path_in_repo=path_in_repo, private=private,
                message=f"Upload GGUF of {path_in_repo}: {', '.join(e['type'] for e in gguf_info)}",
                description=None, what=f"upload of the GGUF files to {gguf_repo}/{path_in_repo}",
                retries=retries, backoff=backoff, sleep=sleep,
            )  # fmt: skip
            goid, gurl = _commit_info(gresult, gguf_repo, ghead)
            record.update(gguf_commit=goid, gguf_url=gurl, gguf_changed=gchanged)
    write_json(receipt, record)
    return record


def _commit_folder(
    api: Any,
    files: dict[str, Path],
    extra: dict[str, bytes],
    manifest: dict[str, dict[str, Any]],
    receipt: Path,
    *,
    repo: str,
    path_in_repo: str,
    private: bool,
    message: str,
    description: str | None,
    what: str,
    retries: int,
    backoff: float,
    sleep: Callable[[float], None],
) -> tuple[Any, str | None, list[str], list[str]]:
    """Make ``repo/path_in_repo`` hold exactly ``manifest``: stage ``files`` (hard links)
    and ``extra`` (bytes) beside ``receipt``, send only what differs and delete what the
    folder no longer has, in one commit (none when nothing differs), retrying transient
    failures. Returns ``(commit result or None, head, changed, deleted)``."""
    stage = _stage(files, receipt)
    try:
        for rel, data in extra.items():
            (stage / rel).write_bytes(data)

        def attempt() -> tuple[Any, str | None, list[str], list[str]]:
            api.create_repo(repo, private=private, exist_ok=True)
            info = api.model_info(repo)
            _check_visibility(info, repo, private)
            remote = _remote_files(api, repo, path_in_repo, info.sha)
            changed = [
                rel
                for rel in sorted(manifest)
                if not _same(remote.get(rel), stage / rel, manifest[rel]["sha256"])
            ]
            stale = sorted(set(remote) - set(manifest))
            if not changed and not stale:
                last = _last_commit(remote, info.sha)
                log.info(
                    "%s/%s: unchanged on the Hub (last changed in %s); no commit",
                    repo,
                    path_in_repo,
                    last,
                )
                return None, last, [], []
            log.info(
                "%s/%s: sending %d file(s) (%s), deleting %d",
                repo,
                path_in_repo,
                len(changed),
                ", ".join(changed),
                len(stale),
            )
            result = api.upload_folder(
                repo_id=repo,
                folder_path=str(stage),
                path_in_repo=path_in_repo,
                commit_message=message,
                commit_description=description,
                allow_patterns=[_fnmatch_escape(p) for p in changed],
                delete_patterns=[_fnmatch_escape(p) for p in stale] or None,
            )
            return result, info.sha, changed, stale

        result, head, changed, stale = with_retries(
            attempt,
            what=what,
            repo=repo,
            retries=retries,
            backoff=backoff,
            sleep=sleep,
        )
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return result, head, changed, stale


def publish_readme(
    text: str,
    receipt: Path,
    *,
    repo: str | None,
    enabled: bool = False,
    private: bool = True,
    readme_out: Path | None = None,
    commit_message: str = "Update README (grid table)",
    retries: int = RETRIES,
    backoff: float = BACKOFF_S,
    sleep: Callable[[float], None] = time.sleep,
    api: Any = None,
) -> dict[str, Any]:
    """Publish the repo-level README (the grid table) as ``README.md`` at the repo root.

    Commits only when the Hub's README differs (one ``upload_file`` commit); writes the
    text to ``readme_out`` and a receipt like :func:`upload_cell`'s, after the commit.
    """
    data = text.encode()
    if readme_out is not None:
        with atomic_file(readme_out, "wb") as fh:
            fh.write(data)
    record: dict[str, Any] = {
        "repo": repo,
        "path_in_repo": README,
        "dry_run": not enabled,
        "private": private,
        "commit": None,
        "url": None,
        "folder_url": hub_url(repo) if repo else None,
        "commit_message": commit_message,
        "files": {README: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}},
        "changed": [README],
        "deleted": [],
        "unchanged": False,
    }
    if enabled:
        from huggingface_hub import HfApi

        if not repo:
            raise MergebakeError("hub.repo is not set; name the results repo (owner/name)")
        api = api or HfApi()
        blob = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()

        def attempt() -> tuple[Any, str | None]:
            api.create_repo(repo, private=private, exist_ok=True)
            info = api.model_info(repo)
            _check_visibility(info, repo, private)
            remote = [
                f
                for f in api.get_paths_info(repo, [README], revision=info.sha)
                if getattr(f, "path", None) == README and hasattr(f, "blob_id")
            ]
            if remote and remote[0].blob_id == blob:
                return None, info.sha
            return api.upload_file(
                path_or_fileobj=data,
                path_in_repo=README,
                repo_id=repo,
                commit_message=commit_message,
            ), info.sha

        result, head = with_retries(
            attempt,
            what=f"upload of {README} to {repo}",
            repo=repo,
            retries=retries,
            backoff=backoff,
            sleep=sleep,
        )
        oid, url = _commit_info(result, repo, head)
        record.update(
            commit=oid,
            url=url,
            unchanged=result is None,
            changed=[] if result is None else [README],
        )
    write_json(receipt, record)
    return record


# ----------------------------------------------------------------------------- CLI


def _load_json_arg(text: str, flag: str) -> Any:
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MergebakeError(f"{flag}: not valid JSON ({e})") from e


def cli_upload(a) -> None:
    """``mergebake upload``: build the cell's card and publish it (or write a dry run)."""
    from .modelcard import build_cell_card, cell_scores, render_recipe

    card_text = summary = description = None
    if a.card:
        spec = _load_json_arg(a.card, "--card")
        spec.update(
            repo=a.repo or "your-org/your-repo", path_in_repo=a.path_in_repo, private=a.private
        )
        baseline = spec.get("baseline") or {}
        if not a.scores:
            raise MergebakeError("--card needs --scores (the cell's eval JSON)")
        summary = cell_scores(
            a.scores,
            baseline.get("eval"),
            spec.get("metrics"),
            baseline.get("name"),
            spec.get("uncertainty"),
        )
        if a.gguf:
            repo = a.gguf_repo or a.repo or "your-org/your-repo"
            spec["gguf"] = dict(
                repo=a.gguf_repo or None, files=gguf_entries(a.gguf, a.path_in_repo, repo)
            )
        card_text = str(build_cell_card(a.cell, spec, summary))
        description = f"Rendered recipe:\n\n```yaml\n{render_recipe(a.cell, spec)}```\n"
    rec = upload_cell(
        a.cell,
        a.receipt,
        repo=a.repo or None,
        path_in_repo=a.path_in_repo,
        enabled=a.enabled,
        private=a.private,
        card=card_text,
        card_out=a.card_out,
        summary=summary,
        commit_description=description,
        retries=a.retries,
        gguf=a.gguf or (),
        gguf_repo=a.gguf_repo or None,
        subfolders={"adapter": a.adapter_dir} if getattr(a, "adapter_dir", None) else None,
    )
    print(
        json.dumps(
            {
                k: rec[k]
                for k in (
                    "repo",
                    "path_in_repo",
                    "dry_run",
                    "commit",
                    "unchanged",
                    "changed",
                    "deleted",
                )
            }
        )
    )


def cli_hub_readme(a) -> None:
    """``mergebake hub-readme``: the repo-level README from the cells' receipts."""
    from .modelcard import build_repo_card

    rows = _load_json_arg(a.rows, "--rows")
    meta = _load_json_arg(a.meta, "--meta") if a.meta else {}
    cells = []
    for r in rows:
        try:
            rec = json.loads(Path(r["receipt"]).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise MergebakeError(
                f"{r.get('receipt')}: cannot read the upload receipt ({e}); run the upload step"
            ) from e
        cells.append(
            {
                **{k: r[k] for k in ("path_in_repo", "size", "variant", "group", "method")},
                "commit": rec.get("commit"),
                "summary": rec.get("summary"),
                **({"gguf": rec["gguf"]} if rec.get("gguf") else {}),
            }
        )
    repo = a.repo or "your-org/your-repo"
    card = build_repo_card(
        cells,
        repo=repo,
        license=meta.get("license"),
        languages=meta.get("languages"),
        base_models=meta.get("base_models"),
        private=a.private,
    )
    rec = publish_readme(
        str(card),
        a.receipt,
        repo=a.repo or None,
        enabled=a.enabled,
        private=a.private,
        readme_out=a.readme_out,
        commit_message=f"Update README: grid of {len(cells)} cell(s)",
        retries=a.retries,
    )
    print(json.dumps({k: rec[k] for k in ("repo", "dry_run", "commit", "unchanged")}))


def add_upload_arguments(sp) -> None:
    sp.add_argument("--cell", type=Path, required=True)
    sp.add_argument("--receipt", type=Path, required=True)
    sp.add_argument("--repo", required=True, help="results repo owner/name ('' for none)")
    sp.add_argument("--path-in-repo", required=True)
    sp.add_argument("--enabled", action="store_true", help="really upload (else a dry run)")
    sp.add_argument("--private", action="store_true", help="create the repo private")
    sp.add_argument("--scores", type=Path, help="the cell's eval JSON (for the model card)")
    card = sp.add_mutually_exclusive_group()
    card.add_argument("--card", help="model card spec as JSON, or @FILE (see mergebake.modelcard)")
    card.add_argument("--card-file", type=Path, help="file holding the model card spec (JSON)")
    sp.add_argument("--card-out", type=Path, help="where to write the model card locally")
    sp.add_argument(
        "--retries", type=int, default=RETRIES, help="attempts for transient Hub failures"
    )
    sp.add_argument(
        "--gguf",
        type=Path,
        action="append",
        help="a GGUF file of the cell (with its .json sidecar) to publish with it; repeatable",
    )
    sp.add_argument(
        "--gguf-repo", help="separate Hub repo (owner/name) for the GGUF files (export.gguf_repo)"
    )
    sp.add_argument(
        "--adapter-dir",
        type=Path,
        help="merged adapter folder of an adapter-space cell, uploaded as <path>/adapter/",
    )


def add_hub_readme_arguments(sp) -> None:
    rows = sp.add_mutually_exclusive_group(required=True)
    rows.add_argument(
        "--rows",
        help="JSON list of cells {path_in_repo, size, variant, group, method, receipt}, or @FILE",
    )
    rows.add_argument("--rows-file", type=Path, help="file holding that JSON list")
    meta = sp.add_mutually_exclusive_group()
    meta.add_argument("--meta", help="JSON {license, languages, base_models}, or @FILE")
    meta.add_argument("--meta-file", type=Path, help="file holding that JSON object")
    sp.add_argument("--receipt", type=Path, required=True)
    sp.add_argument("--readme-out", type=Path, help="where to write the README locally")
    sp.add_argument("--repo", required=True, help="results repo owner/name ('' for none)")
    sp.add_argument("--enabled", action="store_true")
    sp.add_argument("--private", action="store_true")
    sp.add_argument("--retries", type=int, default=RETRIES)
