"""Score one checkpoint with lm-eval and write its results JSON.

One call scores one local model folder (a merged cell or a baseline) on a list of tasks,
each with its own few-shot count, and writes lm-eval's results structure (``results``
keyed by task with ``"<metric>,<filter>"`` keys, ``n-shot``, ``configs``, ``versions``, ...)
plus a ``mergebake`` block to one JSON file. :func:`load_scores` reads the scores back.

Beside it, ``<name>.samples.json.gz`` keeps each document's metric values (lm-eval's
``log_samples``), compactly: per task the document ids, a digest of lm-eval's document
hashes (so two files can be checked to hold the same documents) and, per score key, one
number per document. :mod:`mergebake.stats` bootstraps intervals from them. Prompts,
responses and log-likelihoods are not kept: a 5,000-document multiple-choice task with two
metrics takes ~14 KB gzipped this way (44 KB as plain JSON), against ~10 MB for
lm-eval's own sample logs.

Few-shot counts are set on each lm-eval ``Task`` object before evaluation and no global
``num_fewshot`` is passed: in lm-eval a global value overrides every task's own.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import time
from pathlib import Path
from typing import Any

from . import MergebakeError
from .eval_backend import VllmOptions, check_vllm_runtime, is_auto, lm_settings
from .outputs import atomic_file, write_json


def _check_tasks(tasks: list[dict]) -> list[tuple[str, int]]:
    """Validate the task specs; return ``[(name, num_fewshot), ...]`` in the given order."""
    if not tasks:
        raise MergebakeError("evaluate: no tasks given; list at least one under the eval tasks")
    out: list[tuple[str, int]] = []
    seen: set[str] = set()
    for i, spec in enumerate(tasks):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise MergebakeError(f"evaluate: task #{i} ({spec!r}) needs a non-empty string 'name'")
        name = spec["name"]
        shots = spec.get("num_fewshot", 0)
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
            raise MergebakeError(
                f"evaluate: task {name!r} has num_fewshot={shots!r}; it must be an integer >= 0"
            )
        if name in seen:
            raise MergebakeError(f"evaluate: task {name!r} is listed twice; list each task once")
        seen.add(name)
        out.append((name, shots))
    return out


def _unparsable_yamls(include_path: Path) -> list[str]:
    """YAML files under ``include_path`` that lm-eval cannot parse (it skips them silently)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    bad = []
    for p in sorted(include_path.glob("**/*.yaml")):
        try:
            load_yaml(p, resolve_func=False, recursive=True)
        except Exception as e:  # any failure means lm-eval skips the file
            bad.append(f"{p} ({type(e).__name__}: {e})")
    return bad


