"""fetch and pin against create_autospec(HfApi) mocks: revisions pinned to a commit, only the
needed files of the subfolder asked for (nothing nested), files linked from the Hub cache,
clear errors naming the config key. No network (the fake Hub tests are test_hub_fake.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest.mock import create_autospec, patch

import httpx2
import pytest
from huggingface_hub import HfApi, ResolvedRevision
from huggingface_hub.errors import (
    GatedRepoError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from mergebake import MergebakeError
from mergebake.fetch import (
    ALLOW_PATTERNS,
    fetch,
    is_commit_sha,
    pin_name,
    pin_revision,
    read_pin,
    resolve_revision,
)

SHA = "0123456789abcdef0123456789abcdef01234567"


def _api(sha: str = SHA):
    api = create_autospec(HfApi, instance=True)
    api.resolve_revision.return_value = ResolvedRevision(
        resolved=sha, initial="main", repo_id="org/adapters"
    )
    return api


def _http_error(cls, status: int, url: str = "https://huggingface.co/api/models/org/x"):
    resp = httpx2.Response(status, request=httpx2.Request("GET", url))
    return cls(f"{status} error", response=resp)


def fake_cache(tmp_path: Path):
    """Stand-in for snapshot_download: a cache snapshot of an adapters repo (symlinks to
    blobs, as huggingface_hub lays it out), returning the snapshot folder."""

    def snapshot(**kw):
        snap = tmp_path / "cache" / "snapshots" / kw["revision"]
        blobs = tmp_path / "cache" / "blobs"
        blobs.mkdir(parents=True, exist_ok=True)
        for rel, data in {
            "1b-std/eng/adapter_config.json": b"{}",
            "1b-std/eng/adapter_model.safetensors": b"\0" * 8,
        }.items():
            blob = blobs / rel.replace("/", "_")
            blob.write_bytes(data)
            (snap / rel).parent.mkdir(parents=True, exist_ok=True)
            if not (snap / rel).exists():
                os.symlink(blob, snap / rel)
        return str(snap)

    return snapshot


def test_fetch_pins_branch_to_commit_and_flattens_subfolder(tmp_path):
    api = _api()
    with patch("huggingface_hub.snapshot_download", side_effect=fake_cache(tmp_path)) as snap:
        src = fetch("org/adapters", "main", tmp_path / "out", subfolder="1b-std/eng", api=api)
    api.resolve_revision.assert_called_once_with("org/adapters", revision="main")
    kw = snap.call_args.kwargs
    assert kw["repo_id"] == "org/adapters" and kw["revision"] == SHA
    assert kw["allow_patterns"] == [f"1b-std/eng/{p}" for p in ALLOW_PATTERNS]
    assert "1b-std/eng/adapter_model.bin" not in kw["allow_patterns"]  # no pickle by default
    assert kw["ignore_patterns"] == ["1b-std/eng/*/*"]  # nothing nested is downloaded
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "provenance.json",
    ]
    # Linked from the cache's blob (not a symlink into the cache, not a second download).
    weights = out / "adapter_model.safetensors"
    assert not weights.is_symlink()
    assert os.path.samefile(weights, tmp_path / "cache/blobs/1b-std_eng_adapter_model.safetensors")
    assert src == {
        "repo": "org/adapters",
        "subfolder": "1b-std/eng",
        "revision": "main",
        "commit": SHA,
    }
    assert json.loads((out / "provenance.json").read_text())["source"] == src


def test_fetch_with_a_pinned_commit_resolves_nothing(tmp_path):
    api = _api()
    with patch("huggingface_hub.snapshot_download", side_effect=fake_cache(tmp_path)) as snap:
        src = fetch(
            "org/adapters", "main", tmp_path / "out", subfolder="1b-std/eng", commit=SHA, api=api
        )
    assert api.method_calls == []
    assert snap.call_args.kwargs["revision"] == SHA and src["commit"] == SHA


def test_a_commit_sha_needs_no_resolving():
    api = _api()
    assert resolve_revision("org/base", SHA, api=api) == SHA
    assert api.method_calls == []
    assert is_commit_sha(SHA) and not is_commit_sha("main") and not is_commit_sha(SHA[:12])


def test_allow_pickle_also_fetches_adapter_bin(tmp_path):
    with patch("huggingface_hub.snapshot_download", side_effect=fake_cache(tmp_path)) as snap:
        fetch(
            "org/adapters",
            SHA,
            tmp_path / "out",
            subfolder="1b-std/eng",
            allow_pickle=True,
            api=_api(),
        )
    assert "1b-std/eng/adapter_model.bin" in snap.call_args.kwargs["allow_patterns"]


def test_pin_file_records_the_commit_once(tmp_path, caplog):
    api = _api()
    pin = tmp_path / "pins" / f"{pin_name('org/adapters', 'main')}.json"
    with caplog.at_level("INFO", logger="mergebake.fetch"):
        rec = pin_revision("org/adapters", "main", pin, api=api)
    assert rec == {"repo": "org/adapters", "revision": "main", "commit": SHA}
    assert f"pinned org/adapters@main to commit {SHA}" in caplog.text
    assert read_pin(pin, "org/adapters", "main") == SHA
    with pytest.raises(MergebakeError, match="pins org/adapters@main, not org/other@main"):
        read_pin(pin, "org/other", "main")
    assert pin_name("org/a", "refs/pr/1") == "org--a@refs%2Fpr%2F1"


def test_missing_revision_is_a_clear_error(tmp_path):
    api = _api()
    api.resolve_revision.side_effect = _http_error(RevisionNotFoundError, 404)
    with pytest.raises(
        MergebakeError,
        match=r"^bases.1b-std.hub: Hub repo 'org/base' has no "
        r"revision 'v9'; check the branch",
    ):
        fetch("org/base", "v9", tmp_path / "out", api=api, config_key="bases.1b-std.hub")
    assert not (tmp_path / "out").exists()


def test_missing_or_private_repo_says_how_to_log_in(tmp_path):
    api = _api()
    api.resolve_revision.side_effect = _http_error(RepositoryNotFoundError, 401)
    with patch("huggingface_hub.get_token", return_value=None):
        with pytest.raises(
            MergebakeError, match="not found, or private.*`hf auth login` or set HF_TOKEN"
        ):
            fetch("org/nope", "main", tmp_path / "out", api=api)
    with patch("huggingface_hub.get_token", return_value="hf_x"):
        with pytest.raises(MergebakeError, match="has no access to it") as e:
            fetch("org/nope", "main", tmp_path / "out", api=api)
    assert "hf_x" not in str(e.value)


def test_gated_repo_says_accept_the_terms(tmp_path):
    api = _api()
    api.resolve_revision.side_effect = _http_error(GatedRepoError, 401)
    with pytest.raises(MergebakeError, match="is gated: accept its terms"):
        fetch("google/gemma-3-1b-it", "main", tmp_path / "out", api=api)


def test_empty_subfolder_is_a_clear_error(tmp_path):
    with patch("huggingface_hub.snapshot_download", side_effect=fake_cache(tmp_path)):
        with pytest.raises(MergebakeError, match="no checkpoint or adapter files under 'nob'"):
            fetch("org/adapters", SHA, tmp_path / "out", subfolder="nob", api=_api())
    assert not (tmp_path / "out").exists()


def test_offline_without_cache_says_what_to_do(tmp_path):
    from huggingface_hub.errors import LocalEntryNotFoundError

    with patch(
        "huggingface_hub.snapshot_download", side_effect=LocalEntryNotFoundError("not cached")
    ):
        with pytest.raises(
            MergebakeError, match="not \\(completely\\) in the Hub cache and HF_HUB_OFFLINE"
        ):
            fetch("org/adapters", SHA, tmp_path / "out", api=_api())


def test_cli_fetch_reads_the_pin(tmp_path):
    from mergebake.cli import main

    pin = tmp_path / "pin.json"
    pin.write_text(json.dumps({"repo": "org/adapters", "revision": "main", "commit": SHA}))
    with patch("mergebake.fetch.fetch") as f:
        f.return_value = {"commit": SHA}
        assert (
            main(
                [
                    "fetch",
                    "--repo",
                    "org/adapters",
                    "--revision",
                    "main",
                    "--subfolder",
                    "1b-std/eng",
                    "--pin",
                    str(pin),
                    "--config-key",
                    "adapters.1b-std.eng.hub",
                    "--out",
                    str(tmp_path / "out"),
                ]
            )
            == 0
        )
    assert f.call_args.kwargs["commit"] == SHA
    assert f.call_args.kwargs["config_key"] == "adapters.1b-std.eng.hub"


def test_fetch_retries_a_transient_failure_with_backoff(tmp_path):
    """snapshot_download turns a dropped connection into LocalEntryNotFoundError; the
    fetch backs off (2 s, 4 s) and tries again, and the third attempt lands."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    snapshot, calls, sleeps = fake_cache(tmp_path), [], []

    def flaky(**kw):
        calls.append(kw["revision"])
        if len(calls) < 3:
            raise LocalEntryNotFoundError("cannot reach the Hub") from httpx2.ConnectError("reset")
        return snapshot(**kw)

    with patch("huggingface_hub.snapshot_download", side_effect=flaky):
        src = fetch(
            "org/adapters", "main", tmp_path / "out", subfolder="1b-std/eng", commit=SHA,
            sleep=sleeps.append,
        )  # fmt: skip
    assert calls == [SHA] * 3 and sleeps == [2.0, 4.0]
    assert src["commit"] == SHA
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "provenance.json",
    ]


