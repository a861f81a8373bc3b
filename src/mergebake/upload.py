"""Publish one merged cell to the Hub results repo, or write the receipt of what would be.

Every cell goes to ``<repo>/<size>-<variant>/<group>__<method>/``. With ``hub.enabled:
false`` (the demo) nothing is sent: the receipt lists what an upload would send. With it
on, the folder is committed with ``HfApi.upload_folder`` (one commit per cell) and the
receipt, written only after the commit succeeded, records the commit oid and url.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import MergebakeError
from .outputs import file_manifest, sha256_file, write_json


def upload_cell(cell_dir: Path, receipt: Path, *, repo: str, path_in_repo: str,
                enabled: bool = False, private: bool = True, commit_message: str | None = None,
                api: Any = None) -> dict[str, Any]:
    """Upload ``cell_dir`` to ``repo`` at ``path_in_repo`` (or, disabled, only describe it).

    Writes the receipt JSON ``{repo, path_in_repo, dry_run, commit, url, files: {path:
    {bytes, sha256}}}`` to ``receipt`` atomically and returns it. The token comes from
    huggingface_hub (``HF_TOKEN`` or a cached login) and is never recorded. Raises
    :class:`MergebakeError` when ``cell_dir`` is missing or the upload fails.
    """
    cell_dir = Path(cell_dir)
    if not cell_dir.is_dir():
        raise MergebakeError(f"{cell_dir}: merged cell folder not found; build it first")
    if not repo:
        raise MergebakeError("hub.repo is not set; name the results repo (owner/name)")
    files = file_manifest(cell_dir)
    prov = cell_dir / "provenance.json"
    if prov.is_file():  # file_manifest leaves it out; the upload sends it
        files["provenance.json"] = {"bytes": prov.stat().st_size, "sha256": sha256_file(prov)}
    record: dict[str, Any] = {"repo": repo, "path_in_repo": path_in_repo, "dry_run": not enabled,
                              "commit": None, "url": None, "files": files}
    if enabled:
        from huggingface_hub import HfApi

        api = api or HfApi()
        try:
            api.create_repo(repo, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo, folder_path=str(cell_dir),
                                     path_in_repo=path_in_repo,
                                     commit_message=commit_message or f"Upload {path_in_repo}")
        except Exception as e:  # HfHubHTTPError and friends; the token is never in the text
            raise MergebakeError(f"upload of {cell_dir} to {repo}/{path_in_repo} failed: {e}") \
                from e
        record["commit"] = getattr(info, "oid", None)
        record["url"] = getattr(info, "commit_url", None)
    write_json(receipt, record)
    return record
