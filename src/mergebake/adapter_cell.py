"""The last step of an adapter-space cell: normalise, verify, record the merge space.

An adapter-space cell (a method with ``space: adapter``) is built as: the group's LoRA
adapters merged by PEFT's ``add_weighted_adapter`` (:mod:`mergebake.adapter_merge`) into
one adapter, that adapter baked into the base by the bake engine (``mergebake bake``),
and then :func:`finish_adapter_cell`: the baked checkpoint is normalised to the text-only
causal-LM layout (:func:`mergebake.normalise.normalise`) and verified against the
normalised base under the same contract as a mergekit cell (same tensor names, shapes and
dtypes, same ``config.json`` apart from :data:`mergebake.merge.MERGE_CONFIG_KEYS`, loads
with every key matched, finite, tokenizer usable: :func:`mergebake.verify.
verify_checkpoint`). Only then does the folder appear at ``out``, so it ends where every
other cell ends (``results/merged/{base}/{group}__{method}``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from . import MergebakeError
from .merge import MERGE_CONFIG_KEYS
from .normalise import normalise
from .outputs import atomic_dir, write_provenance
from .verify import VerificationError, verify_checkpoint

log = logging.getLogger(__name__)


def _params(folder: Path) -> dict[str, Any]:
    prov = folder / "provenance.json"
    if not prov.is_file():
        return {}
    return dict(json.loads(prov.read_text()).get("params") or {})


def finish_adapter_cell(
    baked: str | os.PathLike,
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
) -> dict[str, Any]:
    """Write the adapter-space cell ``out`` from ``baked`` (the base with the merged adapter
    baked in), verified against ``base`` (the normalised base).

    ``adapter`` is the merged adapter folder (its ``provenance.json`` gives the
    combination type and options recorded in the cell's). The cell's ``provenance.json``
    has ``step: adapter-cell`` and ``params.space: "adapter"``, with the merge's and the
    normalisation's parameters. Tensors are the normalised baked ones, bit for bit.

    Returns ``{"space", "combination_type", "normalise": {...}}``. Raises
    :class:`MergebakeError` for a missing input folder and
    :class:`mergebake.verify.VerificationError` (naming ``out``) when the result differs
    from the base; ``out`` is then left untouched.
    """
    baked, base, adapter, out = Path(baked), Path(base), Path(adapter), Path(out)
    for what, folder in (("baked checkpoint", baked), ("normalised base", base)):
        if not folder.is_dir():
            raise MergebakeError(f"{folder}: {what} not found; build it first")
    if not (adapter / "adapter_config.json").is_file():
        raise MergebakeError(f"{adapter}: merged adapter not found; run adapter-merge first")
    merge = _params(adapter)
    with atomic_dir(out) as tmp:
        stage = tmp / "normalised"
        summary = normalise(baked, stage)
        for p in stage.iterdir():
            if p.name != "provenance.json":
                os.replace(p, tmp / p.name)
        shutil.rmtree(stage)
        try:
            verify_checkpoint(tmp, base, allowed_config_keys=MERGE_CONFIG_KEYS)
        except VerificationError as e:  # name the cell, not its temporary folder
            raise VerificationError(out, base, e.problems) from None
        write_provenance(
            tmp,
            step="adapter-cell",
            inputs={"adapter": adapter, "baked": baked, "base": base},
            params={
                "space": "adapter",
                "combination_type": merge.get("combination_type"),
                "adapter_merge": merge,
                "bake": _params(baked),
                "normalise": summary,
            },
            seed=merge.get("seed"),
        )
    result = {
        "space": "adapter",
        "combination_type": merge.get("combination_type"),
        "normalise": summary,
    }
    log.info("adapter cell %s: %s", out, result)
    return result


__all__ = ["finish_adapter_cell"]
