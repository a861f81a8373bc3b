"""Early cutoff for evals: scores of byte-identical weights are restored, not recomputed.

An eval is keyed by what decides its scores, never by where things are or by which job
made its inputs:

- the model: size and sha256 of every file lm-eval reads from the folder (weights, config,
  tokenizer), i.e. every file but ``provenance.json``, ``recipe.yaml``, ``README.md``,
  ``mergekit_config.yml`` and hidden files. Hashes come from the folder's own record
  where no file changed since (:func:`mergebake.outputs.file_manifest`), so a
  checkpoint of gigabytes is not read again;
- the tasks: names and few-shot counts as requested, and the sha256 of every file of
  ``include_path`` that they read (:func:`mergebake.workflow.tasks.task_files`: YAMLs,
  included YAMLs, ``!function`` modules, local data files), each named by its path
  relative to ``include_path``; in the YAMLs the absolute ``include_path`` itself is
  replaced by a placeholder first, so tasks generated with absolute data paths (the
  demo's) key the same in any working directory. Built-in lm-eval tasks are keyed by name
  and by the versions below (a Hub dataset is assumed fixed for them);
- every other argument of :func:`mergebake.evaluate.evaluate` (seed, batch size, limit,
  device, dtype, trust_remote_code, and whatever is added later: all of them go in), the
  CUDA device name when on a GPU, the CPU architecture;
- the versions of the packages that compute the scores (:data:`KEY_PACKAGES`), Python's,
  the sha256 of the sources of ``evaluate.py`` and ``eval_backend.py`` and :data:`KEY_FORMAT`.

The key is the sha256 of that description as canonical JSON (sorted keys, no spaces).

Snakemake's own between-workflow cache (``cache:`` rules) cannot give this: its key
chains the upstream jobs' provenance hashes instead of reading the produced files, so a
merge rerun that writes the same bytes (a comment edited in the recipe) changes the
eval's key (``tests/workflow/test_snakemake_cache.py`` shows it).

An entry is a folder ``<cache dir>/eval/<key[:2]>/<key>/`` holding ``result.json`` (the
eval JSON as the miss wrote it), ``samples.json.gz`` (its per-document values) and
``entry.json`` (key, date, the eval JSON it was stored from, the described inputs, sizes
and sha256s of the two files). It is written into a temporary folder beside it and renamed
into place, so a reader never sees half an entry; when two jobs store the same key, the
first rename wins and the other job's copy is dropped. An entry whose files do not match
their recorded sha256s is a miss, and is replaced by the next store.

On a hit both files are copied to the eval's outputs atomically, the ``mergebake`` block
is pointed at the model and include path of this run and gets ``cache: {status: hit, key,
stored, stored_by}``, and lm-eval is not imported; ``mergebake.seconds`` stays what the
scores took to compute. On a miss lm-eval runs as without a cache, the JSON gets
``cache: {status: miss, key}``, and the entry is stored. With the cache off the JSON says
``cache: {status: off}``.

Where: ``--cache-dir``, else ``$MERGEBAKE_CACHE``, else ``$XDG_CACHE_HOME/mergebake``, else
``~/.cache/mergebake``. Off: ``--no-cache``, or ``MERGEBAKE_NO_CACHE`` set to anything but
``""``/``0``/``false``/``no``. The workflow passes its ``cache:`` config through these
environment variables (:func:`environment`), not through the eval command, so changing
them reruns nothing.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import inspect
import json
import logging
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from . import MergebakeError, __version__
from . import eval_backend as _eval_backend
from . import evaluate as _evaluate
from .cachedir import ENV_DIR, ENV_OFF, default_dir, disabled_by_env
from .outputs import atomic_file, file_manifest, sha256_file, write_json

log = logging.getLogger(__name__)

#: Bump when what an entry holds, or what the key describes, changes meaning.
KEY_FORMAT = "mergebake-eval-cache/1"
#: Packages whose versions decide an eval's scores (absent ones are recorded as None).
KEY_PACKAGES = (
    "lm_eval",
    "transformers",
    "tokenizers",
    "torch",
    "accelerate",
    "peft",
    "datasets",
    "evaluate",
    "numpy",
    "safetensors",
    "jinja2",
    "sentencepiece",
    "vllm",
)
#: Files of a model folder lm-eval does not read: provenance (paths, command, times), the
#: rendered recipe (absolute input paths), model cards.
NOT_READ = frozenset({"provenance.json", "recipe.yaml", "README.md", "mergekit_config.yml"})
RESULT, SAMPLES, ENTRY = "result.json", "samples.json.gz", "entry.json"
_STALE_TMP_SECONDS = 24 * 3600


def environment(cache_config: Mapping[str, Any] | None, workdir: str | os.PathLike) -> dict:
    """Environment variables that carry the config's ``cache`` section to the eval jobs.

    ``{}`` for the defaults (``enabled: true``, ``dir: null``: the environment decides);
    ``MERGEBAKE_NO_CACHE=1`` for ``enabled: false``; ``MERGEBAKE_CACHE=<absolute dir>``
    for a ``dir`` (``~`` expanded, relative to ``workdir``).
    """
    cfg = dict(cache_config or {})
    env: dict[str, str] = {}
    if cfg.get("enabled") is False:
        env[ENV_OFF] = "1"
    if cfg.get("dir"):
        env[ENV_DIR] = str((Path(workdir) / Path(cfg["dir"]).expanduser()).resolve())
    return env


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0], "mergebake": __version__}
    for name in KEY_PACKAGES:
        for dist in (name.replace("_", "-"), name):
            try:
                out[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                out[name] = None
    return out


def model_files(model: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes", "sha256"}}`` of the files lm-eval reads from ``model``.

    Every file of the folder but :data:`NOT_READ` and hidden ones (``.snakemake_timestamp``);
    sha256s are reused from the folder's ``provenance.json`` where no file changed since.
    """
    return {
        rel: entry
        for rel, entry in file_manifest(model).items()
        if Path(rel).name not in NOT_READ and not any(p.startswith(".") for p in rel.split("/"))
    }


