"""Merge one cell: render its mergekit recipe, run mergekit, verify, record provenance.

mergekit is always given an explicit ``base_model`` and absolute local paths, writes no
model card (its card looks local paths up on the Hub), and runs in-process through
``mergekit.merge.run_merge``. The output only appears at ``out`` once mergekit finished
and :func:`mergebake.verify.verify_checkpoint` accepted it against the normalised base.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from . import MergebakeError
from .checkpoint import copy_assets, read_config, weight_files
from .config import render_recipe
from .device import resolve_device
from .outputs import atomic_dir, write_provenance
from .verify import VerificationError, verify_checkpoint

log = logging.getLogger(__name__)
# config.json keys a merge may legitimately change.
MERGE_CONFIG_KEYS = ("transformers_version", "dtype", "torch_dtype")


def base_dtype(folder: Path) -> str:
    """The checkpoint's dtype as named in its config.json (``dtype`` or ``torch_dtype``)."""
    cfg = read_config(folder)
    return cfg.get("dtype") or cfg.get("torch_dtype") or "float32"


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
) -> dict[str, Any]:
    """Merge the normalised ``models`` (adapter name -> folder) over ``base`` into ``out``.

    ``recipe`` is a template from ``recipes/`` (see :func:`mergebake.config.render_recipe`);
    it is rendered with absolute paths, ``dtype`` (default: the base's dtype) and
    ``parameters``, and kept in the output as ``recipe.yaml``. ``seed`` is mergekit's
    ``--random-seed`` (randomised methods such as DARE). The merged checkpoint is verified
    against ``base`` (tensor names, shapes, dtypes, config, loadability, finiteness)
    before it is renamed into place. ``device`` is mergekit's device, resolved by
    :func:`mergebake.device.resolve_device` (``auto``: CUDA when usable, else the CPU).

    Returns ``{"recipe": rendered dict, "seconds": wall time}``. Raises
    :class:`MergebakeError` for missing/unsafe inputs, a bad recipe or an unusable
    ``cuda`` device (before mergekit runs) and :class:`mergebake.verify.VerificationError`
    when the output is defective; in every failure ``out`` is left absent (or as it was).
    """
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions, parse_kmb

    t0 = time.perf_counter()
    device = resolve_device(device)  # auto: CUDA if usable, else CPU with a warning
    base = Path(base).resolve()
    models = {name: Path(p).resolve() for name, p in models.items()}
    for p in (base, *models.values()):
        weight_files(p, allow_pickle=allow_pickle)  # exists, safetensors, index complete
    dtype = dtype or base_dtype(base)
    rendered = render_recipe(
        Path(recipe),
        base_model=str(base),
        models={k: str(v) for k, v in models.items()},
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
    with atomic_dir(out) as tmp:
        log.info("mergekit %s over %s -> %s", rendered["merge_method"], base, out)
        run_merge(merge_config, str(tmp), options=options, config_source=source)
        copy_assets(base, tmp, processor=False, link=False)  # the base's tokenizer, as is
        (tmp / "recipe.yaml").write_text(source)
        try:
            verify_checkpoint(tmp, base, allowed_config_keys=MERGE_CONFIG_KEYS)
        except VerificationError as e:  # name the cell, not its temporary folder
            raise VerificationError(Path(out), base, e.problems) from None
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
            },
            seed=seed,
        )
    return {"recipe": rendered, "seconds": time.perf_counter() - t0}
