"""evalcache: what the key depends on (and what not), restore and store, where it lives."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from _evalfixtures import build_tiny_gemma, write_mc_task

from mergebake import evalcache as ec
from mergebake import evaluate as ev
from mergebake.outputs import write_provenance

TASKS = [{"name": "demo_a", "num_fewshot": 0}, {"name": "demo_b", "num_fewshot": 1}]
SETTINGS = {"seed": 7, "batch_size": 1, "limit": None, "device": "cpu", "dtype": "auto"}


def _never(*a, **k):
    raise AssertionError("lm-eval must not run on a cache hit")


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A tiny model with provenance, two tasks, and one real eval through the cache."""
    root = tmp_path_factory.mktemp("evalcache")
    model = build_tiny_gemma(root / "one" / "model")
    (model / "recipe.yaml").write_text(f"base_model: {root}/one\n")
    write_provenance(model, step="test", inputs={})
    tasks = root / "one" / "tasks"
    write_mc_task(tasks, "demo_a")
    write_mc_task(tasks, "demo_b")
    cache = ec.EvalCache(root / "cache")
    out = root / "one" / "eval" / "cell.json"
    data = ec.evaluate_cached(cache, model, out, tasks=TASKS, include_path=tasks, **SETTINGS)
    return {"root": root, "model": model, "tasks": tasks, "cache": cache, "out": out, "data": data}


def _second_dir(scored, where: Path) -> tuple[Path, Path]:
    """The same model bytes and tasks written afresh in another folder (absolute data paths
    in the YAMLs name that folder), with another recipe.yaml and provenance."""
    model = where / "model"
    shutil.copytree(scored["model"], model)
    (model / "recipe.yaml").write_text(f"base_model: {where}\n")
    write_provenance(model, step="other", inputs={})
    tasks = where / "tasks"
    write_mc_task(tasks, "demo_a")
    write_mc_task(tasks, "demo_b")
    assert str(where) in (tasks / "demo_a.yaml").read_text()
    return model, tasks


def test_a_miss_runs_lm_eval_records_the_key_and_stores_the_result(scored):
    data, out = scored["data"], scored["out"]
    assert data == json.loads(out.read_text())
    key = data["mergebake"]["cache"]["key"]
    assert data["mergebake"]["cache"] == {"status": "miss", "key": key}
    assert "demo_a" in data["results"] and data["mergebake"]["seconds"] > 0
    entry = scored["cache"].folder(key)
    assert sorted(p.name for p in entry.iterdir()) == [ec.ENTRY, ec.RESULT, ec.SAMPLES]
    assert json.loads((entry / ec.RESULT).read_text()) == data
    assert (entry / ec.SAMPLES).read_bytes() == ev.samples_path(out).read_bytes()
    meta = json.loads((entry / ec.ENTRY).read_text())
    assert meta["key"] == key and meta["stored_by"] == str(out.resolve())
    assert ec.key_of(meta["described"]) == key
    assert set(meta["described"]["model"]) == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }  # not recipe.yaml, provenance.json


def test_a_hit_in_another_folder_restores_without_running_lm_eval(scored, tmp_path, caplog):
    model, tasks = _second_dir(scored, tmp_path / "two")
    out = tmp_path / "two" / "eval" / "cell.json"
    with caplog.at_level(logging.INFO, logger="mergebake.evalcache"):
        data = ec.evaluate_cached(
            scored["cache"], model, out, run=_never, tasks=TASKS, include_path=tasks, **SETTINGS
        )
    first = scored["data"]
    key = first["mergebake"]["cache"]["key"]
    entry = json.loads((scored["cache"].folder(key) / ec.ENTRY).read_text())
    by = scored["out"].resolve()
    assert f"restored from the eval cache {key} (stored {entry['stored']} by {by})" in caplog.text
    assert data == json.loads(out.read_text())
    assert data["results"] == first["results"] and data["configs"] == first["configs"]
    assert ev.samples_path(out).read_bytes() == ev.samples_path(scored["out"]).read_bytes()
    assert data["mergebake"]["cache"] == {
        "status": "hit",
        "key": key,
        "stored": entry["stored"],
        "stored_by": str(scored["out"].resolve()),
    }
    assert data["mergebake"]["model"] == str(model.resolve())
    assert data["mergebake"]["include_path"] == str(tasks.resolve())
    assert data["mergebake"]["seconds"] == first["mergebake"]["seconds"]  # of the computation
    assert ev.load_scores(out) == ev.load_scores(scored["out"])
    assert not list(out.parent.glob(".*tmp*"))


def _describe(model, task_dir, **changes):
    kw = {"tasks": TASKS, "include_path": task_dir, **SETTINGS, **changes}
    return ec.key_of(ec.describe(model, **kw))


def test_the_key_follows_what_decides_the_scores(scored, tmp_path):
    model, tasks = _second_dir(scored, tmp_path / "two")
    key = scored["data"]["mergebake"]["cache"]["key"]
    assert _describe(model, tasks) == key
    assert _describe(model, tasks, batch_size="1") == key  # as the command line gives it
    assert _describe(model, tasks, trust_remote_code=False) == key  # the default, explicit
    for change in (
        {"seed": 8},
        {"batch_size": 2},
        {"limit": 3},
        {"dtype": "float32"},
        {"trust_remote_code": True},
        {"tasks": [TASKS[0]]},
        {"tasks": [TASKS[0], {"name": "demo_b", "num_fewshot": 2}]},
    ):
        assert _describe(model, tasks, **change) != key, change
    # a task's data
    data = tasks / "demo_b_test.jsonl"
    data.write_text(data.read_text().replace("red", "blue", 1))
    assert _describe(model, tasks) != key


