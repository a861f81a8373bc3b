"""The task index of eval.include_path against lm-eval's own TaskManager, and the files
each task reads (includes, !function modules, groups, tags, local data)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergebake.workflow.tasks import build_index, data_files, task_files


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    """A task folder with includes, a group, a tag, a !function and relative data files."""
    monkeypatch.chdir(tmp_path)
    root = Path("tasks")
    (root / "sub").mkdir(parents=True)
    Path("data/dir").mkdir(parents=True)
    for f in ("data/a_test.jsonl", "data/a_train.jsonl", "data/dir/x.jsonl", "data/c.jsonl"):
        Path(f).write_text("{}\n")
    (root / "_common.yaml").write_text(
        "dataset_path: json\noutput_type: multiple_choice\ndoc_to_text: !function utils.text\n"
    )
    (root / "utils.py").write_text("def text(doc):\n    return doc['q']\n")
    (root / "a.yaml").write_text(
        "include: _common.yaml\ntask: task_a\ntag: [mytag]\n"
        "dataset_kwargs:\n  data_files:\n    test: data/a_test.jsonl\n"
        "    train: [data/a_train.jsonl]\n"
    )
    (root / "sub" / "b.yaml").write_text(
        "task: task_b\ndataset_path: json\ndataset_kwargs:\n  data_dir: data/dir\n"
    )
    (root / "sub" / "c.yaml").write_text(
        "task: task_c\ndataset_path: json\n"
        "dataset_kwargs:\n  data_dir: data\n  data_files: c.jsonl\n"
    )
    (root / "grp.yaml").write_text("group: grp\ntask:\n  - task_b\n  - task_c\n")
    (root / "dup.yaml").write_text("task: task_a\ndataset_path: json\n")  # ignored duplicate
    (root / "broken.yaml").write_text("task: [unclosed\n")
    return root


def test_index_agrees_with_lm_evals_task_manager(folder):
    from lm_eval.tasks import TaskManager

    ours = build_index(folder)
    tm = TaskManager(include_path=str(folder.resolve()), include_defaults=False)
    theirs = {
        name: (e.kind.name.lower(), e.yaml_path.resolve() if e.yaml_path else None)
        for name, e in tm.task_index.items()
    }
    assert {
        name: (e.kind, e.yaml_path.resolve() if e.yaml_path else None) for name, e in ours.items()
    } == theirs
    assert set(ours) == {"task_a", "task_b", "task_c", "grp", "mytag"}


def test_files_of_a_task_include_its_includes_functions_and_data(folder):
    index = build_index(folder)
    assert task_files(index, ["task_a"]) == [
        "data/a_test.jsonl",
        "data/a_train.jsonl",
        "tasks/_common.yaml",
        "tasks/a.yaml",
        "tasks/utils.py",
    ]
    assert task_files(index, ["task_b"]) == ["data/dir/x.jsonl", "tasks/sub/b.yaml"]
    assert task_files(index, ["task_c"]) == ["data/c.jsonl", "tasks/sub/c.yaml"]
    assert task_files(index, ["grp"]) == [
        "data/c.jsonl",
        "data/dir/x.jsonl",
        "tasks/grp.yaml",
        "tasks/sub/b.yaml",
        "tasks/sub/c.yaml",
    ]
    assert task_files(index, ["mytag"]) == task_files(index, ["task_a"])
    assert task_files(index, ["hellaswag"]) == []  # built-in: nothing local
    assert build_index("nowhere") == {}


def test_data_files_globs_remote_and_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("d").mkdir()
    for n in ("1.jsonl", "2.jsonl"):
        Path("d", n).write_text("{}\n")
    cfg = {"dataset_kwargs": {"data_files": {"test": "d/*.jsonl", "x": "hf://datasets/a/b"}}}
    assert data_files(cfg) == ["d/1.jsonl", "d/2.jsonl"]
    assert data_files({"dataset_kwargs": {"data_files": "missing.jsonl"}}) == ["missing.jsonl"]
    assert data_files({"dataset_path": "d"}) == ["d/1.jsonl", "d/2.jsonl"]
    assert data_files({"dataset_path": "json"}) == []
