"""The stream merge engine: mergekit's plan and per-tensor numerics, run in parallel.

mergekit stays the specification and the judge. This engine asks mergekit's own planner
(``mergekit.plan.MergePlanner``) for the tensor tasks of a rendered recipe (names, aliases,
per-tensor parameters after filters and gradients, output dtypes) and for the order its
executor would write them (``mergekit.graph.build_schedule``), then computes each output
tensor with mergekit's own per-tensor code (``ExecuteMergeMethodTask.execute``) in a pool
of worker threads, and writes every shard straight to its final place in the file:

- the shard layout (which tensors go to which file, file names, ``model.safetensors.index.json``
  with ``total_size`` and ``weight_map`` in write order) is computed up front exactly as
  ``mergekit.io.tensor_writer.TensorWriter`` decides it while writing;
- each shard's safetensors header is laid out as ``safetensors`` lays it out (tensors
  ordered by dtype, then name; compact JSON padded with spaces to 8 bytes), so each tensor
  can be written at its offset as soon as it is computed (``os.pwrite``). Inputs are read
  with ``os.preadv`` at the offsets in their headers (no memory mapping). Memory holds the
  tensors in flight only (about ``workers`` x the largest tensor's working set), where
  mergekit holds a whole shard (up to ``out_shard_size``) before writing it.

The output is byte-identical to ``mergekit-yaml`` on the same recipe and options (every
safetensors file and the index; ``tests/unit/test_merge_stream.py``). Three things make it
faster than mergekit at mergekit's own numerics:

1. parallel workers (threads; torch's intra-op threads are split between them): mergekit's
   executor runs one tensor at a time;
2. magnitude trimming (TIES, breadcrumbs) without mergekit's full sort: mergekit spends
   most of a TIES merge in one single-threaded ``torch.argsort`` per task vector, and only
   the entries in front of the cut-off matter. :func:`exact_sparsify` finds exactly the
   entries that sort puts there, ties included, by following the platform's sort
   algorithm into the ranges around the cut-off only (:mod:`mergebake.sort_select`,
   O(numel)); where that model does not apply it runs mergekit's sort;
3. for the task-arithmetic family (``task_arithmetic``, ``ties``, ``breadcrumbs``,
   ``breadcrumbs_ties``), a tensor whose task vectors are all exactly zero in every model
   (embeddings and norms a LoRA never touched) is not computed: its result is the base
   tensor plus a zero of one sign. Which sign mergekit's arithmetic produces for those
   parameters is read from a probe run of mergekit's own code on a 4-element tensor of the
   same dtype (see :func:`_zero_rule`); where the probe shows anything else, no shortcut.

``selection="fast"`` replaces the magnitude trimming's full sort (TIES, breadcrumbs) with a
linear-time threshold selection (:func:`fast_sparsify`): it keeps exactly the entries a
*stable* sort would keep (among equal magnitudes at the cut-off, lowest flat index first),
where mergekit keeps the ones its non-stable ``torch.argsort`` happens to put first. The
result differs from mergekit's only at entries whose magnitude equals the cut-off. (It is
put in place of ``sparsify`` in ``mergekit.merge_methods.generalized_task_arithmetic`` for
the duration of the merge, so the rest of the arithmetic stays mergekit's own.)

What the engine does not reproduce it reports as a hand-over reason
(:func:`support_problem`, :func:`plan`), and the caller runs mergekit instead: randomised
methods (DARE, DELLA: their draws depend on mergekit's global RNG and execution order),
slices/modules, tokenizer merging, chat templates, LoRA model references, non-safetensors
inputs, accelerators, tensors mergekit would convert or skip, inputs of different shapes.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import MergebakeError
from . import methods as method_table
from .outputs import FollowingHash, remember_sha256
from .safetensors_io import (
    DTYPES,
    SafetensorsFile,
    count_nonfinite,
    header_bytes,
    preallocate,
    torch_dtype,
)

log = logging.getLogger(__name__)

ENGINES = ("stream", "mergekit")
SELECTIONS = ("exact", "fast")
# mergekit's GTA methods whose zero-task-vector result is checked by probe (deterministic).
_GTA_SHORTCUT_SPARSIFICATION = (None, "magnitude", "magnitude_outliers")


class HandOver(Exception):
    """Raised by :func:`plan` when the recipe needs something this engine does not do;
    ``str(e)`` is the reason, meant for the log ("runs mergekit: <reason>")."""


# --------------------------------------------------------------------------- support


def support_problem(merge_config: Any, options: Any) -> str | None:
    """Why the stream engine cannot run ``merge_config`` with ``options``, or ``None``.

    ``merge_config`` is a ``mergekit.config.MergeConfiguration``, ``options`` a
    ``mergekit.options.MergeOptions``. Checks only what is known before planning (the
    method's table entry in :mod:`mergebake.methods`, recipe features, options, input
    files); :func:`plan` checks the rest per tensor.
    """
    name = merge_config.merge_method
    entry = method_table.get(name)
    if entry is None:
        return f"merge method {name!r} is not in mergebake's method table"
    if "stream" not in entry.engines:
        if entry.randomised:
            return (
                f"{name} draws from mergekit's global RNG in mergekit's execution order, "
                "which only mergekit reproduces"
            )
        return f"{name} is not run by the stream engine (methods.py: engines={entry.engines})"
    if merge_config.slices or merge_config.modules:
        return (
            "the recipe uses slices/modules (layer ranges), which the stream engine does not plan"
        )
    if merge_config.tokenizer is not None or merge_config.tokenizer_source is not None:
        return "the recipe merges tokenizers (vocabulary permutation)"
    if merge_config.chat_template:
        return "the recipe sets a chat_template"
    device = str(options.device or "cpu")
    if device != "cpu" or options.multi_gpu or options.read_to_gpu or options.low_cpu_memory:
        return f"mergekit runs on device {device!r}; the stream engine computes on the CPU"
    if options.unsafe_truncate_embeddings:
        return "unsafe_truncate_embeddings is set"
    if not options.safe_serialization:
        return "the output is not safetensors (safe_serialization is off)"
    for ref in merge_config.referenced_models():
        if ref.lora is not None:
            return f"{ref} applies a LoRA inside mergekit"
        path = Path(ref.model.path)
        if not path.is_dir():
            return f"{ref.model.path} is not a local folder"
        if (
            not (path / "model.safetensors").exists()
            and not (path / "model.safetensors.index.json").exists()
        ):
            return f"{path} has no model.safetensors[.index.json]"
    return None


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Load:
    """One input of one output tensor: the model, the file and name to read, where its
    bytes lie in the file (absolute ``offset``, ``nbytes``), its stored dtype and shape,
    and the dtype mergekit casts it to after reading (``None``: as stored)."""

    model: Any  # mergekit.common.ModelReference
    file: str
    name: str
    dtype: torch.dtype | None
    offset: int
    nbytes: int
    stored: torch.dtype
    shape: tuple[int, ...]


@dataclass
class Job:
    """One output tensor: its name, mergekit's task, inputs, and where its bytes go."""

    index: int
    name: str
    task: Any  # mergekit.merge_methods.task_adapter.ExecuteMergeMethodTask
    loads: tuple[Load, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    shard: int = -1
    offset: int = -1  # absolute byte offset of the tensor's data in its shard file


@dataclass
class Shard:
    """One output file: its final name and its tensors in ``safetensors`` order."""

    name: str
    jobs: list[Job] = field(default_factory=list)
    header: bytes = b""  # length prefix + JSON, as at the start of the file

    @property
    def size(self) -> int:
        return len(self.header) + sum(j.nbytes for j in self.jobs)


@dataclass
class Plan:
    """What the engine will write, decided before any tensor is computed."""

    jobs: list[Job]
    shards: list[Shard]
    index: bytes | None  # model.safetensors.index.json, or None for a single shard
    arch_info: Any
    method: Any  # mergekit MergeMethod

    @property
    def total_bytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)


