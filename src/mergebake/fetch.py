"""Fetch a base model or LoRA adapter from the Hugging Face Hub, pinned to a commit.

A revision that is a branch or tag is resolved to its commit sha once (:func:`pin_revision`,
the workflow's ``pin`` job, which logs it and writes ``resources/pins/<repo>@<rev>.json``);
every fetch of that repo and revision then downloads that commit, so a push to the branch
during (or after) a run cannot mix commits. A commit sha needs no resolving.

Only the files a bake or merge needs are downloaded: the direct children of the repo (or of
``subfolder``) matching :data:`ALLOW_PATTERNS` (safetensors weights and their index,
configs, tokenizer and chat template, adapter files); nested folders are never pulled.
Downloads go through the Hub cache (``HF_HUB_CACHE``/``HF_HOME``), and the files are
hard-linked (or copied) from there into the output folder, so a second fetch of the same
commit downloads nothing. ``HF_HUB_OFFLINE=1`` is honoured: revisions resolve through the
cache's refs and files come from the cache, or the error says what is missing.

Calls to the Hub are retried on transient failures (network trouble, timeouts, HTTP
408/409/429/5xx) with exponential backoff, as uploads are (:func:`mergebake.hub.
with_retries`); a missing repo, revision or file fails at once.

Gated and private repos use the user's token (``HF_TOKEN`` or ``hf auth login``), which
huggingface_hub reads itself; it is never passed around, logged or written anywhere.
``provenance.json`` records ``source = {repo, subfolder, revision, commit}``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import MergebakeError
from .hub import BACKOFF_S, RETRIES, explain_hub_error, key_prefix, with_retries
from .outputs import atomic_dir, link_or_copy, write_json, write_provenance

log = logging.getLogger(__name__)

# File names (direct children of the repo root or subfolder) a fetch downloads.
ALLOW_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "adapter_config.json",
    "adapter_model.safetensors",
)
# Pickle adapter weights, fetched only where the config sets allow_pickle.
PICKLE_PATTERNS = ("adapter_model.bin",)
_SHA = re.compile(r"^[0-9a-f]{40}$")


def is_commit_sha(revision: str) -> bool:
    """True for a full 40-hex git commit sha (which needs no resolving)."""
    return bool(_SHA.match(revision or ""))


def pin_name(repo: str, revision: str) -> str:
    """File-name-safe key of ``repo@revision``: ``org--name@rev`` (``/`` in rev as ``%2F``)."""
    return f"{repo.replace('/', '--')}@{revision.replace('%', '%25').replace('/', '%2F')}"


def _failure(
    repo: str, revision: str | None, subfolder: str | None, config_key: str | None
) -> Callable[[BaseException, int], str]:
    """The error message of a fetch or pin that failed after ``attempts`` attempts."""

    def message(e: BaseException, attempts: int) -> str:
        text = explain_hub_error(
            e, repo=repo, revision=revision, subfolder=subfolder, config_key=config_key
        )
        return text + (f" (gave up after {attempts} attempts)" if attempts > 1 else "")

    return message


def resolve_revision(
    repo: str,
    revision: str,
    *,
    api: Any = None,
    config_key: str | None = None,
    retries: int = RETRIES,
    backoff: float = BACKOFF_S,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Resolve ``revision`` (branch, tag or sha) of model repo ``repo`` to a commit sha.

    A full sha is returned as is, without a network call. Otherwise the Hub is asked (or,
    offline, the Hub cache's refs), retrying transient failures (``retries`` attempts,
    waits from ``backoff`` seconds; :func:`mergebake.hub.with_retries`). Raises
    :class:`MergebakeError` for a missing repo or revision, a gated repo without access,
    an offline cache that lacks the revision, or a Hub that stays unreachable.
    """
    if is_commit_sha(revision):
        return revision
    from huggingface_hub import HfApi

    api = api or HfApi()
    resolved = with_retries(
        lambda: api.resolve_revision(repo, revision=revision),
        what=f"resolving {repo}@{revision}",
        failure=_failure(repo, revision, None, config_key),
        retries=retries,
        backoff=backoff,
        sleep=sleep,
    )
    return getattr(resolved, "resolved", None) or str(resolved)


def pin_revision(
    repo: str, revision: str, out: Path, *, api: Any = None, config_key: str | None = None
) -> dict[str, str]:
    """Resolve ``repo@revision`` once and write ``{repo, revision, commit}`` to ``out``.

    The fetches of that repo and revision read the commit from ``out``, so they all get the
    same one. Logs the pin. Returns the record.
    """
    commit = resolve_revision(repo, revision, api=api, config_key=config_key)
    record = {"repo": repo, "revision": revision, "commit": commit}
    log.info("pinned %s@%s to commit %s", repo, revision, commit)
    write_json(out, record)
    return record


def read_pin(path: Path, repo: str, revision: str) -> str:
    """The commit recorded in pin file ``path``, checked to be for ``repo@revision``."""
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MergebakeError(
            f"{path}: cannot read the pinned revision ({e}); delete it and "
            "run again to resolve the revision anew"
        ) from e
    if (rec.get("repo"), rec.get("revision")) != (repo, revision) or not is_commit_sha(
        rec.get("commit", "")
    ):
        raise MergebakeError(
            f"{path}: pins {rec.get('repo')}@{rec.get('revision')}, not "
            f"{repo}@{revision}; delete it and run again"
        )
    return rec["commit"]


