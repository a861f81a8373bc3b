"""upload_cell against a create_autospec(HfApi) mock: the exact calls, and the receipt."""

from __future__ import annotations

import json
from unittest.mock import create_autospec

import pytest
from huggingface_hub import HfApi

from mergebake import MergebakeError
from mergebake.outputs import sha256_file
from mergebake.upload import upload_cell


@pytest.fixture
def cell(tmp_path):
    d = tmp_path / "cell"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"x" * 10)
    (d / "provenance.json").write_text("{}")
    return d


def test_dry_run_writes_receipt_and_calls_nothing(cell, tmp_path):
    api = create_autospec(HfApi, instance=True)
    rec = upload_cell(cell, tmp_path / "r.json", repo="org/grid", path_in_repo="1b-std/g__m",
                      api=api)
    assert api.method_calls == []
    assert rec == json.loads((tmp_path / "r.json").read_text())
    assert rec["dry_run"] is True and rec["commit"] is None
    assert rec["files"]["model.safetensors"] == {"bytes": 10,
                                                 "sha256": sha256_file(cell / "model.safetensors")}
    assert set(rec["files"]) == {"config.json", "model.safetensors", "provenance.json"}


def test_enabled_upload_makes_one_commit_into_the_cell_folder(cell, tmp_path):
    api = create_autospec(HfApi, instance=True)
    api.upload_folder.return_value.oid = "abc123"
    api.upload_folder.return_value.commit_url = "https://hub/commit/abc123"
    rec = upload_cell(cell, tmp_path / "r.json", repo="org/grid", path_in_repo="1b-std/g__m",
                      enabled=True, private=True, commit_message="msg", api=api)
    api.create_repo.assert_called_once_with("org/grid", private=True, exist_ok=True)
    api.upload_folder.assert_called_once_with(repo_id="org/grid", folder_path=str(cell),
                                              path_in_repo="1b-std/g__m", commit_message="msg")
    assert rec["commit"] == "abc123" and rec["dry_run"] is False


def test_failed_upload_writes_no_receipt(cell, tmp_path):
    api = create_autospec(HfApi, instance=True)
    api.upload_folder.side_effect = OSError("connection reset")
    with pytest.raises(MergebakeError, match="upload of .* to org/grid/1b-std/g__m failed"):
        upload_cell(cell, tmp_path / "r.json", repo="org/grid", path_in_repo="1b-std/g__m",
                    enabled=True, api=api)
    assert not (tmp_path / "r.json").exists()
