"""GGUF export as the workflow model sees it: config keys, cells' types, jobs, commands,
publishing (receipts, cards; the in-process FAKE Hub, never the Hub) and the preflight
check of each base's family against llama.cpp's converter."""

from __future__ import annotations

import copy
import hashlib
import json
import shlex
from pathlib import Path

import pytest
import yaml
from _workflow import ROOT, demo_config

from mergebake import commands, export, modelcard
from mergebake.config import Cell, ConfigError, gguf_types, load_config
from mergebake.preflight import check_gguf_support, gguf_support_cache
from mergebake.upload import gguf_entries, upload_cell
from mergebake.workflow import Plan

SMALL_GRID = [
    {"sizes": ["1b"], "variants": ["std"], "groups": ["eng-nob"], "methods": ["ties"]},
    {"sizes": ["4b"], "variants": ["std"], "groups": ["eng-nob"], "methods": ["linear"]},
]


def _config(**export_cfg) -> dict:
    c = demo_config()
    c["grid"] = copy.deepcopy(SMALL_GRID)
    if export_cfg:
        c["export"] = export_cfg
    return c


def test_schema_types_are_the_exporters():
    schema = yaml.safe_load((ROOT / "schemas/config.schema.yaml").read_text())
    assert tuple(schema["$defs"]["gguf_types"]["items"]["enum"]) == export.GGUF_TYPES


def test_a_blocks_list_replaces_the_global_one():
    c = _config(gguf=["bf16", "q8_0"])
    c["grid"][1]["export"] = {"gguf": ["q6_k"]}
    cfg = load_config(c)
    assert gguf_types(cfg) == {
        Cell("1b", "std", "eng-nob", "ties"): ["bf16", "q8_0"],
        Cell("4b", "std", "eng-nob", "linear"): ["q6_k"],
    }
    c["grid"][1]["export"] = {"gguf": []}  # the block opts out
    assert gguf_types(load_config(c)) == {Cell("1b", "std", "eng-nob", "ties"): ["bf16", "q8_0"]}
    c = _config()
    c["grid"][0]["export"] = {"gguf": ["f16"]}  # no global list: only this block
    assert gguf_types(load_config(c)) == {Cell("1b", "std", "eng-nob", "ties"): ["f16"]}
    assert gguf_types(load_config(_config())) == {}


def test_bad_export_keys_are_named():
    with pytest.raises(ConfigError, match=r"key 'export.gguf\[1\]'.*'q9_9' is not one of"):
        load_config(_config(gguf=["bf16", "q9_9"]))
    c = _config()
    c["grid"][1]["export"] = {"gguf": ["bf16", "bf16"]}
    with pytest.raises(ConfigError, match=r"key 'grid\[1\].export.gguf'.*non-unique"):
        load_config(c)
    with pytest.raises(ConfigError, match=r"key 'export.gguf_repo'.*is hub.repo"):
        load_config(_config(gguf=["bf16"], gguf_repo="mergebake/gemma-3-demo-merges"))
    with pytest.raises(ConfigError, match=r"key 'export.gguf_repo'.*no cell is exported"):
        load_config(_config(gguf_repo="org/ggufs"))
    with pytest.raises(ConfigError, match=r"key 'export.gguf_repo'.*write owner/name"):
        load_config(_config(gguf=["bf16"], gguf_repo="just-a-name"))


