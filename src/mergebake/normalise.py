"""Normalise a checkpoint to the text-only causal-LM key layout that mergekit merges.

mergekit 0.1.5 merges Gemma-3 reliably only as ``Gemma3ForCausalLM`` with tensors named
``model.*`` (and ``lm_head.*`` when the head is untied); it fails, or silently drops the
text weights, on vision-language wrappers. Those wrap a text causal LM under names that
differ by family and transformers version (Gemma-3 in transformers 5.x:
``language_model.model.*``; 4.52-4.57: ``model.language_model.*``; Gemma-4:
``model.language_model.*``; Qwen2.5-VL: ``model.*`` beside ``visual.*``).

:func:`normalise` renames the text tensors, drops the towers and projectors and writes the
text sub-config as a top-level config, streaming one shard at a time with safetensors (the
model is never instantiated). Which tensor goes where is :mod:`mergebake.layouts`, derived
from transformers' own classes and conversion mappings. A checkpoint that is already
text-only is hard-linked, not copied.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from . import MergebakeError
from .checkpoint import INDEX_NAME, copy_assets, read_config, weight_files
from .layouts import build_layout
from .outputs import atomic_dir, link_or_copy, write_json, write_provenance
from .safetensors_io import read_header, rename_tensors
from .verify import VerificationError, load_problems, tokenizer_problems

log = logging.getLogger(__name__)


def tie_word_embeddings(config: Mapping[str, Any]) -> bool:
    """Whether ``config`` asks for a tied head (top-level key, else the text sub-config's;
    default true). The layout itself (:class:`mergebake.layouts.Layout`) reads the tying
    from the model transformers builds; this is for configs alone."""
    value = config.get("tie_word_embeddings")
    if value is None:
        value = (config.get("text_config") or {}).get("tie_word_embeddings", True)
    return bool(value)


def runtime_names(folder: str | os.PathLike, names: Iterable[str]) -> dict[str, str]:
    """Map the parameter names of the loaded model to the checkpoint's tensor names
    (tensors the class ignores on load are left out); see :mod:`mergebake.layouts`."""
    layout = build_layout(folder, list(names))
    return {r: d for d, r in layout.runtime.items()}


def _bake_adapted(src: Path) -> set[str]:
    """Tensor names a bake changed, from ``src``'s provenance (empty for anything else)."""
    try:
        prov = json.loads((src / "provenance.json").read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(prov, dict) or prov.get("step") != "bake":
        return set()
    return set((prov.get("params") or {}).get("adapted_tensors") or ())


def normalise(src: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Write ``src`` (a base or baked checkpoint) to ``out`` in the text-only layout.

    Which tensors are text, what they are called in the text causal LM and which ones the
    class ignores on load is :func:`mergebake.layouts.build_layout` (derived from
    transformers). Tensors keep their dtype, shape and values (bit for bit); only names
    change. Dropped: vision/audio towers and projectors, a tied head's stored copy, and
    tensors the class ignores on load (Gemma-4's redundant k/v of kv-shared layers), so
    that every normalised checkpoint of a base has the same tensors whichever engine baked
    it. The output keeps the source's shard files (a shard left empty is omitted) and gets
    a ``model.safetensors.index.json`` when the source is sharded. ``config.json`` becomes
    the text config with ``architectures: [<text arch>]``; tokenizer, chat template and
    generation files come along. A text-only source with nothing to drop is hard-linked
    file by file (a copy where the file system cannot link).

    Returns ``{"renamed", "dropped", "kept", "ignored", "adapted_dropped": int, "linked":
    bool, "architecture": str}``: ``ignored`` counts the dropped tensors the class ignores
    on load, ``adapted_dropped`` the dropped tensors a bake had changed (an adapter that
    also targeted a vision or audio tower; read from the source's provenance, and logged
    as a warning). Raises :class:`MergebakeError` (naming the file) for a missing or
    pickle-only source, an unsupported architecture, or tensors that fit no layout rule,
    and :class:`mergebake.verify.VerificationError` when the result does not load as a
    causal LM with every key matched or its tokenizer does not load; ``out`` is then left
    untouched.
    """
    src, out = Path(src), Path(out)
    config = read_config(src)
    files = weight_files(src)
    headers = {f: read_header(f) for f in files}
    tensors = {name: info for tensors, _ in headers.values() for name, info in tensors.items()}
    layout = build_layout(src, list(tensors), config)
    plan = dict(layout.text)
    targets = [n for n in plan.values() if n is not None]
    if len(targets) != len(set(targets)):
        dup = sorted({n for n in targets if targets.count(n) > 1})
        raise MergebakeError(f"{src}: several tensors would be renamed to {dup[:5]}")
    renamed = sum(1 for k, v in plan.items() if v is not None and v != k)
    dropped_names = {k for k, v in plan.items() if v is None}
    dropped = len(dropped_names)
    linked = not layout.wrapped and renamed == 0 and dropped == 0
    adapted_dropped = sorted(_bake_adapted(src) & dropped_names)
    if adapted_dropped:
        log.warning(
            "normalise %s: %d adapted tensor(s) dropped with the non-text parts (the adapter "
            "also targeted them), e.g. %s",
            src,
            len(adapted_dropped),
            adapted_dropped[:3],
        )

    with atomic_dir(out) as tmp:
        weight_map: dict[str, str] = {}
        total = 0
        for f, (shard_tensors, meta) in headers.items():
            kept = {k: plan[k] for k in shard_tensors if plan[k] is not None}
            if not kept:
                continue
            if len(kept) == len(shard_tensors) and all(k == v for k, v in kept.items()):
                link_or_copy(f, tmp / f.name)
                total += sum(shard_tensors[k].nbytes for k in kept)
            else:
                total += rename_tensors(f, tmp / f.name, plan, meta)
            weight_map.update({new: f.name for new in kept.values()})

        if (src / INDEX_NAME).is_file():
            if linked:
                link_or_copy(src / INDEX_NAME, tmp / INDEX_NAME)
            else:
                index = json.loads((src / INDEX_NAME).read_text())
                metadata = dict(index.get("metadata") or {})
                metadata["total_size"] = total
                if "total_parameters" in metadata:
                    metadata["total_parameters"] = sum(
                        tensors[k].numel for k, v in plan.items() if v is not None
                    )
                write_json(
                    tmp / INDEX_NAME,
                    {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))},
                )

        if layout.wrapped:
            write_json(tmp / "config.json", dict(layout.text_config or {}))
        else:
            link_or_copy(src / "config.json", tmp / "config.json")
        assets = copy_assets(src, tmp, processor=not layout.wrapped, link=True)
        # Verified before it counts as built: the text model loads from it with every key
        # matched, and the tokenizer loads. Values are copied bit for bit from the source
        # (checked when it was built), so no second NaN/Inf scan here.
        problems = load_problems(tmp) + tokenizer_problems(tmp, src)
        if problems:
            raise VerificationError(out, src, problems)
        summary = {
            "renamed": renamed,
            "dropped": dropped,
            "kept": len(plan) - dropped,
            "ignored": len(layout.ignored),
            "adapted_dropped": len(adapted_dropped),
            "linked": linked,
            "architecture": layout.text_architecture,
        }
        write_provenance(
            tmp,
            step="normalise",
            inputs={"src": src},
            params={"source_architecture": layout.architecture, **summary, "assets": assets},
        )
    log.info("normalise %s -> %s: %s", src, out, summary)
    return summary
