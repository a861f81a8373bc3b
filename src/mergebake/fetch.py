"""Fetch a base model or LoRA adapter from the Hugging Face Hub, pinned to a commit.

Only the files a bake or merge needs are downloaded (safetensors weights and their index,
configs, tokenizer and chat template, adapter files). A revision that is a branch or tag
is resolved to its commit sha once, and that sha is what gets downloaded and recorded in
``provenance.json``, so a later push to the branch cannot change a build silently.
``HF_HUB_OFFLINE`` and the Hub cache are honoured by huggingface_hub itself; the token is
the user's (``HF_TOKEN`` or a cached login) and is never written anywhere.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from . import MergebakeError
from .outputs import atomic_dir, write_provenance

log = logging.getLogger(__name__)
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


def resolve_revision(repo: str, revision: str, *, api: Any = None) -> str:
    """Resolve ``revision`` (branch, tag or sha) of model repo ``repo`` to a commit sha.

    Raises :class:`MergebakeError` when the repo or revision does not exist or is gated
    without access, naming both and saying what to check.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    api = api or HfApi()
    try:
        info = api.model_info(repo, revision=revision)
    except RevisionNotFoundError as e:
        raise MergebakeError(f"Hub repo {repo!r} has no revision {revision!r}; check the "
                             "branch, tag or commit sha in the config") from e
    except GatedRepoError as e:
        raise MergebakeError(f"Hub repo {repo!r} is gated: accept its terms on the Hub and "
                             "log in (`hf auth login` or HF_TOKEN)") from e
    except RepositoryNotFoundError as e:
        raise MergebakeError(f"Hub repo {repo!r} not found (or private without a token); "
                             "check the name, or log in with `hf auth login`") from e
    return info.sha


def fetch(repo: str, revision: str, out: Path, *, subfolder: str | None = None,
          api: Any = None) -> dict[str, Any]:
    """Download ``repo@revision`` (only ``subfolder`` when given) into ``out``.

    The folder's content is flattened: the files of ``subfolder`` land directly in
    ``out``. ``provenance.json`` records ``source = {repo, subfolder, revision, commit}``.
    Returns that source dict. Raises :class:`MergebakeError` for a missing repo, revision
    or subfolder (nothing is left at ``out``).
    """
    from huggingface_hub import snapshot_download

    commit = resolve_revision(repo, revision, api=api)
    if commit != revision:
        log.info("pinned %s@%s to commit %s", repo, revision, commit)
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    patterns = [prefix + p for p in ALLOW_PATTERNS]
    with atomic_dir(out) as tmp:
        dl = tmp / ".download"
        snapshot_download(repo_id=repo, revision=commit, local_dir=dl,
                          allow_patterns=patterns)
        src = dl / prefix if prefix else dl
        files = [p for p in src.iterdir() if p.is_file()] if src.is_dir() else []
        if not files:
            raise MergebakeError(f"Hub repo {repo!r}@{commit}: no checkpoint or adapter files "
                                 f"under {subfolder or 'the repo root'!r}; check 'subfolder'")
        for p in files:
            shutil.move(str(p), tmp / p.name)
        shutil.rmtree(dl)
        source = {"repo": repo, "subfolder": subfolder, "revision": revision, "commit": commit}
        write_provenance(tmp, step="fetch", inputs={}, params={}, source=source)
    return source