def _header_info(file: str) -> SafetensorsFile:
    """A safetensors file's parsed header (:class:`mergebake.safetensors_io.SafetensorsFile`:
    where its data starts, each tensor's dtype, shape and byte range)."""
    return SafetensorsFile.open(file)


def plan(merge_config: Any, options: Any, out_path: str) -> Plan:
    """Plan ``merge_config`` as mergekit would, and lay out its output files.

    Runs mergekit's planner on a copy of ``merge_config`` (mergekit mutates it), orders the
    tensors as mergekit's executor writes them, resolves every input to a file and name
    as mergekit's ``LoadTensor`` does, and assigns shards and byte offsets as
    ``TensorWriter`` and ``safetensors`` would. Reads safetensors headers only.

    Raises :class:`HandOver` when any tensor needs something the engine does not do (a
    name mergekit would convert or skip, inputs of different shapes, no output dtype, a
    tokenizer task, an architecture that fills parameters after the merge).
    """
    from mergekit.architecture import get_architecture_info
    from mergekit.graph import TaskUniverse, build_schedule
    from mergekit.io.tasks import GatherTensors, LoaderCache, SaveTensor
    from mergekit.merge import _model_out_config
    from mergekit.merge_methods import get as get_method
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
    from mergekit.plan import MergePlanner

    merge_config = copy.deepcopy(merge_config)
    arch_info = get_architecture_info(merge_config, options)
    if getattr(arch_info, "post_fill_parameters", False):
        raise HandOver("the architecture fills parameters after the merge (post_fill_parameters)")
    cache = LoaderCache()
    cache.setup(options=options)
    for ref in merge_config.referenced_models():
        cache.get(ref)
    cfg_out = _model_out_config(
        merge_config, arch_info, trust_remote_code=options.trust_remote_code
    )
    targets = MergePlanner(
        merge_config, arch_info, options=options, out_model_config=cfg_out
    ).plan_to_disk(out_path=out_path)
    universe = TaskUniverse(targets)
    handles = [universe.add_task(t) for t in targets]
    order = [h.task() for h in build_schedule(handles, {}).tasks]
    saves = [t for t in order if isinstance(t, SaveTensor)]
    if any(not isinstance(t, SaveTensor) for t in targets[:-1]) or len(saves) != len(targets) - 1:
        raise HandOver("mergekit planned tasks other than tensor saves (e.g. a tokenizer)")

    headers: dict[str, dict[str, Any]] = {}
    jobs: list[Job] = []
    for i, save in enumerate(saves):
        task = save.tensor_task
        if not isinstance(task, ExecuteMergeMethodTask) or not isinstance(
            task.gather_tensors, GatherTensors
        ):
            raise HandOver(f"{save.tensor_name}: mergekit plans a vocabulary or custom task")
        if save.dtype is None:
            raise HandOver("the recipe sets no out_dtype, so output dtypes are known only late")
        loads, shapes = [], set()
        for arg in task.gather_tensors.arguments().values():
            loader = cache.get(arg.model)
            name = arg._resolve_name(loader)
            if name is None:
                raise HandOver(
                    f"{save.tensor_name}: {arg.model} has no tensor {arg.tensor} (mergekit "
                    "would convert or skip it)"
                )
            file = os.path.join(loader.index.base_path, loader.index.tensor_paths[name])
            if not file.endswith(".safetensors"):
                raise HandOver(f"{file} is not a safetensors file")
            if file not in headers:
                headers[file] = _header_info(file)
            st = headers[file]
            entry = st.tensors[name]
            shape = entry.shape
            shapes.add(shape)
            stored = _torch_dtype(entry.dtype, file)
            load = Load(
                arg.model,
                file,
                name,
                _dtype(arg.dtype),
                st.data_start + entry.start,
                entry.nbytes,
                stored,
                shape,
            )
            if load.nbytes != _numel(shape) * stored.itemsize:
                raise MergebakeError(f"{file}: {name} has {load.nbytes} bytes for {shape} {stored}")
            loads.append(load)
        if len(shapes) != 1:
            raise HandOver(f"{save.tensor_name}: inputs differ in shape {sorted(shapes)}")
        (shape,) = shapes
        dtype = _dtype(save.dtype)
        nbytes = _numel(shape) * dtype.itemsize
        jobs.append(Job(i, save.tensor_name, task, tuple(loads), shape, dtype, nbytes))
    if len({j.name for j in jobs}) != len(jobs):
        raise HandOver("mergekit plans one output name twice")
    shards = _layout(jobs, options.out_shard_size)
    index = _index_json(jobs, shards) if len(shards) > 1 else None
    return Plan(jobs, shards, index, arch_info, get_method(merge_config.merge_method))


