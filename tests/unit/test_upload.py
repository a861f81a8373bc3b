"""upload_cell and publish_readme against create_autospec(HfApi) mocks: the exact calls
(repo_id, path_in_repo, revision, commit message), only changed files sent, no commit for
an unchanged cell, retries with backoff, and the receipt only after a commit. No network."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import ANY, create_autospec

import httpx2
import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.hf_api import CommitInfo, RepoFile

from mergebake import MergebakeError
from mergebake.outputs import sha256_file
from mergebake.upload import git_blob_sha1, publish_readme, upload_cell

HEAD = "1111111111111111111111111111111111111111"
NEW = "2222222222222222222222222222222222222222"
REPO, PATH = "org/grid", "1b-std/g__m"
MESSAGE = "Upload 1b-std/g__m: g merged with m (recipe ties; density=0.5, weight={a: 0.3, b: 0.7})"


@pytest.fixture
def cell(tmp_path):
    d = tmp_path / "cell"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"x" * 10)
    (d / ".snakemake_timestamp").write_text("")  # Snakemake's marker: never uploaded
    (d / "provenance.json").write_text(
        json.dumps(
            {
                "params": {
                    "recipe_template": "/work/recipes/ties.yaml",
                    "parameters": {"density": 0.5, "weight": {"b": 0.7, "a": 0.3}},
                }
            }
        )
    )
    return d


def _api(*, private: bool = True, remote=()):
    api = create_autospec(HfApi, instance=True)
    api.model_info.return_value = SimpleNamespace(sha=HEAD, private=private)
    api.list_repo_tree.return_value = list(remote)
    api.upload_folder.return_value = CommitInfo(
        commit_url=f"https://huggingface.co/{REPO}/commit/{NEW}",
        commit_message="m",
        commit_description="",
        oid=NEW,
    )
    return api


def _remote(cell, name, *, content=None, lfs=False, last=("0" * 40, "2026-01-01")):
    """A RepoFile as list_repo_tree(expand=True) gives it for ``name`` of the cell."""
    data = (cell / name).read_bytes() if content is None else content
    sha = hashlib.sha256(data).hexdigest()
    blob = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
    return RepoFile(
        path=f"{PATH}/{name}",
        size=len(data),
        oid=blob,
        lfs={"size": len(data), "oid": sha, "pointerSize": 134} if lfs else None,
        lastCommit={"id": last[0], "title": "t", "date": f"{last[1]}T00:00:00Z"},
    )


def _no_sleep(_):
    pass


def test_dry_run_writes_receipt_and_card_and_calls_nothing(cell, tmp_path):
    api = create_autospec(HfApi, instance=True)
    rec = upload_cell(
        cell,
        tmp_path / "r.json",
        repo=REPO,
        path_in_repo=PATH,
        card="# card\n",
        card_out=tmp_path / "card.md",
        api=api,
    )
    assert api.method_calls == []
    assert rec == json.loads((tmp_path / "r.json").read_text())
    assert rec["dry_run"] is True and rec["commit"] is None
    assert rec["files"]["model.safetensors"] == {
        "bytes": 10,
        "sha256": sha256_file(cell / "model.safetensors"),
    }
    assert set(rec["files"]) == {"README.md", "config.json", "model.safetensors", "provenance.json"}
    assert (tmp_path / "card.md").read_text() == "# card\n"
    assert rec["commit_message"] == MESSAGE


def test_first_upload_is_one_commit_into_the_cell_folder(cell, tmp_path):
    api = _api()
    staged = {}

    def upload_folder(**kw):
        staged.update({p.name: p.read_bytes() for p in Path(kw["folder_path"]).iterdir()})
        return api.upload_folder.return_value

    api.upload_folder.side_effect = upload_folder
    rec = upload_cell(
        cell,
        tmp_path / "r.json",
        repo=REPO,
        path_in_repo=PATH,
        enabled=True,
        private=True,
        card="---\nlicense: mit\n---\n# card\n",
        commit_description="recipe",
        api=api,
    )
    api.create_repo.assert_called_once_with(REPO, private=True, exist_ok=True)
    api.model_info.assert_called_once_with(REPO)
    api.list_repo_tree.assert_called_once_with(
        REPO, path_in_repo=PATH, recursive=True, expand=True, revision=HEAD
    )
    api.upload_folder.assert_called_once_with(
        repo_id=REPO,
        folder_path=ANY,
        path_in_repo=PATH,
        commit_message=MESSAGE,
        commit_description="recipe",
        allow_patterns=["README.md", "config.json", "model.safetensors", "provenance.json"],
        delete_patterns=None,
    )
    assert staged["README.md"].startswith(b"---\nlicense: mit")
    assert ".snakemake_timestamp" not in staged
    assert not list(tmp_path.glob(".r.json.upload-*"))  # staging folder removed
    assert rec["commit"] == NEW and rec["dry_run"] is False and rec["unchanged"] is False
    assert rec["url"] == f"https://huggingface.co/{REPO}/commit/{NEW}"
    assert rec["folder_url"] == f"https://huggingface.co/{REPO}/tree/{NEW}/{PATH}"
    assert rec["changed"] == ["README.md", "config.json", "model.safetensors", "provenance.json"]


def test_unchanged_cell_makes_no_commit(cell, tmp_path):
    card = "# card\n"
    (tmp_path / "README.md").write_text(card)
    cell_commit = "3" * 40  # the commit that last changed the cell (the head is later)
    remote = [
        _remote(cell, "config.json"),
        _remote(cell, "model.safetensors", lfs=True),
        _remote(cell, "provenance.json", last=(cell_commit, "2026-02-01")),
        _remote(cell, "README.md", content=card.encode()),
    ]
    api = _api(remote=remote)
    rec = upload_cell(
        cell, tmp_path / "r.json", repo=REPO, path_in_repo=PATH, enabled=True, card=card, api=api
    )
    api.upload_folder.assert_not_called()
    assert rec["unchanged"] is True and rec["commit"] == cell_commit
    assert rec["url"] == f"https://huggingface.co/{REPO}/commit/{cell_commit}"
    assert rec["changed"] == [] and rec["deleted"] == []
    assert json.loads((tmp_path / "r.json").read_text())["commit"] == cell_commit


def test_only_changed_files_are_sent_and_stale_ones_deleted(cell, tmp_path):
    remote = [
        _remote(cell, "config.json", content=b'{"old": 1}'),
        _remote(cell, "model.safetensors", lfs=True),  # same sha256: not sent
        _remote(cell, "provenance.json"),
        _remote(cell, "model-00002-of-00002.safetensors", content=b"y", lfs=True),
    ]
    api = _api(remote=remote)
    rec = upload_cell(
        cell, tmp_path / "r.json", repo=REPO, path_in_repo=PATH, enabled=True, api=api
    )
    kw = api.upload_folder.call_args.kwargs
    assert kw["allow_patterns"] == ["config.json"]
    assert kw["delete_patterns"] == ["model-00002-of-00002.safetensors"]
    assert rec["changed"] == ["config.json"]
    assert rec["deleted"] == ["model-00002-of-00002.safetensors"]


def test_transient_failures_are_retried_with_backoff(cell, tmp_path):
    api = _api()
    resp = httpx2.Response(503, request=httpx2.Request("POST", "https://huggingface.co/x"))
    api.upload_folder.side_effect = [
        HfHubHTTPError("503 busy", response=resp),
        ConnectionError("reset"),
        api.upload_folder.return_value,
    ]
    sleeps = []
    rec = upload_cell(
        cell,
        tmp_path / "r.json",
        repo=REPO,
        path_in_repo=PATH,
        enabled=True,
        api=api,
        sleep=sleeps.append,
        backoff=2.0,
    )
    assert sleeps == [2.0, 4.0]
    assert api.upload_folder.call_count == 3
    assert api.list_repo_tree.call_count == 3  # each attempt compares with the Hub again
    assert rec["commit"] == NEW


def test_retries_give_up_and_write_no_receipt(cell, tmp_path):
    api = _api()
    api.upload_folder.side_effect = TimeoutError("timed out")
    with pytest.raises(
        MergebakeError,
        match=r"upload of .* to org/grid/1b-std/g__m failed "
        r"after 3 attempts.*cannot be reached",
    ):
        upload_cell(
            cell,
            tmp_path / "r.json",
            repo=REPO,
            path_in_repo=PATH,
            enabled=True,
            api=api,
            retries=3,
            sleep=_no_sleep,
        )
    assert not (tmp_path / "r.json").exists()
    assert not list(tmp_path.glob(".r.json.upload-*"))


def test_unauthorised_is_not_retried(cell, tmp_path):
    api = _api()
    resp = httpx2.Response(401, request=httpx2.Request("POST", "https://huggingface.co/x"))
    api.create_repo.side_effect = HfHubHTTPError("401", response=resp)
    with pytest.raises(MergebakeError, match="unauthorised"):
        upload_cell(
            cell,
            tmp_path / "r.json",
            repo=REPO,
            path_in_repo=PATH,
            enabled=True,
            api=api,
            sleep=_no_sleep,
        )
    assert api.create_repo.call_count == 1
    assert not (tmp_path / "r.json").exists()


def test_private_cell_is_never_sent_to_a_public_repo(cell, tmp_path):
    api = _api(private=False)
    with pytest.raises(
        MergebakeError, match="hub.private is true but the Hub repo 'org/grid' is public"
    ):
        upload_cell(
            cell,
            tmp_path / "r.json",
            repo=REPO,
            path_in_repo=PATH,
            enabled=True,
            private=True,
            api=api,
        )
    api.upload_folder.assert_not_called()


def test_enabled_without_repo_is_an_error(cell, tmp_path):
    with pytest.raises(MergebakeError, match="hub.repo is not set"):
        upload_cell(
            cell, tmp_path / "r.json", repo=None, path_in_repo=PATH, enabled=True, api=_api()
        )


def test_repo_readme_is_committed_only_when_it_changes(tmp_path):
    text = "---\nlicense: mit\n---\n# grid\n"
    api = _api()
    api.get_paths_info.return_value = []
    api.upload_file.return_value = api.upload_folder.return_value
    rec = publish_readme(
        text,
        tmp_path / "r.json",
        repo=REPO,
        enabled=True,
        readme_out=tmp_path / "README.md",
        commit_message="Update README",
        api=api,
    )
    api.get_paths_info.assert_called_once_with(REPO, ["README.md"], revision=HEAD)
    api.upload_file.assert_called_once_with(
        path_or_fileobj=text.encode(),
        path_in_repo="README.md",
        repo_id=REPO,
        commit_message="Update README",
    )
    assert rec["commit"] == NEW and (tmp_path / "README.md").read_text() == text

    (tmp_path / "same").write_text(text)
    blob = git_blob_sha1(tmp_path / "same")
    api = _api()
    api.get_paths_info.return_value = [RepoFile(path="README.md", size=len(text), oid=blob)]
    rec = publish_readme(text, tmp_path / "r.json", repo=REPO, enabled=True, api=api)
    api.upload_file.assert_not_called()
    assert rec["unchanged"] is True and rec["commit"] == HEAD


def test_the_card_replaces_a_cell_readme_without_touching_it(cell, tmp_path):
    (cell / "README.md").write_text("mergekit's card")
    api = _api()
    staged = {}
    api.upload_folder.side_effect = lambda **kw: (
        staged.update(readme=(Path(kw["folder_path"]) / "README.md").read_text())
        or api.upload_folder.return_value
    )
    rec = upload_cell(
        cell,
        tmp_path / "r.json",
        repo=REPO,
        path_in_repo=PATH,
        enabled=True,
        card="# ours\n",
        api=api,
    )
    assert staged["readme"] == "# ours\n"
    assert (cell / "README.md").read_text() == "mergekit's card"  # the cell is left alone
    assert rec["files"]["README.md"]["bytes"] == len("# ours\n")


def test_the_manifest_takes_the_cells_recorded_hashes(tmp_path):
    """No hashing twice: the sha256s the merge recorded for its outputs are what the upload
    sends, while the files are unchanged since; a file modified later is hashed again."""
    import os

    from mergebake.outputs import write_provenance

    cell = tmp_path / "cell"
    cell.mkdir()
    (cell / "model.safetensors").write_bytes(b"W" * 100)
    (cell / "config.json").write_text("{}")
    write_provenance(cell, step="merge", inputs={})
    prov = cell / "provenance.json"
    record = json.loads(prov.read_text())
    record["outputs"]["model.safetensors"]["sha256"] = "e" * 64  # visible if reused
    prov.write_text(json.dumps(record))
    api = create_autospec(HfApi, instance=True)
    rec = upload_cell(cell, tmp_path / "r.json", repo=REPO, path_in_repo=PATH, api=api)
    assert rec["files"]["model.safetensors"]["sha256"] == "e" * 64
    assert rec["files"]["config.json"]["sha256"] == sha256_file(cell / "config.json")
    later = prov.stat().st_mtime_ns + 1_000_000_000
    os.utime(cell / "model.safetensors", ns=(later, later))
    rec = upload_cell(cell, tmp_path / "r.json", repo=REPO, path_in_repo=PATH, api=api)
    assert rec["files"]["model.safetensors"]["sha256"] == sha256_file(cell / "model.safetensors")