def test_plan_targets_jobs_and_commands():
    plan = Plan(load_config(_config(gguf=["bf16", "q8_0"])))
    files = [
        "results/gguf/1b-std/eng-nob__ties.bf16.gguf",
        "results/gguf/1b-std/eng-nob__ties.q8_0.gguf",
        "results/gguf/4b-std/eng-nob__linear.bf16.gguf",
        "results/gguf/4b-std/eng-nob__linear.q8_0.gguf",
    ]
    assert plan.final_outputs()[-4:] == files
    jobs = [(r, wc) for r, wc in plan.jobs() if r in ("gguf_tools", "export_gguf")]
    assert jobs == [("gguf_tools", {})] + [
        ("export_gguf", dict(base=b, group="eng-nob", method=m, type=t))
        for b, m in (("1b-std", "ties"), ("4b-std", "linear"))
        for t in ("bf16", "q8_0")
    ]
    wc = dict(base="1b-std", group="eng-nob", method="ties", type="q8_0")
    assert shlex.split(commands.command_line(plan, "export_gguf", wc)) == [
        *["mergebake", "export", "--cell", "results/merged/1b-std/eng-nob__ties"],
        *["--out", files[1], "--type", "q8_0", "--tools", "resources/tools"],
    ]
    assert commands.command_line(plan, "gguf_tools", {}) == (
        "mergebake gguf-tools --tools resources/tools"
    )
    up = shlex.split(commands.command_line(plan, "upload", wc))
    assert up[up.index("--gguf") :] == ["--gguf", files[0], "--gguf", files[1]]
    assert plan.gguf_tools() == "resources/tools/llama.cpp-0.3.36/tools.json"
    spec = plan.card_spec(wc)["gguf"]
    assert spec == {
        "repo": None,
        "files": [
            {"type": t, "file": f, "path_in_repo": f"1b-std/eng-nob__ties/{Path(f).name}"}
            for t, f in zip(("bf16", "q8_0"), files[:2], strict=True)
        ],
    }
    rules = {r for r, _ in plan.jobs()}
    assert plan.job_resources("export_gguf", wc)["disk_mb"] > 0 and "export_gguf" in rules


def test_without_export_nothing_changes():
    plan = Plan(load_config(_config()))
    assert not any(r in ("gguf_tools", "export_gguf") for r, _ in plan.jobs())
    assert not any(".gguf" in f for f in plan.final_outputs())
    wc = dict(base="1b-std", group="eng-nob", method="ties")
    assert "gguf" not in plan.card_spec(wc)
    assert "--gguf" not in commands.command_line(plan, "upload", wc)


def _fake_gguf(folder: Path, name: str, gguf_type: str, payload: bytes) -> Path:
    f = folder / name
    f.write_bytes(payload)
    check = {
        "logits": {
            "prompts": 5,
            "top1_agree": 5,
            "max_abs_diff": [0.01, 0.02, 0.0, 0.005, 0.01],
            "top1_reference": [1, 2, 3, 4, 5],
            "top1_gguf": [1, 2, 3, 4, 5],
        },
        "metadata": [],
        "tensors": [],
    }
    side = {
        "type": gguf_type,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "bytes": len(payload),
        "converter": {"package": "llama-cpp-python", "version": "0.3.36"},
        "check": check,
    }
    Path(f"{f}.json").write_text(json.dumps(side))
    return f


@pytest.fixture
def cell_and_gguf(tmp_path):
    cell = tmp_path / "cell"
    cell.mkdir()
    (cell / "config.json").write_text("{}")
    (cell / "model.safetensors").write_bytes(b"w" * 100)
    g = tmp_path / "gguf"
    g.mkdir()
    files = [
        _fake_gguf(g, "g__m.bf16.gguf", "bf16", b"b" * 2_500_000),
        _fake_gguf(g, "g__m.q8_0.gguf", "q8_0", b"q" * 1_300_000),
    ]
    return cell, files


def test_dry_run_receipt_lists_the_gguf_files(cell_and_gguf, tmp_path):
    cell, files = cell_and_gguf
    r = upload_cell(
        cell, tmp_path / "r.json", repo="org/grid", path_in_repo="1b-std/g__m", gguf=files
    )
    assert [(e["type"], e["path_in_repo"], e["repo"]) for e in r["gguf"]] == [
        ("bf16", "1b-std/g__m/g__m.bf16.gguf", "org/grid"),
        ("q8_0", "1b-std/g__m/g__m.q8_0.gguf", "org/grid"),
    ]
    assert r["gguf"][0]["bytes"] == 2_500_000 and r["gguf"][0]["check"]["top1_agree"] == 5
    assert r["gguf"][0]["checked_by"] == "llama.cpp (llama-cpp-python 0.3.36)"
    assert sorted(r["files"]) == sorted(
        ["config.json", "model.safetensors", "g__m.bf16.gguf", "g__m.bf16.gguf.json",
         "g__m.q8_0.gguf", "g__m.q8_0.gguf.json"]
    )  # fmt: skip
    assert json.loads((tmp_path / "r.json").read_text()) == r
    # a separate repo: not in the cell's files, listed on their own
    r = upload_cell(
        cell, tmp_path / "r2.json", repo="org/grid", path_in_repo="1b-std/g__m",
        gguf=files, gguf_repo="org/ggufs",
    )  # fmt: skip
    assert sorted(r["files"]) == ["config.json", "model.safetensors"]
    assert {e["repo"] for e in r["gguf"]} == {"org/ggufs"} and r["gguf_commit"] is None
    assert r["gguf_changed"] == sorted(f"{f.name}{s}" for f in files for s in ("", ".json"))


