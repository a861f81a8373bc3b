"""Normalise a checkpoint to the text-only causal-LM key layout that mergekit merges.

mergekit 0.1.5 merges Gemma-3 reliably only as ``Gemma3ForCausalLM`` with tensors named
``model.*`` (and ``lm_head.*`` when the head is untied). The multimodal
``Gemma3ForConditionalGeneration`` checkpoints wrap that text model:

- transformers 5.x writes ``language_model.model.*``, ``language_model.lm_head.*`` (only
  when untied), ``vision_tower.*`` and ``multi_modal_projector.*``;
- transformers 4.52-4.57 wrote ``model.language_model.*``, ``lm_head.*``,
  ``model.vision_tower.*`` and ``model.multi_modal_projector.*``.

:func:`normalise` renames the text tensors, drops the vision tower and projector and
writes the text sub-config as a top-level config, streaming one shard at a time with
safetensors (the model is never instantiated). A checkpoint that is already text-only is
hard-linked, not copied. Which wrapped layouts are understood is the table
:data:`WRAPPED_LAYOUTS`; adding a llava-style architecture is one entry there.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import MergebakeError
from .checkpoint import INDEX_NAME, copy_assets, read_config, weight_files
from .outputs import atomic_dir, link_or_copy, write_json, write_provenance
from .safetensors_io import TensorInfo, read_header, rename_tensors
from .verify import VerificationError, load_problems, tokenizer_problems

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WrappedLayout:
    """How one multimodal architecture wraps its text causal LM.

    Prefix rules are ``(checkpoint prefix, replacement)`` pairs; the first rule whose
    prefix starts a tensor name applies. ``text_rules`` map to the text-only layout,
    ``runtime_rules`` to the parameter names of the loaded multimodal model (the names
    PEFT adapters use), ``drop`` lists the prefixes of non-text tensors.
    """

    text_arch: str
    text_model_type: str
    text_config_key: str
    text_rules: tuple[tuple[str, str], ...]
    drop: tuple[str, ...]
    runtime_rules: tuple[tuple[str, str], ...]


# Architecture (config.json "architectures"[0]) -> its wrapped layout.
WRAPPED_LAYOUTS: dict[str, WrappedLayout] = {
    "Gemma3ForConditionalGeneration": WrappedLayout(
        text_arch="Gemma3ForCausalLM",
        text_model_type="gemma3_text",
        text_config_key="text_config",
        text_rules=(
            ("language_model.model.", "model."),  # transformers 5.x
            ("language_model.lm_head.", "lm_head."),  # transformers 5.x, untied head
            ("model.language_model.", "model."),  # transformers 4.52-4.57
            ("lm_head.", "lm_head."),  # transformers 4.52-4.57
        ),
        drop=(
            "vision_tower.",
            "multi_modal_projector.",
            "model.vision_tower.",
            "model.multi_modal_projector.",
        ),
        runtime_rules=(
            ("language_model.model.", "model.language_model."),
            ("language_model.lm_head.", "lm_head."),
            ("vision_tower.", "model.vision_tower."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
            ("model.", "model."),
            ("lm_head.", "lm_head."),
        ),
    ),
}
TEXT_PREFIXES = ("model.", "lm_head.")


def _apply(rules: Iterable[tuple[str, str]], name: str) -> str | None:
    for old, new in rules:
        if name.startswith(old):
            return new + name[len(old) :]
    return None


def _architecture(config: Mapping[str, Any], folder: Path) -> str:
    archs = config.get("architectures") or []
    if not archs:
        raise MergebakeError(
            f"{folder / 'config.json'}: no 'architectures' entry; mergebake needs it to know "
            "the key layout. Re-save the checkpoint with save_pretrained"
        )
    return archs[0]


def wrapped_layout(config: Mapping[str, Any], folder: str | os.PathLike) -> WrappedLayout | None:
    """The :class:`WrappedLayout` of a multimodal config, or None for a text-only one.

    Raises :class:`MergebakeError` for a multimodal architecture that is not in
    :data:`WRAPPED_LAYOUTS` (a config with a ``text_config`` or ``vision_config``).
    """
    folder = Path(folder)
    arch = _architecture(config, folder)
    if arch in WRAPPED_LAYOUTS:
        return WRAPPED_LAYOUTS[arch]
    if "text_config" in config or "vision_config" in config:
        raise MergebakeError(
            f"{folder / 'config.json'}: multimodal architecture {arch!r} is not supported; "
            f"mergebake knows the wrapped layouts of {sorted(WRAPPED_LAYOUTS)} and text-only "
            "*ForCausalLM checkpoints. Add an entry to mergebake.normalise.WRAPPED_LAYOUTS"
        )
    return None


def tie_word_embeddings(config: Mapping[str, Any]) -> bool:
    """Whether the model ties ``lm_head`` to the input embeddings (top-level key; default true).

    transformers reads the top-level ``tie_word_embeddings`` of the model it builds, also
    for a wrapped multimodal model; Gemma-3 configs default it to true.
    """
    value = config.get("tie_word_embeddings")
    if value is None:
        value = (config.get("text_config") or {}).get("tie_word_embeddings", True)
    return bool(value)


def runtime_names(folder: str | os.PathLike, names: Iterable[str]) -> dict[str, str]:
    """Map the parameter names of the loaded model to the checkpoint's tensor names.

    Loaded models (and PEFT adapters trained on them) name parameters differently from
    what transformers 5.x writes for wrapped layouts (``model.language_model.X`` in
    memory, ``language_model.model.X`` on disk). Text-only checkpoints map to themselves.
    """
    folder = Path(folder)
    layout = wrapped_layout(read_config(folder), folder)
    out: dict[str, str] = {}
    for name in names:
        runtime = _apply(layout.runtime_rules, name) if layout else name
        out[runtime or name] = name
    return out


def text_config(config: Mapping[str, Any], layout: WrappedLayout, *, tied: bool) -> dict:
    """The top-level text-only config for a wrapped multimodal ``config``.

    The text sub-config is taken as stored (every key keeps its JSON type), with
    ``architectures`` set to the text architecture, ``model_type`` to the text model type
    when absent, ``dtype``/``torch_dtype``/``transformers_version`` from the top level
    where it has them, and ``tie_word_embeddings`` to ``tied``.
    """
    sub = config.get(layout.text_config_key)
    if not isinstance(sub, dict):
        raise MergebakeError(
            f"config.json: {layout.text_config_key!r} is missing or not an object; cannot "
            "build the text-only config"
        )
    out = copy.deepcopy(sub)
    out["architectures"] = [layout.text_arch]
    out.setdefault("model_type", layout.text_model_type)
    for key in ("dtype", "torch_dtype", "transformers_version"):
        if key in config:
            out[key] = config[key]
    out["tie_word_embeddings"] = tied
    return out


def plan_renames(
    folder: Path, config: Mapping[str, Any], tensors: Mapping[str, TensorInfo]
) -> tuple[dict[str, str | None], WrappedLayout | None, bool]:
    """Decide the fate of every tensor: ``({name: new name, or None to drop}, layout, tied)``.

    Raises :class:`MergebakeError` for a tensor that no rule covers, two tensors that would
    get one name, or an untied head with no ``lm_head`` tensor.
    """
    layout = wrapped_layout(config, folder)
    tied = tie_word_embeddings(config)
    plan: dict[str, str | None] = {}
    unknown: list[str] = []
    for name in tensors:
        if layout is None:
            new = name if name.startswith(TEXT_PREFIXES) else None
        elif name.startswith(layout.drop):
            plan[name] = None
            continue
        else:
            new = _apply(layout.text_rules, name)
        if new is None:
            unknown.append(name)
        elif layout is not None and tied and new.startswith("lm_head."):
            plan[name] = None  # transformers ignores a saved head when it is tied
        else:
            plan[name] = new
    if unknown:
        what = f"wrapped layout {_architecture(config, folder)}" if layout else "a text-only model"
        raise MergebakeError(
            f"{folder}: tensor(s) {sorted(unknown)[:5]} ({len(unknown)} in all) fit no rule "
            f"for {what}; expected names under {TEXT_PREFIXES}"
            + (f" or {layout.drop}" if layout else "")
        )
    targets = [n for n in plan.values() if n is not None]
    if len(targets) != len(set(targets)):
        dup = sorted({n for n in targets if targets.count(n) > 1})
        raise MergebakeError(f"{folder}: several tensors would be renamed to {dup[:5]}")
    if not tied and not any(n.startswith("lm_head.") for n in targets):
        raise MergebakeError(
            f"{folder / 'config.json'}: tie_word_embeddings is false but the checkpoint has no "
            "lm_head tensor; the checkpoint is incomplete"
        )
    return plan, layout, tied


def normalise(src: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Write ``src`` (a base or baked checkpoint) to ``out`` in the text-only layout.

    Tensors keep their dtype, shape and values (bit for bit); only names change. The
    output keeps the source's shard files (a shard left empty is omitted) and gets a
    ``model.safetensors.index.json`` when the source is sharded. ``config.json`` becomes
    the text config with ``architectures: [<text arch>]``; tokenizer, chat template and
    generation files come along. A source that is already text-only is hard-linked file
    by file (a copy where the file system cannot link).

    Returns ``{"renamed": int, "dropped": int, "kept": int, "linked": bool,
    "architecture": str}``. Raises :class:`MergebakeError` (naming the file) for a missing
    or pickle-only source, an unsupported multimodal architecture, or tensors that fit no
    layout rule, and :class:`mergebake.verify.VerificationError` when the result does not
    load as a causal LM with every key matched or its tokenizer does not load; ``out`` is
    then left untouched.
    """
    src, out = Path(src), Path(out)
    config = read_config(src)
    files = weight_files(src)
    headers = {f: read_header(f) for f in files}
    tensors = {name: info for tensors, _ in headers.values() for name, info in tensors.items()}
    plan, layout, tied = plan_renames(src, config, tensors)
    renamed = sum(1 for k, v in plan.items() if v is not None and v != k)
    dropped = sum(1 for v in plan.values() if v is None)
    linked = layout is None and renamed == 0 and dropped == 0

    with atomic_dir(out) as tmp:
        weight_map: dict[str, str] = {}
        total = 0
        for f, (shard_tensors, meta) in headers.items():
            kept = {k: plan[k] for k in shard_tensors if plan[k] is not None}
            if not kept:
                continue
            if all(k == v for k, v in kept.items()):
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

        if linked:
            link_or_copy(src / "config.json", tmp / "config.json")
        else:
            write_json(tmp / "config.json", text_config(config, layout, tied=tied))
        assets = copy_assets(src, tmp, processor=layout is None, link=True)
        # Verified before it counts as built: the text model loads from it with every key
        # matched, and the tokenizer loads. Values are copied bit for bit from the source
        # (checked when it was built), so no second NaN/Inf scan here.
        problems = load_problems(tmp) + tokenizer_problems(tmp, src)
        if problems:
            raise VerificationError(out, src, problems)
        arch = layout.text_arch if layout else _architecture(config, src)
        summary = {
            "renamed": renamed,
            "dropped": dropped,
            "kept": len(plan) - dropped,
            "linked": linked,
            "architecture": arch,
        }
        write_provenance(
            tmp,
            step="normalise",
            inputs={"src": src},
            params={"source_architecture": _architecture(config, src), **summary, "assets": assets},
        )
    log.info("normalise %s -> %s: %s", src, out, summary)
    return summary
