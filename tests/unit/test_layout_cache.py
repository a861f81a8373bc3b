"""The layout cache: a second build of the same base's layout reads it from disk, equal
field by field to the one transformers gives, without importing transformers."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _models import make_family, make_lora

import mergebake
from mergebake import MergebakeError, layouts
from mergebake.layouts import build_layout, layout_cache_file, layout_cache_key

SRC = Path(mergebake.__file__).parents[1]
#: runtime name -> what an adapter trained with transformers 4.50/4.51 calls it (Gemma-3 VLM)
LEGACY_450 = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout-cache-bases")
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = make_family(root / family, family)
        return made[family]

    return get


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """An empty cache root of this test's own, with the cache on."""
    root = tmp_path / "cache"
    monkeypatch.setenv("MERGEBAKE_CACHE", str(root))
    monkeypatch.delenv("MERGEBAKE_NO_CACHE", raising=False)
    return root


def entries(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def names_and_config(base: Path) -> tuple[list[str], dict]:
    from mergebake.checkpoint import read_config, tensor_index

    return sorted(tensor_index(base)), read_config(base)


def legacy(name: str) -> str:
    for new, old in LEGACY_450:
        if name.startswith(new):
            return old + name[len(new) :]
    return name


def probe_names(layout) -> list[str]:
    """Names an adapter may give :meth:`Layout.adapter_param`: every runtime name, the
    ``.bias`` of each module, the same under 4.50/4.51 names, and names nothing knows."""
    runtime = sorted(layout.disk)
    modules = {n.rsplit(".", 1)[0] for n in runtime}
    out = set(runtime) | {m + ".bias" for m in modules} | {m + ".weight" for m in modules}
    out |= {legacy(n) for n in set(out)}
    out |= {"model.no_such_module.weight", "language_model.model.no_such.bias", "x"}
    return sorted(out)


def renaming_facts(layout) -> list[tuple]:
    return [
        (type(r).__name__, repr(r), r.scope_prefix, r.base_model_prefix, r.compiled_sources)
        for r in layout.renamings
    ]


@pytest.mark.parametrize("family", ["gemma3-text", "qwen2-text", "gemma3-mm", "qwen2_5-vl"])
def test_a_hit_equals_the_built_layout_field_by_field(
    bases, cache_dir, tmp_path, family, monkeypatch
):
    from transformers.core_model_loading import rename_source_key

    base = bases(family)
    with monkeypatch.context() as m:
        m.setenv("MERGEBAKE_NO_CACHE", "1")
        want = build_layout(base)
    assert not entries(cache_dir)
    cold = build_layout(base)
    (entry,) = entries(cache_dir)
    names, config = names_and_config(base)
    assert entry == layout_cache_file(config, names)
    assert entry.parent.name == entry.stem[:2] and entry.parent.parent == cache_dir / "layout"
    copy = tmp_path / "elsewhere"  # the same base in another folder: same key
    shutil.copytree(base, copy)

    def never(*a, **k):
        raise AssertionError("the layout was built, not read from the cache")

    monkeypatch.setattr(layouts, "_build_layout", never)
    hit = build_layout(copy)
    assert isinstance(hit.renamings, layouts._PickledRenamings)
    assert hit.folder == copy and cold.folder == want.folder == base
    for f in dataclasses.fields(layouts.Layout):
        if f.name not in ("folder", "renamings"):
            assert getattr(hit, f.name) == getattr(want, f.name) == getattr(cold, f.name), f.name
    assert renaming_facts(hit) == renaming_facts(want) and len(want.renamings) > 0
    probes = probe_names(want)
    renamed = 0
    for name in probes:
        # transformers' own renaming of the name, with the renamings of a fresh build
        ref = name if name in want.disk else rename_source_key(name, list(want.renamings), [])[0]
        assert hit.adapter_param(name) == want.adapter_param(name) == ref, name
        renamed += ref != name
    if family == "gemma3-mm":  # Gemma-3 4.50/4.51 adapter names reach the runtime names
        name = "language_model.model.layers.0.self_attn.q_proj.weight"
        assert hit.adapter_param(name) == "model.language_model.layers.0.self_attn.q_proj.weight"
        assert renamed > 0


def _run(code: str, cache: Path, **env: str) -> dict:
    """``code`` in a fresh interpreter with ``cache`` as the cache root; its last stdout
    line as JSON."""
    full = {
        **os.environ,
        "MERGEBAKE_CACHE": str(cache),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
        **env,
    }
    full.pop("MERGEBAKE_NO_CACHE", None)
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_hit_does_not_import_transformers(bases, tmp_path):
    base = bases("gemma3-mm")
    code = f"""
        import json, sys
        from mergebake.layouts import build_layout
        layout = build_layout({str(base)!r})
        before = "transformers" in sys.modules
        q = "model.language_model.layers.0.self_attn.q_proj"
        plain = [layout.adapter_param(q + ".weight"), layout.adapter_param(q + ".bias")]
        after_plain = "transformers" in sys.modules
        old = layout.adapter_param("language_model.model.layers.0.self_attn.q_proj.weight")
        print(json.dumps(dict(before=before, after_plain=after_plain, plain=plain, old=old,
                              after_old="transformers" in sys.modules)))
    """
    cold = _run(code, tmp_path / "cache")
    assert cold["before"] is True
    warm = _run(code, tmp_path / "cache")
    q = "model.language_model.layers.0.self_attn.q_proj"
    assert warm == {
        "before": False,
        "after_plain": False,  # its own names and bias-less modules' biases: no renaming
        "plain": [q + ".weight", q + ".bias"],
        "old": q + ".weight",  # a 4.50/4.51 name needs the renamings: now it is imported
        "after_old": True,
    }
    assert warm["plain"] == cold["plain"] and warm["old"] == cold["old"]


def test_a_warm_preflight_does_not_import_transformers(bases, tmp_path):
    base = bases("gemma3-text")
    adapter = make_lora(base, tmp_path / "lora", target_modules="all-linear")
    code = f"""
        import json, sys
        from mergebake.bake import preflight
        plan = preflight({str(base)!r}, {str(adapter)!r})
        print(json.dumps(dict(imported="transformers" in sys.modules, renamed=plan.renamed,
                              modules=len(plan.runtime))))
    """
    cold = _run(code, tmp_path / "cache")
    warm = _run(code, tmp_path / "cache")
    assert cold["imported"] is True and warm["imported"] is False
    assert warm == {**cold, "imported": False} and warm["modules"] > 0


def test_the_key_changes_with_config_names_and_versions(bases, monkeypatch):
    names, config = names_and_config(bases("gemma3-text"))
    key = layout_cache_key(config, names)
    assert len(key) == 64
    assert layout_cache_key(dict(reversed(config.items())), names[::-1]) == key  # canonical
    changed = json.loads(json.dumps(config))
    changed["rms_norm_eps"] = config["rms_norm_eps"] * 10
    others = {
        layout_cache_key(changed, names),
        layout_cache_key({**config, "num_hidden_layers": 3}, names),
        layout_cache_key(config, names[1:]),
        layout_cache_key(config, [*names, "model.layers.9.mlp.up_proj.weight"]),
    }
    real = layouts._dist_version
    for attr, value in (
        ("_dist_version", lambda n: "0.0.1" if n == "transformers" else real(n)),
        ("__version__", "0.0.0-other"),
        ("_source_sha256", lambda: "0" * 64),
    ):
        with monkeypatch.context() as m:
            m.setattr(layouts, attr, value)
            others.add(layout_cache_key(config, names))
    with monkeypatch.context() as m:
        m.setitem(layouts.TEXT_CAUSAL_LM, "made_up_text", "qwen2")
        others.add(layout_cache_key(config, names))
    assert layout_cache_key(config, names) == key
    assert len(others) == 8 and key not in others


def test_a_changed_config_is_a_miss(bases, cache_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(bases("gemma3-text"), base)
    first = build_layout(base)
    config = json.loads((base / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (base / "config.json").write_text(json.dumps(config))
    second = build_layout(base)
    assert len(entries(cache_dir)) == 2
    assert first.tie_word_embeddings and not second.tie_word_embeddings
    assert first.tied and not second.tied


@pytest.mark.parametrize(
    "damage",
    ["garbage", "truncated", "another key", "bad pickle hash", "missing field", "a list"],
)
def test_a_damaged_entry_is_a_miss_and_is_rewritten(bases, cache_dir, damage, caplog):
    base = bases("gemma3-mm")
    want = build_layout(base)
    (entry,) = entries(cache_dir)
    good = entry.read_text()
    data = json.loads(good)
    if damage == "garbage":
        entry.write_bytes(b"\x00\xff not json")
    elif damage == "truncated":
        entry.write_text(good[: len(good) // 2])
    elif damage == "another key":
        entry.write_text(json.dumps({**data, "key": "0" * 64}))
    elif damage == "bad pickle hash":
        data["renamings"]["sha256"] = "0" * 64
        entry.write_text(json.dumps(data))
    elif damage == "missing field":
        del data["layout"]["runtime"]
        entry.write_text(json.dumps(data))
    else:
        entry.write_text("[]")
    with caplog.at_level(logging.WARNING, logger="mergebake.layouts"):
        got = build_layout(base)
    assert "damaged layout cache entry" in caplog.text
    assert not isinstance(got.renamings, layouts._PickledRenamings)  # built again
    assert got.runtime == want.runtime and got.text == want.text and got.tied == want.tied
    assert entries(cache_dir) == [entry] and json.loads(entry.read_text())["key"] == entry.stem
    assert isinstance(build_layout(base).renamings, layouts._PickledRenamings)


class _Payload:
    """Unpickles into a call of ``os.mkdir``: what a planted cache entry could try."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("blob", ["not a pickle", "a planted call"])
def test_an_unreadable_pickle_is_a_clear_error_on_use(bases, cache_dir, tmp_path, blob):
    import base64
    import hashlib
    import pickle

    base = bases("gemma3-mm")
    build_layout(base)
    (entry,) = entries(cache_dir)
    data = json.loads(entry.read_text())
    marker = tmp_path / "ran"
    raw = b"not a pickle" if blob == "not a pickle" else pickle.dumps((_Payload(marker),))
    data["renamings"] = {
        "pickle": base64.b64encode(raw).decode(),
        "sha256": hashlib.sha256(raw).hexdigest(),
    }
    entry.write_text(json.dumps(data))
    layout = build_layout(base)
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert layout.adapter_param(name) == name  # no renamings needed
    assert layout.adapter_param(name.replace(".weight", ".bias")) == name.replace("weight", "bias")
    with pytest.raises(MergebakeError, match=rf"{entry}: cannot unpickle.*delete the file"):
        layout.adapter_param("language_model.model.layers.0.self_attn.q_proj.weight")
    assert not marker.exists()


def test_no_cache_writes_nothing(bases, cache_dir, monkeypatch):
    base = bases("gemma3-text")
    for value in ("1", "true", "yes"):
        monkeypatch.setenv("MERGEBAKE_NO_CACHE", value)
        names, config = names_and_config(base)
        assert layout_cache_file(config, names) is None
        assert build_layout(base).runtime
    assert not cache_dir.exists()
    monkeypatch.setenv("MERGEBAKE_NO_CACHE", "0")
    build_layout(base)
    assert len(entries(cache_dir)) == 1


def test_an_unwritable_cache_only_warns(bases, tmp_path, monkeypatch, caplog):
    base = bases("gemma3-text")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache root should be")
    monkeypatch.setenv("MERGEBAKE_CACHE", str(blocker))
    monkeypatch.delenv("MERGEBAKE_NO_CACHE", raising=False)
    with caplog.at_level(logging.WARNING, logger="mergebake.layouts"):
        got = build_layout(base)
    assert "cannot store the layout cache entry" in caplog.text
    with monkeypatch.context() as m:
        m.setenv("MERGEBAKE_NO_CACHE", "1")
        want = build_layout(base)
    assert got.runtime == want.runtime and got.tied == want.tied
    assert blocker.read_text() == "a file where the cache root should be"
    assert list(tmp_path.iterdir()) == [blocker]


def test_a_full_disk_leaves_no_temporary_file(bases, cache_dir, monkeypatch, caplog):
    base = bases("gemma3-text")

    def full(self, *a, **k):
        Path.write_bytes(self, b'{"half": ')  # what a full disk leaves
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="mergebake.layouts"):
        m.setattr(Path, "write_text", full)
        assert build_layout(base).runtime
    assert "No space left on device" in caplog.text
    assert not entries(cache_dir)
    build_layout(base)
    assert len(entries(cache_dir)) == 1


def test_errors_are_not_cached(bases, cache_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    base = tmp_path / "stray"
    shutil.copytree(bases("gemma3-text"), base)
    tensors = load_file(base / "model.safetensors")
    tensors["model.no_such_module.weight"] = tensors["model.norm.weight"].clone()
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    for _ in range(2):
        with pytest.raises(MergebakeError, match="fit no rule"):
            build_layout(base)
    assert not entries(cache_dir)
