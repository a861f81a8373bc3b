"""Publishing and fetching against an in-process FAKE Hub (tests/_fakehub.py), never the Hub.

huggingface_hub runs unmodified; only its HTTP client is swapped for the fake's transport
(``set_client_factory``, ``HF_HUB_DISABLE_XET=1``). The workflow tests run the demo grid
with ``hub.enabled: true`` through Snakemake, with the fake activated in every job by
``tests/_fakehub_site/sitecustomize.py``, then change one method's parameters and check
that only those cells are committed again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _fakehub import ENV, TOKEN_ENV, FakeHub, install
from _workflow import FAKE_TOKEN, ROOT, demo_config, env, planned_jobs, snakemake, write_config
from huggingface_hub import ModelCard, constants, hf_hub_download, set_client_factory
from huggingface_hub.utils._http import default_client_factory

from mergebake import MergebakeError
from mergebake.fetch import fetch, pin_revision
from mergebake.upload import upload_cell

TOKEN = "hf_fakeHubUnitTestTokenNotReal"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The fake Hub installed in this process, with a fresh cache and a (fake) token."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    fake = FakeHub(tmp_path / "fakehub", token=TOKEN)
    install(fake)
    yield fake
    set_client_factory(default_client_factory)


@pytest.fixture
def cell(tmp_path):
    d = tmp_path / "cell"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "gemma3_text"}')
    (d / "model.safetensors").write_bytes(b"w" * 4096)
    (d / "recipe.yaml").write_text("merge_method: ties\n")
    (d / ".snakemake_timestamp").write_text("")
    return d


def _lfs_puts(hub: FakeHub) -> int:
    return sum(r["method"] == "PUT" for r in hub.requests())


def test_cell_upload_commits_once_then_only_what_changed(hub, cell, tmp_path):
    card = "---\nlicense: mit\ntags:\n- merge\n---\n# cell\n"
    r1 = upload_cell(
        cell,
        tmp_path / "r1.json",
        repo="org/grid",
        path_in_repo="1b-std/g__m",
        enabled=True,
        private=True,
        card=card,
    )
    hist = hub.history("org/grid")
    assert [c["summary"] for c in hist] == ["initial commit", r1["commit_message"]]
    assert hist[-1]["added"] == [
        f"1b-std/g__m/{f}" for f in ("README.md", "config.json", "model.safetensors", "recipe.yaml")
    ]
    assert r1["commit"] == hub.head("org/grid") and hub.is_private("org/grid")
    files = hub.files("org/grid")
    assert files["1b-std/g__m/README.md"] == card.encode()
    assert files["1b-std/g__m/model.safetensors"] == b"w" * 4096
    card_path = hf_hub_download("org/grid", "1b-std/g__m/README.md")
    assert ModelCard.load(card_path).data.to_dict() == {"license": "mit", "tags": ["merge"]}

    # Unchanged: no commit, nothing sent.
    puts = _lfs_puts(hub)
    r2 = upload_cell(
        cell,
        tmp_path / "r2.json",
        repo="org/grid",
        path_in_repo="1b-std/g__m",
        enabled=True,
        card=card,
    )
    assert len(hub.history("org/grid")) == 2
    assert r2["unchanged"] is True and r2["commit"] == r1["commit"]
    assert _lfs_puts(hub) == puts

    # Only the card changed: one commit with only README.md; the weights are not sent.
    r3 = upload_cell(
        cell,
        tmp_path / "r3.json",
        repo="org/grid",
        path_in_repo="1b-std/g__m",
        enabled=True,
        card=card.replace("# cell", "# cell v2"),
    )
    assert hub.history("org/grid")[-1]["added"] == ["1b-std/g__m/README.md"]
    assert r3["changed"] == ["README.md"] and _lfs_puts(hub) == puts

    # A file the cell no longer has is deleted on the Hub.
    (cell / "recipe.yaml").unlink()
    r4 = upload_cell(
        cell,
        tmp_path / "r4.json",
        repo="org/grid",
        path_in_repo="1b-std/g__m",
        enabled=True,
        card=card.replace("# cell", "# cell v2"),
    )
    assert hub.history("org/grid")[-1]["deleted"] == ["1b-std/g__m/recipe.yaml"]
    assert r4["deleted"] == ["recipe.yaml"] and len(hub.history("org/grid")) == 4


def test_transient_commit_failure_is_retried_with_one_commit(hub, cell, tmp_path):
    hub.fail_next("commit", times=2, status=503)
    sleeps = []
    rec = upload_cell(
        cell,
        tmp_path / "r.json",
        repo="org/grid",
        path_in_repo="1b-std/g__m",
        enabled=True,
        sleep=sleeps.append,
        backoff=0.5,
    )
    assert len(hub.history("org/grid")) == 2  # initial + exactly one cell commit
    assert rec["commit"] == hub.head("org/grid")
    assert sleeps == [0.5, 1.0]  # backed off twice, then the commit went through


def test_private_cells_never_go_to_a_public_repo(hub, cell, tmp_path):
    hub.create("org/public", private=False)
    with pytest.raises(MergebakeError, match="is public"):
        upload_cell(
            cell,
            tmp_path / "r.json",
            repo="org/public",
            path_in_repo="a/b",
            enabled=True,
            private=True,
        )
    assert len(hub.history("org/public")) == 1
    assert not (tmp_path / "r.json").exists()


def _seed_adapters(hub: FakeHub, weights: bytes = b"\1" * 64) -> str:
    return hub.seed(
        "org/adapters",
        {
            "1b-std/eng/adapter_config.json": b'{"r": 4}',
            "1b-std/eng/adapter_model.safetensors": weights,
            "1b-std/eng/checkpoint-5/adapter_model.safetensors": b"\x09" * 64,  # nested: skipped
            "1b-std/eng/training_args.bin": b"pickle",  # not needed
            "README.md": b"# adapters\n",
        },
    )


def test_fetch_pins_the_branch_and_takes_only_what_is_needed(hub, tmp_path, monkeypatch):
    first = _seed_adapters(hub)
    pin = pin_revision("org/adapters", "main", tmp_path / "pin.json")
    assert pin["commit"] == first
    _seed_adapters(hub, weights=b"\2" * 64)  # the branch moves on after the pin
    src = fetch(
        "org/adapters", "main", tmp_path / "eng", subfolder="1b-std/eng", commit=pin["commit"]
    )
    assert src == {
        "repo": "org/adapters",
        "subfolder": "1b-std/eng",
        "revision": "main",
        "commit": first,
    }
    out = tmp_path / "eng"
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "provenance.json",
    ]
    assert (out / "adapter_model.safetensors").read_bytes() == b"\1" * 64  # the pinned one
    got = {r["path"] for r in hub.requests() if r["method"] == "GET" and "/resolve/" in r["path"]}
    assert got == {
        f"/org/adapters/resolve/{first}/1b-std/eng/{f}"
        for f in ("adapter_config.json", "adapter_model.safetensors")
    }

    # Again (another output): served from the Hub cache, nothing downloaded.
    n = len(hub.requests())
    fetch("org/adapters", "main", tmp_path / "eng2", subfolder="1b-std/eng", commit=first)
    assert not [r for r in hub.requests()[n:] if "/resolve/" in r["path"]]

    # Offline: the branch resolves through the cache's refs, files come from the cache.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    n = len(hub.requests())
    src = fetch("org/adapters", "main", tmp_path / "offline", subfolder="1b-std/eng")
    assert src["commit"] == first and len(hub.requests()) == n
    with pytest.raises(MergebakeError, match="HF_HUB_OFFLINE"):
        fetch("org/other", "main", tmp_path / "x")


def test_fetch_errors_name_the_key_and_the_fix(hub, tmp_path, monkeypatch):
    _seed_adapters(hub)
    hub.seed("org/private", {"config.json": b"{}"}, private=True)
    hub.seed("org/gated", {"config.json": b"{}"}, gated=True)
    key = "adapters.1b-std.eng.hub"
    cases = [
        (("org/nope", "main", None), "Hub repo 'org/nope' not found, or private"),
        (("org/adapters", "v9", None), "Hub repo 'org/adapters' has no revision 'v9'"),
        (
            ("org/adapters", "main", "1b-std/nob"),
            "no checkpoint or adapter files under '1b-std/nob'.*folders with a config there: "
            "1b-std/eng",
        ),
    ]
    for (repo, rev, sub), msg in cases:
        with pytest.raises(MergebakeError, match=f"^{key}: .*{msg}"):
            fetch(repo, rev, tmp_path / "out", subfolder=sub, config_key=key)
        assert not (tmp_path / "out").exists()
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-login"))
    with pytest.raises(
        MergebakeError, match="not found, or private.*`hf auth login` or set HF_TOKEN"
    ):
        fetch("org/private", "main", tmp_path / "out")
    with pytest.raises(MergebakeError, match="is gated: accept its terms"):
        fetch("org/gated", "main", tmp_path / "out")


# --------------------------------------------------------------------------- workflow


def fake_env(state: Path, home: Path) -> dict[str, str]:
    """The environment of a Snakemake run whose jobs all talk to the fake in ``state``."""
    e = env()
    e.update(
        {
            ENV: str(state),
            TOKEN_ENV: FAKE_TOKEN,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_OFFLINE": "0",
            "HF_HOME": str(home),
            "PYTHONPATH": str(ROOT / "tests" / "_fakehub_site"),
        }
    )
    return e


def _hub_config(**hub) -> dict:
    cfg = demo_config()
    cfg["hub"].update(enabled=True, **hub)
    return cfg


REPO = demo_config()["hub"]["repo"]


@pytest.mark.workflow
def test_demo_publishes_to_the_fake_hub_and_republishes_only_changed_cells(
    demo, tmp_path, monkeypatch
):
    wd = tmp_path / "wd"
    shutil.copytree(demo, wd, symlinks=True)
    state, home = tmp_path / "fakehub", tmp_path / "hf-home"
    hub = FakeHub(state, token=FAKE_TOKEN)
    config = write_config(wd / "hub.yaml", _hub_config())
    cells = sorted(
        p.relative_to(wd / "results/merged").as_posix() for p in (wd / "results/merged").glob("*/*")
    )
    assert len(cells) == 16

    # Turning publishing on reruns only the uploads and the repo README.
    jobs = planned_jobs(wd, config)
    assert jobs == {("upload", f"results/uploaded/{c}.json") for c in cells} | {
        ("hub_readme", "results/uploaded/README.json")
    }
    snakemake(wd, "--cores", "2", config=config, environ=fake_env(state, home))

    hist = hub.history(REPO)
    assert hub.is_private(REPO)
    assert len(hist) == 1 + 16 + 1  # initial, one commit per cell, the README
    by_cell = {}
    for c in hist[1:-1]:
        path = c["summary"].split()[1].rstrip(":")
        by_cell[path] = c
        assert c["summary"].startswith(f"Upload {path}: eng-nob merged with ")
        assert "(recipe " in c["summary"] and "Rendered recipe" in c["description"]
        assert all(f.startswith(path + "/") for f in c["added"])
        assert f"{path}/model.safetensors" in c["added"] and f"{path}/README.md" in c["added"]
    assert sorted(by_cell) == cells
    assert hist[-1]["added"] == ["README.md"]
    files = hub.files(REPO)
    for c in cells:
        receipt = json.loads((wd / f"results/uploaded/{c}.json").read_text())
        assert receipt["dry_run"] is False and receipt["commit"] == by_cell[c]["oid"]
        assert receipt["url"].endswith(f"/{REPO}/commit/{by_cell[c]['oid']}")
        adapter_space = c.endswith("__ties-adapter")  # its merged adapter goes up too
        assert any(n.startswith("adapter/") for n in receipt["files"]) == adapter_space
        for name in receipt["files"]:
            if name == "README.md":
                local = wd / "results/cards" / f"{c}.md"
            elif name.startswith("adapter/"):
                local = wd / "results/adapters" / c / name.removeprefix("adapter/")
            else:
                local = wd / "results/merged" / c / name
            assert files[f"{c}/{name}"] == local.read_bytes()
        card_text = files[f"{c}/README.md"].decode()
        assert card_text == (wd / f"results/cards/{c}.md").read_text()
        card = ModelCard(card_text)
        engine = "peft" if adapter_space else "mergekit"
        assert card.data.tags == ["merge", engine, "lora", c.split("__")[1]]
        assert card.data.license == "apache-2.0" and card.data.language == ["en", "nb"]
        assert card.data.eval_results and "Δ" in card.text
    readme = files["README.md"].decode()
    assert all(f"[{c}](" in readme for c in cells)
    readme_receipt = json.loads((wd / "results/uploaded/README.json").read_text())
    assert readme_receipt["commit"] == hist[-1]["oid"]

    # Loadable from the (fake) Hub with from_pretrained(repo, subfolder=...).
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "load-cache"))
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    install(FakeHub(state, token=FAKE_TOKEN))
    try:
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(REPO, subfolder="1b-std/eng-nob__ties")
        local = load_file(wd / "results/merged/1b-std/eng-nob__ties/model.safetensors")
        sd = model.state_dict()
        assert all((sd[k] == v).all() for k, v in local.items() if k in sd)
    finally:
        set_client_factory(default_client_factory)

    # Change one method's parameters: only those cells (and the README) are committed again.
    cfg = _hub_config()
    cfg["methods"]["linear"]["parameters"]["weight"]["eng"] = 0.8
    changed = write_config(wd / "changed.yaml", cfg)
    before = len(hist)
    snakemake(wd, "--cores", "2", config=changed, environ=fake_env(state, home))
    new = hub.history(REPO)[before:]
    linear = [c for c in cells if c.endswith("__linear")]
    assert sorted(c["summary"].split()[1].rstrip(":") for c in new[:-1]) == linear
    assert all("weight={eng: 0.8, nob: 0.5}" in c["summary"] for c in new[:-1])
    assert new[-1]["added"] == ["README.md"]
    assert all(f"{c}/model.safetensors" in {f for x in new for f in x["added"]} for c in linear)

    # Re-uploading an unchanged cell makes no commit.
    head = hub.head(REPO)
    snakemake(
        wd,
        "--cores",
        "1",
        "--forcerun",
        "upload",
        "results/uploaded/1b-std/eng-nob__ties.json",
        config=changed,
        environ=fake_env(state, home),
    )
    assert hub.head(REPO) == head
    receipt = json.loads((wd / "results/uploaded/1b-std/eng-nob__ties.json").read_text())
    assert (
        receipt["unchanged"] is True and receipt["commit"] == by_cell["1b-std/eng-nob__ties"]["oid"]
    )  # the commit the cell's content came from, not the head

    # The token is nowhere: not in the outputs, logs, receipts, cards, nor on the fake Hub.
    hits = [
        p
        for root in (wd, state)
        for p in root.rglob("*")
        if p.is_file() and FAKE_TOKEN.encode() in p.read_bytes()
    ]
    assert hits == []


@pytest.mark.workflow
def test_hub_sources_are_pinned_once_and_fetched(demo, tmp_path):
    state, home = tmp_path / "fakehub", tmp_path / "hf-home"
    hub = FakeHub(state, token=FAKE_TOKEN)

    def folder(d: Path) -> dict[str, bytes]:
        return {
            p.name: p.read_bytes()
            for p in d.iterdir()
            if p.is_file() and p.name != "provenance.json" and not p.name.startswith(".")
        }

    base = hub.seed("org/gemma-3-1b-demo", folder(demo / "resources/bases/1b-std"))
    adapters = {
        f"1b-std/{a}/{n}": b
        for a in ("eng", "nob")
        for n, b in folder(demo / f"resources/adapters/1b-std/{a}").items()
    }
    first = hub.seed("org/adapters", adapters)
    cfg = demo_config()
    cfg["bases"] = {"1b-std": {"hub": {"repo": "org/gemma-3-1b-demo", "revision": "main"}}}
    cfg["adapters"] = {
        "1b-std": {
            a: {"hub": {"repo": "org/adapters", "revision": "main", "subfolder": f"1b-std/{a}"}}
            for a in ("eng", "nob")
        }
    }
    cfg["grid"] = [
        {"sizes": ["1b"], "variants": ["std"], "groups": ["eng-nob"], "methods": ["linear"]}
    ]
    config = write_config(tmp_path / "c.yaml", cfg)
    targets = [
        "resources/bases/1b-std",
        "resources/adapters/1b-std/eng",
        "resources/adapters/1b-std/nob",
    ]
    snakemake(tmp_path, "--cores", "2", *targets, config=config, environ=fake_env(state, home))
    pins = sorted(p.name for p in (tmp_path / "resources/pins").iterdir())
    assert pins == ["org--adapters@main.json", "org--gemma-3-1b-demo@main.json"]
    assert (
        f"pinned org/adapters@main to commit {first}"
        in (tmp_path / "logs/pin/org--adapters@main.log").read_text()
    )
    for t, commit in zip(targets, (base, first, first), strict=True):
        prov = json.loads((tmp_path / t / "provenance.json").read_text())
        assert prov["source"]["commit"] == commit
    assert (
        tmp_path / "resources/adapters/1b-std/eng/adapter_model.safetensors"
    ).read_bytes() == adapters["1b-std/eng/adapter_model.safetensors"]

    # The branch moves on: nothing is refetched, and a new fetch of the same repo@branch
    # uses the commit pinned before (one commit per repo@branch in the build).
    hub.seed("org/adapters", {"1b-std/eng/adapter_model.safetensors": b"changed"})
    assert not {r for r, _ in planned_jobs(tmp_path, config)} & {
        "pin",
        "fetch_base",
        "fetch_adapter",
    }
    shutil.rmtree(tmp_path / "resources/adapters/1b-std/eng")
    snakemake(tmp_path, "--cores", "1", targets[1], config=config, environ=fake_env(state, home))
    prov = json.loads((tmp_path / targets[1] / "provenance.json").read_text())
    assert prov["source"]["commit"] == first