def _dtype(name: str | None) -> torch.dtype | None:
    from mergekit.common import dtype_from_name

    return dtype_from_name(name) if name else None


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _layout(jobs: list[Job], max_shard_size: int) -> list[Shard]:
    """Shards as ``TensorWriter.save_tensor`` fills them (a new shard when the current one
    is not empty and the tensor would take it past ``max_shard_size``; ``<= 0``: one
    shard), named as its ``finalize`` renames them; offsets in ``safetensors`` order."""
    groups: list[list[Job]] = []
    size = 0
    for job in jobs:
        if groups and groups[-1] and max_shard_size > 0 and size + job.nbytes > max_shard_size:
            groups.append([])
            size = 0
        if not groups:
            groups.append([])
        groups[-1].append(job)
        size += job.nbytes
    n = len(groups)
    shards = []
    for s, group in enumerate(groups):
        name = "model.safetensors" if n == 1 else f"model-{s + 1:05d}-of-{n:05d}.safetensors"
        ordered = _safetensors_order(group)
        header = _header_bytes(ordered)
        pos = len(header)  # the 8-byte length prefix and the JSON
        for job in ordered:
            job.shard, job.offset = s, pos
            pos += job.nbytes
        shards.append(Shard(name, ordered, header))
    return shards


def _torch_dtype(code: str, file: str) -> torch.dtype:
    if code not in DTYPES:
        raise HandOver(f"{file}: safetensors dtype {code} is not read by the stream engine")
    return torch_dtype(code)


