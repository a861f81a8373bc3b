"""Engine ``stream``: bake a LoRA adapter into its base tensor by tensor, never loading the model.

PEFT's default ``merge_and_unload`` is the specification, reproduced operation for
operation (the same torch ops in the same order, on tensors of the same dtypes and
layouts), so every output tensor is bit-identical to PEFT's on the same machine:

- LoRA on a linear layer: ``W += transpose(B @ A, fan_in_fan_out) * scale`` with ``A``,
  ``B`` in fp32 (PEFT's ``autocast_adapter_dtype`` holds bf16/fp16 adapters in fp32), the
  fp32 delta added in place to the stored dtype, so the sum is rounded once;
- LoRA on an embedding: ``W += (B @ A).T * scale`` cast to ``W``'s dtype first (PEFT's
  ``Embedding.merge``: rounded twice);
- DoRA (``use_dora``): ``W = (m / ||W + ΔW||) * (W + ΔW)``, the norm row-wise as in
  PEFT's ``DoraLinearLayer.get_weight_norm`` (``DoraEmbeddingLayer`` for embeddings);
- ``lora_bias``: ``b += lora_B.bias * scale``;
- scale ``α/r`` or ``α/√r`` (``use_rslora``), ``r`` and ``α`` looked up in
  ``rank_pattern``/``alpha_pattern`` with PEFT's ``get_pattern_key``; ``fan_in_fan_out``
  is what PEFT makes of it: true for ``Conv1D`` layers (GPT-2), false for ``nn.Linear``
  (what an adapter means is :mod:`mergebake.lora`);
- whole tensors the adapter carries replace the base's: ``modules_to_save`` copies (a
  new tensor, so a tied head or embedding saved this way unties, as in PEFT, and the
  config says ``tie_word_embeddings: false``) and the ``base_layer`` copies PEFT saves
  beside an embedding LoRA (loaded into the shared tensor, which stays tied).

Arithmetic: the plain-LoRA linear delta is computed a block of output rows at a time
(``B[i:j] @ A``, about :data:`DELTA_BLOCK_BYTES` of fp32), scaled and added to those rows
of ``W`` while the block is in cache, for every product shape where the first tensor of
that shape proved the blocks bit-identical to the full product (:class:`RowBlocks`);
otherwise, and for DoRA and embeddings, the full fp32 ``B @ A`` is computed as PEFT does.

I/O: each base shard is written to an output shard of the same name, tensors in the same
order with the same header (and metadata) unless a tensor is added; its disk space is
reserved first. Tensors nothing touches are copied in the kernel (``copy_file_range``) by
a thread of their own and a shard nothing touches is hard-linked; the others are read
with ``pread`` into reused buffers (the kernel asked to read ahead the ones that follow),
changed in place by one worker thread per torch thread (torch single-threaded inside
each), and written at their final offsets with ``pwrite`` by one writer thread behind
them. Memory is a few tensors, whatever the size of the model; no file is memory-mapped.
The sha256 the provenance record needs of each written shard is computed meanwhile by a
thread that follows the writes (:class:`mergebake.outputs.FollowingHash`), so the shard
is not read again after the bake.
Every check (options the engine does not reproduce, ranks, biases, shapes) runs in
:func:`plan_stream`, before anything is written. File access is
:mod:`mergebake.safetensors_io`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import MergebakeError
from .checkpoint import INDEX_NAME, weight_files
from .lora import AdapterPlan, group_keys, is_conv1d, module_scale, unsupported_options
from .outputs import FollowingHash, link_or_copy, remember_sha256, write_json
from .safetensors_io import (
    DTYPES,
    SafetensorsFile,
    TensorInfo,
    TensorReader,
    copy_range,
    count_nonfinite,
    header_bytes,
    preallocate,
    pwrite_all,
    torch_dtype,
)

log = logging.getLogger(__name__)

BLOCK_ELEMENTS = 256 * 1024  # elementwise ops on a full delta: row blocks of about 1 MB fp32
#: fp32 bytes of one row block of ``B @ A`` on the row-block path (:class:`RowBlocks`): the
#: block's product, scale and add stay in cache (L2/L3). The best of 256 KiB…4 MiB measured
#: with ``bench/bake.py --arithmetic`` (one layer of the 4.9 GB bench checkpoint, one
#: thread, AMD EPYC, 1 MiB L2): 61 ms instead of 73 ms for the full product at r=64, 28
#: instead of 41 at r=16, 202 instead of 203 at r=256; smaller blocks lose (MKL repacks
#: ``A`` for every block).
DELTA_BLOCK_BYTES = 2 * 1024 * 1024
#: Row blocks start at multiples of this many rows and hold at least this many (BLAS
#: kernels compute rows in tiles; see :class:`RowBlocks`).
ROW_ALIGN = 16
MAX_WORKERS = 4  # tensors baked at once ...
WORKER_MEMORY = 2 * 1024**3  # ... within about this many bytes of buffers


# ---------------------------------------------------------------------------------------
# the plan: which operations change which tensor


@dataclass
class LoraOp:
    """One adapted module's contribution to one base tensor, as PEFT's ``merge`` does it.

    ``kind``: ``linear`` (also Conv1D, with ``fan_in_fan_out``), ``embedding`` or
    ``bias`` (``lora_bias``: ``b += lora_B.bias * scale``). ``magnitude`` names the DoRA
    magnitude vector when the module uses DoRA.
    """

    module: str
    kind: str
    scale: float
    a: str | None = None
    b: str | None = None
    fan_in_fan_out: bool = False
    magnitude: str | None = None


@dataclass
class Storage:
    """One tensor as the merged model holds it: where its starting value comes from
    (``("base", disk name)`` or ``("adapter", key)``) and the merge operations, in order."""

    source: tuple[str, str]
    dtype: str
    shape: tuple[int, ...]
    ops: list[LoraOp] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.source[0] != "base" or bool(self.ops)


@dataclass
class StreamPlan:
    """Everything the stream engine will do, decided (and checked) before any write."""

    base: Path
    adapter_file: Path
    shards: list[SafetensorsFile]
    # disk name -> the storage whose final value is written under it
    outputs: dict[str, Storage]
    # tensors the output gains (an untied head): disk name -> (shard file name, storage)
    added: dict[str, tuple[str, Storage]]
    config_patch: dict[str, Any]
    index: dict[str, Any] | None

    @property
    def lora_ops(self) -> int:
        seen = {id(s): s for s in list(self.outputs.values()) + [s for _, s in self.added.values()]}
        return sum(len(s.ops) for s in seen.values())


def plan_stream(base: Path, adapter: Path, plan: AdapterPlan) -> StreamPlan:
    """Decide every operation of the bake from headers and configs; raise before any write.

    ``plan`` is the :class:`mergebake.lora.AdapterPlan` that :func:`mergebake.bake.preflight`
    made: its ``runtime`` maps the loaded model's parameter names to disk names, ``tied``
    the tied head's entry (``lm_head.weight`` -> the embedding). Raises
    :class:`MergebakeError` for options the engine does not reproduce, trainable tokens, a
    rank that disagrees with the config, ``lora_bias`` on a layer without bias (PEFT cannot
    merge that either), and LoRA on a convolution.
    """
    config, base_config = plan.config, plan.base_config
    runtime, tied_alias = plan.runtime, plan.tied
    cfg_path = adapter / "adapter_config.json"
    bad = unsupported_options(config)
    if bad:
        raise MergebakeError(
            f"{cfg_path}: {', '.join(bad)} is not supported by the stream engine (the merge "
            "would not be W + scale * B @ A of this base); use bake.engine: peft"
        )
    if plan.weights.suffix != ".safetensors":
        raise MergebakeError(
            f"{plan.weights}: the stream engine reads safetensors adapters only; "
            "re-save the adapter with safe_serialization=True or use "
            "bake.engine: peft"
        )
    shards = [SafetensorsFile.open(f) for f in weight_files(base)]
    disk: dict[str, tuple[SafetensorsFile, TensorInfo]] = {}
    for st in shards:
        for name, e in st.tensors.items():
            disk[name] = (st, e)
    shapes = plan.shapes  # adapter tensor -> shape

    storages: dict[str, Storage] = {
        n: Storage(("base", n), e.dtype, e.shape) for n, (_, e) in disk.items()
    }
    slots: dict[str, Storage] = {}  # runtime parameter name -> storage (tied ones share)

    def slot(param: str) -> Storage:
        if param not in slots:
            slots[param] = storages[runtime[param]]
        return slots[param]

    # 1. load: whole tensors the adapter carries (PEFT loads them before merging)
    tie_both = bool(config.get("ensure_weight_tying"))
    grouped = group_keys(plan.keys, plan.renamed)
    if grouped.tokens:
        raise MergebakeError(
            f"{plan.weights}: trainable tokens on {sorted(set(grouped.tokens))[:5]} are not "
            "supported by the stream engine; use bake.engine: peft"
        )
    for param, keys in sorted(grouped.whole.items()):
        for key, module in keys.items():
            st = slot(param)
            if ".base_layer." in module or module.endswith(".base_layer"):
                st.source = ("adapter", key)  # loaded into the module's own (shared) tensor
            else:  # modules_to_save: a copy of the module, loaded, replaces the original
                new = Storage(("adapter", key), st.dtype, st.shape)
                if tie_both and param in _tied_pair(tied_alias, runtime):
                    for p in _tied_pair(tied_alias, runtime):
                        slots[p] = new
                else:
                    slots[param] = new

    # 2. merge: LoRA modules in model order (the embedding before the tied head)
    lora = grouped.lora
    order = sorted(lora, key=lambda m: (m + ".weight" in tied_alias, m))
    problems: list[str] = []
    for module in order:
        parts = lora[module]
        weight_param = module + ".weight"
        target = slot(weight_param)
        if len(target.shape) != 2:
            problems.append(
                f"{module}: LoRA on a {len(target.shape)}-d weight (a convolution?) "
                "is not supported by the stream engine"
            )
            continue
        embedding = "lora_embedding_A" in parts
        a = parts.get("lora_embedding_A" if embedding else "lora_A")
        b = parts.get("lora_embedding_B" if embedding else "lora_B")
        r, _, scale = module_scale(config, module)
        if shapes[a][0] != r:
            problems.append(
                f"{module}: lora_A has rank {shapes[a][0]} but "
                f"adapter_config.json gives r={r} (r / rank_pattern)"
            )
            continue
        magnitude = parts.get("lora_magnitude_vector")
        if bool(config.get("use_dora")) != (magnitude is not None):
            problems.append(
                f"{module}: use_dora is {bool(config.get('use_dora'))} but the "
                f"adapter {'has' if magnitude else 'lacks'} a lora_magnitude_vector"
            )
            continue
        fan = False if embedding else is_conv1d(base_config, module)
        target.ops.append(
            LoraOp(module, "embedding" if embedding else "linear", scale, a, b, fan, magnitude)
        )
        bias_key = parts.get("lora_B.bias")
        if bias_key is not None:
            if module + ".bias" not in runtime:
                problems.append(
                    f"{module}: lora_bias is set but the base layer has no bias "
                    "(PEFT cannot merge this either)"
                )
                continue
            slot(module + ".bias").ops.append(LoraOp(module, "bias", scale, b=bias_key))
    if problems:
        raise MergebakeError(
            f"{plan.weights}: cannot bake: {'; '.join(problems[:5])}"
            + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
        )
    if config.get("fan_in_fan_out") and not any(is_conv1d(base_config, m) for m in lora):
        log.info(
            "%s: fan_in_fan_out is set but the targets are nn.Linear layers; PEFT ignores "
            "it there, and so does the stream engine",
            cfg_path,
        )

    # 3. what is written under which name
    outputs: dict[str, Storage] = {}
    for param, name in runtime.items():
        if param in tied_alias:
            continue
        outputs[name] = slot(param)
    for name in disk:  # tensors no parameter loads (the class ignores them): copied as they are
        outputs.setdefault(name, storages[name])
    added: dict[str, tuple[str, Storage]] = {}
    config_patch: dict[str, Any] = {}
    for alias, embed_disk in tied_alias.items():
        embed_params = [p for p, n in runtime.items() if n == embed_disk and p not in tied_alias]
        if embed_params and slot(alias) is not slot(embed_params[0]):
            head = alias  # the name save_pretrained gives an untied head (also multimodal)
            shard = disk[embed_disk][0].path.name
            added[head] = (shard, slot(alias))
            config_patch["tie_word_embeddings"] = False
            msg = (
                f"{plan.weights}: the adapter replaces the tied {alias} or its embedding "
                f"(modules_to_save), which unties them as in PEFT; the output gets "
                f"{head} and tie_word_embeddings: false"
            )
            log.warning(msg)
            warnings.warn(msg, stacklevel=3)
    index = None
    if (base / INDEX_NAME).is_file():
        index = json.loads((base / INDEX_NAME).read_text())
    return StreamPlan(base, plan.weights, shards, outputs, added, config_patch, index)


def _tied_pair(tied_alias: Mapping[str, str], runtime: Mapping[str, str]) -> list[str]:
    out = []
    for alias, embed in tied_alias.items():
        out.append(alias)
        out += [p for p, n in runtime.items() if n == embed and p not in tied_alias]
    return out


# ---------------------------------------------------------------------------------------
# the arithmetic: PEFT's merge, op for op


def _t(weight, fan_in_fan_out: bool):
    """PEFT's ``transpose``."""
    return weight.T if fan_in_fan_out else weight


