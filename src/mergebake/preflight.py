"""Preflight: checks that run before any job, so a mistake stops the run in seconds, not
hours in.

The config itself is validated when the workflow is parsed (:func:`mergebake.config.
load_config`). :func:`preflight` adds what needs the file system or the environment:
local bases and adapters exist; each local adapter fits its base (``base_model_name_or_
path``, target modules and LoRA shapes, from headers only; see
:func:`mergebake.bake.preflight`); the adapters of each adapter-space cell can be merged by
PEFT (:func:`check_adapter_cells`); a Hub token is available when publishing is on; and the
disk holds the outputs still to be built. Every problem is collected, then raised together
as one :class:`PreflightError` that names each config key or file.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import MergebakeError

log = logging.getLogger(__name__)


class PreflightError(MergebakeError):
    """One or more preflight checks failed; the message lists each, one per line."""


def disk_needed(config: Mapping[str, Any], workdir: Path) -> int:
    """Upper estimate, in bytes, of what the outputs not yet on disk will take
    (:meth:`mergebake.workflow.Plan.disk_needed`)."""
    from .workflow import Plan

    return Plan(config).disk_needed(workdir)


def check_local_paths(config: Mapping[str, Any]) -> None:
    """Raise :class:`mergebake.config.ConfigError` naming ``bases.<b>.path`` or
    ``adapters.<b>.<a>.path`` for every local source of the grid that does not exist.

    Cheap, so the workflow runs it when it parses the config (dry runs included)."""
    from .config import ConfigError
    from .workflow import PathSource, Plan

    problems = []
    plan = Plan(config)
    for base in plan.bases:
        src = plan.base_sources[base]
        if isinstance(src, PathSource) and not Path(src.path).is_dir():
            problems.append(f"key 'bases.{base}.path': {src.path} does not exist")
        for a in plan.adapters[base]:
            asrc = plan.adapter_sources[(base, a)]
            if isinstance(asrc, PathSource) and not Path(asrc.path).is_dir():
                problems.append(f"key 'adapters.{base}.{a}.path': {asrc.path} does not exist")
    if problems:
        raise ConfigError(
            "local input folder(s) not found; fix the path(s) or use a hub "
            "source:\n  - " + "\n  - ".join(problems)
        )


def check_adapter_cells(config: Mapping[str, Any], workdir: str | Path = ".") -> list[str]:
    """Check every adapter-space cell whose adapters are all on disk with
    :func:`mergebake.adapter_merge.check_adapters` (adapter configs and safetensors headers
    only: what PEFT's ``add_weighted_adapter`` refuses, such as unequal ranks for the
    non-SVD types or a regex ``target_modules`` mixed with a list).

    Local adapters exist when the workflow is parsed, so their mistakes stop even a dry
    run; fetched or generated ones are checked once on disk (the ``adapter_merge`` job
    checks again before it reads a tensor, and runs first: it has a high priority).
    Returns the cells checked (``<base>/<group>__<method>``). Raises
    :class:`mergebake.config.ConfigError` naming ``methods.<method>`` and the cell.
    """
    from .adapter_merge import check_adapters
    from .config import ConfigError, adapter_options
    from .workflow import Plan

    workdir = Path(workdir)
    plan = Plan(config)
    checked = []
    for cell in plan.cells:
        if not plan.is_adapter_cell(cell.method):
            continue
        folders = {
            a: workdir / plan.adapter_dir(cell.base, a) for a in config["groups"][cell.group]
        }
        if not all(f.is_dir() for f in folders.values()):
            continue
        try:
            check_adapters(folders, **adapter_options(config, cell))
        except MergebakeError as e:
            raise ConfigError(
                f"key 'methods.{cell.method}' (cell {cell.path_in_repo}): PEFT cannot merge "
                f"these adapters: {e}"
            ) from None
        checked.append(cell.path_in_repo)
    return checked


def preflight(
    config: Mapping[str, Any],
    *,
    workdir: str | Path = ".",
    check_token: bool = True,
    check_disk: bool = True,
    keep_going: bool = False,
) -> list[str]:
    """Run the preflight checks on a validated ``config``; return the warnings.

    Raises :class:`PreflightError` listing every failure: a local adapter that does not
    fit its (local or already fetched) base — names the config key and the adapter file;
    a ``base_model_name_or_path`` mismatch counts only with ``bake.strict_base_match``,
    otherwise it is a warning; ``hub.enabled`` without a token (``HF_TOKEN`` or ``hf auth
    login``); less free disk under ``workdir`` than :func:`disk_needed` estimates. With
    ``keep_going`` (Snakemake's ``--keep-going``) an adapter that does not fit is only a
    warning: its bake job fails on its own and every other cell is still built.
    """
    from .bake import preflight as bake_preflight

    check_local_paths(config)
    workdir = Path(workdir)
    problems: list[str] = []
    notes: list[str] = []
    from .workflow import PathSource, Plan

    plan = Plan(config)
    try:
        check_adapter_cells(config, workdir)
    except MergebakeError as e:
        (notes if keep_going else problems).append(str(e))
    for base in plan.bases:
        src = plan.base_sources[base]
        base_dir = Path(src.path) if isinstance(src, PathSource) else workdir / plan.base_dir(base)
        for a in plan.adapters[base]:
            asrc = plan.adapter_sources[(base, a)]
            if not isinstance(asrc, PathSource) or not base_dir.is_dir():
                continue  # fetched/generated adapters are checked by their own bake job
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    bake_preflight(
                        base_dir,
                        Path(asrc.path),
                        allow_pickle=config["allow_pickle"],
                        expected_base=src.expected_base,
                        strict_base_match=config["bake"]["strict_base_match"],
                    )
                except MergebakeError as e:
                    msg = f"config key 'adapters.{base}.{a}': {e}"
                    (notes if keep_going else problems).append(msg)
            notes += [str(w.message) for w in caught]
    if check_token and config["hub"]["enabled"]:
        from huggingface_hub import get_token

        if not get_token():
            problems.append(
                "config key 'hub.enabled' is true but no Hugging Face token was "
                "found; run `hf auth login` or set HF_TOKEN (or set hub.enabled: "
                "false for a dry run)"
            )
    if check_disk:
        need = disk_needed(config, workdir)
        probe = workdir if workdir.exists() else workdir.parent
        free = shutil.disk_usage(probe).free
        if need > free:
            problems.append(
                f"disk: the planned outputs need about {need / 1e9:.1f} GB but "
                f"{probe.resolve()} has {free / 1e9:.1f} GB free; free space, set "
                "temp_intermediates: true, or build fewer cells"
            )
    if problems:
        raise PreflightError("preflight failed:\n  - " + "\n  - ".join(problems))
    for n in notes:
        log.warning(n)
    return notes
