"""Merge one cell: render its mergekit recipe, run an engine, verify, record provenance.

mergekit is always given an explicit ``base_model`` and absolute local paths, writes no
model card (its card looks local paths up on the Hub), and runs in-process through
``mergekit.merge.run_merge``. The ``stream`` engine (:mod:`mergebake.merge_stream`) writes
the same bytes faster from the same rendered recipe, and hands over to mergekit what it
does not reproduce; the log and ``provenance.json`` say which engine ran and why. The
output only appears at ``out`` once the engine finished and
:func:`mergebake.verify.verify_checkpoint` accepted it against the normalised base.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from . import MergebakeError
from .checkpoint import copy_assets, read_config, weight_files
from .config import render_recipe
from .device import resolve_device
from .merge_stream import ENGINES, SELECTIONS, HandOver, stream_merge, support_problem
from .outputs import atomic_dir, write_provenance
from .verify import VerificationError, verify_checkpoint

log = logging.getLogger(__name__)
# config.json keys a merge may legitimately change.
MERGE_CONFIG_KEYS = ("transformers_version", "dtype", "torch_dtype")


def base_dtype(folder: Path) -> str:
    """The checkpoint's dtype as named in its config.json (``dtype`` or ``torch_dtype``)."""
    cfg = read_config(folder)
    return cfg.get("dtype") or cfg.get("torch_dtype") or "float32"


def _without_at(folder: Path, links: Path, i: int) -> Path:
    """``folder``, or when its path holds ``@`` a symlink to it, ``links/<i>``."""
    if "@" not in str(folder):
        return folder
    links.mkdir(parents=True, exist_ok=True)
    link = links / str(i)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(folder, target_is_directory=True)
    return link


