"""Which files of an lm-eval task folder (``eval.include_path``) each task reads.

Snakemake reruns a job only for files that are its inputs, so the evals that run a task
must list the files that decide its scores: the task's YAML, the YAMLs it ``include:``s,
the Python files its ``!function`` tags name, a group's or tag's member tasks, and local
data files (``dataset_kwargs.data_files`` / ``data_dir``, or a ``dataset_path`` that is a
local folder).

The index follows lm-eval 0.4.13's own rules (``lm_eval.tasks._index.TaskIndex`` and
``_yaml_loader.load_yaml``): every ``**/*.yaml`` under the folder except
``__pycache__``/``.ipynb_checkpoints``, in sorted order; a YAML with ``class`` or ``task``
defines a task, one with ``group`` a group, ``tag`` adds the task to tags; the first
definition of a name wins; an ``include:`` is resolved relative to the including YAML
and its keys are overridden by the includer's; ``!function mod.fn`` names
``<yaml dir>/mod.py``. Data paths resolve as the ``datasets`` library resolves them:
``data_files`` against ``data_dir`` when given, else against the working directory
(DESIGN.md: lm-eval's relative ``data_files`` resolve against the working directory).

It parses YAML with PyYAML rather than importing lm-eval: importing ``lm_eval.tasks``
costs ~0.6 s, which every ``snakemake`` invocation (dry runs included) would pay; the
scan of a small folder takes milliseconds. A unit test holds this index against
lm-eval's ``TaskManager`` on the same folder.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)
_IGNORE_DIRS = {"__pycache__", ".ipynb_checkpoints"}
_Base = yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader


@dataclass(frozen=True)
class _Function:
    """A ``!function mod.fn`` tag, kept unresolved."""

    spec: str


class _Loader(_Base):  # type: ignore[misc,valid-type]
    pass


_Loader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))


@dataclass
class TaskEntry:
    """One name lm-eval knows from the folder: a task, group or tag.

    ``kind`` is ``task``, ``group`` or ``tag``; ``files`` are the files the definition
    itself reads (YAMLs, Python modules, data), as paths relative to the working
    directory where the folder is; ``members`` are the names a group or tag runs.
    """

    name: str
    kind: str
    yaml_path: Path | None
    files: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)


def _load(path: Path, seen: set[Path], files: list[Path]) -> dict[str, Any]:
    """``path`` parsed with its ``include:`` chain merged (lm-eval's semantics)."""
    key = path.resolve()
    if key in seen:
        raise ValueError(f"include cycle at {path}")
    seen.add(key)
    files.append(path)
    with path.open("rb") as fh:
        cfg = yaml.load(fh, Loader=_Loader)  # noqa: S506 (safe loader + one tag)
    if not isinstance(cfg, dict):
        raise ValueError(f"expected a YAML mapping in {path}")
    for fn in _functions(cfg):
        module = path.parent / (fn.spec.rpartition(".")[0].replace(".", "/") + ".py")
        if module.is_file():
            files.append(module)
    includes = cfg.pop("include", None)
    if includes is None:
        return cfg
    merged: dict[str, Any] = {}
    for inc in includes if isinstance(includes, list) else [includes]:
        inc_path = Path(inc) if Path(inc).is_absolute() else path.parent / inc
        inc_cfg = _load(inc_path, seen, files)
        inc_cfg.pop("task_list", None)
        merged.update(inc_cfg)
    merged.update(cfg)
    return merged


def _functions(obj: Any) -> Iterable[_Function]:
    if isinstance(obj, _Function):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _functions(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _functions(v)


def _local_tree(folder: str) -> list[str]:
    """Every non-hidden file under ``folder``, sorted."""
    out = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]
    return out


def _patterns(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [p for v in value.values() for p in _patterns(v)]
    if isinstance(value, list | tuple):
        return [p for v in value for p in _patterns(v)]
    return []


def data_files(cfg: Mapping[str, Any]) -> list[str]:
    """Local files a task config reads through ``datasets``, relative to the working dir.

    ``dataset_kwargs.data_files`` (a path, a glob, a list, or a split -> path(s) mapping)
    resolved against ``dataset_kwargs.data_dir`` when given, else the working directory;
    with ``data_dir`` and no ``data_files``, every file under ``data_dir``; a
    ``dataset_path`` that is a local folder, every file under it. Remote paths (``://``)
    are not files of the build and are left out; a pattern that matches nothing is kept
    as is, so Snakemake reports the missing input by name.
    """
    kwargs = cfg.get("dataset_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        kwargs = {}
    data_dir = kwargs.get("data_dir")
    data_dir = data_dir if isinstance(data_dir, str) and "://" not in data_dir else None
    out: list[str] = []
    for pat in _patterns(kwargs.get("data_files")):
        if "://" in pat:
            continue
        full = os.path.join(data_dir, pat) if data_dir and not os.path.isabs(pat) else pat
        if glob.has_magic(full):
            out += sorted(p for p in glob.glob(full, recursive=True) if os.path.isfile(p))
        else:
            out.append(os.path.normpath(full))
    if data_dir and kwargs.get("data_files") is None and os.path.isdir(data_dir):
        out += _local_tree(data_dir)
    dataset_path = cfg.get("dataset_path")
    if isinstance(dataset_path, str) and os.path.isdir(dataset_path):
        out += _local_tree(dataset_path)
    return out


def build_index(include_path: str | os.PathLike) -> dict[str, TaskEntry]:
    """Index the task folder ``include_path``: ``{name: TaskEntry}`` for tasks, groups, tags.

    Paths in the entries keep ``include_path``'s form (relative stays relative to the
    working directory). YAML files that cannot be parsed are skipped, as lm-eval skips
    them (the eval step names them when a task is then unknown). A missing folder gives
    an empty index.
    """
    root = Path(include_path)
    index: dict[str, TaskEntry] = {}
    if not root.is_dir():
        return index
    yamls = sorted(
        (p for p in root.glob("**/*.yaml") if not any(d in _IGNORE_DIRS for d in p.parts)),
        key=lambda p: p.as_posix(),
    )
    for path in yamls:
        read: list[Path] = []
        try:
            cfg = _load(path, set(), read)
        except Exception as e:  # lm-eval skips any file it cannot load
            log.debug("skip %s (%s)", path, e)
            continue
        files = list(dict.fromkeys(str(p) for p in read))
        if "class" in cfg or ("task" in cfg and "group" not in cfg):
            name = cfg.get("task")
            if not isinstance(name, str) or name in index:
                continue
            index[name] = TaskEntry(name, "task", path, files + data_files(cfg))
            tags = cfg.get("tag") or []
            for tag in [tags] if isinstance(tags, str) else tags:
                entry = index.setdefault(tag, TaskEntry(tag, "tag", None))
                entry.members.append(name)
        elif "group" in cfg:
            name = cfg["group"]
            if not isinstance(name, str) or name in index:
                continue
            members, inline = [], []
            for t in cfg.get("task") or []:
                if isinstance(t, str):
                    members.append(t)
                elif isinstance(t, dict):  # an inline task config
                    inline += data_files(t)
                    if isinstance(t.get("task"), str):
                        members.append(t["task"])
            index[name] = TaskEntry(name, "group", path, files + inline, members)
    return index


def task_files(index: Mapping[str, TaskEntry], names: Iterable[str]) -> list[str]:
    """Every file that running the tasks ``names`` reads from the indexed folder, sorted.

    Groups and tags bring their members' files, recursively; a name the folder does not
    define (a built-in lm-eval task) brings none.
    """
    out: set[str] = set()
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen or name not in index:
            continue
        seen.add(name)
        entry = index[name]
        out.update(entry.files)
        todo += entry.members
    return sorted(out)
