"""What each job asks the scheduler for: ``mem_mb``, ``runtime``, ``threads``, ``disk_mb``, ``gpu``.

Every figure grows with the size of the checkpoint the job reads, measured without
loading it (:func:`measure`: the index's ``total_size`` or the safetensors headers, see
:func:`mergebake.checkpoint.checkpoint_bytes`). Where that checkpoint does not exist yet
(a dry run plans jobs before their inputs are built) the size is estimated from the
config instead (:func:`estimate`, also preflight's disk check): the real size of a
local base, else the table
:data:`SIZE_BYTES` of size names, else the parameter count in the name (``7b``, ``350m``)
at two bytes per parameter, else :data:`DEFAULT_BYTES`. Resources are recomputed from the
real inputs when a job is scheduled, so the estimate only shows in plans.

Per rule (:data:`MODELS`), with ``S`` the checkpoint size in GiB::

    mem_mb  = (mem_base  + mem_per_gb     × S × factor) × attempt
    runtime = (runtime_base + runtime_per_gb × S × factor) × attempt      (minutes)
    threads = ceil(S / gb_per_thread), between 1 and max_threads
    disk_mb = disk_base + disk_per_gb × S
    gpu     = 1 where the step can use one and the config's device is cuda, else 0

``factor`` is 1 except for merges (the method table's factor, :mod:`mergebake.methods`:
TIES/DARE do more work per tensor than a linear merge) and evaluation in a wider dtype than
the one stored (a bf16 checkpoint scored in float32 needs twice the memory). ``attempt`` is
Snakemake's attempt counter: with ``--retries`` a job that died (out of memory or time) is
resubmitted asking for twice, then three times as much. Normalisation streams one shard at a
time, so its memory follows the largest weight file, not the whole checkpoint.

The knobs ``mem_base``, ``mem_per_gb``, ``runtime_base``, ``runtime_per_gb``, ``disk_base``,
``disk_per_gb``, ``gb_per_thread`` and ``max_threads`` can be overridden per rule (see
``profiles/slurm/config.yaml``, ``set-resources``); :func:`markdown_table` renders what
each rule asks for at the real Gemma-3 sizes (the table in README.md).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path

from . import MergebakeError, methods
from .checkpoint import checkpoint_bytes, weight_files
from .safetensors_io import DTYPES, read_header

GiB = 1024**3
MiB = 1024**2

#: Checkpoint bytes per size name (bf16 safetensors, the whole published checkpoint:
#: Gemma-3 4b/12b/27b include the vision tower). Used only to plan before a base exists.
SIZE_BYTES: dict[str, int] = {
    "270m": 536_000_000,
    "1b": 2_000_000_000,
    "4b": 8_600_000_000,
    "12b": 24_400_000_000,
    "27b": 54_900_000_000,
    # Gemma-4, about 2 bytes x the total parameter counts of the model cards (E2B 5.1B and
    # E4B 8B with their per-layer embeddings, 26B-A4B 25.2B of which 3.8B active, 31B
    # 30.7B); a fetched base is measured instead (resources.estimate).
    "e2b": 10_200_000_000,
    "e4b": 16_000_000_000,
    "26b-a4b": 50_400_000_000,
    "31b": 61_400_000_000,
}
#: A size name that is neither in the table nor a parameter count (``7b``, ``1.5b``, ``350m``).
DEFAULT_BYTES = 16 * GiB
#: The demo grid's generated bases: 155 kB (text, 2 layers, bf16) to 1.32 MB (the largest
#: the schema allows: multimodal, 8 layers, float32), measured with mergebake.demo.make_base.
DEMO_BYTES = 2 * MiB
#: safetensors shards are at most this large where a checkpoint's shards are not known.
SHARD_BYTES = 5 * 10**9
#: A parameter count: ``7b``, ``1.5b``, ``350m``; ``e<N>b`` (N effective parameters of a model
#: with per-layer embeddings, Gemma-3n/4 E-series); ``<N>b-a<M>b`` (a mixture of experts with
#: N parameters in all, M active per token). Case-insensitive.
_PARAMS = re.compile(r"^(e)?(\d+(?:\.\d+)?)([kmbt])(?:-a\d+(?:\.\d+)?[kmbt])?$")
#: Stored parameters per effective one of an E-series model (per-layer embeddings): Gemma-4
#: E2B holds 5.1B parameters for 2.3B effective, E4B 8B for 4.5B (model cards).
E_SERIES_FACTOR = 2
_SCALE = {"k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}

#: Bytes per parameter of the dtypes lm-eval may load a model in (``auto``: as stored).
EVAL_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Size:
    """A checkpoint's size: all tensors and the largest weight file (bytes), bytes per
    parameter, and how it was found (``basis``: ``measured``, ``demo``, ``table`` (of
    :data:`SIZE_BYTES`), ``parameters`` (a count in the name) or ``default``)."""

    total: int
    largest_file: int
    bytes_per_param: int = 2
    basis: str = "measured"

    @property
    def gib(self) -> float:
        return self.total / GiB


@dataclass(frozen=True)
class Model:
    """Resource model of one rule; every knob can be overridden per rule.

    ``sized_by`` is ``total`` (the whole checkpoint), ``shard`` (the largest weight file:
    the step streams one file at a time) or ``none`` (fixed figures). ``gpu``: the step can
    run on a GPU (bake, merge, eval) and asks for one when the config's device is cuda.
    """

    mem_base: int  # MiB
    mem_per_gb: int  # MiB of memory per GiB of checkpoint (1024 = once its size)
    runtime_base: int  # minutes
    runtime_per_gb: float  # minutes per GiB
    disk_base: int  # MiB
    disk_per_gb: int  # MiB of output per GiB of checkpoint
    gb_per_thread: float = 0.0  # 0: one thread
    max_threads: int = 1
    gpu: bool = False
    sized_by: str = "total"


#: The resource model of each rule of the workflow (rules/*.smk).
MODELS: dict[str, Model] = {
    # generate the demo grid: tiny models, a few seconds each
    "demo_base": Model(2000, 0, 10, 0, 100, 0, sized_by="none"),
    "demo_adapter": Model(3000, 0, 15, 0, 100, 0, sized_by="none"),
    "demo_tasks": Model(1000, 0, 5, 0, 10, 0, sized_by="none"),
    # download from the Hub: network-bound (~10 MB/s worst case); the output is the checkpoint
    "fetch_base": Model(2000, 0, 30, 2, 200, 1100),
    "fetch_adapter": Model(2000, 0, 30, 0, 2000, 0, sized_by="none"),
    # PEFT: load the base, merge_and_unload in place, save
    "bake": Model(4000, 1536, 10, 1.5, 200, 1100, gb_per_thread=4, max_threads=8, gpu=True),
    # bake with `bake.engine: stream`: tensor by tensor, a bounded number of bytes in flight
    "bake_stream": Model(
        3000, 1024, 5, 1, 200, 1100, gb_per_thread=8, max_threads=4, gpu=True, sized_by="shard"
    ),
    # rename/drop tensors one shard at a time; a text-only checkpoint is only hard-linked
    "normalise_base": Model(2000, 1536, 5, 0.5, 100, 1075, sized_by="shard"),
    "normalise_baked": Model(2000, 1536, 5, 0.5, 100, 1075, sized_by="shard"),
    # mergekit (lazy per-tensor, output buffered up to a shard) + verification; × method
    "merge": Model(4000, 1024, 10, 2, 200, 1100, gb_per_thread=4, max_threads=8, gpu=True),
    # adapter space: PEFT's add_weighted_adapter over a skeleton of the targeted modules
    # (adapter tensors only, never the base's weights); then normalise + verify the bake
    "adapter_merge": Model(3000, 0, 15, 0, 200, 0, sized_by="none"),
    "normalise_cell": Model(3000, 1280, 10, 1, 100, 1075),
    # lm-eval's hf model: the whole model in memory (× eval dtype / stored dtype)
    "eval_cell": Model(4000, 1280, 30, 10, 500, 0, gb_per_thread=2, max_threads=16, gpu=True),
    "eval_baseline": Model(4000, 1280, 30, 10, 500, 0, gb_per_thread=2, max_threads=16, gpu=True),
    "report": Model(2000, 0, 10, 0, 100, 0, sized_by="none"),
    # upload_folder: network-bound, files are streamed
    "upload": Model(2000, 0, 30, 2, 200, 0),
    "hub_readme": Model(2000, 0, 10, 0, 100, 0, sized_by="none"),
    # resolve a branch to a commit (a local rule: runs where Snakemake runs)
    "pin": Model(1000, 0, 5, 0, 10, 0, sized_by="none"),
    # GGUF export: llama.cpp's converter streams tensors lazily; the check holds the cell in
    # float32 with transformers (2× a bf16 checkpoint) and the GGUF in llama.cpp (≤ 1×); the
    # converter's f32 reference file (2×) is written beside the output and removed
    "export_gguf": Model(4000, 3072, 10, 4, 200, 3100, gb_per_thread=4, max_threads=4),
    # fetch llama.cpp's converter (one ~77 MB sdist from PyPI; a local rule)
    "gguf_tools": Model(1000, 0, 10, 0, 300, 0, sized_by="none"),
}
#: Rules not in :data:`MODELS` (a rule added later) get this.
DEFAULT_MODEL = Model(4000, 1024, 60, 2, 1000, 1100, gb_per_thread=4, max_threads=8)
#: Names of the knobs that ``set-resources`` may override per rule.
KNOBS = tuple(f.name for f in fields(Model) if f.name not in ("gpu", "sized_by"))


def _ceil_to(x: float, step: int) -> int:
    return int(math.ceil(round(x) / step) * step)


def parse_size_name(size: str) -> int | None:
    """Bytes (bf16) of a checkpoint called ``size``, or None when the name says nothing.

    :data:`SIZE_BYTES` first (``12b``, ``e4b``, ``26b-a4b``, ``31b``), else 2 bytes x the
    parameter count in the name (:data:`_PARAMS`): ``1.5b`` -> 3 GB; a mixture of experts
    ``40b-a6b`` counts all 40B; an E-series ``e3b`` counts 3B x :data:`E_SERIES_FACTOR`.
    """
    size = size.lower()
    if size in SIZE_BYTES:
        return SIZE_BYTES[size]
    m = _PARAMS.match(size)
    if m:
        params = float(m.group(2)) * _SCALE[m.group(3)]
        if m.group(1):
            params *= E_SERIES_FACTOR
        return int(params * 2)  # bf16
    return None


def estimate(
    size: str | None, source: Mapping | None = None, *, folder: str | os.PathLike | None = None
) -> Size:
    """Size of a base called ``size`` with config ``source`` (hub/path/demo): the package's
    one checkpoint-size estimator (resources, plans and preflight's disk check).

    The checkpoint in ``folder`` (where a fetched base lands), else a local base
    (``source["path"]``), is measured when it exists (:func:`measure`); a demo base is
    :data:`DEMO_BYTES`; otherwise the size name is looked up (:func:`parse_size_name`:
    :data:`SIZE_BYTES`, else 2 bytes × the parameter count in the name), falling back to
    :data:`DEFAULT_BYTES`. ``Size.basis`` says which.
    """
    source = source or {}
    for where in (folder, source.get("path")):
        measured = measure(where)
        if measured is not None:
            return measured
    if "demo" in source:
        total, basis = DEMO_BYTES, "demo"
    else:
        named = parse_size_name(size) if size else None
        if named is None:
            total, basis = DEFAULT_BYTES, "default"
        else:
            total, basis = named, "table" if size.lower() in SIZE_BYTES else "parameters"
    return Size(total, min(total, SHARD_BYTES), 2, basis)


def _bytes_per_param(folder: Path) -> int:
    """Bytes per element of the dtype holding most of the first weight file's bytes."""
    tensors, _ = read_header(weight_files(folder)[0])
    by_dtype: dict[str, int] = {}
    for t in tensors.values():
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.nbytes
    if not by_dtype:
        return 2
    dtype = DTYPES.get(max(by_dtype, key=by_dtype.__getitem__))
    return dtype.nbytes if dtype else 2


def measure(folder: str | os.PathLike | None) -> Size | None:
    """Size of the checkpoint in ``folder`` from its index/headers; None when there is none.

    Never raises: a folder that is missing, incomplete or not a safetensors checkpoint
    (an adapter, a pickle checkpoint) gives None, and the caller estimates instead.
    """
    if not folder:
        return None
    folder = Path(folder)
    try:
        if not folder.is_dir():
            return None
        files = weight_files(folder, allow_pickle=True)
        total = checkpoint_bytes(folder)
        largest = max(f.stat().st_size for f in files)
        return Size(total, min(largest, total), _bytes_per_param(folder))
    except (MergebakeError, OSError, ValueError, KeyError):
        return None


def method_factor(method: str | None) -> float:
    """The merge method's factor (recipe name) from the method table,
    :func:`mergebake.methods.factor`; the largest for a recipe the table does not know."""
    if method is None:
        return 1.0
    return methods.factor(method)


def dtype_factor(eval_dtype: str | None, size: Size) -> float:
    """How much wider the eval dtype is than the stored one (``auto``: 1; never below 1)."""
    want = EVAL_DTYPE_BYTES.get(str(eval_dtype or "auto").lower())
    if want is None:
        return 1.0
    return max(1.0, want / max(size.bytes_per_param, 1))


def model_for(
    rule: str, overrides: Mapping[str, float] | None = None, *, model: str | None = None
) -> Model:
    """The :class:`Model` of ``rule`` (or of ``model``) with knob ``overrides`` applied.

    Raises :class:`MergebakeError` naming the rule and knob for a value that is not a
    non-negative number; resources that are not knobs are ignored.
    """
    model = MODELS.get(model or rule, DEFAULT_MODEL)
    if not overrides:
        return model
    changes = {}
    for knob, value in overrides.items():
        if knob not in KNOBS:
            continue  # an ordinary resource (mem_mb, slurm_partition, ...), not a knob
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = -1.0
        if not number >= 0:
            raise MergebakeError(
                f"set-resources {rule}:{knob}={value!r}: expected a number >= 0 "
                f"(knobs: {', '.join(KNOBS)})"
            )
        current = getattr(model, knob)
        changes[knob] = type(current)(number) if isinstance(current, int) else number
    return replace(model, **changes)


def job_resources(
    rule: str,
    size: Size | None,
    *,
    attempt: int = 1,
    factor: float = 1.0,
    device: str = "auto",
    overrides: Mapping[str, float] | None = None,
    model: str | None = None,
) -> dict[str, int]:
    """``{mem_mb, runtime, threads, disk_mb, gpu}`` of one job of ``rule``.

    ``size`` is the checkpoint the job reads (None or a ``sized_by: none`` rule: the fixed
    figures), ``factor`` scales the size-dependent memory and runtime (merge method, eval
    dtype), ``attempt`` (1, 2, ...) multiplies memory and runtime, and ``device`` is the
    config's device: ``cuda`` makes GPU-capable steps ask for one GPU. Memory and disk are
    rounded up to 100 MiB, runtime to 5 minutes. ``model`` names the entry of
    :data:`MODELS` where it is not the rule's name (``bake_stream``).
    """
    m = model_for(rule, overrides, model=model)
    attempt = max(int(attempt or 1), 1)
    if size is None or m.sized_by == "none":
        gib = shard_gib = 0.0
    else:
        gib = size.gib
        shard_gib = min(size.largest_file, size.total) / GiB
    mem_gib = shard_gib if m.sized_by == "shard" else gib
    mem = (m.mem_base + m.mem_per_gb * mem_gib * factor) * attempt
    runtime = (m.runtime_base + m.runtime_per_gb * gib * factor) * attempt
    threads = 1
    if m.gb_per_thread > 0:
        threads = min(max(math.ceil(round(gib / m.gb_per_thread, 6)), 1), max(m.max_threads, 1))
    disk = m.disk_base + m.disk_per_gb * gib
    return {
        "mem_mb": _ceil_to(mem, 100),
        "runtime": max(_ceil_to(runtime, 5), 5),
        "threads": threads,
        "disk_mb": _ceil_to(disk, 100),
        "gpu": int(m.gpu and str(device).startswith("cuda")),
    }


def knobs_table() -> str:
    """The knobs of every rule of :data:`MODELS` as a Markdown table (README)."""
    cols = [
        "mem_base",
        "mem_per_gb",
        "runtime_base",
        "runtime_per_gb",
        "disk_base",
        "disk_per_gb",
        "gb_per_thread",
        "max_threads",
    ]
    lines = [
        "| rule | sized by | " + " | ".join(f"`{c}`" for c in cols) + " | gpu |",
        "|" + " --- |" * (len(cols) + 3),
    ]
    for rule, m in MODELS.items():
        values = [f"{getattr(m, c):g}" for c in cols]
        lines.append(
            f"| {rule} | {m.sized_by} | " + " | ".join(values) + f" | {'yes' if m.gpu else ''} |"
        )
    return "\n".join(lines) + "\n"


def _fmt_mb(mb: int) -> str:
    return f"{mb / 1024:.1f} GiB" if mb >= 1024 else f"{mb} MiB"


def _fmt_min(minutes: int) -> str:
    h, m = divmod(minutes, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min"


def markdown_table(sizes: tuple[str, ...] = ("1b", "4b", "12b", "27b")) -> str:
    """What each rule asks for at the real Gemma-3 sizes of :data:`SIZE_BYTES` (README).

    One row per rule (merge: linear and TIES), one column per size; each cell is
    memory / runtime / threads / disk at the first attempt, eval in the stored dtype.
    """
    rows = [
        ("fetch_base", "fetch_base", 1.0),
        ("bake (engine: peft)", "bake", 1.0),
        ("bake (engine: stream)", "bake_stream", 1.0),
        ("normalise_base, normalise_baked", "normalise_base", 1.0),
        ("merge (linear, task_arithmetic)", "merge", method_factor("linear")),
        ("merge (ties, dare_ties)", "merge", method_factor("ties")),
        ("eval_cell, eval_baseline", "eval_cell", 1.0),
        ("upload", "upload", 1.0),
        ("export_gguf (per type)", "export_gguf", 1.0),
    ]
    head = "| rule | " + " | ".join(f"{s} ({SIZE_BYTES[s] / 1e9:g} GB)" for s in sizes) + " |"
    lines = [head, "|" + " --- |" * (len(sizes) + 1)]
    for label, rule, factor in rows:
        cells = []
        for s in sizes:
            r = job_resources(rule, estimate(s), factor=factor, model=rule)
            cells.append(
                f"{_fmt_mb(r['mem_mb'])} · {_fmt_min(r['runtime'])} · "
                f"{r['threads']} cpu · {_fmt_mb(r['disk_mb'])}"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    fixed = [r for r, m in MODELS.items() if m.sized_by == "none"]
    lines.append("")
    lines.append(
        "Fixed, at any size: "
        + "; ".join(
            f"{r} {_fmt_mb(job_resources(r, None)['mem_mb'])} · "
            f"{_fmt_min(job_resources(r, None)['runtime'])}"
            for r in fixed
        )
        + "."
    )
    return "\n".join(lines) + "\n"