def test_fetch_does_not_retry_a_missing_file_and_gives_up_on_a_dead_hub(tmp_path):
    from huggingface_hub.errors import RemoteEntryNotFoundError

    sleeps = []
    with patch(
        "huggingface_hub.snapshot_download",
        side_effect=_http_error(RemoteEntryNotFoundError, 404),
    ) as snap:
        with pytest.raises(
            MergebakeError,
            match="^bases.x: Hub repo org/a@.*'nob' not found; check 'subfolder' in the config$",
        ):
            fetch(
                "org/a", "main", tmp_path / "o", subfolder="nob", commit=SHA,
                config_key="bases.x", sleep=sleeps.append,
            )  # fmt: skip
    assert snap.call_count == 1 and sleeps == []
    with patch(
        "huggingface_hub.snapshot_download", side_effect=httpx2.ConnectError("down")
    ) as snap:
        with pytest.raises(MergebakeError, match="cannot be reached.*gave up after 3 attempts"):
            fetch("org/a", "main", tmp_path / "o", commit=SHA, retries=3, sleep=sleeps.append)
    assert snap.call_count == 3 and sleeps == [2.0, 4.0]
    assert not (tmp_path / "o").exists()


def test_pin_retries_a_busy_hub_and_waits_as_long_as_a_rate_limit_says(tmp_path):
    from huggingface_hub.errors import HfHubHTTPError

    api, sleeps = _api(), []
    limited = httpx2.Response(
        429,
        headers={"ratelimit": '"api";r=0;t=55'},
        request=httpx2.Request("GET", "https://huggingface.co/api/models/org/adapters"),
    )
    api.resolve_revision.side_effect = [
        _http_error(HfHubHTTPError, 503),
        HfHubHTTPError("429 slow down", response=limited),
        api.resolve_revision.return_value,
    ]
    assert resolve_revision("org/adapters", "main", api=api, sleep=sleeps.append) == SHA
    assert sleeps == [2.0, 56.0]  # backoff, then the window's reset + 1 s (as http_backoff)