def test_a_gguf_its_sidecar_does_not_describe_is_refused(cell_and_gguf):
    _, files = cell_and_gguf
    files[1].write_bytes(b"changed")
    with pytest.raises(Exception, match=r"g__m.q8_0.gguf: its sidecar .* describes another file"):
        gguf_entries(files, "1b-std/g__m", "org/grid")
    Path(f"{files[0]}.json").unlink()
    with pytest.raises(Exception, match=r"g__m.bf16.gguf.json: cannot read the GGUF's check"):
        gguf_entries(files[:1], "1b-std/g__m", "org/grid")


def test_the_upload_takes_each_gguf_hash_from_its_sidecar(cell_and_gguf, tmp_path, monkeypatch):
    """A GGUF no newer than its sidecar, with the recorded size, is not read again at upload
    (its sha256 is the export's, in the receipt and the manifest, in either repo); one
    modified after its sidecar is hashed and refused when it differs."""
    import os

    from mergebake import upload

    cell, files = cell_and_gguf
    hashed = []
    sha256_file = upload.sha256_file
    monkeypatch.setattr(upload, "sha256_file", lambda p: hashed.append(Path(p)) or sha256_file(p))
    for gguf_repo in (None, "org/ggufs"):
        r = upload_cell(
            cell, tmp_path / "r.json", repo="org/grid", path_in_repo="1b-std/g__m",
            gguf=files, gguf_repo=gguf_repo,
        )  # fmt: skip
        assert not [p for p in hashed if p.suffix == ".gguf"], hashed
        for e in r["gguf"]:
            assert (
                e["sha256"]
                == hashlib.sha256(Path(files[0].parent, e["file"]).read_bytes()).hexdigest()
            )
    # the same size, other bytes, written after the sidecar: hashed, and refused
    data = files[1].read_bytes()
    files[1].write_bytes(b"x" * len(data))
    side = Path(f"{files[1]}.json")
    st = side.stat()
    os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(Exception, match=r"g__m.q8_0.gguf: its sidecar .* describes another file"):
        gguf_entries(files, "1b-std/g__m", "org/grid")
    assert hashed[-1] == files[1]


def test_card_lists_files_with_type_size_check_and_how_to_run(cell_and_gguf):
    _, files = cell_and_gguf
    spec = {
        "repo": "org/grid",
        "gguf": {"repo": None, "files": gguf_entries(files, "1b-std/g__m", "org/grid")},
    }
    text = "\n".join(modelcard._gguf_section(spec))
    assert "| `g__m.bf16.gguf` | bf16 | 2.5 MB | 5/5 | 0.02 |" in text
    assert "| `g__m.q8_0.gguf` | q8_0 | 1.3 MB | 5/5 | 0.02 |" in text
    assert "hf download org/grid 1b-std/g__m/g__m.bf16.gguf --local-dir ." in text
    assert "llama-cli -m 1b-std/g__m/g__m.bf16.gguf" in text
    assert modelcard._gguf_section({"repo": "org/grid"}) == []