def _st_dtype(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    for code, d in DTYPES.items():
        if d.torch == name:
            return code
    raise HandOver(f"safetensors has no dtype code for {dtype}")


def _safetensors_order(jobs: list[Job]) -> list[Job]:
    """``jobs`` in the order ``safetensors`` lays tensors out in a file (asked of the
    ``safetensors`` package itself, by serialising empty tensors of the same names and
    dtypes, so the order follows whatever version is installed)."""
    from safetensors.torch import save

    blob = save({j.name: torch.empty(0, dtype=j.dtype) for j in jobs}, metadata={"format": "pt"})
    (n,) = struct.unpack("<Q", blob[:8])
    names = [k for k in json.loads(blob[8 : 8 + n]) if k != "__metadata__"]
    by_name = {j.name: j for j in jobs}
    return [by_name[k] for k in names]


def _header_bytes(ordered: list[Job]) -> bytes:
    """The safetensors header of a file holding ``ordered`` (in that order), with
    ``{"format": "pt"}`` metadata as mergekit writes it: compact JSON, padded with spaces
    to a multiple of 8 bytes (the format's alignment rule)."""
    entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    pos = 0
    for job in ordered:
        entries[job.name] = (_st_dtype(job.dtype), tuple(job.shape), pos, pos + job.nbytes)
        pos += job.nbytes
    return header_bytes(entries, {"format": "pt"})


def _index_json(jobs: list[Job], shards: list[Shard]) -> bytes:
    """``model.safetensors.index.json`` as ``TensorWriter.finalize`` writes it: total size
    of all tensors, mergekit's version, and the weight map in the order tensors were saved."""
    from importlib.metadata import version

    content = {
        "metadata": {
            "total_size": sum(j.nbytes for j in jobs),
            "mergekit_version": version("mergekit"),
        },
        "weight_map": {j.name: shards[j.shard].name for j in jobs},
    }
    return json.dumps(content, indent=2).encode()


# --------------------------------------------------------------------------- selection


def fast_sparsify(tensor: torch.Tensor, density: float, method: Any, **kwargs: Any) -> torch.Tensor:
    """mergekit's ``sparsify`` with a linear-time selection for magnitude trimming.

    ``magnitude`` (TIES) keeps ``k = max(1, int(density * numel))`` entries of largest
    ``|x|``; ``magnitude_outliers`` (breadcrumbs) keeps the ranks ``[n_bot, n_bot + n)`` of
    ``|x|`` in ascending order, ``n = int(density * numel)``, ``n_bot = max(0, numel - n -
    int(gamma * numel))`` (mergekit's formulas, ``mergekit.sparsify``). The cut-off values
    come from a counting pass (16-bit floats: one ``bincount`` over the bit patterns of
    ``|x|``, which order like the values) or ``torch.kthvalue`` (other dtypes), so the
    cost is O(numel) instead of a sort's O(numel log numel). Among entries equal to a
    cut-off, the lowest flat index ranks first, i.e. the kept set is exactly the one a
    *stable* sort gives (``torch.sort(..., stable=True)``). Same dtype and shape as
    ``tensor``; the kept entries are ``tensor * mask`` as in mergekit. Every other method,
    a rescaling norm (its sums would round differently) or a NaN magnitude goes to
    mergekit's own ``sparsify``.
    """
    from mergekit.sparsify import SparsificationMethod, rescaled_masked_tensor, sparsify

    rescale = kwargs.get("rescale_norm")
    if method not in (SparsificationMethod.magnitude, SparsificationMethod.magnitude_outliers):
        return sparsify(tensor, density, method, **kwargs)
    if rescale is not None or density >= 1 or density <= 0 or tensor.numel() == 0:
        return sparsify(tensor, density, method, **kwargs)
    if torch.isnan(tensor).any():
        return sparsify(tensor, density, method, **kwargs)
    num = tensor.numel()
    if method == SparsificationMethod.magnitude:
        keep = stable_rank_band(tensor, 0, max(1, int(density * num)), descending=True)
    else:
        target = int(density * num)
        n_bot = max(0, num - target - int(kwargs.get("gamma", 0) * num))
        keep = stable_rank_band(tensor, n_bot, n_bot + target, descending=False)
    return rescaled_masked_tensor(tensor, keep.to(tensor.dtype).reshape_as(tensor), None)


def stable_rank_band(x: torch.Tensor, lo: int, hi: int, *, descending: bool) -> torch.Tensor:
    """Flat bool mask of the entries of ``x`` whose rank by ``|x|`` lies in ``[lo, hi)``.

    Ranks are those of a stable sort of ``|x|.reshape(-1)`` (``descending`` or ascending):
    equal magnitudes rank by flat index, lowest first. ``x`` must hold no NaN. O(numel).
    """
    n = x.numel()
    keep = torch.zeros(n, dtype=torch.bool)
    lo, hi = max(lo, 0), min(hi, n)
    if hi <= lo:
        return keep
    a = x.abs().reshape(-1)
    if a.element_size() == 2 and a.is_floating_point():
        key = a.view(torch.int16)  # |x| >= 0: the bit patterns order like the values
        counts = torch.bincount(key, minlength=1 << 15)
        if descending:
            counts = counts.flip(0)
        ends = counts.cumsum(0)  # rank just past each class, in sort order
        classes = torch.searchsorted(ends, torch.tensor([lo, hi - 1]), right=True).tolist()
        values = [(1 << 15) - 1 - c if descending else c for c in classes]
        starts = [int(ends[c] - counts[c]) for c in classes]
    else:
        key = a.float()
        values, starts = [], []
        for r in (lo, hi - 1):
            v = float(torch.kthvalue(key, n - r if descending else r + 1).values)
            values.append(v)
            starts.append(int((key > v).sum() if descending else (key < v).sum()))
    v_lo, v_hi = values
    if descending:
        keep |= (key < v_lo) & (key > v_hi)
    else:
        keep |= (key > v_lo) & (key < v_hi)
    for v, start in dict(zip(values, starts, strict=True)).items():
        ties = (key == v).nonzero().reshape(-1)  # flat indices, ascending
        keep[ties[max(0, lo - start) : max(0, hi - start)]] = True
    return keep


def exact_sparsify(
    tensor: torch.Tensor, density: float, method: Any, **kwargs: Any
) -> torch.Tensor:
    """mergekit's ``sparsify``, bit for bit, with magnitude trimming in O(numel).

    For ``magnitude`` (TIES: the first ``k = max(1, int(density * numel))`` entries of
    ``torch.argsort(|x|.float(), descending=True)``) and ``magnitude_outliers``
    (breadcrumbs: the entries ``[n_bot, n_bot + n)`` of ``torch.sort(|x|.float())``,
    formulas of ``mergekit.sparsify``), the kept set comes from
    :func:`mergebake.sort_select.magnitude_mask`, which follows the platform's sort
    (libstdc++ introsort) into the ranges around the cut-offs only, so ties at a cut-off
    are broken exactly as mergekit's sort breaks them; the mask then goes through
    mergekit's own ``rescaled_masked_tensor`` (rescaling norms included). Same dtype and
    shape as ``tensor``. Everything else, and any tensor the model cannot follow (NaN, a
    heap-sort fallback, a platform whose sort differs), runs mergekit's ``sparsify``.
    """
    from mergekit.sparsify import SparsificationMethod, rescaled_masked_tensor, sparsify

    from .sort_select import magnitude_mask

    magnitude = method == SparsificationMethod.magnitude
    if not magnitude and method != SparsificationMethod.magnitude_outliers:
        return sparsify(tensor, density, method, **kwargs)
    num = tensor.numel()
    if density >= 1 or density <= 0 or num == 0 or tensor.device.type != "cpu":
        return sparsify(tensor, density, method, **kwargs)
    if magnitude:
        mask = magnitude_mask(tensor, 0, max(1, int(density * num)), descending=True)
    else:
        target = int(density * num)
        n_bot = max(0, num - target - int(kwargs.get("gamma", 0) * num))
        mask = magnitude_mask(tensor, n_bot, n_bot + target, descending=False)
    if mask is None:
        return sparsify(tensor, density, method, **kwargs)
    return rescaled_masked_tensor(
        tensor, mask.to(tensor.dtype).reshape_as(tensor), kwargs.get("rescale_norm")
    )


@contextlib.contextmanager
def _selection(selection: str) -> Iterator[None]:
    """Within the block, mergekit's task-arithmetic family trims with
    :func:`exact_sparsify` (``selection="exact"``: mergekit's result, without its full
    sort) or :func:`fast_sparsify` (``"fast"``)."""
    from mergekit.merge_methods import generalized_task_arithmetic as gta

    original = gta.sparsify
    gta.sparsify = fast_sparsify if selection == "fast" else exact_sparsify
    try:
        yield
    finally:
        gta.sparsify = original


def _trims_by_magnitude(the_plan: Plan) -> bool:
    """Whether any tensor of the plan is trimmed by magnitude where :func:`fast_sparsify`
    would select (a magnitude method, density < 1, no rescaling)."""
    method = the_plan.method
    sparsification = getattr(method, "sparsification_method", None)
    if sparsification is None or sparsification.value not in ("magnitude", "magnitude_outliers"):
        return False
    for job in the_plan.jobs:
        if job.task.parameters.get("rescale"):
            continue
        for params in job.task.input_parameters.values():
            if params.get("density", 1.0) < 1:
                return True
    return False


# --------------------------------------------------------------------------- shortcut


_ZERO_RULES: dict[Any, str | None] = {}
_ZERO_LOCK = threading.Lock()


def _zero_rule(job: Job, dtype: torch.dtype) -> str | None:
    """What mergekit's code returns for ``job``'s parameters when every task vector is
    exactly zero: ``"base"`` (the base tensor, bit for bit), ``"plus_zero"`` (the base with
    -0.0 turned into +0.0, i.e. ``base + (+0.0)``) or ``None`` (anything else: no shortcut).

    Found by running mergekit's own per-tensor code on a probe of the same dtype whose
    inputs all equal ``[-0.0, 0.0, 1.5, -3.25]``: with zero task vectors every
    elementwise step of the task-arithmetic family gives the same (signed) zero at every
    position, and magnitude masks multiply zeros only, so the probe's result decides it.
    Cached by (parameters, dtype).
    """
    task = job.task
    key = (task.method_name, task.parameters, task.input_parameters, task.model_order, dtype)
    with _ZERO_LOCK:
        if key in _ZERO_RULES:
            return _ZERO_RULES[key]
    ndim = len(job.shape)
    probe = torch.tensor([-0.0, 0.0, 1.5, -3.25], dtype=dtype).reshape(
        (4,) + (1,) * max(ndim - 1, 0)
    )
    with torch.no_grad():
        got = task.execute(tensors={load.model: probe.clone() for load in job.loads})
    rule = None
    if got is not None and got.dtype == dtype and got.shape == probe.shape:
        if _same_bits(got, probe):
            rule = "base"
        elif _same_bits(got, probe + torch.zeros((), dtype=dtype)):
            rule = "plus_zero"
    with _ZERO_LOCK:
        _ZERO_RULES[key] = rule
    return rule


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bytes(_as_bytes(a)) == bytes(_as_bytes(b))


def _as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _zero_task_vectors(job: Job, tensors: dict[Any, torch.Tensor]) -> bool:
    """True when every model's input equals the base's bit for bit and the base is
    finite (so each task vector ``x - base`` is +0.0 everywhere)."""
    base_ref = job.task.base_model
    base = tensors.get(base_ref)
    if base is None or len(tensors) != len(job.loads) or not base.is_floating_point():
        return False
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}.get(base.element_size())
    if ints is None:
        return False
    b = base.view(ints)
    others = [t for ref, t in tensors.items() if ref != base_ref]
    if any(t.dtype != base.dtype for t in others):
        return False
    # the first entries first: a fine-tuned tensor differs there, and torch.equal reads all
    head = b.reshape(-1)[:4096]
    if any(not torch.equal(t.view(ints).reshape(-1)[:4096], head) for t in others):
        return False
    if any(not torch.equal(t.view(ints), b) for t in others):
        return False
    return bool(torch.isfinite(base).all())


