"""Your own lm-eval tasks (eval.include_path) are inputs of the evals that run them: a
change to a task's YAML or its data file reschedules exactly those evals and what reads
their scores; a change to a task nobody runs reschedules nothing. Snakemake 9 keeps
checksums of small inputs, so each edit changes content, and is undone by restoring it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from _workflow import demo_config, planned_jobs, snakemake, write_config

pytestmark = pytest.mark.workflow

BASE, CELL = "1b-std", "eng-nob__linear"


@pytest.fixture(scope="module")
def built(demo, tmp_path_factory) -> tuple[Path, Path]:
    """The demo run, re-scored on one cell with tasks from ./mytasks reading ./data."""
    wd = tmp_path_factory.mktemp("tasks") / "wd"
    shutil.copytree(demo, wd, symlinks=True)
    (wd / "mytasks").mkdir()
    (wd / "data").mkdir()
    for skill, task in (("eng", "my_eng"), ("nob", "my_unused")):
        shutil.copy(wd / f"resources/demo/tasks/{skill}.jsonl", wd / f"data/{task}.jsonl")
        text = (wd / f"resources/demo/tasks/demo_{skill}.yaml").read_text()
        text = text.replace(f"task: demo_{skill}", f"task: {task}")
        old = str((demo / f"resources/demo/tasks/{skill}.jsonl").resolve())  # written there
        assert old in text
        # relative data_files resolve against the working directory (lm-eval, DESIGN.md)
        text = text.replace(f'"{old}"', f'"data/{task}.jsonl"')
        (wd / f"mytasks/{task}.yaml").write_text(text)
    cfg = demo_config()
    cfg["grid"] = [
        {"sizes": ["1b"], "variants": ["std"], "groups": ["eng-nob"], "methods": ["linear"]}
    ]
    cfg["eval"].update(demo_tasks=False, include_path="mytasks", tasks=[{"name": "my_eng"}])
    config = write_config(wd / "mytasks.yaml", cfg)
    snakemake(wd, "--cores", "2", config=config)
    assert planned_jobs(wd, config) == set()
    return wd, config


RESCORED = {
    ("eval_cell", f"results/eval/{BASE}/{CELL}.json"),
    ("eval_baseline", f"results/eval/{BASE}/_base.json"),
    ("eval_baseline", f"results/eval/{BASE}/eng.json"),
    ("eval_baseline", f"results/eval/{BASE}/nob.json"),
    ("upload", f"results/uploaded/{BASE}/{CELL}.json"),  # the model card shows the scores
    ("report", "results/report/merge_eval_pivot.csv"),
    ("hub_readme", "results/uploaded/README.json"),
}


def _edited(path: Path, old: str, new: str):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return text


@pytest.mark.parametrize(
    "file, old, new, expected",
    [
        ("mytasks/my_eng.yaml", 'target_delimiter: " "', 'target_delimiter: ""', RESCORED),
        ("data/my_eng.jsonl", '"answer": ', '"answer":', RESCORED),
        ("mytasks/my_unused.yaml", 'target_delimiter: " "', 'target_delimiter: ""', set()),
        ("data/my_unused.jsonl", '"answer": ', '"answer":', set()),
    ],
    ids=["task-yaml", "task-data", "unused-yaml", "unused-data"],
)
def test_editing_a_task_file_reschedules_exactly_its_evals(built, file, old, new, expected):
    wd, config = built
    before = _edited(wd / file, old, new)
    try:
        assert planned_jobs(wd, config) == expected
    finally:
        (wd / file).write_text(before)
    assert planned_jobs(wd, config) == set()