def test_gguf_repo_gets_its_own_commit_on_the_fake_hub(cell_and_gguf, tmp_path, monkeypatch):
    from _fakehub import FakeHub, install
    from huggingface_hub import constants, set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_fakeHubUnitTestTokenNotReal")
    hub = FakeHub(tmp_path / "fakehub", token="hf_fakeHubUnitTestTokenNotReal")
    install(hub)
    try:
        cell, files = cell_and_gguf
        kw = dict(repo="org/grid", path_in_repo="1b-std/g__m", enabled=True, gguf=files)
        r = upload_cell(cell, tmp_path / "r.json", gguf_repo="org/ggufs", **kw)
        cell_files = sorted(f for f in hub.files("org/grid") if f.startswith("1b-std/"))
        assert cell_files == ["1b-std/g__m/config.json", "1b-std/g__m/model.safetensors"]
        got = hub.files("org/ggufs")
        assert got["1b-std/g__m/g__m.q8_0.gguf"] == files[1].read_bytes()
        assert r["gguf_commit"] == hub.head("org/ggufs") and r["commit"] == hub.head("org/grid")
        assert hub.history("org/ggufs")[-1]["summary"] == ("Upload GGUF of 1b-std/g__m: bf16, q8_0")
        again = upload_cell(cell, tmp_path / "r2.json", gguf_repo="org/ggufs", **kw)
        assert again["gguf_changed"] == [] and again["gguf_commit"] == r["gguf_commit"]
        # the same repo: one commit holds the cell and its GGUF files
        r3 = upload_cell(cell, tmp_path / "r3.json", **{**kw, "repo": "org/grid2"})
        assert sorted(hub.history("org/grid2")[-1]["added"]) == sorted(
            f"1b-std/g__m/{n}" for n in r3["files"]
        )
        assert "1b-std/g__m/g__m.bf16.gguf" in hub.files("org/grid2")
    finally:
        set_client_factory(default_client_factory)


def test_preflight_refuses_a_family_llama_cpp_cannot_convert(tmp_path, monkeypatch):
    base = tmp_path / "foo-base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"architectures": ["FooBarForCausalLM"]}))
    c = _config(gguf=["bf16"])
    c["bases"]["1b-std"] = {"path": str(base)}
    cfg = load_config(c)
    tools = ROOT / "resources" / "tools"
    export.converter(tools)  # fetched once into the repository's ignored resources/
    cache = tmp_path / "tools"
    cache.mkdir()
    (cache / export.tools_folder(tools).name).symlink_to(export.tools_folder(tools))
    problems, notes = check_gguf_support(cfg, workdir=tmp_path, tools=cache)
    assert notes == []
    assert len(problems) == 1
    assert problems[0].startswith("config key 'export.gguf': base '1b-std'")
    assert "architecture 'FooBarForCausalLM' is not in the converter's registry" in problems[0]
    answers = json.loads(gguf_support_cache(cache).read_text())
    assert sorted(answers.values(), key=str) == [
        None,
        "architecture 'FooBarForCausalLM' is not in the converter's registry",
    ]
    # cached per architecture: a second check asks llama.cpp nothing
    monkeypatch.setattr(export, "gguf_support_many", lambda *a, **k: pytest.fail("asked again"))
    assert check_gguf_support(cfg, workdir=tmp_path, tools=cache)[0] == problems
    # nothing exported: nothing asked, even uncached
    assert check_gguf_support(load_config(_config()), workdir=tmp_path / "x") == ([], [])


def test_dry_run_plans_exactly_these_exports(tmp_path):
    from _workflow import planned_jobs, write_config

    c = _config(gguf=["bf16", "q8_0"])
    c["grid"][1]["export"] = {"gguf": ["q6_k"]}
    write_config(tmp_path / "config.yaml", c)
    jobs = planned_jobs(tmp_path)
    assert {j for j in jobs if j[0] in ("gguf_tools", "export_gguf")} == {
        ("gguf_tools", "resources/tools/llama.cpp-0.3.36/tools.json"),
        ("export_gguf", "results/gguf/1b-std/eng-nob__ties.bf16.gguf"),
        ("export_gguf", "results/gguf/1b-std/eng-nob__ties.q8_0.gguf"),
        ("export_gguf", "results/gguf/4b-std/eng-nob__linear.q6_k.gguf"),
    }
    assert not (tmp_path / "resources").exists()  # a dry run asks llama.cpp nothing