# --------------------------------------------------------------------------- execution


class _Reader:
    """Reads input tensors with ``os.preadv``: one copy from the page cache, and no mapping
    of the input files, so the process's resident memory holds the tensors in flight only
    (a ``safe_open`` mapping counts every page it touched). Each worker thread reads into
    byte buffers of its own, reused from tensor to tensor (grown when a tensor needs more),
    so the kernel does not fault in and zero fresh pages for every input."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def _fd(self, file: str) -> int:
        with self._lock:
            if file not in self._fds:
                self._fds[file] = os.open(file, os.O_RDONLY)
            return self._fds[file]

    def buffer(self, slot: int, nbytes: int) -> torch.Tensor:
        """This thread's byte buffer number ``slot``, at least ``nbytes`` long (uint8). Valid
        until this thread asks for the same slot again."""
        bufs = getattr(self._local, "buffers", None)
        if bufs is None:
            bufs = self._local.buffers = {}
        buf = bufs.get(slot)
        if buf is None or buf.numel() < nbytes:
            bufs[slot] = None  # free the old one first
            buf = bufs[slot] = torch.empty(nbytes, dtype=torch.uint8)
        return buf

    def get(self, load: Load, slot: int) -> torch.Tensor:
        """``load``'s tensor, read into this thread's buffer ``slot`` (then cast to the
        recipe's dtype where it differs, into a new tensor)."""
        buf = self.buffer(slot, load.nbytes)
        x = buf[: load.nbytes].view(load.stored).view(load.shape)
        view, fd, done = _as_bytes(x), self._fd(load.file), 0
        while done < load.nbytes:
            n = os.preadv(fd, [view[done:]], load.offset + done)
            if n <= 0:
                raise MergebakeError(f"{load.file}: ended before {load.name}'s data")
            done += n
        if load.dtype is not None and load.dtype != x.dtype:
            x = x.to(dtype=load.dtype)  # LoadTensor's cast to the recipe's dtype
        return x

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


#: Elements per row block when an elementwise method is computed block by block: 2 MiB of
#: bf16 per input, so each of mergekit's passes runs in the L2/L3 cache where a whole
#: tensor's do not, while the Python cost of a call into mergekit per block stays small.
#: Measured on the 4.9 GB bench pair (2 cores, ``bench/merge.py``): task_arithmetic took
#: 19.3 s with 64k-element blocks, 14.0-15.5 s with 1M or 2M (linear 19.3 -> 13.7-14.8 s).
BLOCK_ELEMENTS = 1 << 20


def elementwise(method: Any) -> bool:
    """Whether mergekit's per-tensor code for ``method`` computes each output entry from
    the same entry of the inputs only, with tensor-wide scalars (weights, lambda, the
    normalising sum of weights): ``linear`` (``mergekit.merge_methods.linear``) and the
    task-arithmetic family without sparsification and sign consensus
    (``task_arithmetic``). Such a tensor can be computed by blocks of rows, each block
    through mergekit's own code, with the same bits as the whole (held against mergekit
    in ``tests/unit/test_merge_stream.py`` with blocks forced small)."""
    from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge

    if isinstance(method, GeneralizedTaskArithmeticMerge):
        return method.sparsification_method is None and method.consensus_method is None
    spec = getattr(method, "spec", None)
    return getattr(spec, "name", None) == "linear"


def _by_row_blocks(
    job: Job, tensors: dict[Any, torch.Tensor], out: torch.Tensor | None = None
) -> torch.Tensor | None:
    """``job``'s result computed by mergekit's code on blocks of rows of every input
    (:data:`BLOCK_ELEMENTS` each), cast to ``job.dtype`` block by block, or None where
    the tensor is a single block or its inputs do not all have its shape."""
    shape = job.shape
    if len(shape) == 0 or job.dtype is None:
        return None
    row = _numel(shape[1:]) or 1
    rows = max(1, BLOCK_ELEMENTS // row)
    if shape[0] <= rows or any(tuple(t.shape) != shape for t in tensors.values()):
        return None
    if out is None:
        out = torch.empty(shape, dtype=job.dtype)
    with torch.no_grad():
        for start in range(0, shape[0], rows):
            part = job.task.execute(
                tensors={k: t[start : start + rows] for k, t in tensors.items()}
            )
            if part is None or tuple(part.shape) != (min(rows, shape[0] - start), *shape[1:]):
                return None
            out[start : start + rows] = part.to(dtype=job.dtype)
    return out


@dataclass
class _Stats:
    shortcut: int = 0
    computed: int = 0
    seconds_compute: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    scan: bool = False  # count NaN/Inf of every output tensor while in memory
    nonfinite: list[tuple[str, int, int]] = field(default_factory=list)  # (name, bad, numel)
    hashes: dict[int, Any] = field(default_factory=dict)  # shard index -> FollowingHash


def _run_job(
    job: Job, reader: _Reader, fds: list[int], gta: bool, stats: _Stats, blocks: bool = False
) -> None:
    """Compute one output tensor as mergekit's executor would and write its bytes."""
    t0 = time.perf_counter()
    tensors = {}
    for i, load in enumerate(job.loads):
        tensors[load.model] = reader.get(load, i)
    result = None
    if gta and _zero_task_vectors(job, tensors):
        base = tensors[job.task.base_model]
        rule = _zero_rule(job, base.dtype)
        if rule == "base":
            result = base
        elif rule == "plus_zero":
            result = base + torch.zeros((), dtype=base.dtype)
    shortcut = result is not None
    if result is None and blocks:
        out = reader.buffer(len(job.loads), job.nbytes)[: job.nbytes]
        result = _by_row_blocks(job, tensors, out.view(job.dtype).view(job.shape))
        # (the out buffer is this thread's, written below before the thread's next job)
    if result is None:
        with torch.no_grad():
            result = job.task.execute(tensors=tensors)
    del tensors
    if result is None:
        raise MergebakeError(f"mergekit's {job.task.method_name} returned no value for {job.name}")
    if job.dtype is not None:
        result = result.to(dtype=job.dtype)  # SaveTensor's cast to out_dtype
    if tuple(result.shape) != job.shape or result.dtype != job.dtype:
        raise MergebakeError(
            f"stream merge: {job.name} came out {tuple(result.shape)} {result.dtype}, planned "
            f"{job.shape} {job.dtype}; run with merge.engine: mergekit and report this"
        )
    bad = count_nonfinite(result) if stats.scan else 0
    data = _as_bytes(result)
    fd, pos, done = fds[job.shard], job.offset, 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], pos + done)
    if job.shard in stats.hashes:
        stats.hashes[job.shard].written(pos, len(data))
    with stats.lock:
        if bad:
            stats.nonfinite.append((job.name, bad, result.numel()))
        stats.shortcut += shortcut
        stats.computed += not shortcut
        stats.seconds_compute += time.perf_counter() - t0