def _patterns(prefix: str, allow_pickle: bool) -> tuple[list[str], list[str]]:
    names = ALLOW_PATTERNS + (PICKLE_PATTERNS if allow_pickle else ())
    # fnmatch's * crosses '/', so nested folders are excluded explicitly.
    return [prefix + p for p in names], [prefix + "*/*"]


def _candidates(repo: str, commit: str, cache_dir: str | None) -> str:
    """Folders of the repo at ``commit`` that hold a checkpoint or adapter (from the cache)."""
    try:
        from huggingface_hub import get_cached_repo_tree

        paths = [f.path for f in get_cached_repo_tree(repo, revision=commit, cache_dir=cache_dir)]
    except Exception:  # nothing cached: no suggestion
        return ""
    found = sorted(
        {
            p.rpartition("/")[0] or "."
            for p in paths
            if p.rpartition("/")[2] in ("config.json", "adapter_config.json")
        }
    )
    return f"; folders with a config there: {', '.join(found)}" if found else ""


def fetch(
    repo: str,
    revision: str,
    out: Path,
    *,
    subfolder: str | None = None,
    commit: str | None = None,
    allow_pickle: bool = False,
    cache_dir: str | None = None,
    config_key: str | None = None,
    api: Any = None,
    retries: int = RETRIES,
    backoff: float = BACKOFF_S,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Download ``repo@revision`` (only ``subfolder`` when given) into ``out``.

    ``commit`` is the sha the revision was pinned to (from :func:`pin_revision`); without
    it the revision is resolved here. The files of ``subfolder`` land directly in ``out``
    (hard links into the Hub cache where possible). ``provenance.json`` records
    ``source = {repo, subfolder, revision, commit}``; that dict is returned.

    Transient failures are retried (``retries`` attempts, waits from ``backoff`` seconds;
    :func:`mergebake.hub.with_retries`); files already downloaded stay in the Hub cache,
    so a retry only fetches what is missing. Raises :class:`MergebakeError` (naming
    ``config_key`` when given) for a missing repo, revision or subfolder, a gated or
    private repo without access, an offline cache that lacks the files, or a Hub that
    stays unreachable; nothing is left at ``out`` then.
    """
    from huggingface_hub import snapshot_download

    retrying = {"retries": retries, "backoff": backoff, "sleep": sleep}
    commit = commit or resolve_revision(repo, revision, api=api, config_key=config_key, **retrying)
    if commit != revision:
        log.info("%s@%s is pinned to commit %s", repo, revision, commit)
    sub = subfolder.strip("/") if subfolder else ""
    prefix = f"{sub}/" if sub else ""
    allow, ignore = _patterns(prefix, allow_pickle)
    snapshot = with_retries(
        lambda: snapshot_download(
            repo_id=repo,
            revision=commit,
            allow_patterns=allow,
            ignore_patterns=ignore,
            cache_dir=cache_dir,
        ),
        what=f"download of {repo}@{commit}",
        failure=_failure(repo, commit, sub, config_key),
        **retrying,
    )
    src = Path(snapshot) / sub if sub else Path(snapshot)
    files = sorted(p for p in src.iterdir() if p.is_file()) if src.is_dir() else []
    if not files:
        raise MergebakeError(
            f"{key_prefix(config_key)}Hub repo {repo!r}@{commit}: no checkpoint or adapter files "
            f"under {sub or 'the repo root'!r}; check 'subfolder'"
            + _candidates(repo, commit, cache_dir)
        )
    with atomic_dir(out) as tmp:
        for p in files:
            link_or_copy(os.path.realpath(p), tmp / p.name)
        source = {"repo": repo, "subfolder": subfolder, "revision": revision, "commit": commit}
        write_provenance(tmp, step="fetch", inputs={}, params={}, source=source)
    log.info(
        "fetched %d file(s) of %s@%s%s into %s: %s",
        len(files),
        repo,
        commit,
        f" ({sub})" if sub else "",
        out,
        ", ".join(p.name for p in files),
    )
    return source


def cli_pin(a) -> None:
    """``mergebake pin``: resolve a revision once and write the pin file."""
    rec = pin_revision(a.repo, a.revision, a.out, config_key=a.config_key)
    print(json.dumps(rec))


def cli_fetch(a) -> None:
    """``mergebake fetch``: download a base or adapter, pinned to a commit."""
    commit = read_pin(a.pin, a.repo, a.revision) if a.pin else None
    src = fetch(
        a.repo,
        a.revision,
        a.out,
        subfolder=a.subfolder,
        commit=commit,
        allow_pickle=a.allow_pickle,
        config_key=a.config_key,
    )
    print(json.dumps(src))


def add_pin_arguments(sp) -> None:
    sp.add_argument("--repo", required=True)
    sp.add_argument("--revision", required=True, help="branch or tag to resolve")
    sp.add_argument("--out", type=Path, required=True, help="pin file (JSON) to write")
    sp.add_argument("--config-key", help="config key named in errors, e.g. bases.1b-std.hub")


def add_fetch_arguments(sp) -> None:
    sp.add_argument("--repo", required=True)
    sp.add_argument("--revision", required=True)
    sp.add_argument("--subfolder")
    sp.add_argument("--pin", type=Path, help="pin file of `mergebake pin` with the commit to use")
    sp.add_argument("--allow-pickle", action="store_true", help="also fetch adapter_model.bin")
    sp.add_argument("--config-key", help="config key named in errors, e.g. bases.1b-std.hub")
    sp.add_argument("--out", type=Path, required=True)