def task_files(include_path: Path | None, names: list[str]) -> dict[str, str]:
    """``{path relative to include_path: sha256}`` of the files the tasks ``names`` read.

    YAML files are hashed with the absolute ``include_path`` replaced by ``${include_path}``;
    other files as they are. A name not defined under ``include_path`` (a built-in task)
    contributes nothing. ``{}`` without an include path.
    """
    if include_path is None:
        return {}
    from .workflow.tasks import build_index
    from .workflow.tasks import task_files as files_of

    root = Path(include_path).resolve()
    out: dict[str, str] = {}
    for f in files_of(build_index(root), names):
        p = Path(f)
        rel = Path(os.path.relpath(p.resolve(), root)).as_posix()
        data = p.read_bytes()
        if p.suffix in (".yaml", ".yml"):
            data = data.replace(str(root).encode(), b"${include_path}")
        out[rel] = hashlib.sha256(data).hexdigest()
    return out


def _accelerator(device: str) -> dict[str, Any]:
    acc: dict[str, Any] = {"machine": platform.machine()}
    if str(device).startswith("cuda"):
        import torch

        index = int(device.split(":", 1)[1]) if ":" in device else 0
        acc["cuda_device"] = torch.cuda.get_device_name(index)
        acc["cuda"] = torch.version.cuda
    return acc