def merge_cell(
    recipe: Path,
    *,
    base: Path,
    models: Mapping[str, Path],
    parameters: Mapping[str, Any],
    out: Path,
    dtype: str | None = None,
    seed: int | None = None,
    out_shard_size: str = "5B",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    device: str = "auto",
    engine: str = "mergekit",
    selection: str = "exact",
    workers: int | None = None,
) -> dict[str, Any]:
    """Merge the normalised ``models`` (adapter name -> folder) over ``base`` into ``out``.

    ``recipe`` is a template from ``recipes/`` (see :func:`mergebake.config.render_recipe`);
    it is rendered with absolute paths, ``dtype`` (default: the base's dtype) and
    ``parameters``, and kept in the output as ``recipe.yaml``. ``seed`` is mergekit's
    ``--random-seed`` (randomised methods such as DARE). The merged checkpoint is verified
    against ``base`` (tensor names, shapes, dtypes, config, loadability, finiteness)
    before it is renamed into place. ``device`` is mergekit's device, resolved by
    :func:`mergebake.device.resolve_device` (``auto``: CUDA when usable, else the CPU).

    ``engine`` (config ``merge.engine``) is ``"mergekit"`` (``run_merge``) or ``"stream"``
    (:func:`mergebake.merge_stream.stream_merge`: byte-identical output, ``workers``
    threads, default one per core); a recipe the stream engine does not reproduce
    (randomised methods such as DARE/DELLA, slices, tokenizer merging, a CUDA device, ...)
    runs through mergekit, and the log says why. ``selection`` (``merge.selection``) is
    ``"exact"`` or ``"fast"``: the stream engine's linear-time magnitude trimming
    (:func:`mergebake.merge_stream.fast_sparsify`; differs from mergekit only among entries
    whose magnitude equals the cut-off). Provenance records ``engine``, ``engine_reason``
    (why mergekit ran where the stream engine was asked, else ``None``) and the
    ``selection`` that made the weights (``"fast"`` only where fast trimming was applied).

    Returns ``{"recipe": rendered dict, "engine": str, "engine_reason": str | None,
    "selection": str, "seconds": wall time}`` (plus the stream engine's figures under
    ``"stream"`` when it ran). Raises :class:`MergebakeError` for missing/unsafe inputs, an
    unknown engine or selection, a bad recipe or an unusable ``cuda`` device (before any
    engine runs) and :class:`mergebake.verify.VerificationError` when the output is
    defective; in every failure ``out`` is left absent (or as it was).
    """
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions, parse_kmb

    if engine not in ENGINES:
        raise MergebakeError(f"key 'merge.engine': {engine!r} is unknown; choose one of {ENGINES}")
    if selection not in SELECTIONS:
        raise MergebakeError(
            f"key 'merge.selection': {selection!r} is unknown; choose one of {SELECTIONS}"
        )
    if workers is not None and workers < 1:
        raise MergebakeError(f"merge workers must be at least 1, not {workers}")
    t0 = time.perf_counter()
    device = resolve_device(device)  # auto: CUDA if usable, else CPU with a warning
    base = Path(base).resolve()
    models = {name: Path(p).resolve() for name, p in models.items()}
    for p in (base, *models.values()):
        weight_files(p, allow_pickle=allow_pickle)  # exists, safetensors, index complete
    dtype = dtype or base_dtype(base)
    # mergekit reads "path@revision": a folder whose path holds "@" (a checkpoint row such
    # as eng@500) reaches it through a link without one (removed once merged).
    links = Path(out).parent / f".{Path(out).name}.links"
    given = {k: _without_at(v, links, i) for i, (k, v) in enumerate(models.items())}
    rendered = render_recipe(
        Path(recipe),
        base_model=str(base),
        models={k: str(v) for k, v in given.items()},
        parameters=parameters,
        dtype=dtype,
    )
    try:
        merge_config = MergeConfiguration.model_validate(rendered)
    except Exception as e:  # pydantic ValidationError: mergekit rejects the rendered recipe
        raise MergebakeError(f"{recipe}: mergekit rejects the rendered recipe: {e}") from e
    source = yaml.safe_dump(rendered, sort_keys=False)
    options = MergeOptions(
        out_shard_size=parse_kmb(out_shard_size),
        copy_tokenizer=True,
        trust_remote_code=trust_remote_code,
        random_seed=seed,
        write_model_card=False,
        safe_serialization=True,
        quiet=True,
        device=device,
        lazy_unpickle=False,
    )
    method = rendered["merge_method"]
    reason = None
    if engine == "stream":
        reason = support_problem(merge_config, options)
    stats = None
    with atomic_dir(out) as tmp:
        if engine == "stream" and reason is None:
            try:
                stats = stream_merge(
                    merge_config,
                    str(tmp),
                    options,
                    workers=workers,
                    selection=selection,
                    config_source=source,
                    hash_outputs=True,
                    scan_values=True,
                )
            except HandOver as e:  # found while planning, before anything was written
                reason = str(e)
        if stats is not None:
            log.info(
                "merge engine: stream (%s over %s -> %s; selection %s, %d workers, %d of %d "
                "tensors computed, %d with zero task vectors taken from the base)",
                method,
                base,
                out,
                stats["selection"],
                stats["workers"],
                stats["computed"],
                stats["tensors"],
                stats["shortcut"],
            )
        else:
            if engine == "stream":
                log.info("merge engine: mergekit, not stream: %s", reason)
            else:
                log.info("merge engine: mergekit (merge.engine: mergekit)")
            if selection == "fast":
                log.info("merge selection: exact (fast selection is the stream engine's)")
            log.info("mergekit %s over %s -> %s", method, base, out)
            run_merge(merge_config, str(tmp), options=options, config_source=source)
        ran = "stream" if stats is not None else "mergekit"
        made_by = stats["selection"] if stats is not None else "exact"
        copy_assets(base, tmp, processor=False, link=False)  # the base's tokenizer, as is
        (tmp / "recipe.yaml").write_text(source)
        # the stream engine checked every tensor for NaN/Inf while it had it in memory
        problems = [
            f"tensor {name}: {bad} NaN/Inf value(s) of {numel}"
            for name, bad, numel in (stats or {}).get("nonfinite", [])
        ]
        try:
            verify_checkpoint(
                tmp, base, allowed_config_keys=MERGE_CONFIG_KEYS, scan_values=stats is None
            )
        except VerificationError as e:
            problems += e.problems
        if problems:  # name the cell, not its temporary folder
            raise VerificationError(Path(out), base, problems) from None
        write_provenance(
            tmp,
            step="merge",
            inputs={"base": base, **{f"model:{k}": v for k, v in models.items()}},
            params={
                "recipe_template": str(Path(recipe).resolve()),
                "recipe": rendered,
                "parameters": dict(parameters),
                "dtype": dtype,
                "out_shard_size": out_shard_size,
                "engine": ran,
                "engine_reason": reason,
                "selection": made_by,
            },
            seed=seed,
        )
    if links.is_dir():
        shutil.rmtree(links)
    res = {
        "recipe": rendered,
        "engine": ran,
        "engine_reason": reason,
        "selection": made_by,
        "seconds": time.perf_counter() - t0,
    }
    if stats is not None:
        res["stream"] = stats
    return res
