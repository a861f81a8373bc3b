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
    from .config import ConfigError, split_member
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
                name, step = split_member(a)  # a checkpoint row: eng@500
                at = f" (checkpoint {step})" if step else ""
                problems.append(
                    f"key 'adapters.{base}.{name}.path'{at}: {asrc.path} does not exist"
                )
    if problems:
        raise ConfigError(
            "local input folder(s) not found; fix the path(s) or use a hub "
            "source:\n  - " + "\n  - ".join(problems)
        )


def _architectures(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a ``config.json`` that decides llama.cpp's converter class."""
    out: dict[str, Any] = {"architectures": list(config.get("architectures") or [])}
    text = config.get("text_config")
    if isinstance(text, Mapping):
        out["text_config"] = {"architectures": list(text.get("architectures") or [])}
    return out


def _base_architectures(plan: Any, base: str, workdir: Path) -> dict[str, Any] | None:
    """Architectures of a base from its ``config.json`` (local, generated or fetched), or
    from the demo spec; None when a Hub base is not fetched yet."""
    import json

    from .workflow import DemoSource, PathSource

    src = plan.base_sources[base]
    folder = Path(src.path) if isinstance(src, PathSource) else workdir / plan.base_dir(base)
    if (folder / "config.json").is_file():
        return _architectures(json.loads((folder / "config.json").read_text()))
    if isinstance(src, DemoSource):
        from .demo import _model_class

        return {"architectures": [_model_class(src.spec["arch"]).__name__]}
    return None


def gguf_support_cache(tools: Path) -> Path:
    """The file caching llama.cpp's answers per architecture (beside the converter)."""
    from .export import tools_folder

    return Path(f"{tools_folder(tools)}.support.json")


def check_gguf_support(
    config: Mapping[str, Any], *, workdir: str | Path = ".", tools: str | Path | None = None
) -> tuple[list[str], list[str]]:
    """Whether llama.cpp's converter can convert every base that has GGUF cells.

    Asks :func:`mergebake.export.gguf_support_many` once per distinct architecture (one
    converter subprocess, ~5 s; the converter is fetched into ``tools`` if absent) and
    caches the answers per architecture in :func:`gguf_support_cache`, so later runs ask
    nothing. A base's architecture comes from its ``config.json`` (local, generated or
    already fetched) or its demo spec; a Hub base not fetched yet cannot be asked and gives
    a note instead (its export jobs refuse it). Returns ``(problems, notes)``; each problem
    names ``export.gguf`` and the base. Does nothing when no cell is exported.
    """
    import json

    from .export import DEFAULT_TOOLS, gguf_support_many
    from .workflow import Plan

    plan = Plan(config)
    if not plan.gguf:
        return [], []
    workdir = Path(workdir)
    tools = Path(tools) if tools is not None else workdir / DEFAULT_TOOLS
    problems: list[str] = []
    notes: list[str] = []
    archs: dict[str, dict[str, Any]] = {}
    for base in plan.gguf_bases():
        hp = _base_architectures(plan, base, workdir)
        if hp is None:
            notes.append(
                f"config key 'export.gguf': base {base!r} is not fetched yet, so whether "
                "llama.cpp can convert it is checked by its export jobs"
            )
        else:
            archs[base] = hp
    cache_file = gguf_support_cache(tools)
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    keys = {base: json.dumps(hp, sort_keys=True) for base, hp in archs.items()}
    ask = sorted(set(keys.values()) - set(cache))
    if ask:
        answers = gguf_support_many([json.loads(k) for k in ask], tools=tools)
        cache.update(zip(ask, answers, strict=True))
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
    for base, key in sorted(keys.items()):
        if cache[key] is not None:
            problems.append(
                f"config key 'export.gguf': base {base!r} ({key}) cannot be exported to "
                f"GGUF: {cache[key]}; drop export.gguf for its grid block (export: {{gguf: "
                "[]}}) or remove it from the grid"
            )
    return problems, notes


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
    check_gguf: bool = False,
) -> list[str]:
    """Run the preflight checks on a validated ``config``; return the warnings.

    Raises :class:`PreflightError` listing every failure: a local adapter that does not
    fit its (local or already fetched) base — names the config key and the adapter file;
    a ``base_model_name_or_path`` mismatch counts only with ``bake.strict_base_match``,
    otherwise it is a warning; ``hub.enabled`` without a token (``HF_TOKEN`` or ``hf auth
    login``); less free disk under ``workdir`` than :func:`disk_needed` estimates. With
    ``keep_going`` (Snakemake's ``--keep-going``) an adapter that does not fit is only a
    warning: its bake job fails on its own and every other cell is still built. With
    ``check_gguf`` (the workflow's onstart), a base with ``export.gguf`` cells whose family
    llama.cpp's converter cannot convert (:func:`check_gguf_support`; ~5 s per new
    architecture, cached, skipped when nothing is exported). With ``eval.backend: vllm``,
    vLLM or a CUDA GPU missing on this machine is a warning
    (:func:`mergebake.eval_backend.environment_notes`): the eval jobs may run elsewhere,
    and each refuses to start where they are missing.
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
                    name = a.partition("@")[0]  # a checkpoint row eng@500 is adapter eng
                    key = f"adapters.{base}.{name}" + (f"' ({a})" if name != a else "'")
                    msg = f"config key '{key}: {e}"
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
    from .eval_backend import environment_notes

    notes += environment_notes(config["eval"])  # warnings: eval jobs may run on GPU nodes
    if check_gguf:
        gguf_problems, gguf_notes = check_gguf_support(config, workdir=workdir)
        problems += gguf_problems
        notes += gguf_notes
    if problems:
        raise PreflightError("preflight failed:\n  - " + "\n  - ".join(problems))
    for n in notes:
        log.warning(n)
    return notes