def _builtin_tasks_dir() -> Path:
    """The folder of lm-eval's built-in task YAMLs (what ``include_defaults`` indexes)."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _task_manager(names: list[str], include_path: Path | None, metadata: dict[str, Any]):
    """A ``TaskManager`` that knows every name in ``names``, or a :class:`MergebakeError`.

    Indexing lm-eval's ~15k built-in task YAMLs takes ~10 s, so where every requested name
    is a plain task defined under ``include_path`` only that folder is indexed. Otherwise the
    built-in tasks are indexed too, with ``include_path`` after them so that, as in lm-eval,
    a task defined there overrides a built-in one of the same name.
    """
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not include_path.is_dir():
            raise MergebakeError(
                f"evaluate: task include path {include_path} is not a folder; "
                "point eval include_path at the folder holding the task YAMLs"
            )
        local = TaskManager(
            include_path=str(include_path), include_defaults=False, metadata=metadata
        )
        if all(n in local.all_subtasks for n in names):
            return local
    paths = [str(_builtin_tasks_dir())] + ([str(include_path)] if include_path else [])
    tm = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
    known = set(tm.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        where = (
            f"include path {include_path}" if include_path is not None else "no include path given"
        )
        msg = (
            f"evaluate: unknown lm-eval task(s) {unknown} (looked in lm-eval's built-in "
            f"tasks and {where}); check the task name, or add a YAML with `task: <name>`"
        )
        if include_path is not None:
            bad = _unparsable_yamls(include_path)
            if bad:
                msg += "; these YAML files could not be parsed and were skipped: " + "; ".join(bad)
        raise MergebakeError(msg)
    return tm


def _load_tasks(tm, specs: list[tuple[str, int]], leaves: dict | None = None) -> list:
    """Build lm-eval Task/Group objects with each leaf task's ``num_fewshot`` set.

    A group name sets the count on every task in the group and is passed on as the Group
    (so lm-eval still aggregates it); a tag name passes on its tasks. ``leaves``, when
    given, is filled with ``{task name: Task}`` and ``{group name: Group}`` under the keys
    ``"tasks"`` and ``"groups"``.
    """
    objects: list = []
    for name, shots in specs:
        try:
            loaded = tm.load([name])
        except Exception as e:  # lm-eval and datasets raise many kinds
            entry = tm.task_index.get(name)
            where = f" (defined in {entry.yaml_path})" if entry and entry.yaml_path else ""
            raise MergebakeError(
                f"evaluate: task {name!r}{where} could not be loaded: {type(e).__name__}: {e}. "
                f"Check its YAML and data files; relative data_files resolve against the "
                f"working directory ({Path.cwd()}), so prefer absolute paths"
            ) from e
        for task in loaded["tasks"].values():
            task.set_config(key="num_fewshot", value=shots)
        if leaves is not None:
            leaves.setdefault("tasks", {}).update(loaded["tasks"])
            leaves.setdefault("groups", {}).update(loaded.get("groups", {}))
        if name in loaded.get("groups", {}):
            objects.append(loaded["groups"][name])
        else:
            objects.extend(loaded["tasks"].values())
    return objects


def _jsonable(obj: Any) -> Any:
    """lm-eval's results made JSON-serialisable with its own ``handle_non_serializable``."""
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(obj, default=handle_non_serializable))


SAMPLES_SUFFIX = ".samples.json.gz"
SAMPLES_FORMAT = "mergebake-samples/1"


def samples_path(eval_json: Path) -> Path:
    """The per-document file written beside ``eval_json``: ``x/cell.json`` gives
    ``x/cell.samples.json.gz``."""
    eval_json = Path(eval_json)
    return eval_json.with_name(eval_json.stem + SAMPLES_SUFFIX)