def describe(
    model: str | os.PathLike,
    *,
    tasks: list[dict],
    include_path: str | os.PathLike | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """What an eval's scores depend on, as a JSON-able dict (see the module docstring).

    ``tasks``, ``include_path`` and ``settings`` are :func:`mergebake.evaluate.evaluate`'s
    keyword arguments; a setting left out counts as ``evaluate``'s default. Raises
    ``OSError`` when a model or task file cannot be read.
    """
    include = Path(include_path).resolve() if include_path is not None else None
    specs = [
        {"name": t.get("name"), "num_fewshot": t.get("num_fewshot", 0)}
        if isinstance(t, dict)
        else t
        for t in tasks
    ]
    names = [t["name"] for t in specs if isinstance(t, dict) and isinstance(t.get("name"), str)]
    defaults = {
        name: p.default
        for name, p in inspect.signature(_evaluate.evaluate).parameters.items()
        if p.kind is p.KEYWORD_ONLY and p.default is not p.empty
    }
    defaults.pop("include_path", None)
    settings = {**defaults, **settings}  # an argument left out counts as its default
    if "batch_size" in settings:  # 1 from the config, "1" from the command line
        settings["batch_size"] = str(settings["batch_size"])
    for name, value in settings.items():  # e.g. the vLLM options
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            settings[name] = dataclasses.asdict(value)
    return {
        "format": KEY_FORMAT,
        "model": model_files(model),
        "tasks": specs,
        "task_files": task_files(include, names),
        "settings": settings,
        "accelerator": _accelerator(str(settings.get("device", "cpu"))),
        "packages": _versions(),
        "code": {
            Path(m.__file__).name: sha256_file(m.__file__) for m in (_evaluate, _eval_backend)
        },
    }


def key_of(description: Mapping[str, Any]) -> str:
    """The cache key: hex sha256 of ``description`` as canonical JSON."""
    return hashlib.sha256(_canonical(description).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Entry:
    """A stored eval: its folder and ``entry.json``'s content."""

    key: str
    folder: Path
    meta: dict[str, Any]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class EvalCache:
    """The eval cache under ``root`` (entries in ``root/eval/``)."""

    root: Path

    @classmethod
    def configured(cls, cache_dir: str | os.PathLike | None = None, enabled: bool = True):
        """The cache to use, or None when it is off (``enabled`` false or ``MERGEBAKE_NO_CACHE``).

        ``cache_dir`` (``--cache-dir``) beats :func:`default_dir`.
        """
        if not enabled or disabled_by_env():
            return None
        return cls(Path(cache_dir).expanduser() if cache_dir else default_dir())

    def folder(self, key: str) -> Path:
        """Where the entry of ``key`` lives."""
        return self.root / "eval" / key[:2] / key

    def lookup(self, key: str) -> Entry | None:
        """The intact entry of ``key``, or None (absent, unreadable, or its files do not
        match their recorded sha256s: a warning says so)."""
        folder = self.folder(key)
        try:
            meta = json.loads((folder / ENTRY).read_text())
            for name, rec in meta["files"].items():
                if sha256_file(folder / name) != rec["sha256"]:
                    raise ValueError(f"{name} does not match its sha256")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("eval cache entry %s is unusable (%s); treating it as a miss", folder, e)
            return None
        return Entry(key, folder, meta)

    def restore(self, entry: Entry, out: Path, *, model: Path, include_path: Path | None) -> dict:
        """Write ``entry``'s eval JSON to ``out`` and its samples beside it, atomically
        (samples first, as :func:`mergebake.evaluate.evaluate` does); return the JSON."""
        data = json.loads((entry.folder / RESULT).read_text())
        with atomic_file(_evaluate.samples_path(out), "wb") as fh:
            fh.write((entry.folder / SAMPLES).read_bytes())
        mb = data.setdefault("mergebake", {})
        mb["model"] = str(model)
        mb["include_path"] = str(include_path) if include_path is not None else None
        mb["samples"] = _evaluate.samples_path(out).name
        mb["cache"] = {
            "status": "hit",
            "key": entry.key,
            "stored": entry.meta.get("stored"),
            "stored_by": entry.meta.get("stored_by"),
        }
        write_json(out, data)
        return data

    def store(self, key: str, out: Path, description: Mapping[str, Any]) -> Path | None:
        """Store the eval JSON ``out`` and its samples under ``key``; return the entry folder.

        Written into a temporary folder beside the entry and renamed into place; when another
        job stored the key first, its entry is kept and this copy dropped. An unusable entry
        already there is replaced. Errors (a read-only or full disk) are logged as warnings and
        give None: the eval itself has succeeded.
        """
        final = self.folder(key)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self._clear_stale(final.parent)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:12]}-", dir=final.parent))
            try:
                os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide it from a team
                shutil.copyfile(out, tmp / RESULT)
                shutil.copyfile(_evaluate.samples_path(out), tmp / SAMPLES)
                files = {
                    n: {"bytes": (tmp / n).stat().st_size, "sha256": sha256_file(tmp / n)}
                    for n in (RESULT, SAMPLES)
                }
                meta = {
                    "key": key,
                    "stored": _now(),
                    "stored_by": str(Path(out).resolve()),
                    "host": socket.gethostname(),
                    "files": files,
                    "described": dict(description),
                }
                write_json(tmp / ENTRY, meta)
                if final.exists() and self.lookup(key) is None:
                    self._discard(final)  # unusable: make room for this copy
                try:
                    os.rename(tmp, final)
                except OSError:
                    if self.lookup(key) is None:
                        raise
                    log.info("eval cache %s: already stored by another job; kept that", key)
                    return final
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        except OSError as e:
            log.warning("eval cache: could not store %s under %s (%s); not cached", out, final, e)
            return None
        return final

    @staticmethod
    def _discard(folder: Path) -> None:
        trash = folder.with_name(f".tmp-trash-{os.getpid()}-{folder.name[:12]}")
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)

    @staticmethod
    def _clear_stale(parent: Path) -> None:
        """Remove temporary folders of writers killed over a day ago (any host)."""
        cutoff = time.time() - _STALE_TMP_SECONDS
        for p in parent.glob(".tmp-*"):
            try:
                if p.stat().st_mtime < cutoff:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass


