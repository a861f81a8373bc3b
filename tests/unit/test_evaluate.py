"""evaluate: lm-eval on a tiny local Gemma-3, per-task few-shot, seeds, preflight errors."""

from __future__ import annotations

import gzip
import json

import pytest
from _evalfixtures import build_tiny_gemma, write_gen_task, write_mc_task

from mergebake import MergebakeError
from mergebake import evaluate as ev

TASKS = [{"name": "demo_a", "num_fewshot": 0}, {"name": "demo_b", "num_fewshot": 2}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model, an include folder with two MC tasks, and one evaluate() run."""
    root = tmp_path_factory.mktemp("eval")
    model = build_tiny_gemma(root / "model")
    tasks = root / "tasks"
    write_mc_task(tasks, "demo_a")
    write_mc_task(tasks, "demo_b", num_fewshot=5)  # YAML default, overridden by the request
    out = root / "out" / "cell.json"
    returned = ev.evaluate(model, out, tasks=TASKS, include_path=tasks, seed=7)
    return {"root": root, "model": model, "tasks": tasks, "out": out, "returned": returned}


def test_results_json_structure(tiny):
    data = json.loads(tiny["out"].read_text())
    assert data == tiny["returned"]
    for task in ("demo_a", "demo_b"):
        acc = data["results"][task]["acc,none"]
        assert 0.0 <= acc <= 1.0
        assert "acc_stderr,none" in data["results"][task]
        assert task in data["configs"] and task in data["versions"]
    mb = data["mergebake"]
    assert mb["model"] == str(tiny["model"].resolve())
    assert mb["tasks"] == TASKS
    assert mb["seed"] == 7
    assert mb["samples"] == "cell.samples.json.gz"
    assert isinstance(mb["seconds"], float) and mb["seconds"] > 0
    assert data["config"]["random_seed"] == 7 and data["config"]["fewshot_seed"] == 7
    assert not list(tiny["out"].parent.glob(".*tmp*"))  # atomic write left no temp file


def test_per_task_fewshot_honoured(tiny):
    data = tiny["returned"]
    assert data["n-shot"] == {"demo_a": 0, "demo_b": 2}
    assert data["configs"]["demo_a"]["num_fewshot"] == 0
    assert data["configs"]["demo_b"]["num_fewshot"] == 2


def test_load_scores(tiny):
    scores = ev.load_scores(tiny["out"])
    assert set(scores) == {"demo_a", "demo_b"}
    for task, row in scores.items():
        assert row == {"acc,none": tiny["returned"]["results"][task]["acc,none"]}


def test_same_seed_same_results(tiny):
    again = ev.evaluate(
        tiny["model"], tiny["root"] / "again.json", tasks=TASKS, include_path=tiny["tasks"], seed=7
    )
    assert again["results"] == tiny["returned"]["results"]
    assert again["n-shot"] == tiny["returned"]["n-shot"]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything tries to build or load a model."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    def boom(*a, **k):
        raise AssertionError("model loaded before the task check")

    monkeypatch.setattr(lm_eval, "simple_evaluate", boom)
    monkeypatch.setattr(HFLM, "__init__", boom)


def test_unknown_task_fails_before_model_load(tiny, tmp_path, monkeypatch, no_model_load):
    # An empty stand-in for lm-eval's ~15k built-in task YAMLs keeps this test fast.
    empty = tmp_path / "builtin"
    empty.mkdir()
    monkeypatch.setattr(ev, "_builtin_tasks_dir", lambda: empty)
    (tiny["tasks"] / "broken.yaml").write_text("task: [unclosed\n")
    try:
        with pytest.raises(MergebakeError) as err:
            ev.evaluate(
                tiny["model"],
                tmp_path / "x.json",
                include_path=tiny["tasks"],
                tasks=[
                    {"name": "demo_a", "num_fewshot": 0},
                    {"name": "no_such_task", "num_fewshot": 1},
                ],
            )
    finally:
        (tiny["tasks"] / "broken.yaml").unlink()
    msg = str(err.value)
    assert "no_such_task" in msg and str(tiny["tasks"].resolve()) in msg
    assert "broken.yaml" in msg  # lm-eval skips unparsable YAMLs silently; we name them
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize(
    "tasks, needle",
    [
        ([], "no tasks"),
        ([{"name": "demo_a", "num_fewshot": -1}], "num_fewshot"),
        ([{"name": "demo_a", "num_fewshot": True}], "num_fewshot"),
        ([{"num_fewshot": 0}], "name"),
        ([{"name": "demo_a", "num_fewshot": 0}] * 2, "twice"),
    ],
)
def test_bad_task_specs(tiny, tmp_path, no_model_load, tasks, needle):
    with pytest.raises(MergebakeError, match=needle):
        ev.evaluate(tiny["model"], tmp_path / "x.json", tasks=tasks, include_path=tiny["tasks"])


def test_missing_model_and_include_path(tiny, tmp_path, no_model_load):
    with pytest.raises(MergebakeError, match="config.json"):
        ev.evaluate(tmp_path / "nope", tmp_path / "x.json", tasks=TASKS, include_path=tiny["tasks"])
    with pytest.raises(MergebakeError, match="include path"):
        ev.evaluate(
            tiny["model"], tmp_path / "x.json", tasks=TASKS, include_path=tmp_path / "no_tasks"
        )


def test_load_scores_errors(tmp_path):
    with pytest.raises(MergebakeError, match="not found"):
        ev.load_scores(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(MergebakeError, match="not valid JSON"):
        ev.load_scores(tmp_path / "bad.json")
    (tmp_path / "odd.json").write_text("{}")
    with pytest.raises(MergebakeError, match="results"):
        ev.load_scores(tmp_path / "odd.json")


def test_unloadable_task_fails_before_model_load(tiny, tmp_path, no_model_load):
    tasks = tmp_path / "tasks"
    yaml_path = write_mc_task(tasks, "demo_gone")
    (tasks / "demo_gone_test.jsonl").unlink()
    with pytest.raises(MergebakeError, match="demo_gone") as err:
        ev.evaluate(
            tiny["model"],
            tmp_path / "x.json",
            include_path=tasks,
            tasks=[{"name": "demo_gone", "num_fewshot": 0}],
        )
    assert str(yaml_path.resolve()) in str(err.value)


def test_samples_file_matches_scores(tiny):
    """Per-document values beside the eval JSON: their mean is lm-eval's score."""
    data = json.loads(gzip.decompress(ev.samples_path(tiny["out"]).read_bytes()))
    assert ev.samples_path(tiny["out"]).name == "cell.samples.json.gz"
    assert data["format"] == "mergebake-samples/1"
    assert set(data["tasks"]) == {"demo_a", "demo_b"}
    for task in ("demo_a", "demo_b"):
        entry = data["tasks"][task]
        assert entry["doc_ids"] == list(range(6))
        assert list(entry["values"]) == ["acc,none"]
        vals = entry["values"]["acc,none"]
        assert set(vals) <= {0, 1} and len(vals) == 6
        assert sum(vals) / 6 == pytest.approx(tiny["returned"]["results"][task]["acc,none"])
        assert entry["aggregation"] == {"acc": "mean"}
    # Both tasks read the same six documents, so their document digests agree.
    assert data["tasks"]["demo_a"]["docs_sha256"] == data["tasks"]["demo_b"]["docs_sha256"]


def test_samples_of_generate_until_task(tiny, tmp_path):
    tasks = tmp_path / "tasks"
    write_gen_task(tasks, "demo_gen", n_test=5)
    out = tmp_path / "gen.json"
    res = ev.evaluate(
        tiny["model"], out, tasks=[{"name": "demo_gen", "num_fewshot": 0}], include_path=tasks
    )
    entry = json.loads(gzip.decompress(ev.samples_path(out).read_bytes()))["tasks"]["demo_gen"]
    assert entry["doc_ids"] == [0, 1, 2, 3, 4]
    vals = entry["values"]["exact_match,none"]
    assert len(vals) == 5 and set(vals) <= {0, 1}
    assert sum(vals) / 5 == pytest.approx(res["results"]["demo_gen"]["exact_match,none"])
    assert entry["aggregation"] == {"exact_match": "mean"}