def row_blocks(rows: int, cols: int, block_bytes: int | None = None) -> list[tuple[int, int]]:
    """The ``[start, end)`` row ranges in which a ``rows × cols`` fp32 ``B @ A`` is computed.

    Each block holds about ``block_bytes`` (default :data:`DELTA_BLOCK_BYTES`) of fp32,
    rounded down to a multiple of :data:`ROW_ALIGN` rows and at least that many; every
    block starts at a multiple of :data:`ROW_ALIGN`, and a last block shorter than that is
    joined to the one before (so no block is smaller than :data:`ROW_ALIGN` rows unless
    the whole matrix is). One block for a matrix of at most a block's rows.
    """
    block_bytes = DELTA_BLOCK_BYTES if block_bytes is None else block_bytes
    step = max(ROW_ALIGN, block_bytes // (4 * max(1, cols)) // ROW_ALIGN * ROW_ALIGN)
    blocks = [(i, min(rows, i + step)) for i in range(0, rows, step)]
    if len(blocks) > 1 and blocks[-1][1] - blocks[-1][0] < ROW_ALIGN:
        blocks.pop()
        blocks[-1] = (blocks[-1][0], rows)
    return blocks


class Scratch:
    """One worker's reused fp32 buffers (page faults cost more than the arithmetic).

    :meth:`full` holds a whole ``B @ A`` (``rows × cols`` fp32: 4 bytes an element, e.g.
    37.7 MB for 6144 × 1536), :meth:`block` one row block of it (about
    :data:`DELTA_BLOCK_BYTES`). Each grows when asked for more and never shrinks; both
    start 64-byte aligned (torch's CPU allocator), as the fresh tensor PEFT's ``b @ a``
    writes into does.
    """

    def __init__(self) -> None:
        self._full = None
        self._block = None

    @staticmethod
    def _get(buf, rows: int, cols: int):
        import torch

        if buf is None or buf.numel() < rows * cols:
            buf = None  # free the old one first
            buf = torch.empty(rows * cols, dtype=torch.float32)
        return buf

    def full(self, rows: int, cols: int):
        """An fp32 ``rows × cols`` view of the whole-matrix buffer."""
        self._full = self._get(self._full, rows, cols)
        return self._full[: rows * cols].view(rows, cols)

    def block(self, rows: int, cols: int):
        """An fp32 ``rows × cols`` view of the row-block buffer."""
        self._block = self._get(self._block, rows, cols)
        return self._block[: rows * cols].view(rows, cols)


class RowBlocks:
    """Row-block arithmetic of one bake, and the product shapes verified for it.

    Whether ``B[i:j] @ A`` equals rows ``i:j`` of ``B @ A`` bit for bit is up to the BLAS
    kernel, not to arithmetic: the inner dimension is only ``r``, but a kernel computes
    rows in tiles and may take another code path (another summation order, FMA or not) for
    a block that starts inside a tile or holds only a few rows, or for another thread
    count. Measured with torch 2.13's MKL on an AMD EPYC (AVX-512), single-threaded: blocks
    starting at multiples of 16 rows and holding at least 4 agreed with the full product
    for every ``r`` in 1…256 and every width tried; blocks of 1–3 rows did not (for
    ``r`` >= 2), nor, at some widths, blocks starting off a multiple of 4 rows, nor, with
    2 threads, some blocks of 5–11 rows. So nothing is assumed: the first time a bake
    meets a product shape (``rows``, ``cols``, ``r``, block size, torch threads),
    :meth:`agree` computes a product of that shape from random fp32 ``A`` and ``B`` (fixed
    seed) both ways and compares every block with ``torch.equal``; tensors of that shape
    use row blocks only where they agreed, the full product otherwise. A kernel's
    summation order depends on shapes, strides, alignment and threads, never on the
    values, and random values expose any difference in it (the adapter's own values might
    not: an untrained ``B`` is all zeros); the probe's tensors are laid out as the bake's
    (fresh, 64-byte-aligned, contiguous). Two workers may both probe a shape they meet at
    once. ``block_bytes``: fp32 bytes of a row block (default :data:`DELTA_BLOCK_BYTES`).
    Thread-safe.
    """

    def __init__(self, block_bytes: int | None = None) -> None:
        self.block_bytes = DELTA_BLOCK_BYTES if block_bytes is None else block_bytes
        self._lock = threading.Lock()
        self.verdicts: dict[tuple[int, ...], bool] = {}
        self.blocked_ops = 0  # plain-LoRA linear ops computed by row blocks
        self.full_ops = 0  # ... and from the full product

    def agree(self, rows: int, cols: int, rank: int, scratch: Scratch) -> bool:
        """Whether :func:`row_blocks` of a ``rows × rank`` by ``rank × cols`` fp32 product
        are bit-identical to the full product here (probed once per shape, then recorded).
        A product of one block is the full product: ``True`` without a probe."""
        import torch

        spans = row_blocks(rows, cols, self.block_bytes)
        if len(spans) == 1:
            return True
        key = (rows, cols, rank, self.block_bytes, torch.get_num_threads())
        with self._lock:
            known = self.verdicts.get(key)
        if known is not None:
            return known
        g = torch.Generator().manual_seed(0)
        a = torch.randn(rank, cols, generator=g)
        b = torch.randn(rows, rank, generator=g)
        full = torch.matmul(b, a, out=scratch.full(rows, cols))
        tall = max(j - i for i, j in spans)
        same = all(
            torch.equal(_rows_product(b[i:j], a, scratch.block(tall, cols)[: j - i]), full[i:j])
            for i, j in spans
        )
        with self._lock:
            if key not in self.verdicts and not same:
                log.info(
                    "stream bake: row blocks of B @ A (%d × %d, r=%d) differ from the full "
                    "product with this BLAS; tensors of that shape use the full product",
                    rows,
                    cols,
                    rank,
                )
            self.verdicts[key] = same
        return same

    def count(self, blocked: bool) -> None:
        """Count one plain-LoRA linear op, computed by row blocks or from the full product."""
        with self._lock:
            if blocked:
                self.blocked_ops += 1
            else:
                self.full_ops += 1


def _add_scaled(weight, delta, rows: slice, scale: float, fan: bool) -> None:
    """``W[rows] += delta * scale`` (``W[:, rows]`` with ``fan_in_fan_out``): ``delta`` is
    fp32 rows ``rows`` of ``B @ A``, scaled in place (the values of PEFT's out-of-place
    ``* scaling``) and added to the stored dtype in fp32, rounded once (``Linear.merge``)."""
    delta.mul_(scale)
    if fan:
        weight[:, rows].add_(delta.T)  # `+=` on the view: the same add_, no write-back
    else:
        weight[rows].add_(delta)


def _linear(weight, a, b, scale: float, fan: bool, scratch: Scratch | None, blocks):
    """Vanilla LoRA on a linear layer, PEFT's ``Linear.merge``: ``W += T(B @ A) * scale``.

    ``weight``: ``out × in`` (``in × out`` with ``fan_in_fan_out``), any float dtype;
    ``a``: ``r × in`` and ``b``: ``out × r``, fp32. With ``blocks`` (:class:`RowBlocks`),
    where row blocks of this product shape agree with the full product bit for bit, the
    product is computed a row block of ``B`` at a time into one cache-sized buffer (fp32
    ``block × in``, about :data:`DELTA_BLOCK_BYTES`), scaled and added to the same rows of
    ``W`` (columns with ``fan_in_fan_out``) while it is in cache. Otherwise the full fp32
    ``out × in`` product is computed first, as PEFT does (into ``scratch`` when given),
    then scaled and added a row block at a time. The elementwise ops are PEFT's either
    way, element for element.
    """
    import torch

    rows, cols = b.shape[0], a.shape[1]
    scratch = scratch if scratch is not None or blocks is None else Scratch()
    if blocks is not None and blocks.agree(rows, cols, a.shape[0], scratch):
        spans = row_blocks(rows, cols, blocks.block_bytes)
        tall = max(j - i for i, j in spans)
        for i, j in spans:
            block = _rows_product(b[i:j], a, scratch.block(tall, cols)[: j - i])
            _add_scaled(weight, block, slice(i, j), scale, fan)
        blocks.count(blocked=True)
        return weight
    full = torch.matmul(b, a, out=scratch.full(rows, cols)) if scratch is not None else b @ a
    for i, j in row_blocks(rows, cols, BLOCK_ELEMENTS * 4):
        _add_scaled(weight, full[i:j], slice(i, j), scale, fan)
    if blocks is not None:
        blocks.count(blocked=False)
    return weight


def _rows_product(b_rows, a, out):
    """``out = b_rows @ a`` (fp32): rows of ``B @ A`` from a row block of ``B``."""
    import torch

    return torch.matmul(b_rows, a, out=out)


def apply_op(
    weight,
    op: LoraOp,
    tensors: Mapping[str, Any],
    scratch: Scratch | None = None,
    blocks: RowBlocks | None = None,
):
    """Apply one merge operation to ``weight`` (in place where PEFT works in place).

    The formulas, op for op, are PEFT 0.21's (``peft/tuners/lora/layer.py``:
    ``Linear.get_delta_weight`` and ``merge``, ``Embedding.get_delta_weight`` and
    ``merge``; ``peft/tuners/lora/dora.py`` and ``variants.py`` for DoRA), see the module
    docstring. ``weight``: the stored tensor (``out × in``, ``in × out`` for Conv1D, ``vocab
    × dim`` for an embedding, ``out`` for a bias), any float dtype; ``tensors`` holds the
    op's adapter tensors already in fp32 on ``weight``'s device (``lora_A``: ``r × in``,
    ``lora_B``: ``out × r``; the embedding's ``r × vocab`` and ``dim × r``). ``scratch``
    (:class:`Scratch`) lends reused fp32 buffers instead of fresh allocations; ``blocks``
    (:class:`RowBlocks`, CPU only) lets a plain-LoRA linear op compute its ``B @ A`` by
    row blocks that stay in cache, where that is verified bit-identical (see
    :func:`_linear`). DoRA needs each full row's norm of ``W + ΔW`` and the embedding path
    rounds the whole delta to ``W``'s dtype first: both compute the full fp32 product as
    PEFT does. Returns the new weight (a new tensor for DoRA, as PEFT assigns
    ``weight.data``).
    """
    if op.kind == "bias":
        weight += tensors[op.b] * op.scale
        return weight
    a, b = tensors[op.a], tensors[op.b]
    if op.kind == "embedding":
        delta = _t(b @ a, True) * op.scale  # Embedding.get_delta_weight
        if op.magnitude is None:
            weight += delta.to(weight.dtype)  # Embedding.merge: cast, then add
            return weight
        # DoraEmbeddingVariant.merge_unsafe
        base_weight = weight.detach().clone()
        norm_in = _t(base_weight, True)  # DoraEmbeddingLayer(fan_in_fan_out=True)
        norm_in = norm_in + 1 * delta.T
        weight_norm = _linalg_norm(norm_in).to(norm_in.dtype)
        dora_factor = tensors[op.magnitude] / weight_norm
        dora_factor = dora_factor.view(1, -1)
        return (dora_factor * (weight + delta)).to(weight.dtype)
    fan = op.fan_in_fan_out
    if op.magnitude is None:  # Linear.merge, vanilla LoRA: W += delta (fp32, rounded once)
        return _linear(weight, a, b, op.scale, fan, scratch, blocks)
    # DoraLinearVariant.merge_unsafe
    delta = _t(b @ a, fan) * op.scale
    base_weight = weight.detach().clone()
    norm_in = _t(base_weight, fan)  # DoraLinearLayer.get_weight_norm
    norm_in = norm_in + 1 * _t(delta, fan)
    weight_norm = _linalg_norm(norm_in).to(norm_in.dtype)
    dora_factor = tensors[op.magnitude] / weight_norm
    dora_factor = _t(dora_factor.view(-1, 1), fan)
    return (dora_factor * (weight + delta)).to(weight.dtype)


def _linalg_norm(x):
    import torch

    return torch.linalg.norm(x, dim=1)


# ---------------------------------------------------------------------------------------
# execution


@dataclass
class _Job:
    """One output tensor that needs computing: where it goes and how it is made."""

    name: str
    storage: Storage
    fd: int  # output file
    offset: int  # absolute offset in the output file
    nbytes: int


def _shard_layout(
    st: SafetensorsFile, added: Mapping[str, Storage]
) -> tuple[bytes, dict[str, int]]:
    """Header bytes and each tensor's data offset (relative to the data section)."""
    if not added:
        return st.header, {n: e.start for n, e in st.tensors.items()}
    entries = {n: (e.dtype, e.shape, e.start, e.end) for n, e in st.tensors.items()}
    end = max((e.end for e in st.tensors.values()), default=0)
    for name, s in added.items():
        n = DTYPES[s.dtype].nbytes
        for d in s.shape:
            n *= d
        entries[name] = (s.dtype, s.shape, end, end + n)
        end += n
    return header_bytes(entries, st.metadata), {n: v[2] for n, v in entries.items()}


def worker_count(threads: int, jobs: list[_Job]) -> tuple[int, int]:
    """``(workers, torch threads per worker)`` for ``threads`` CPU threads.

    One single-threaded worker per thread, at most :data:`MAX_WORKERS`, and no more than
    fit in :data:`WORKER_MEMORY` (each holds two copies of its largest tensor, one being
    written while the next is computed, and an fp32 product of it); threads left over go
    to torch inside each worker.
    """
    biggest = max(
        (2 * j.nbytes + 4 * (j.nbytes // DTYPES[j.storage.dtype].nbytes) for j in jobs), default=1
    )
    workers = max(1, min(threads, MAX_WORKERS, WORKER_MEMORY // max(1, biggest)))
    return workers, max(1, threads // workers)


@dataclass
class _Slot:
    """One of a worker's two byte buffers, and the write still pending from it."""

    buffer: Any
    data: Any = None  # what the writer is sending from this slot (kept alive until written)
    written: threading.Event | None = None


class _Workers:
    """Bake the jobs on a few threads that read and compute, and one that writes behind them.

    Every worker owns two byte buffers, used in turn: ``pread`` lands in one, the weight is
    changed in place there, and the writer thread writes it (``pwrite``) at its final offset
    while the worker reads and computes the next tensor in the other (it waits only when
    that one's write is still pending). One thread writes because buffered writes to one
    file serialise on its inode lock anyway: measured here, 4.9 GB took 2.5 s from one
    thread and 3.7 s from two, and workers that wrote themselves sat in that lock instead
    of computing. Each worker also owns a :class:`Scratch` (fp32 product buffers), all of
    it reused from tensor to tensor: memory is a few tensors whatever the size of the
    model, and no page is faulted in twice. Before computing, a worker asks the kernel to
    read ahead the tensor that comes ``workers`` jobs later (``POSIX_FADV_WILLNEED``), so a
    checkpoint that is not in the page cache is read from disk while the CPUs compute. On
    the CPU, torch runs single-threaded inside each worker (one worker per torch thread,
    see :func:`worker_count`): independent tensors in parallel need no barriers, which
    keeps the bake fast on a busy machine where OpenMP's would stall. The plain-LoRA
    linear ops compute by row blocks (:class:`RowBlocks`) on the CPU.
    """

    def __init__(
        self,
        splan: StreamPlan,
        device: str,
        on_written: Callable[[int, int, int], None] | None = None,
    ) -> None:
        self.splan = splan
        self.device = device
        self.on_written = on_written  # (fd, offset, nbytes) after each write
        self.blocks = RowBlocks() if device == "cpu" else None
        self._disk = {n: (st, e) for st in splan.shards for n, e in st.tensors.items()}
        self._local = threading.local()
        self._lock = threading.Lock()
        self._readers: list[TensorReader] = []
        self._queue: queue.Queue = queue.Queue()
        self._write_error: BaseException | None = None
        self._jobs: list[_Job] = []
        self._ahead = 1
        self._advise: dict[Path, int] = {}  # shard -> fd for read-ahead advice

    def _state(self):
        import torch

        local = self._local
        if not hasattr(local, "reader"):
            local.reader = TensorReader()
            local.slots = [_Slot(torch.empty(0, dtype=torch.uint8)) for _ in range(2)]
            local.turn = 0
            local.scratch = Scratch()
            with self._lock:
                self._readers.append(local.reader)
        return local

    def _write_loop(self) -> None:
        """The writer thread: ``pwrite`` each queued tensor; ``None`` ends it."""
        while True:
            item = self._queue.get()
            if item is None:
                return
            fd, data, offset, written = item
            try:
                if self._write_error is None:
                    pwrite_all(fd, memoryview(data.numpy()), offset)
                    if self.on_written is not None:
                        self.on_written(fd, offset, data.numel())
            except BaseException as e:  # raised by the workers and by run()
                self._write_error = e
            finally:
                written.set()

    def _read_ahead(self, index: int) -> None:
        """Ask the kernel to start reading job ``index``'s base tensor (no-op when cached)."""
        if index >= len(self._jobs) or not hasattr(os, "posix_fadvise"):
            return
        src, key = self._jobs[index].storage.source
        if src != "base":
            return
        st, e = self._disk[key]
        fd = self._advise.get(st.path)
        if fd is not None and e.nbytes:
            os.posix_fadvise(fd, st.data_start + e.start, e.nbytes, os.POSIX_FADV_WILLNEED)

    def _one(self, index: int) -> None:
        import torch

        job = self._jobs[index]
        local = self._state()
        slot = local.slots[local.turn]
        local.turn = 1 - local.turn
        if slot.written is not None:  # the write from this buffer two jobs ago
            slot.written.wait()
            slot.written = slot.data = None
        if self._write_error is not None:
            raise self._write_error
        if slot.buffer.numel() < job.nbytes:
            slot.buffer = torch.empty(0, dtype=torch.uint8)  # free the old one first
            slot.buffer = torch.empty(job.nbytes, dtype=torch.uint8)
        src, key = job.storage.source
        if src == "base":
            weight = local.reader.read(self._disk[key][0].path, key, slot.buffer)
        else:  # load_state_dict's copy_ into the module's dtype
            weight = local.reader.read(self.splan.adapter_file, key)
            weight = weight.to(torch_dtype(job.storage.dtype))
        tensors = {}
        for op in job.storage.ops:
            for k in (op.a, op.b, op.magnitude):
                if k is not None and k not in tensors:
                    tensors[k] = local.reader.read(self.splan.adapter_file, k).to(torch.float32)
        self._read_ahead(index + self._ahead)
        if job.storage.ops:
            if self.device == "cpu":
                for op in job.storage.ops:
                    weight = apply_op(weight, op, tensors, local.scratch, self.blocks)
            else:
                weight = weight.to(self.device)
                tensors = {k: v.to(self.device) for k, v in tensors.items()}
                for op in job.storage.ops:
                    weight = apply_op(weight, op, tensors)
                weight = weight.cpu()
        if job.storage.ops and count_nonfinite(weight):
            raise MergebakeError(
                f"{job.name}: NaN/Inf after adding the LoRA delta (the base weight or the "
                "adapter overflows in this dtype); nothing was written"
            )
        data = weight.contiguous().reshape(-1).view(torch.uint8)
        if data.numel() != job.nbytes:
            raise MergebakeError(
                f"{job.name}: computed {data.numel()} bytes, expected {job.nbytes}"
            )
        slot.data, slot.written = data, threading.Event()
        self._queue.put((job.fd, data, job.offset, slot.written))

    def run(self, jobs: list[_Job]) -> None:
        """Bake ``jobs``; raise the first error of a worker or of the writer."""
        from concurrent.futures import ThreadPoolExecutor

        import torch

        threads = torch.get_num_threads()
        workers, intra = worker_count(threads, jobs) if self.device == "cpu" else (2, threads)
        torch.set_num_threads(intra)
        self._jobs, self._ahead = jobs, workers
        for st in self.splan.shards:
            self._advise[st.path] = os.open(st.path, os.O_RDONLY)
        writer = threading.Thread(target=self._write_loop, name="bake-write", daemon=True)
        writer.start()
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="bake") as pool:
                # consume in order so that the first error is raised and the rest cancelled
                futures = [pool.submit(self._one, i) for i in range(len(jobs))]
                try:
                    for f in futures:
                        f.result()
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
        finally:
            self._queue.put(None)
            writer.join()
            torch.set_num_threads(threads)
            for reader in self._readers:
                reader.close()
            for fd in self._advise.values():
                os.close(fd)
        if self._write_error is not None:
            raise self._write_error
        if self.blocks is not None:
            log.info(
                "stream bake: %d linear delta(s) by row blocks of %d bytes, %d from the full "
                "product (%d product shape(s) probed, %d not bit-identical by blocks)",
                self.blocks.blocked_ops,
                self.blocks.block_bytes,
                self.blocks.full_ops,
                len(self.blocks.verdicts),
                sum(not v for v in self.blocks.verdicts.values()),
            )


def _data_end(st: SafetensorsFile, added: Mapping[str, Storage]) -> int:
    """Bytes of the output shard's data section: the base's tensors, then the added ones."""
    end = max((e.end for e in st.tensors.values()), default=0)
    return end + sum(DTYPES[s.dtype].nbytes * math.prod(s.shape) for s in added.values())


def run_stream(splan: StreamPlan, out: Path, *, device: str = "cpu") -> dict[str, Any]:
    """Write the baked checkpoint of ``splan`` into the (empty, temporary) folder ``out``.

    Returns ``{"shards_written", "shards_linked", "tensors_changed", "tensors_added",
    "lora_ops", "bytes", "device"}``.
    """
    t0 = time.perf_counter()
    added_by_shard: dict[str, dict[str, Storage]] = {}
    for name, (shard, s) in splan.added.items():
        added_by_shard.setdefault(shard, {})[name] = s
    jobs: list[_Job] = []
    copies: list[tuple[int, int, int, int, int]] = []  # (src fd, dst fd, count, src, dst)
    fds: list[int] = []
    hashes: dict[int, FollowingHash] = {}  # output fd -> the sha256 following its writes
    linked = written = 0
    total = 0
    done = False
    try:
        for st in splan.shards:
            added = added_by_shard.get(st.path.name, {})
            changed = {n for n in st.tensors if splan.outputs[n].changed}
            total += sum(e.nbytes for e in st.tensors.values())
            if not changed and not added:
                link_or_copy(st.path, out / st.path.name)
                linked += 1
                continue
            written += 1
            header, offsets = _shard_layout(st, added)
            src = os.open(st.path, os.O_RDONLY)
            fds.append(src)
            dst = os.open(out / st.path.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            fds.append(dst)
            preallocate(dst, len(header) + _data_end(st, added))
            pwrite_all(dst, memoryview(header), 0)
            hashes[dst] = FollowingHash(out / st.path.name)
            hashes[dst].written(0, len(header))
            base = len(header)
            run: list[int] | None = None  # pending copy [src offset, dst offset, count]
            for name, e in st.tensors.items():
                if name in changed:
                    jobs.append(
                        _Job(name, splan.outputs[name], dst, base + offsets[name], e.nbytes)
                    )
                    if run:
                        copies.append((src, dst, run[2], run[0], run[1]))
                    run = None
                    continue
                s_off, d_off = st.data_start + e.start, base + offsets[name]
                if run and run[0] + run[2] == s_off and run[1] + run[2] == d_off:
                    run[2] += e.nbytes
                else:
                    if run:
                        copies.append((src, dst, run[2], run[0], run[1]))
                    run = [s_off, d_off, e.nbytes]
            if run:
                copies.append((src, dst, run[2], run[0], run[1]))
            for name, s in added.items():
                n = DTYPES[s.dtype].nbytes * math.prod(s.shape)
                jobs.append(_Job(name, s, dst, base + offsets[name], n))
                total += n
        # kernel copies of the untouched ranges run beside the compute
        copier_error: list[BaseException] = []

        def copy_all() -> None:
            try:
                for c in copies:
                    copy_range(*c)
                    hashes[c[1]].written(c[4], c[2])
            except BaseException as e:
                copier_error.append(e)

        copier = threading.Thread(target=copy_all, name="bake-copy", daemon=True)
        copier.start()
        try:
            _Workers(splan, device, lambda fd, off, n: hashes[fd].written(off, n)).run(jobs)
        finally:
            copier.join()
        if copier_error:
            raise copier_error[0]
        done = True
    finally:
        for fd in fds:
            os.close(fd)
        if not done:
            for h in hashes.values():
                h.cancel()
    # the sha256 of each written shard, for the provenance record (no second read)
    for h in hashes.values():
        remember_sha256(h.path, h.finish())
    _write_index(splan, out, total)
    summary = {
        "shards_written": written,
        "shards_linked": linked,
        "tensors_changed": sum(1 for j in jobs if j.name not in splan.added),
        "tensors_added": len(splan.added),
        "lora_ops": splan.lora_ops,
        "bytes": total,
        "device": device,
    }
    log.info("stream bake: %s in %.2fs", summary, time.perf_counter() - t0)
    return summary


def _write_index(splan: StreamPlan, out: Path, total: int) -> None:
    if splan.index is None:
        return
    index = dict(splan.index)
    if splan.added:
        weight_map = dict(index.get("weight_map") or {})
        for name, (shard, _) in splan.added.items():
            weight_map[name] = shard
        metadata = dict(index.get("metadata") or {})
        if "total_size" in metadata:
            metadata["total_size"] = total
        if "total_parameters" in metadata:
            metadata["total_parameters"] = int(metadata["total_parameters"]) + sum(
                math.prod(s.shape) for _, s in splan.added.values()
            )
        index = {**index, "metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
        write_json(out / INDEX_NAME, index)
    else:
        (out / INDEX_NAME).write_bytes((splan.base / INDEX_NAME).read_bytes())


__all__ = [
    "DELTA_BLOCK_BYTES",
    "LoraOp",
    "RowBlocks",
    "Scratch",
    "Storage",
    "StreamPlan",
    "apply_op",
    "plan_stream",
    "row_blocks",
    "run_stream",
    "worker_count",
]
