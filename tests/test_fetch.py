"""fetch against mocks of the Hub client: revision pinned to the commit, subfolder
flattened, only the needed files asked for, clear errors. No network."""

from __future__ import annotations

import json
from types import SimpleNamespace
from unittest.mock import create_autospec, patch

import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import RevisionNotFoundError

from mergebake import MergebakeError
from mergebake.fetch import fetch

SHA = "0123456789abcdef0123456789abcdef01234567"


def fake_snapshot(**kw):
    """Stand-in for snapshot_download: lays out the files an adapter repo would give."""
    root = kw["local_dir"]
    sub = root / "1b-std" / "eng"
    sub.mkdir(parents=True)
    (sub / "adapter_config.json").write_text("{}")
    (sub / "adapter_model.safetensors").write_bytes(b"\0" * 8)
    return str(root)


def test_fetch_pins_branch_to_commit_and_flattens_subfolder(tmp_path):
    api = create_autospec(HfApi, instance=True)
    api.model_info.return_value = SimpleNamespace(sha=SHA)
    with patch("huggingface_hub.snapshot_download", side_effect=fake_snapshot) as snap:
        src = fetch("org/adapters", "main", tmp_path / "out", subfolder="1b-std/eng", api=api)
    api.model_info.assert_called_once_with("org/adapters", revision="main")
    kw = snap.call_args.kwargs
    assert kw["repo_id"] == "org/adapters" and kw["revision"] == SHA
    assert "1b-std/eng/adapter_model.safetensors" in kw["allow_patterns"]
    assert all(p.startswith("1b-std/eng/") for p in kw["allow_patterns"])
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json",
                                                    "adapter_model.safetensors",
                                                    "provenance.json"]
    assert src == {"repo": "org/adapters", "subfolder": "1b-std/eng", "revision": "main",
                   "commit": SHA}
    assert json.loads((out / "provenance.json").read_text())["source"] == src


def test_missing_revision_is_a_clear_error(tmp_path):
    api = create_autospec(HfApi, instance=True)
    api.model_info.side_effect = RevisionNotFoundError("404", response=SimpleNamespace(
        headers={}, status_code=404, request=None, url="u"))
    with pytest.raises(MergebakeError, match="has no revision 'v9'"):
        fetch("org/base", "v9", tmp_path / "out", api=api)
    assert not (tmp_path / "out").exists()


def test_empty_subfolder_is_a_clear_error(tmp_path):
    api = create_autospec(HfApi, instance=True)
    api.model_info.return_value = SimpleNamespace(sha=SHA)
    with patch("huggingface_hub.snapshot_download", side_effect=fake_snapshot):
        with pytest.raises(MergebakeError, match="no checkpoint or adapter files under 'nob'"):
            fetch("org/adapters", SHA, tmp_path / "out", subfolder="nob", api=api)
    assert not (tmp_path / "out").exists()