def _number(v: Any) -> float | int | None:
    """A per-document metric value as a JSON number (integral values as ints), else None."""
    if isinstance(v, bool):
        return int(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    if math.isnan(f) or math.isinf(f):
        return None
    return int(f) if f.is_integer() and abs(f) < 2**53 else f


def compact_samples(samples: dict[str, list[dict]], leaves: dict) -> dict:
    """Per-document metric values from lm-eval's ``results["samples"]``.

    ``samples`` is ``{task: [entry, ...]}`` as ``simple_evaluate(log_samples=True)``
    returns it (lm-eval 0.4.13): one entry per document and filter, with ``doc_id`` (int),
    ``filter`` (str), ``doc_hash`` (sha256 hex of the document), ``metrics`` (names) and
    one key per metric name holding that document's value (a float for ``acc``,
    ``acc_norm``, ``exact_match``, ``f1``; a tuple for corpus-level metrics such as
    perplexities, which are not kept). ``leaves`` holds the Task and Group objects
    (see :func:`_load_tasks`), for each metric's aggregation and each group's weighting.

    Returns ``{"format", "tasks": {task: {"doc_ids": [int], "docs_sha256": str,
    "values": {"<metric>,<filter>": [number per doc, in doc_ids order]}, "aggregation":
    {metric: function name}}}, "groups": {group: {"tasks": [leaf task names],
    "weight_by_size": {metric: bool}}}}``. ``docs_sha256`` is the sha256 of the
    documents' ``doc_hash`` values joined in ``doc_ids`` order.
    """
    tasks: dict[str, Any] = {}
    task_objs = leaves.get("tasks", {})
    for task, entries in sorted(samples.items()):
        ids = sorted({int(e["doc_id"]) for e in entries})
        pos = {d: i for i, d in enumerate(ids)}
        hashes = [""] * len(ids)
        values: dict[str, list] = {}
        skipped: set[str] = set()
        for e in entries:
            i = pos[int(e["doc_id"])]
            hashes[i] = str(e.get("doc_hash", ""))
            for metric in e.get("metrics", []):
                key = f"{metric},{e.get('filter', 'none')}"
                v = _number(e.get(metric))
                if v is None:
                    skipped.add(key)
                    continue
                values.setdefault(key, [None] * len(ids))[i] = v
        values = {k: v for k, v in values.items() if k not in skipped and None not in v}
        agg = {}
        obj = task_objs.get(task)
        if obj is not None:
            agg = {m: getattr(f, "__name__", str(f)) for m, f in obj.aggregation().items()}
        tasks[task] = {
            "doc_ids": ids,
            "docs_sha256": hashlib.sha256("\n".join(hashes).encode()).hexdigest(),
            "values": dict(sorted(values.items())),
            "aggregation": dict(sorted(agg.items())),
        }
    groups: dict[str, Any] = {}
    for name, group in sorted(leaves.get("groups", {}).items()):
        groups[name] = {
            "tasks": sorted(t.task_name for t in group.get_all_tasks()),
            "weight_by_size": {
                a.metric: bool(a.weight_by_size) for a in (group.aggregate_metric_list or [])
            },
        }
    return {"format": SAMPLES_FORMAT, "tasks": tasks, "groups": groups}


def write_samples(path: Path, data: dict) -> None:
    """Write ``data`` as gzipped JSON atomically; bytes depend on ``data`` only (no mtime)."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as gz:
        gz.write(json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    with atomic_file(Path(path), "wb") as fh:
        fh.write(buf.getvalue())


def check_request(
    model: Path,
    *,
    tasks: list[dict],
    seed: int = 1234,
    batch_size: int | str = 1,
    device: str = "cpu",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    backend: str = "hf",
    max_batch_size: int | None = None,
    vllm: VllmOptions | None = None,
    **_ignored: Any,
) -> tuple[list, Any]:
    """The checks :func:`evaluate` runs before it loads tasks or a model (arguments as
    there; others ignored): the task specs, ``model``'s ``config.json``, the backend
    settings, and the runtime (vLLM and its GPUs; CUDA where a CUDA device is asked for).
    Returns ``(task specs, lm settings)``; raises what :func:`evaluate` documents for them.
    Also run by the eval cache before it hashes anything for a key."""
    specs = _check_tasks(tasks)
    if not (Path(model) / "config.json").is_file():
        raise MergebakeError(f"evaluate: {model} has no config.json; is it a checkpoint folder?")
    lm = lm_settings(
        backend,
        pretrained=str(model),
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        seed=seed,
        batch_size=batch_size,
        max_batch_size=max_batch_size,
        device=device,
        vllm=vllm,
    )
    if backend == "vllm":
        check_vllm_runtime((vllm or VllmOptions()).tensor_parallel_size)
    elif device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise MergebakeError(
                f"evaluate: device {device!r} asked for but CUDA is not available here; "
                "set the eval device to 'cpu' or run the job on a GPU node"
            )
    return specs, lm


def evaluate(
    model: Path,
    out: Path,
    *,
    tasks: list[dict],
    include_path: Path | None = None,
    seed: int = 1234,
    batch_size: int | str = 1,
    limit: int | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    backend: str = "hf",
    max_batch_size: int | None = None,
    vllm: VllmOptions | None = None,
) -> dict:
    """Score the local checkpoint folder ``model`` with lm-eval; write the results to ``out``.

    ``tasks`` is a list of ``{"name": str, "num_fewshot": int}``; each task gets its own
    few-shot count (a group name sets it on all the group's tasks). ``include_path`` is a
    folder of extra task YAMLs. ``seed`` seeds Python's, NumPy's and torch's RNGs and the
    few-shot sampler. ``limit`` caps the documents scored per task (testing only).
    ``backend`` is lm-eval's model type, ``hf`` or ``vllm`` (CUDA GPUs only; ``vllm`` holds
    its options); ``device``/``dtype``/``batch_size`` (a positive integer, ``"auto"`` or
    ``"auto:N"``)/``max_batch_size`` go to that model as
    :func:`mergebake.eval_backend.lm_settings` describes.

    Writes, atomically, lm-eval's results JSON (made serialisable; without lm-eval's
    ``samples``) with an added ``mergebake`` block: ``model`` (absolute path), ``tasks`` (as
    requested), ``seed``, ``seconds`` (wall-clock seconds of the whole call, float),
    ``samples`` (file name of the per-document file); with ``backend`` vllm also ``backend``,
    and with an auto batch size ``auto_batch_sizes``: the sizes lm-eval's detection chose
    for the loglikelihood requests (its results' ``config.batch_sizes``, one per ``auto:N``
    step; lm-eval 0.4.13 does not report the size it picks for generation or rolling
    loglikelihood requests, and with vLLM it is ``[]``: vLLM batches by itself). Returns
    that dict. The per-document values go to :func:`samples_path` (``out``'s stem +
    ``.samples.json.gz``, see :func:`compact_samples`), written before ``out`` so a finished
    ``out`` always has them.

    Raises :class:`MergebakeError` before any model is loaded when a task spec is malformed,
    a task name is unknown (naming it and the include path), the model folder has no
    ``config.json``, or a CUDA device is asked for where CUDA is not available; raises
    :class:`mergebake.eval_backend.BackendError` (a :class:`MergebakeError`) at the same
    point for a bad batch size or backend, and, with vLLM, for a cpu device, vLLM not
    installed (or older than lm-eval needs) or too few CUDA GPUs visible.
    """
    t0 = time.perf_counter()
    model = Path(model).resolve()
    out = Path(out)
    include_path = Path(include_path).resolve() if include_path is not None else None
    specs, lm = check_request(
        model,
        tasks=tasks,
        seed=seed,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        backend=backend,
        max_batch_size=max_batch_size,
        vllm=vllm,
    )

    import lm_eval

    model_args = lm.model_args
    tm = _task_manager([n for n, _ in specs], include_path, metadata=dict(model_args))
    leaves: dict = {}
    task_objects = _load_tasks(tm, specs, leaves)

    results = lm_eval.simple_evaluate(
        **lm.simple_evaluate_kwargs(),
        tasks=task_objects,
        limit=limit,
        log_samples=True,
        task_manager=tm,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if results is None:  # only non-zero ranks of a distributed run get None
        raise MergebakeError("evaluate: lm-eval returned no results (not rank 0?)")
    samples = results.pop("samples", None) or {}
    data = _jsonable(dict(results))
    data.pop("samples", None)
    write_samples(samples_path(out), compact_samples(samples, leaves))
    data["mergebake"] = {
        "model": str(model),
        "tasks": [{"name": n, "num_fewshot": s} for n, s in specs],
        "include_path": str(include_path) if include_path is not None else None,
        "seed": seed,
        "samples": samples_path(out).name,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if backend != "hf":
        data["mergebake"]["backend"] = backend
    if is_auto(batch_size):
        data["mergebake"]["auto_batch_sizes"] = list(data["config"].get("batch_sizes") or [])
    write_json(out, data)
    return data


def load_scores(path: Path) -> dict[str, dict[str, float]]:
    """Scores from an eval JSON: ``{task: {"<metric>,<filter>": value}}``.

    Values are the metric values as lm-eval reports them (``acc`` as a fraction in [0, 1]);
    standard errors (``*_stderr,*``), keys without a filter (``alias``, ``name``,
    ``sample_len``) and any non-numeric entry are left out.
    Groups appear like tasks. Raises :class:`MergebakeError` naming the file when it is
    missing, not JSON, or has no ``results`` mapping.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise MergebakeError(f"{path}: eval results file not found; run the eval step") from e
    except json.JSONDecodeError as e:
        raise MergebakeError(f"{path}: not valid JSON ({e}); re-run the eval step") from e
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict):
        raise MergebakeError(f"{path}: no 'results' mapping; not an lm-eval results file")
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        if not isinstance(metrics, dict):
            continue
        row: dict[str, float] = {}
        for key, value in metrics.items():
            metric, sep, _ = key.partition(",")
            if not sep or metric.endswith("_stderr"):  # alias, name, sample_len, stderrs
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            row[key] = float(value)
        scores[task] = row
    return scores
