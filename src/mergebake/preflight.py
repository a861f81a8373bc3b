"""Preflight: checks that run before any job, so a mistake stops the run in seconds, not
hours in.

The config itself is validated when the workflow is parsed (:func:`mergebake.config.
load_config`). :func:`preflight` adds what needs the file system or the environment:
local bases and adapters exist; each local adapter fits its base (``base_model_name_or_
path``, target modules and LoRA shapes, from headers only; see
:func:`mergebake.bake.preflight`); a Hub token is available when publishing is on; and the
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
from .config import expand_grid
from .resources import estimate

log = logging.getLogger(__name__)


class PreflightError(MergebakeError):
    """One or more preflight checks failed; the message lists each, one per line."""


def _base_folder(config: Mapping[str, Any], base: str, workdir: Path) -> Path:
    src = config["bases"][base]
    return Path(src["path"]) if "path" in src else workdir / "resources" / "bases" / base


def _adapter_folder(config: Mapping[str, Any], base: str, adapter: str, workdir: Path) -> Path:
    src = config["adapters"][base][adapter]
    if "path" in src:
        return Path(src["path"])
    return workdir / "resources" / "adapters" / base / adapter


def disk_needed(config: Mapping[str, Any], workdir: Path) -> int:
    """Upper estimate, in bytes, of what the outputs not yet on disk will take.

    Counts a fetched copy of each missing base, a baked and a normalised checkpoint per
    missing (base, adapter), a normalised base and a merged checkpoint per missing cell,
    each the size of its base (:func:`mergebake.resources.estimate`; a base whose size
    nothing tells counts 0). With ``temp_intermediates`` the baked and normalised
    checkpoints are deleted as the run goes, so the estimate is an upper bound.
    """
    total = 0
    cells = expand_grid(config)
    for base in sorted({c.base for c in cells}):
        size = base.split("-")[0]
        folder = _base_folder(config, base, workdir)
        planned = estimate(size, config["bases"][base], folder=folder)
        nbytes = 0 if planned.basis == "default" else planned.total  # unknown: not counted
        if not folder.exists():
            total += nbytes
        if not (workdir / "results" / "text" / base / "_base").exists():
            total += nbytes
        adapters = {a for c in cells if c.base == base for a in config["groups"][c.group]}
        for a in adapters:
            for stage in ("baked", "text"):
                if not (workdir / "results" / stage / base / a).exists():
                    total += nbytes
        for c in cells:
            if c.base == base and not (workdir / "results" / "merged" / base / c.name).exists():
                total += nbytes
    return total


def check_local_paths(config: Mapping[str, Any]) -> None:
    """Raise :class:`mergebake.config.ConfigError` naming ``bases.<b>.path`` or
    ``adapters.<b>.<a>.path`` for every local source of the grid that does not exist.

    Cheap, so the workflow runs it when it parses the config (dry runs included)."""
    from .config import ConfigError

    problems = []
    cells = expand_grid(config)
    for base in sorted({c.base for c in cells}):
        src = config["bases"][base]
        if "path" in src and not Path(src["path"]).is_dir():
            problems.append(f"key 'bases.{base}.path': {src['path']} does not exist")
        for a in sorted({a for c in cells if c.base == base for a in config["groups"][c.group]}):
            asrc = config["adapters"][base][a]
            if "path" in asrc and not Path(asrc["path"]).is_dir():
                problems.append(f"key 'adapters.{base}.{a}.path': {asrc['path']} does not exist")
    if problems:
        raise ConfigError(
            "local input folder(s) not found; fix the path(s) or use a hub "
            "source:\n  - " + "\n  - ".join(problems)
        )


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
    cells = expand_grid(config)
    for base in sorted({c.base for c in cells}):
        src = config["bases"][base]
        base_dir = _base_folder(config, base, workdir)
        expected = src.get("hub", {}).get("repo") or src.get("path")
        for a in sorted({a for c in cells if c.base == base for a in config["groups"][c.group]}):
            if "path" not in config["adapters"][base][a] or not base_dir.is_dir():
                continue  # fetched/generated adapters are checked by their own bake job
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    bake_preflight(
                        base_dir,
                        _adapter_folder(config, base, a, workdir),
                        allow_pickle=config["allow_pickle"],
                        expected_base=expected,
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
