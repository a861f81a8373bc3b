"""Merge LoRA adapters in adapter space with PEFT's own ``add_weighted_adapter``.

PEFT merges adapters on a loaded model (``LoraModel.add_weighted_adapter``, PEFT 0.21:
``peft/tuners/lora/model.py``; the pruning and sign election in ``peft/utils/merge_utils.py``).
What it computes for a module reads only that module's LoRA tensors, the adapters'
scalings and, for the SVD types, the LoRA layer's ``fan_in_fan_out``: never the base
weight. So mergebake runs PEFT's code unchanged over a **skeleton**: a ``torch.nn`` tree
that holds only the targeted modules, each an ``nn.Linear`` / ``Conv1D`` / ``nn.Embedding``
with the in/out features the adapter's A/B shapes imply and a weight of one element
expanded to the full shape (stride 0: four bytes, whatever the module's size). Peak
memory is that of the adapter tensors, never the base's weights.

Deterministic combination types are run **module group by module group** (a skeleton per
group of about ``chunk_bytes`` of adapter tensors; PEFT's per-module result does not
depend on other modules) and the merged tensors are streamed to disk, so memory stays
flat as the base grows. The random DARE types run once over the whole skeleton, so that
PEFT draws its random numbers in the same sequence as on the full model.

Seeding (DARE types: ``dare_linear``, ``dare_ties``, ``dare_linear_svd``,
``dare_ties_svd``): :func:`merge_adapters` calls ``torch.manual_seed(seed)`` immediately
before ``add_weighted_adapter``; nothing else draws from torch's global CPU generator in
between. Inside the call PEFT first initialises the merged adapter's LoRA layers (which
draws numbers, module by module in ``named_modules`` order, by each layer's shape), then
draws DARE's Bernoulli masks, module by module in the same order (A before B, or once per
ΔW for the SVD types). The result therefore equals PEFT's run on the full model when that
run is seeded the same way immediately before its call, on the CPU, with the same modules
targeted in the same order: pass ``base`` so the order is the model's own
(:func:`module_order`: the architecture is built on the meta device from the base's
``config.json``; no weight is read); without it modules are in natural order of their
names (``layers.2`` before ``layers.10``), which matches PEFT's sequence only where the
model declares its modules in that order.

:func:`check_adapters` refuses, from ``adapter_config.json`` files and safetensors headers
only, what PEFT refuses (unequal ranks for ``linear``/``ties``/``dare_*``/``magnitude_prune``,
a regex ``target_modules`` mixed with a list, ``target_parameters``, ``modules_to_save``
shared by two adapters) and what it needs base weights for (DoRA, ``modules_to_save``,
trainable tokens, saved embedding copies, PiSSA-style initialisations), so the workflow
can call it at configuration time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import MergebakeError
from .lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    PLAIN_INITS,
    UNSUPPORTED,
    read_adapter_config,
)
from .methods import ADAPTER_METHODS, adapter_method
from .outputs import atomic_dir, write_provenance

log = logging.getLogger(__name__)

#: PEFT combination types, in the order of ``add_weighted_adapter``'s ``Literal``.
COMBINATION_TYPES: tuple[str, ...] = tuple(ADAPTER_METHODS)
#: Adapter tensors of deterministic types merged per skeleton (bytes, as stored).
CHUNK_BYTES = 32 * 1024**2
#: LoraConfig options whose merge needs the base's weights (or is not LoRA arithmetic):
#: (field, the value that is fine). Those the stream bake refuses (:data:`lora.UNSUPPORTED`)
#: plus what only a loaded base can merge (DoRA's norms, LoRA bias, whole saved modules).
NEEDS_BASE = (
    ("use_dora", False),
    ("lora_bias", False),
    ("modules_to_save", None),
    *(opt for opt in UNSUPPORTED if opt[0] != "target_parameters"),
)
_MERGED = "merged"  # PEFT adapter name of the result inside the skeleton


@dataclass(frozen=True)
class Leaf:
    """A targeted module as the adapter's shapes imply it: ``kind`` is ``linear``,
    ``conv1d`` (GPT-2's ``Conv1D``, LoRA ``fan_in_fan_out``) or ``embedding``."""

    kind: str
    in_features: int
    out_features: int


@dataclass
class AdapterInfo:
    """What :func:`check_adapters` read of one adapter (config and safetensors header)."""

    name: str
    path: Path
    config: dict[str, Any]
    weights: Path
    rank: int  # PEFT's: max(r, *rank_pattern.values())
    modules: dict[str, Leaf] = field(default_factory=dict)  # runtime module path -> leaf
    keys: dict[str, list[str]] = field(default_factory=dict)  # module -> saved keys
    nbytes: dict[str, int] = field(default_factory=dict)  # module -> bytes of its tensors


@dataclass
class MergePlan:
    """The checked inputs of :func:`merge_adapters`."""

    adapters: list[AdapterInfo]
    combination_type: str  # as asked
    effective_type: str  # PEFT merges a single adapter with "linear"
    weights: list[float]
    options: dict[str, Any]  # add_weighted_adapter keyword options
    modules: dict[str, Leaf]  # union of the adapters' modules, natural order

    @property
    def randomised(self) -> bool:
        return ADAPTER_METHODS[self.effective_type].randomised


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _header(path: Path) -> dict[str, tuple[str, tuple[int, ...], int]]:
    from .safetensors_io import SafetensorsFile

    st = SafetensorsFile.open(path)
    return {k: (e.dtype, e.shape, e.nbytes) for k, e in st.tensors.items()}


def _split(key: str) -> tuple[str, str | None, str]:
    from .lora import split_key

    return split_key(key)


def _read_adapter(name: str, path: Path) -> AdapterInfo:
    """Config and header of one adapter; refuses what the skeleton cannot reproduce."""
    if not path.is_dir():
        raise MergebakeError(f"adapter {name!r}: {path} does not exist; fetch it first")
    config = read_adapter_config(path)
    cfg_path = path / ADAPTER_CONFIG
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise MergebakeError(
            f"adapter {name!r}: {weights} missing; adapter-space merges read safetensors "
            "adapters only (re-save it with safe_serialization=True)"
        )
    if config.get("target_parameters"):
        raise MergebakeError(
            f"adapter {name!r} ({cfg_path}): target_parameters is set; PEFT's "
            "add_weighted_adapter does not support adapters on nn.Parameter. Merge it in "
            "weight space"
        )
    bad = [f"{k}={config[k]!r}" for k, ok in NEEDS_BASE if config.get(k) not in (ok, None, {}, [])]
    if config.get("init_lora_weights", True) not in PLAIN_INITS:
        bad.append(f"init_lora_weights={config['init_lora_weights']!r}")
    if bad:
        raise MergebakeError(
            f"adapter {name!r} ({cfg_path}): {', '.join(bad)}; merging it in adapter space "
            "needs the base's weights or is not plain LoRA arithmetic. Merge it in weight "
            "space (bake, then mergekit) instead"
        )
    pattern = config.get("rank_pattern") or {}
    rank = max([int(config.get("r", 8)), *(int(v) for v in pattern.values())])
    info = AdapterInfo(name, path, config, weights, rank)
    tensors: dict[str, dict[str, tuple[int, ...]]] = {}
    whole: list[str] = []
    for key, (_dtype, shape, nbytes) in _header(weights).items():
        module, marker, param = _split(key)
        if marker is None or param not in ("weight", ""):
            whole.append(key)
            continue
        tensors.setdefault(module, {})[marker] = shape
        info.keys.setdefault(module, []).append(key)
        info.nbytes[module] = info.nbytes.get(module, 0) + nbytes
    if whole:
        raise MergebakeError(
            f"adapter {name!r} ({weights}): holds whole tensors {sorted(whole)[:3]} "
            f"({len(whole)} in all: modules_to_save or embedding copies PEFT saves with "
            "save_embedding_layers); an adapter-space merge needs LoRA-only adapters. Re-save "
            "it with save_embedding_layers=False, or merge in weight space"
        )
    if not tensors:
        raise MergebakeError(f"adapter {name!r} ({weights}): holds no LoRA tensors")
    fan = bool(config.get("fan_in_fan_out"))
    for module, t in tensors.items():
        a = t.get("lora_A", t.get("lora_embedding_A"))
        b = t.get("lora_B", t.get("lora_embedding_B"))
        if (
            a is None
            or b is None
            or set(t)
            - {"lora_A", "lora_B"}
            - {
                "lora_embedding_A",
                "lora_embedding_B",
            }
        ):
            raise MergebakeError(
                f"adapter {name!r} ({weights}): module {module} has {sorted(t)}; expected "
                "lora_A and lora_B (or lora_embedding_A and lora_embedding_B)"
            )
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise MergebakeError(
                f"adapter {name!r} ({weights}): module {module} has lora A {list(a)} and B "
                f"{list(b)}; adapter-space merges support Linear, Conv1D and Embedding LoRA "
                "layers (2-d A [r, in] and B [out, r])"
            )
        kind = "embedding" if "lora_embedding_A" in t else "conv1d" if fan else "linear"
        info.modules[module] = Leaf(kind, a[1], b[0])
    return info


def check_adapters(
    adapters: Mapping[str, str | os.PathLike],
    *,
    combination_type: str,
    weights: Sequence[float] | Mapping[str, float] | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    device: str = "cpu",
) -> MergePlan:
    """Check that PEFT can merge ``adapters`` with these options, reading only each
    adapter's ``adapter_config.json`` and safetensors header (no tensor data).

    ``adapters`` maps a name (used in messages) to an adapter folder, in merge order.
    ``weights`` is one float per adapter (a sequence in that order, or ``{name: w}``;
    ``None``: 1.0 each). The options are ``add_weighted_adapter``'s (PEFT 0.21), checked
    against :data:`mergebake.methods.ADAPTER_METHODS`. Raises :class:`MergebakeError`
    naming the adapter(s) and option when: ``combination_type`` is not PEFT's; a weight is
    missing or not finite; ``density`` is missing for a type that prunes (``ties``,
    ``ties_svd``, ``dare_*``, ``magnitude_prune*``) or outside (0, 1]; an option is out of
    range or set for a type that does not use it; ``svd_driver`` is set on the CPU (torch
    supports it on CUDA only); ranks differ for ``linear``, ``ties``, ``dare_linear``,
    ``dare_ties`` or ``magnitude_prune`` (PEFT: "All adapters must have the same r value");
    a regex ``target_modules`` is mixed with a list (PEFT refuses; ``all-linear`` counts as
    a list, as PEFT expands it on loading); the adapters disagree on ``fan_in_fan_out``
    or on a module's in/out features (adapters of different bases); and for every refusal
    of :func:`_read_adapter` (missing folder or safetensors, DoRA, ``modules_to_save``,
    trainable tokens, ``target_parameters``, LoRA bias, non-plain initialisations, whole
    tensors saved beside the LoRA ones, conv LoRA layers).
    """
    method = adapter_method(combination_type)
    if not adapters:
        raise MergebakeError("adapter merge: no adapters given")
    names = list(adapters)
    if weights is None:
        ws: list[Any] = [1.0] * len(names)
    elif isinstance(weights, Mapping):
        missing = [n for n in names if n not in weights]
        extra = [n for n in weights if n not in adapters]
        if missing or extra:
            raise MergebakeError(
                f"adapter merge: weights name {sorted(weights)} but the adapters are {names}"
            )
        ws = [weights[n] for n in names]
    else:
        ws = list(weights)
        if len(ws) != len(names):
            raise MergebakeError(
                f"adapter merge: {len(ws)} weight(s) {ws} for {len(names)} adapters {names}; "
                "give one weight per adapter"
            )
    for n, w in zip(names, ws, strict=True):
        method.param("weight").check(w, f"weights.{n}")
    options = {
        "density": density,
        "majority_sign_method": majority_sign_method,
        "svd_rank": svd_rank,
        "svd_clamp": svd_clamp,
        "svd_full_matrices": svd_full_matrices,
        "svd_driver": svd_driver,
    }
    defaults = {"majority_sign_method": "total", "svd_full_matrices": True}
    for key, value in options.items():
        p = method.param(key)
        if p is None:
            if value != defaults.get(key):
                raise MergebakeError(
                    f"adapter merge: option {key}={value!r} is not used by combination_type "
                    f"{combination_type!r} (its options: "
                    f"{', '.join(q.name for q in method.params)})"
                )
            continue
        if value is None and p.required:
            raise MergebakeError(
                f"adapter merge: combination_type {combination_type!r} needs option "
                f"{key} ({p.doc}); set it, e.g. {key}: 0.2"
            )
        p.check(value, key)
    if svd_driver is not None and not str(device).startswith("cuda"):
        raise MergebakeError(
            f"adapter merge: option svd_driver={svd_driver!r} works only on CUDA "
            "(torch.linalg.svd); this merge runs on the CPU: leave it unset"
        )
    infos = [_read_adapter(n, Path(p)) for n, p in adapters.items()]
    effective = "linear" if len(infos) == 1 else combination_type
    if ADAPTER_METHODS[effective].equal_ranks and len({i.rank for i in infos}) > 1:
        ranks = ", ".join(f"{i.name} (r={i.rank})" for i in infos)
        raise MergebakeError(
            f"adapter merge: combination_type {combination_type!r} needs adapters of equal "
            f"rank (PEFT refuses others); got {ranks}. Use 'cat' or an SVD type "
            "(svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd)"
        )
    kinds = {i.name: _target_kind(i.config.get("target_modules")) for i in infos}
    if len(set(kinds.values())) > 1:
        raise MergebakeError(
            "adapter merge: the adapters' target_modules mix a regex string with a list "
            f"({', '.join(f'{n}: {k}' for n, k in kinds.items())}); PEFT's "
            "add_weighted_adapter refuses that. Re-save them with the same kind"
        )
    fans = {i.name: bool(i.config.get("fan_in_fan_out")) for i in infos}
    if len(set(fans.values())) > 1:
        raise MergebakeError(
            f"adapter merge: the adapters disagree on fan_in_fan_out ({fans}); they were made "
            "for different architectures"
        )
    modules: dict[str, Leaf] = {}
    owner: dict[str, str] = {}
    for info in infos:
        for module, leaf in info.modules.items():
            if module in modules and modules[module] != leaf:
                raise MergebakeError(
                    f"adapter merge: module {module} is {modules[module]} in adapter "
                    f"{owner[module]!r} but {leaf} in {info.name!r}; the adapters were made "
                    "for different bases"
                )
            modules.setdefault(module, leaf)
            owner.setdefault(module, info.name)
    modules = dict(sorted(modules.items(), key=lambda kv: _natural_key(kv[0])))
    return MergePlan(infos, combination_type, effective, [float(w) for w in ws], options, modules)


def _target_kind(targets: Any) -> str:
    if isinstance(targets, str) and targets.lower() != "all-linear":
        return "regex string"
    return "list"


def module_order(base: str | os.PathLike, *, trust_remote_code: bool = False) -> list[str]:
    """Module names of ``base``'s model in ``named_modules`` order, without its weights.

    Reads ``config.json`` and builds the class it names on the meta device (no memory,
    no weights read). Raises :class:`MergebakeError` naming the file when the config is
    missing or names an unknown architecture.
    """
    import torch

    from .bake import _model_class
    from .checkpoint import read_config

    base = Path(base)
    config = read_config(base)
    cls = _model_class(config, base, trust_remote_code)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = cls.from_config(cfg, trust_remote_code=True) if trust_remote_code else cls(cfg)
    return [n for n, _ in model.named_modules() if n]


def _skeleton(modules: Mapping[str, Leaf], dtype):
    """A ``torch.nn`` tree holding ``modules`` (in order), each leaf with a stride-0 weight."""
    import torch
    from torch import nn

    root = nn.Module()
    for path, leaf in modules.items():
        parent = root
        *parents, last = path.split(".")
        for part in parents:
            child = parent._modules.get(part)
            if child is None:
                child = nn.Module()
                parent.add_module(part, child)
            parent = child
        with torch.device("meta"):
            if leaf.kind == "embedding":
                m = nn.Embedding(leaf.in_features, leaf.out_features)
                shape = (leaf.in_features, leaf.out_features)
            elif leaf.kind == "conv1d":
                from transformers.pytorch_utils import Conv1D

                m = Conv1D(leaf.out_features, leaf.in_features)
                shape = (leaf.in_features, leaf.out_features)
            else:
                m = nn.Linear(leaf.in_features, leaf.out_features, bias=False)
                shape = (leaf.out_features, leaf.in_features)
        m.weight = nn.Parameter(torch.zeros(1, 1, dtype=dtype).expand(*shape), requires_grad=False)
        if getattr(m, "bias", None) is not None:
            m.bias = nn.Parameter(
                torch.zeros(1, dtype=dtype).expand(leaf.out_features), requires_grad=False
            )
        parent.add_module(last, m)
    return root


def _lora_config(info: AdapterInfo):
    """The adapter's LoraConfig as PEFT loads it; ``all-linear`` becomes the module names
    it covers (what PEFT expands it to on the full model, minus the output head)."""
    from peft import LoraConfig

    config = LoraConfig.from_pretrained(str(info.path))
    config.inference_mode = True
    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == "all-linear":
        config.target_modules = set(info.modules)
    return config


def _chunks(plan: MergePlan, order: list[str], chunk_bytes: int) -> list[list[str]]:
    """Module groups, each run on its own skeleton: one group for random types or where
    an adapter does not cover every module (PEFT needs every adapter in each skeleton)."""
    covered_by_all = all(set(i.modules) == set(plan.modules) for i in plan.adapters)
    if plan.randomised or not covered_by_all or chunk_bytes <= 0:
        return [order]
    chunks: list[list[str]] = [[]]
    size = 0
    for module in order:
        nbytes = sum(i.nbytes[module] for i in plan.adapters)
        if chunks[-1] and size + nbytes > chunk_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(module)
        size += nbytes
    return chunks


def _run_chunk(plan: MergePlan, modules: list[str], seed: int, dtype):
    """Run PEFT's add_weighted_adapter over a skeleton of ``modules``.

    Returns ``(state dict of the merged adapter, its LoraConfig)``."""
    import torch
    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors import safe_open

    skeleton = _skeleton({m: plan.modules[m] for m in modules}, dtype)
    wanted = set(modules)
    internal = [f"a{i}" for i in range(len(plan.adapters))]
    model = None
    for name, info in zip(internal, plan.adapters, strict=True):
        config = _lora_config(info)
        if model is None:
            model = PeftModel(skeleton, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        with safe_open(info.weights, framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for m in modules if m in info.keys for k in info.keys[m]}
        result = set_peft_model_state_dict(model, tensors, adapter_name=name)
        del tensors
        missing = [
            k
            for k in result.missing_keys
            if f".{name}." in k and any(f".lora_{x}" in k for x in ("A", "B", "embedding"))
        ]
        if result.unexpected_keys or missing:
            raise MergebakeError(
                f"adapter {info.name!r} ({info.weights}): its tensors do not match the modules "
                f"its own adapter_config.json targets (unexpected "
                f"{sorted(result.unexpected_keys)[:3]}, missing {sorted(missing)[:3]}); "
                "re-save the adapter with PEFT"
            )
        model.base_model._cast_adapter_dtype(adapter_name=name, autocast_adapter_dtype=True)
    assert model is not None
    model.eval()
    o = plan.options
    torch.manual_seed(seed)
    try:
        model.add_weighted_adapter(
            internal,
            plan.weights,
            _MERGED,
            combination_type=plan.combination_type,
            svd_rank=o["svd_rank"],
            svd_clamp=o["svd_clamp"],
            svd_full_matrices=o["svd_full_matrices"],
            svd_driver=o["svd_driver"],
            density=o["density"],
            majority_sign_method=o["majority_sign_method"],
        )
    except (ValueError, TypeError, RuntimeError) as e:
        names = ", ".join(i.name for i in plan.adapters)
        raise MergebakeError(
            f"adapter merge of {names} ({plan.combination_type}): PEFT's add_weighted_adapter "
            f"refused: {e}"
        ) from e
    state = get_peft_model_state_dict(model, adapter_name=_MERGED, save_embedding_layers=False)
    state = {k: v.detach().contiguous() for k, v in state.items()}
    unknown = [k for k in state if k.removeprefix(PEFT_PREFIX).split(".lora_")[0] not in wanted]
    if unknown:  # cannot happen: the skeleton holds only these modules
        raise MergebakeError(f"adapter merge: PEFT produced tensors for {unknown[:3]}")
    return state, model.peft_config[_MERGED]


class _StreamWriter:
    """Write a safetensors file tensor by tensor: data to a side file, header at the end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data_path = path.with_name(path.name + ".data")
        self.fh = open(self.data_path, "wb")
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        self.offset = 0

    def add(self, name: str, tensor) -> None:
        import torch

        from .safetensors_io import DTYPES

        data = tensor.contiguous().view(-1).view(dtype=torch.uint8).numpy()
        codes = {v.torch: k for k, v in DTYPES.items()}
        code = codes[str(tensor.dtype).removeprefix("torch.")]
        self.fh.write(data.tobytes())
        self.entries[name] = (code, tuple(tensor.shape), self.offset, self.offset + data.size)
        self.offset += data.size

    def close(self, metadata: Mapping[str, str]) -> None:
        from .safetensors_io import header_bytes

        self.fh.close()
        entries = dict(sorted(self.entries.items(), key=lambda kv: kv[1][2]))
        with open(self.path, "wb") as out, open(self.data_path, "rb") as data:
            out.write(header_bytes(entries, metadata))
            shutil.copyfileobj(data, out, 16 * 1024**2)
        self.data_path.unlink()


def _config_json(config) -> str:
    """The merged LoraConfig as PEFT's ``save_pretrained`` writes it (target list sorted)."""
    d = config.to_dict()
    if isinstance(d.get("target_modules"), (set, list, tuple)):
        d["target_modules"] = sorted(d["target_modules"])
    d["inference_mode"] = True
    return json.dumps(d, indent=2, sort_keys=True)


def merge_adapters(
    adapters: Mapping[str, str | os.PathLike],
    out: str | os.PathLike,
    *,
    combination_type: str,
    weights: Sequence[float] | Mapping[str, float] | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    seed: int = 0,
    base: str | os.PathLike | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    threads: int | None = None,
) -> dict[str, Any]:
    """Merge LoRA ``adapters`` into one adapter folder ``out`` with PEFT's arithmetic.

    ``out`` becomes a standard PEFT adapter folder (``adapter_config.json``,
    ``adapter_model.safetensors`` with F32 tensors as PEFT keeps them, ``provenance.json``),
    loadable with ``PeftModel.from_pretrained``; its tensors equal (``torch.equal``) what
    PEFT 0.21's ``LoraModel.add_weighted_adapter(list(adapters), weights, name,
    combination_type=..., ...)`` followed by ``get_peft_model_state_dict`` gives on the full
    model loaded with these adapters, and its config is PEFT's merged config (``r`` and
    ``lora_alpha`` the merged rank, ``target_modules`` the union, sorted). The options are
    PEFT's (see :func:`check_adapters`, which runs first: every refusal happens before
    any tensor is read, and leaves ``out`` untouched). ``seed`` seeds torch's global CPU
    generator immediately before the call (DARE types; see the module docstring for what
    equality holds under); ``base`` (optional; only its ``config.json`` is read) puts the
    modules in the model's order. ``chunk_bytes`` bounds the adapter bytes one skeleton
    holds for deterministic types (``0``: one skeleton). ``threads`` sets torch's CPU
    threads for the merge.

    Peak memory: torch and PEFT (about 400 MB) plus about twice the adapter tensors of one
    chunk (every adapter's tensors for DARE types and where an adapter does not cover
    every module); never the base's weights.

    Returns ``{"combination_type", "effective_type", "rank", "modules", "tensors",
    "chunks", "seed", "seconds"}``.
    """
    import torch

    t0 = time.perf_counter()
    plan = check_adapters(
        adapters,
        combination_type=combination_type,
        weights=weights,
        density=density,
        majority_sign_method=majority_sign_method,
        svd_rank=svd_rank,
        svd_clamp=svd_clamp,
        svd_full_matrices=svd_full_matrices,
        svd_driver=svd_driver,
    )
    names = [i.name for i in plan.adapters]
    order = list(plan.modules)
    if base is not None:
        position = {m: i for i, m in enumerate(module_order(base))}
        unknown = [m for m in order if m not in position]
        if unknown:
            raise MergebakeError(
                f"adapter merge: module(s) {unknown[:3]} of the adapters are not in the model "
                f"of {base}; the adapters were made for another base"
            )
        order.sort(key=position.__getitem__)
    chunks = _chunks(plan, order, chunk_bytes)
    out = Path(out)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    merged_config = None
    n_tensors = 0
    try:
        with atomic_dir(out) as tmp:
            writer = _StreamWriter(tmp / ADAPTER_WEIGHTS)
            for chunk in chunks:
                state, config = _run_chunk(plan, chunk, seed, torch.float32)
                merged_config = merged_config or config
                for name in sorted(state, key=_natural_key):
                    writer.add(name, state[name])
                n_tensors += len(state)
                del state
            writer.close({"format": "pt"})
            (tmp / ADAPTER_CONFIG).write_text(_config_json(merged_config))
            summary = {
                "combination_type": plan.combination_type,
                "effective_type": plan.effective_type,
                "rank": merged_config.r,
                "modules": len(order),
                "tensors": n_tensors,
                "chunks": len(chunks),
                "seed": seed,
            }
            write_provenance(
                tmp,
                step="adapter-merge",
                inputs={i.name: i.path for i in plan.adapters},
                params={
                    "engine": "peft-skeleton",
                    "adapters": names,
                    "weights": dict(zip(names, plan.weights, strict=True)),
                    **plan.options,
                    **summary,
                    "module_order": "model" if base is not None else "natural",
                },
                seed=seed,
            )
    finally:
        torch.set_num_threads(old_threads)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    log.info("adapter merge %s -> %s: %s", list(adapters), out, summary)
    return summary


# ---------------------------------------------------------------------------------------
# CLI: `mergebake adapter-merge` (registered by mergebake.cli)


def _parse_adapters(items: Iterable[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise MergebakeError(f"--adapter {item!r}: expected NAME=PATH")
        if name in out:
            raise MergebakeError(f"--adapter {name!r} given twice")
        out[name] = Path(path)
    return out


def add_adapter_merge_arguments(sp) -> None:
    """Options of ``mergebake adapter-merge`` on the argparse subparser ``sp``."""
    sp.add_argument(
        "--adapter",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="an adapter folder; repeat, in merge order",
    )
    sp.add_argument("--out", type=Path, required=True, help="merged adapter folder to write")
    sp.add_argument("--combination-type", required=True, choices=COMBINATION_TYPES)
    sp.add_argument(
        "--weight",
        action="append",
        default=[],
        metavar="NAME=W",
        help="weight of an adapter (default 1.0)",
    )
    sp.add_argument("--density", type=float)
    sp.add_argument("--majority-sign-method", default="total", choices=("total", "frequency"))
    sp.add_argument("--svd-rank", type=int)
    sp.add_argument("--svd-clamp", type=float)
    sp.add_argument("--svd-full-matrices", default=True, action=argparse.BooleanOptionalAction)
    sp.add_argument("--svd-driver")
    sp.add_argument("--seed", type=int, default=0, help="torch seed of the DARE types")
    sp.add_argument("--base", type=Path, help="base folder: module order (config.json only)")
    sp.add_argument("--threads", type=int)


def cli_adapter_merge(a) -> None:
    """``mergebake adapter-merge``: merge adapters with PEFT's add_weighted_adapter."""
    adapters = _parse_adapters(a.adapter)
    weights: dict[str, float] = {n: 1.0 for n in adapters}
    for item in a.weight:
        name, sep, value = item.partition("=")
        if not sep or name not in adapters:
            raise MergebakeError(f"--weight {item!r}: expected NAME=W with NAME one of {adapters}")
        try:
            weights[name] = float(value)
        except ValueError as e:
            raise MergebakeError(f"--weight {item!r}: {value!r} is not a number") from e
    summary = merge_adapters(
        adapters,
        a.out,
        combination_type=a.combination_type,
        weights=weights,
        density=a.density,
        majority_sign_method=a.majority_sign_method,
        svd_rank=a.svd_rank,
        svd_clamp=a.svd_clamp,
        svd_full_matrices=a.svd_full_matrices,
        svd_driver=a.svd_driver,
        seed=a.seed,
        base=a.base,
        threads=a.threads,
    )
    print(json.dumps(summary))


__all__ = [
    "CHUNK_BYTES",
    "COMBINATION_TYPES",
    "MergePlan",
    "add_adapter_merge_arguments",
    "check_adapters",
    "cli_adapter_merge",
    "merge_adapters",
    "module_order",
]