def evaluate_cached(
    cache: EvalCache | None,
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    run: Callable[..., dict] | None = None,
    **kwargs: Any,
) -> dict:
    """:func:`mergebake.evaluate.evaluate` (or ``run``, same signature) with early cutoff.

    ``kwargs`` are the eval's keyword arguments (``tasks``, ``include_path``, ``seed``, ...);
    all of them go into the key. With ``cache`` None the eval runs and its JSON records
    ``cache: {status: off}``. Otherwise, on a hit the stored JSON and samples are copied to
    ``out`` (see :meth:`EvalCache.restore`) and the log says ``restored from the eval cache
    <key> (stored <date> by <path>)``; on a miss the eval runs, its JSON records the key, and
    the result is stored. Returns the JSON written to ``out``. A model or task file that
    cannot be read for the key only makes the eval run uncached (with a warning); the eval
    then reports it. Raises what the eval raises.
    """
    run = run or _evaluate.evaluate
    model, out = Path(model), Path(out)
    if cache is None:
        log.info("eval cache: off")
        data = run(model, out, **kwargs)
        return _mark(out, data, {"status": "off"})
    t0 = time.perf_counter()
    if run is _evaluate.evaluate:  # refuse a bad request before hashing anything for its key
        _evaluate.check_request(model.resolve(), **kwargs)
    try:
        description = describe(model, **kwargs)
    except (OSError, MergebakeError) as e:
        log.warning("eval cache: cannot key this eval (%s); running it uncached", e)
        data = run(model, out, **kwargs)
        return _mark(out, data, {"status": "off"})
    key = key_of(description)
    entry = cache.lookup(key)
    if entry is not None:
        include = kwargs.get("include_path")
        data = cache.restore(
            entry,
            out,
            model=model.resolve(),
            include_path=Path(include).resolve() if include is not None else None,
        )
        log.info(
            "restored from the eval cache %s (stored %s by %s); lm-eval not run (%s, %.2f s)",
            key,
            entry.meta.get("stored"),
            entry.meta.get("stored_by"),
            entry.folder,
            time.perf_counter() - t0,
        )
        return data
    log.info("eval cache miss %s (%s): running lm-eval", key, cache.root)
    data = run(model, out, **kwargs)
    if not out.is_file():
        return data  # the eval wrote nothing: nothing to store
    data = _mark(out, data, {"status": "miss", "key": key})
    stored = cache.store(key, out, description)
    if stored is not None:
        size = sum(p.stat().st_size for p in stored.iterdir())
        log.info("stored in the eval cache %s (%s, %d bytes)", key, stored, size)
    return data


def _mark(out: Path, data: Any, cache: dict) -> Any:
    """Add ``cache`` to the ``mergebake`` block of the eval JSON ``out`` (rewritten
    atomically) and return the JSON; ``data`` as it is when the eval wrote no ``out``."""
    if not out.is_file():
        return data
    data = json.loads(out.read_text())
    data["mergebake"] = {**data.get("mergebake", {}), "cache": cache}
    write_json(out, data)
    return data


__all__ = [
    "ENV_DIR",
    "ENV_OFF",
    "KEY_FORMAT",
    "KEY_PACKAGES",
    "NOT_READ",
    "Entry",
    "EvalCache",
    "default_dir",
    "describe",
    "disabled_by_env",
    "environment",
    "evaluate_cached",
    "key_of",
    "model_files",
    "task_files",
]