def default_workers() -> int:
    """One worker per core this process may use (``os.sched_getaffinity``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def stream_merge(
    merge_config: Any,
    out_path: str | os.PathLike,
    options: Any,
    *,
    workers: int | None = None,
    selection: str = "exact",
    config_source: str | None = None,
    hash_outputs: bool = False,
    scan_values: bool = False,
) -> dict[str, Any]:
    """Write the merge of ``merge_config`` into ``out_path`` as ``mergekit-yaml`` would.

    ``merge_config``/``options`` are mergekit's ``MergeConfiguration``/``MergeOptions``;
    ``workers`` threads compute tensors (default: one per usable core; torch's intra-op
    threads are set to ``max(1, threads // workers)`` meanwhile and restored after);
    ``selection`` is ``"exact"`` (mergekit's kept sets, :func:`exact_sparsify`) or
    ``"fast"`` (:func:`fast_sparsify`);
    the returned ``selection`` is ``"fast"`` only where a tensor was trimmed by magnitude
    with it (else the output is the exact one whatever was asked).
    Writes the safetensors shards (+ index), ``config.json``, the tokenizer files and
    mergekit's tag-along files (and its model card when ``options.write_model_card``), as
    ``mergekit.merge.run_merge`` does. Peak memory: the tensors in flight, about
    ``2 * workers`` output tensors with their inputs.

    With ``hash_outputs`` a thread computes each shard's sha256 while it is written
    (:class:`mergebake.outputs.FollowingHash`) and records it for this process's
    provenance (:func:`mergebake.outputs.remember_sha256`), so the shards are not read
    again to hash them; with ``scan_values`` every output tensor is checked for NaN/Inf
    while in memory (:func:`mergebake.safetensors_io.count_nonfinite`) and the result
    lists them under ``"nonfinite"`` (``[name, bad, numel]`` each; ``mergebake merge``
    then skips verification's read of the values). Both are off for the bare engine, as
    in ``mergekit-yaml``.

    Returns ``{"engine": "stream", "selection", "workers", "tensors", "shortcut",
    "computed", "bytes", "shards", "seconds"}`` (plus ``"nonfinite"`` with
    ``scan_values``). Raises :class:`HandOver` (before writing
    anything) when the recipe needs mergekit (:func:`support_problem`, :func:`plan`),
    ``ValueError`` for an unknown ``selection``, and :class:`MergebakeError` when a tensor
    comes out other than planned.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection {selection!r} is unknown; choose one of {SELECTIONS}")
    t0 = time.perf_counter()
    problem = support_problem(merge_config, options)
    if problem:
        raise HandOver(problem)
    # The hundreds of thousands of objects torch, transformers and mergekit created at
    # import are never garbage; without this every full collection (triggered by the
    # objects of mergekit's planner and per-call code) walks them: 7% of a 4.9 GB linear
    # merge's CPU time in a perf profile.
    gc.freeze()
    try:
        return _stream_merge(
            merge_config,
            out_path,
            options,
            workers=workers,
            selection=selection,
            config_source=config_source,
            hash_outputs=hash_outputs,
            scan_values=scan_values,
            t0=t0,
        )
    finally:
        gc.unfreeze()


def _stream_merge(
    merge_config: Any,
    out_path: str | os.PathLike,
    options: Any,
    *,
    workers: int | None,
    selection: str,
    config_source: str | None,
    hash_outputs: bool,
    scan_values: bool,
    t0: float,
) -> dict[str, Any]:
    """:func:`stream_merge` after its checks, with the garbage collector's old objects frozen."""
    from mergekit.merge import _copy_tagalong_files, _copy_tokenizer, _model_out_config
    from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge

    out = Path(out_path)
    the_plan = plan(merge_config, options, str(out))
    workers = max(1, workers or default_workers())
    method = the_plan.method
    gta = isinstance(method, GeneralizedTaskArithmeticMerge) and (
        (method.sparsification_method.value if method.sparsification_method else None)
        in _GTA_SHORTCUT_SPARSIFICATION
    )

    selection = selection if _trims_by_magnitude(the_plan) else "exact"
    blocks = elementwise(method)

    out.mkdir(parents=True, exist_ok=True)
    fds = []
    stats = _Stats(scan=scan_values)
    done = False
    try:
        for i, shard in enumerate(the_plan.shards):
            fd = os.open(out / shard.name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            fds.append(fd)
            preallocate(fd, shard.size)
            os.pwrite(fd, shard.header, 0)
            os.ftruncate(fd, shard.size)
            if hash_outputs:
                stats.hashes[i] = FollowingHash(out / shard.name)
                stats.hashes[i].written(0, len(shard.header))
        reader = _Reader()
        threads = torch.get_num_threads()
        per_worker = max(1, threads // workers)
        torch.set_num_threads(per_worker)
        try:
            with (
                _selection(selection),
                ThreadPoolExecutor(
                    workers,
                    "mergebake-merge",
                    initializer=torch.set_num_threads,
                    initargs=(per_worker,),
                ) as pool,
            ):
                pending: set[Future] = set()
                for job in the_plan.jobs:
                    while len(pending) >= 2 * workers:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for f in done:
                            f.result()
                    pending.add(pool.submit(_run_job, job, reader, fds, gta, stats, blocks))
                for f in pending:
                    f.result()
        finally:
            torch.set_num_threads(threads)
            reader.close()
        done = True
    finally:
        for fd in fds:
            os.close(fd)
        if not done:
            for h in stats.hashes.values():
                h.cancel()
    for h in stats.hashes.values():
        remember_sha256(h.path, h.finish())
    if the_plan.index is not None:
        (out / "model.safetensors.index.json").write_bytes(the_plan.index)

    # What run_merge does after the tensors, in its order.
    cfg_out = _model_out_config(
        merge_config, the_plan.arch_info, trust_remote_code=options.trust_remote_code
    )
    cfg_out.save_pretrained(str(out))
    if options.write_model_card:
        from mergekit.card import generate_card

        source = config_source or merge_config.to_yaml()
        card = generate_card(config=merge_config, config_yaml=source, name=out.name)
        (out / "README.md").write_text(card, encoding="utf-8")
        (out / "mergekit_config.yml").write_text(source, encoding="utf-8")
    if options.copy_tokenizer:
        try:
            _copy_tokenizer(merge_config, str(out), options=options)
        except Exception as e:  # as mergekit: the merge stands without a tokenizer
            log.error("could not copy the tokenizer (the merge itself succeeded): %s", e)
    _copy_tagalong_files(
        merge_config, str(out), files=the_plan.arch_info.tagalong_files or [], options=options
    )
    return {
        "engine": "stream",
        "selection": selection,
        "workers": workers,
        "tensors": len(the_plan.jobs),
        "shortcut": stats.shortcut,
        "computed": stats.computed,
        "bytes": the_plan.total_bytes,
        "shards": len(the_plan.shards),
        "seconds": time.perf_counter() - t0,
        **({"nonfinite": [list(x) for x in stats.nonfinite]} if scan_values else {}),
    }