def test_one_byte_of_the_weights_changes_the_key_and_metadata_files_do_not(scored, tmp_path):
    model, tasks = _second_dir(scored, tmp_path / "two")
    key = _describe(model, tasks)
    (model / "README.md").write_text("a model card")
    (model / ".snakemake_timestamp").write_text("")
    (model / "provenance.json").write_text("{}")
    assert _describe(model, tasks) == key
    weights = model / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1
    weights.write_bytes(bytes(blob))
    assert _describe(model, tasks) != key


def test_the_model_hashes_come_from_its_provenance_record(scored, tmp_path):
    """No hashing twice: the key takes the sha256 the model's writer recorded."""
    model, tasks = _second_dir(scored, tmp_path / "two")
    key = _describe(model, tasks)
    prov = json.loads((model / "provenance.json").read_text())
    prov["outputs"]["model.safetensors"]["sha256"] = "0" * 64
    (model / "provenance.json").write_text(json.dumps(prov))
    assert ec.model_files(model)["model.safetensors"]["sha256"] == "0" * 64
    assert _describe(model, tasks) != key


def test_a_corrupt_entry_is_a_miss_and_is_replaced(scored, tmp_path, caplog):
    cache = ec.EvalCache(tmp_path / "cache")
    shutil.copytree(scored["cache"].root, cache.root)
    key = scored["data"]["mergebake"]["cache"]["key"]
    (cache.folder(key) / ec.SAMPLES).write_bytes(b"garbage")
    assert cache.lookup(key) is None
    assert "unusable" in caplog.text
    out = tmp_path / "eval" / "cell.json"
    calls = []

    def rerun(model, out, **kw):
        calls.append(model)
        shutil.copy(ev.samples_path(scored["out"]), ev.samples_path(out))
        data = {**scored["data"], "mergebake": {"model": str(model)}}
        out.write_text(json.dumps(data))
        return data

    out.parent.mkdir()
    data = ec.evaluate_cached(
        cache,
        scored["model"],
        out,
        run=rerun,
        tasks=TASKS,
        include_path=scored["tasks"],
        **SETTINGS,
    )
    assert len(calls) == 1 and data["mergebake"]["cache"] == {"status": "miss", "key": key}
    assert cache.lookup(key) is not None
    assert (cache.folder(key) / ec.SAMPLES).read_bytes() == ev.samples_path(out).read_bytes()


def test_a_second_store_of_the_same_key_keeps_the_first(scored, tmp_path):
    key = scored["data"]["mergebake"]["cache"]["key"]
    cache = ec.EvalCache(tmp_path / "cache")
    first = cache.store(key, scored["out"], {"n": 1})
    stored = json.loads((first / ec.ENTRY).read_text())
    assert cache.store(key, scored["out"], {"n": 2}) == first
    assert json.loads((first / ec.ENTRY).read_text()) == stored
    assert [p.name for p in first.parent.iterdir()] == [key]  # no temporary folder left


def test_an_unwritable_cache_only_warns(scored, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    key = scored["data"]["mergebake"]["cache"]["key"]
    assert ec.EvalCache(blocker).store(key, scored["out"], {}) is None
    assert "could not store" in caplog.text


def test_off_runs_the_eval_and_says_so(scored, tmp_path):
    out = tmp_path / "cell.json"

    def run(model, out, **kw):
        out.write_text(json.dumps({"results": {}, "mergebake": {"seed": 7}}))
        return {}

    data = ec.evaluate_cached(None, scored["model"], out, run=run, tasks=TASKS)
    assert data["mergebake"] == {"seed": 7, "cache": {"status": "off"}}


def test_where_the_cache_lives_and_how_it_is_turned_off(monkeypatch, tmp_path):
    for var in (ec.ENV_DIR, ec.ENV_OFF, "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ec.default_dir() == tmp_path / "home" / ".cache" / "mergebake"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ec.EvalCache.configured().root == tmp_path / "xdg" / "mergebake"
    monkeypatch.setenv(ec.ENV_DIR, str(tmp_path / "mine"))
    assert ec.EvalCache.configured().root == tmp_path / "mine"
    assert ec.EvalCache.configured(tmp_path / "flag").root == tmp_path / "flag"
    assert ec.EvalCache.configured(enabled=False) is None
    for value, off in (("1", True), ("yes", True), ("0", False), ("false", False), ("", False)):
        monkeypatch.setenv(ec.ENV_OFF, value)
        assert (ec.EvalCache.configured() is None) is off, value


def test_the_config_section_becomes_the_environment(tmp_path):
    assert ec.environment({"enabled": True, "dir": None}, tmp_path) == {}
    assert ec.environment({"enabled": False, "dir": None}, tmp_path) == {ec.ENV_OFF: "1"}
    assert ec.environment({"enabled": True, "dir": "c"}, tmp_path) == {
        ec.ENV_DIR: str(tmp_path.resolve() / "c")
    }
    assert ec.environment({"dir": "/abs"}, tmp_path)[ec.ENV_DIR] == os.path.abspath("/abs")


def test_a_bad_request_is_refused_before_anything_is_hashed(scored, tmp_path, monkeypatch):
    """The eval's own checks (here: vLLM asked for where it is not installed) run before
    the cache hashes the model for a key, and give the eval's own error."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")

    def no_key(*a, **k):
        raise AssertionError("the key was computed before the request was checked")

    monkeypatch.setattr(ec, "describe", no_key)
    with pytest.raises(ev.MergebakeError, match="key 'eval.backend' is vllm, but the vllm package"):
        ec.evaluate_cached(
            scored["cache"],
            scored["model"],
            tmp_path / "v.json",
            tasks=TASKS,
            include_path=scored["tasks"],
            **{**SETTINGS, "device": "cuda"},
            backend="vllm",
        )
    assert not (tmp_path / "v.json").exists()
