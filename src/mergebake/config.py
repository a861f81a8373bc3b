"""The config: validation against ``schemas/config.schema.yaml``, grid expansion, recipes.

``load_config`` validates a config mapping with JSON schema (filling defaults), then runs
the checks a schema cannot express: every grid block names known sizes/variants/groups/
methods, every cell's base and adapters are configured, no cell appears twice, method
parameters are in range and only name adapters of the groups they are used with, and
every cell's recipe renders. All errors are :class:`ConfigError` naming the config key.
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from . import MergebakeError, methods

# The workflow folder (Snakefile, schemas/, recipes/): this checkout when installed editable,
# else the working directory; Snakemake passes its own basedir to load_config.
_HERE = Path(__file__).resolve().parents[2]
ROOT = _HERE if (_HERE / "schemas").is_dir() else Path.cwd()
SCHEMA_PATH = ROOT / "schemas" / "config.schema.yaml"
RECIPES_DIR = ROOT / "recipes"
BASE_ROW = "_base"
# Placeholders every recipe may use besides the method's parameters.
BUILTIN_PLACEHOLDERS = {"base_model", "model", "adapter", "dtype"}
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_INDEXED = re.compile(r"^(model|adapter)_(\d+)$")


# Range checks for mergekit parameters that have one (mergekit docs / papers).
class ConfigError(MergebakeError):
    """The config is invalid; the message names the key and says what to do."""


class ConfigWarning(UserWarning):
    """Something in the config is likely a mistake but not an error (e.g. an exclusion
    pattern that matches no cell)."""


_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@dataclass(frozen=True)
class MethodPoint:
    """One point of a method's sweep: the name cells use, the configured method, and the
    swept parameter values.

    ``name`` is what the ``{method}`` wildcard, output paths, the report and Hub paths
    carry: the method's own name when it has no ``sweep:``, else
    ``<method>.<param>-<value>[.<param>-<value>...]`` (e.g. ``ties.density-0.3``; a
    per-adapter value reads ``weight-eng0.3-nob0.7``). ``sweep`` is ``((param, value),
    ...)`` in the order of ``methods.<method>.sweep`` (empty when not swept).
    """

    name: str
    method: str
    sweep: tuple[tuple[str, Any], ...] = ()

    def parameters(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """``methods.<method>.parameters`` with this point's swept values in place."""
        return {**config["methods"][self.method].get("parameters", {}), **dict(self.sweep)}


def _value_label(value: Any) -> str:
    """A sweep value as it appears in a cell name (``0.3``, ``1e-05``, ``true``,
    ``eng0.3-nob0.7`` for ``{eng: 0.3, nob: 0.7}``)."""
    if isinstance(value, Mapping):
        return "-".join(f"{a}{_value_label(v)}" for a, v in value.items())
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def method_points(config: Mapping[str, Any], mname: str) -> list[MethodPoint]:
    """The sweep points of method ``mname``: the product of its ``sweep:`` lists, the first
    parameter varying slowest; ``[MethodPoint(mname, mname)]`` without a sweep. Assumes a
    schema-valid config (names are checked by :func:`load_config`)."""
    sweep = config["methods"][mname].get("sweep") or {}
    if not sweep:
        return [MethodPoint(mname, mname)]
    points = []
    for values in itertools.product(*sweep.values()):
        pairs = tuple(zip(sweep, values, strict=True))
        label = ".".join(f"{p}-{_value_label(v)}" for p, v in pairs)
        points.append(MethodPoint(f"{mname}.{label}", mname, pairs))
    return points


def all_method_points(config: Mapping[str, Any]) -> dict[str, MethodPoint]:
    """Every cell method name of the config -> its :class:`MethodPoint`, in config order."""
    return {p.name: p for m in config["methods"] for p in method_points(config, m)}


def block_tasks(config: Mapping[str, Any], block: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The eval tasks of a grid block's cells: ``eval.tasks``, replaced by the block's
    ``eval.tasks`` or extended by its ``eval.add`` (``[{"name", "num_fewshot"}]``)."""
    own = block.get("eval") or {}
    if "tasks" in own:
        return list(own["tasks"])
    return [*config["eval"]["tasks"], *own.get("add", [])]


#: Separates an adapter from its checkpoint in row and group member names (``eng@500``).
CHECKPOINT_SEP = "@"
#: The group member suffix that names an adapter's selected checkpoint (``eng@best``).
BEST = "best"
#: The placeholder a checkpointed adapter's Hub ``subfolder`` or local ``path`` holds.
CHECKPOINT_PLACEHOLDER = "{checkpoint}"


def split_member(member: str) -> tuple[str, str | None]:
    """A group member or baseline row name as ``(adapter, checkpoint)``: ``"eng"`` gives
    ``("eng", None)``, ``"eng@500"`` gives ``("eng", "500")``, ``"eng@best"`` ``("eng",
    "best")``."""
    adapter, sep, step = member.partition(CHECKPOINT_SEP)
    return adapter, (step if sep else None)


def checkpoint_row(adapter: str, step: int | str) -> str:
    """The baseline row (and folder) name of one checkpoint: ``eng@500``."""
    return f"{adapter}{CHECKPOINT_SEP}{step}"


def adapter_checkpoints(config: Mapping[str, Any], base: str, adapter: str) -> list[int]:
    """The declared ``checkpoints`` of ``adapters.<base>.<adapter>`` in config order ([]
    when it has none)."""
    return list(config.get("adapters", {}).get(base, {}).get(adapter, {}).get("checkpoints") or [])


def member_rows(config: Mapping[str, Any], base: str, member: str) -> list[str]:
    """The baseline rows a group member stands for on ``base``: ``eng`` itself, ``eng@500``
    itself, and for ``eng@best`` every checkpoint row of ``eng`` (the candidates of the
    selection)."""
    adapter, step = split_member(member)
    if step == BEST:
        return [checkpoint_row(adapter, n) for n in adapter_checkpoints(config, base, adapter)]
    return [member]


def adapter_rows(config: Mapping[str, Any], base: str, adapter: str) -> list[str]:
    """The rows (baked, scored folders) of an adapter on ``base``: one per declared
    checkpoint (``eng@500``, ...), else the adapter's own name."""
    steps = adapter_checkpoints(config, base, adapter)
    return [checkpoint_row(adapter, n) for n in steps] if steps else [adapter]


@dataclass(frozen=True, order=True)
class Cell:
    """One merged checkpoint of the grid: ``{size}-{variant}/{group}__{method}``."""

    size: str
    variant: str
    group: str
    method: str

    @property
    def base(self) -> str:
        """The base name, ``{size}-{variant}``."""
        return f"{self.size}-{self.variant}"

    @property
    def name(self) -> str:
        """The cell's folder name, ``{group}__{method}``."""
        return f"{self.group}__{self.method}"

    @property
    def path_in_repo(self) -> str:
        """Where the cell goes in the Hub results repo."""
        return f"{self.base}/{self.name}"


def _key(path: Iterable[Any]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<top level>"


def _extend_with_default(validator_class):
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _extend_with_default(jsonschema.Draft202012Validator)


def _schema(path: Path | None = None) -> dict:
    return yaml.safe_load((path or SCHEMA_PATH).read_text())


def validate_schema(config: dict, source: str = "config", schema: Path | None = None) -> dict:
    """Validate ``config`` in place against the JSON schema, filling defaults.

    Defaults of nested objects are filled in two passes (a defaulted ``{}`` gets its own
    defaults on the second). Raises :class:`ConfigError` naming the first bad key.
    """
    validator = _Validator(_schema(schema))
    for _ in range(2):
        errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
        if errors:
            e = min(errors, key=lambda e: len(list(e.absolute_path)))
            best = jsonschema.exceptions.best_match([e])
            where = _key(best.absolute_path)
            msg = best.message
            if best.validator == "additionalProperties":
                msg += " (unknown key: check the spelling against schemas/config.schema.yaml)"
            elif best.validator == "pattern" or (
                best.validator == "propertyNames" or "does not match" in msg
            ):
                msg += " (names must match [a-z0-9][a-z0-9._-]*: they become paths)"
            raise ConfigError(f"{source}: key {where!r}: {msg}")
    return config


def load_config(
    config: Mapping[str, Any] | str | Path,
    *,
    workflow_dir: Path | None = None,
    source: str | None = None,
) -> dict:
    """Validate a config (mapping or YAML path) and return it with defaults filled.

    ``workflow_dir`` holds ``schemas/config.schema.yaml`` and ``recipes/`` (default: the
    checkout this package was installed from, else the working directory).

    Raises :class:`ConfigError` naming the key at fault for: schema violations (unknown
    keys, bad names, wrong types), grid blocks naming unknown sizes/variants/groups/
    methods, a cell whose base or adapters are not configured, a duplicate cell, parameters
    out of range or naming adapters outside the groups of the method, recipe files that are
    missing or have placeholders no parameter fills, an ``eval.batch_size`` lm-eval does not
    accept (not a positive integer, ``auto`` or ``auto:N``), ``eval.backend: vllm`` with
    ``device: cpu``.
    """
    if isinstance(config, (str, Path)):
        source = source or str(config)
        try:
            data = yaml.safe_load(Path(config).read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"{config}: config file not found") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{config}: not valid YAML: {e}") from e
    else:
        data = copy.deepcopy(dict(config))
    source = source or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a mapping of keys")
    wf = Path(workflow_dir) if workflow_dir else ROOT
    validate_schema(data, source, wf / "schemas" / "config.schema.yaml")
    _check_semantics(data, source, wf / "recipes")
    return data


def _no_double_underscore(name: str, key: str, source: str) -> None:
    if "__" in name:
        raise ConfigError(
            f"{source}: key {key!r}: name {name!r} contains '__', which separates "
            "group and method in cell names; use another name"
        )


def _block_cells(block: Mapping[str, Any], config: Mapping[str, Any]) -> Iterable[Cell]:
    """Every cell a block spans before its exclusions (methods expanded to sweep points)."""
    for size in block["sizes"]:
        for variant in block["variants"]:
            for group in block["groups"]:
                for method in block["methods"]:
                    for point in method_points(config, method):
                        yield Cell(size, variant, group, point.name)


def excluded(cell: Cell, patterns: Iterable[str]) -> bool:
    """Whether ``cell`` matches one of a block's ``exclude:`` patterns (:func:`fnmatch.
    fnmatchcase` over ``<size>-<variant>/<group>__<method>``, the method a sweep point's
    name, e.g. ``27b-open/*`` or ``*/eng-nob__ties.density-0.7``)."""
    return any(fnmatch.fnmatchcase(cell.path_in_repo, p) for p in patterns)


def grid_cells(config: Mapping[str, Any]) -> list[tuple[Cell, int]]:
    """``(cell, block index)`` of every cell of the grid in config order (block by block,
    sizes × variants × groups × methods × sweep points), exclusions left out. Assumes a
    validated config."""
    out: list[tuple[Cell, int]] = []
    for i, block in enumerate(config["grid"]):
        patterns = block.get("exclude") or []
        out += [(c, i) for c in _block_cells(block, config) if not excluded(c, patterns)]
    return out


def expand_grid(config: Mapping[str, Any]) -> list[Cell]:
    """All cells of the grid in config order (block by block, sizes × variants × groups ×
    methods × sweep points, exclusions left out). Assumes a validated config."""
    return [c for c, _ in grid_cells(config)]


def gguf_types(config: Mapping[str, Any]) -> dict[Cell, list[str]]:
    """The GGUF types each cell is exported to (:mod:`mergebake.export`), in config order.

    A grid block's ``export.gguf`` replaces the global ``export.gguf`` for the block's
    cells (``[]`` turns export off for them; sweep points are cells of their own, excluded
    cells have none); a block without one uses the global list. Cells with no type are
    left out. Assumes a validated config (defaults filled).
    """
    default = list((config.get("export") or {}).get("gguf") or [])
    out: dict[Cell, list[str]] = {}
    for cell, i in grid_cells(config):  # sweep points and exclusions as the grid has them
        block_export = config["grid"][i].get("export") or {}
        types = list(block_export["gguf"]) if "gguf" in block_export else default
        if types:
            out[cell] = types
    return out


def check_export_config(config: Mapping[str, Any], source: str = "config") -> None:
    """Config-time checks of ``export`` that the schema cannot express.

    ``export.gguf_repo`` must be ``owner/name``, differ from ``hub.repo`` (leave it null to
    put the GGUF files with their cells) and have GGUF files to hold. Whether llama.cpp can
    convert each base's family is checked before any job, in the preflight
    (:func:`mergebake.preflight.check_gguf_support`). Raises :class:`ConfigError` naming
    the key.
    """
    export = config.get("export") or {}
    repo = export.get("gguf_repo")
    if repo is None:
        return
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*", repo):
        raise ConfigError(
            f"{source}: key 'export.gguf_repo': {repo!r} is not a Hub repo id; write owner/name"
        )
    if repo == (config.get("hub") or {}).get("repo"):
        raise ConfigError(
            f"{source}: key 'export.gguf_repo': {repo!r} is hub.repo; set it to null to "
            "upload the GGUF files with their cells, or name a separate repo"
        )
    if not gguf_types(config):
        raise ConfigError(
            f"{source}: key 'export.gguf_repo' is set but no cell is exported to GGUF; "
            "list types under export.gguf (or a grid block's export.gguf), or drop it"
        )


def _check_semantics(config: dict, source: str, recipes_dir: Path) -> None:
    for kind in ("groups", "methods"):
        for name in config[kind]:
            _no_double_underscore(name, f"{kind}.{name}", source)
    for base in config["bases"]:
        for ad in config.get("adapters", {}).get(base, {}):
            _no_double_underscore(ad, f"adapters.{base}.{ad}", source)
    _check_sweeps(config, source, recipes_dir)
    _check_checkpoints(config, source)
    seen: dict[Cell, int] = {}
    for i, block in enumerate(config["grid"]):
        for kind in ("groups", "methods"):
            for name in block[kind]:
                if name not in config[kind]:
                    known = ", ".join(sorted(config[kind]))
                    raise ConfigError(
                        f"{source}: key 'grid[{i}].{kind}': unknown {kind[:-1]} "
                        f"{name!r}; define it under '{kind}' (known: {known})"
                    )
        patterns = block.get("exclude") or []
        matched: set[str] = set()
        for cell in _block_cells(block, config):
            hits = {p for p in patterns if fnmatch.fnmatchcase(cell.path_in_repo, p)}
            if hits:
                matched |= hits
                continue
            base = cell.base
            if base not in config["bases"]:
                raise ConfigError(
                    f"{source}: key 'grid[{i}]': base {base!r} (size {cell.size!r} × variant "
                    f"{cell.variant!r}) is not in 'bases'; add bases.{base}, drop it from "
                    f"the block, or leave it out with grid[{i}].exclude: ['{base}/*']"
                )
            for member in config["groups"][cell.group]:
                ad, _ = split_member(member)
                if ad not in config.get("adapters", {}).get(base, {}):
                    raise ConfigError(
                        f"{source}: key 'groups.{cell.group}': adapter {ad!r} is not "
                        f"configured for base {base!r}; add adapters.{base}.{ad}"
                    )
                _check_member(config, source, cell.group, member, base)
            if cell in seen:
                raise ConfigError(
                    f"{source}: key 'grid[{i}]': cell {cell.path_in_repo} is "
                    f"already in grid[{seen[cell]}]; each cell may appear once"
                )
            seen[cell] = i
        for j, p in enumerate(patterns):
            if p not in matched:
                warnings.warn(
                    f"{source}: key 'grid[{i}].exclude[{j}]': pattern {p!r} matches no cell "
                    "of the block (patterns match <size>-<variant>/<group>__<method>)",
                    ConfigWarning,
                    stacklevel=2,
                )
    for base in config.get("adapters", {}):
        if base not in config["bases"]:
            raise ConfigError(
                f"{source}: key 'adapters.{base}': no base {base!r} in 'bases'; "
                "add it there or remove these adapters"
            )
    points = all_method_points(config)
    groups_of: dict[str, set[str]] = {}
    for cell in seen:
        groups_of.setdefault(points[cell.method].method, set()).add(cell.group)
    for mname, method in config["methods"].items():
        if method_space(method) == "adapter":
            _check_adapter_method(mname, method, groups_of.get(mname, set()), config, source)
            continue
        if "combination_type" in method:
            raise ConfigError(
                f"{source}: key 'methods.{mname}.combination_type' is a PEFT option of "
                "adapter-space methods; add 'space: adapter' or remove it"
            )
        recipe = recipe_path(method, mname, recipes_dir)
        if not recipe.is_file():
            raise ConfigError(
                f"{source}: key 'methods.{mname}.recipe': no recipe file {recipe}; "
                f"available: {sorted(p.stem for p in recipes_dir.glob('*.yaml'))}"
            )
        for point in method_points(config, mname):
            where = f" (sweep point {point.name!r})" if point.sweep else ""
            merged = dict(method, parameters=point.parameters(config))
            try:
                _check_parameters(
                    mname, merged, groups_of.get(mname, set()), config, source, recipe
                )
            except ConfigError as e:
                raise ConfigError(f"{e}{where}") from None
            for group in sorted(groups_of.get(mname, ())):
                adapters = [split_member(a)[0] for a in config["groups"][group]]
                try:
                    render_recipe(
                        recipe,
                        base_model="/base",
                        models={a: f"/{a}" for a in adapters},
                        parameters=merged["parameters"],
                        dtype="bfloat16",
                    )
                except ConfigError as e:
                    raise ConfigError(
                        f"{source}: key 'methods.{mname}' with group {group!r}{where}: {e}"
                    ) from None
    baseline = config["report"]["baseline"]
    if baseline != "base":
        every = {a for ads in config.get("adapters", {}).values() for a in ads}
        if baseline not in every:
            raise ConfigError(
                f"{source}: key 'report.baseline': {baseline!r} is neither 'base' "
                f"nor an adapter name ({sorted(every)})"
            )
    names = [t["name"] for t in config["eval"]["tasks"]]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"{source}: key 'eval.tasks': task(s) {sorted(dup)} listed twice")
    _check_block_tasks(config, source)
    _check_eval_backend(config, source)
    _check_selection_metrics(config, source, seen)
    check_oracle_config(config, source)
    check_export_config(config, source)
    _check_cache(config, source)


def _check_cache(config: Mapping[str, Any], source: str) -> None:
    """``cache.dir`` may not be an existing file (the eval cache is a folder)."""
    folder = (config.get("cache") or {}).get("dir")
    if folder and Path(folder).expanduser().is_file():
        raise ConfigError(
            f"{source}: key 'cache.dir': {folder} is a file; point it at a folder (created "
            "when missing), or leave it null for $MERGEBAKE_CACHE / ~/.cache/mergebake"
        )


def _check_eval_backend(config: dict, source: str) -> None:
    """``eval.batch_size``, ``eval.backend`` and ``eval.vllm`` against each other and the
    device (:func:`mergebake.eval_backend.config_notes`); what only the machine running the
    eval can tell (vLLM installed, a GPU visible) is checked by the eval job itself."""
    from .eval_backend import BackendError, config_notes

    try:
        notes = config_notes(config["eval"], config["device"])
    except BackendError as e:
        raise ConfigError(f"{source}: {e}") from None
    for note in notes:
        warnings.warn(f"{source}: {note}", ConfigWarning, stacklevel=3)


def _check_sweeps(config: dict, source: str, recipes_dir: Path) -> None:
    """Each sweep value in range (:func:`mergebake.methods.check_parameters`), each point's
    name path-safe, and no two points of a method named alike."""
    for mname, method in config["methods"].items():
        sweep = method.get("sweep") or {}
        spec = methods.get(recipe_method(recipe_path(method, mname, recipes_dir)) or "")
        for pname, values in sweep.items():
            for j, v in enumerate(values):
                key = f"methods.{mname}.sweep.{pname}[{j}]"
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f"{source}: key {key!r}: {v} is not a finite number")
                if spec is not None:
                    try:
                        methods.check_parameters(spec, {pname: v}, f"methods.{mname}.sweep")
                    except MergebakeError as e:
                        msg = str(e).replace(f"sweep.{pname}", f"sweep.{pname}[{j}]", 1)
                        raise ConfigError(f"{source}: {msg}") from None
        names: dict[str, tuple] = {}
        for point in method_points(config, mname):
            if not _NAME.match(point.name) or "__" in point.name:
                raise ConfigError(
                    f"{source}: key 'methods.{mname}.sweep': the point {dict(point.sweep)} "
                    f"would be named {point.name!r}, which is not path-safe (names match "
                    "[a-z0-9][a-z0-9._-]* without '__'); use plain numbers or lower-case "
                    "strings as sweep values"
                )
            if point.name in names:
                raise ConfigError(
                    f"{source}: key 'methods.{mname}.sweep': the points "
                    f"{dict(names[point.name])} and {dict(point.sweep)} would both be named "
                    f"{point.name!r}; give each value once"
                )
            names[point.name] = point.sweep
        clash = set(names) & (set(config["methods"]) - {mname})
        if clash:
            raise ConfigError(
                f"{source}: key 'methods.{mname}.sweep': point name(s) {sorted(clash)} "
                "are also method names; rename the method"
            )


def _check_checkpoints(config: dict, source: str) -> None:
    """Each adapter with ``checkpoints`` has the ``{checkpoint}`` placeholder where its
    checkpoints are (Hub ``subfolder`` or local ``path``; a demo adapter saves them itself,
    within its training steps); ``select`` and a placeholder need ``checkpoints``; every
    group names each adapter once."""
    from .demo import DEFAULT_STEPS

    for base, ads in config.get("adapters", {}).items():
        for ad, entry in ads.items():
            key = f"adapters.{base}.{ad}"
            steps = entry.get("checkpoints")
            where = (
                ("hub.subfolder", (entry["hub"].get("subfolder") or ""))
                if "hub" in entry
                else ("path", entry["path"])
                if "path" in entry
                else None
            )
            has = where is not None and CHECKPOINT_PLACEHOLDER in where[1]
            if steps and where is not None and not has:
                raise ConfigError(
                    f"{source}: key '{key}.{where[0]}': {where[1]!r} has no {{checkpoint}} "
                    f"placeholder, but {key}.checkpoints lists {steps}; write where each "
                    "checkpoint is, e.g. 'adapters/checkpoint-{checkpoint}'"
                )
            if has and not steps:
                raise ConfigError(
                    f"{source}: key '{key}.{where[0]}': {where[1]!r} has a {{checkpoint}} "
                    f"placeholder but {key} lists no checkpoints; add {key}.checkpoints"
                )
            if steps and "demo" in entry and max(steps) > DEFAULT_STEPS:
                raise ConfigError(
                    f"{source}: key '{key}.checkpoints': a demo adapter trains "
                    f"{DEFAULT_STEPS} steps; list checkpoints from 1 to {DEFAULT_STEPS}"
                )
            if "select" in entry and not steps:
                raise ConfigError(
                    f"{source}: key '{key}.select': the adapter has no checkpoints to "
                    f"select from; add {key}.checkpoints or drop select"
                )
    for group, members in config["groups"].items():
        names = [split_member(m)[0] for m in members]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(
                f"{source}: key 'groups.{group}': adapter(s) {dup} named more than once "
                "(a group merges one checkpoint of each adapter)"
            )


def _check_member(config: dict, source: str, group: str, member: str, base: str) -> None:
    """A group member fits its adapter on ``base``: ``@best`` needs ``select``, ``@N`` a
    declared checkpoint N, and a checkpointed adapter must be named with one of them."""
    ad, step = split_member(member)
    entry = config["adapters"][base][ad]
    key = f"groups.{group}"
    steps = entry.get("checkpoints") or []
    if step is None and steps:
        raise ConfigError(
            f"{source}: key {key!r}: adapter {ad!r} of base {base!r} has checkpoints "
            f"{steps}; name one: {ad}@best (with adapters.{base}.{ad}.select) or "
            f"{ad}@{steps[-1]}"
        )
    if step == BEST and "select" not in entry:
        raise ConfigError(
            f"{source}: key {key!r}: {member!r} needs adapters.{base}.{ad}.select "
            "(metric and mode) to pick the best checkpoint; add it or name a checkpoint"
        )
    if step not in (None, BEST) and int(step) not in steps:
        raise ConfigError(
            f"{source}: key {key!r}: {member!r} names checkpoint {step}, which "
            f"adapters.{base}.{ad}.checkpoints does not declare ({steps or 'none'})"
        )


def _check_selection_metrics(config: dict, source: str, cells: Iterable[Cell]) -> None:
    """A ``select.metric`` names a task the adapter's base is scored on (the union of its
    cells' tasks), and checkpoint rows are scored at all (``eval.baselines``)."""
    tasks: dict[str, set[str]] = {}
    blocks = dict(grid_cells(config))
    for cell in cells:
        block = config["grid"][blocks[cell]]
        tasks.setdefault(cell.base, set()).update(t["name"] for t in block_tasks(config, block))
    for base, ads in config.get("adapters", {}).items():
        for ad, entry in ads.items():
            if "select" not in entry or base not in tasks:
                continue
            key = f"adapters.{base}.{ad}.select.metric"
            if not config["eval"]["baselines"]:
                raise ConfigError(
                    f"{source}: key '{key}': checkpoints are selected on their baseline "
                    "scores but eval.baselines is false; set it to true"
                )
            task = entry["select"]["metric"].rpartition("/")[0]
            if task not in tasks[base]:
                raise ConfigError(
                    f"{source}: key '{key}': task {task!r} is not scored on base {base!r} "
                    f"(its tasks: {sorted(tasks[base])}); name one of them"
                )


def _check_block_tasks(config: dict, source: str) -> None:
    """A block's own tasks are not listed twice, and a task has one few-shot everywhere
    (a base's baselines are scored once on the union of its cells' tasks)."""
    fewshot = {t["name"]: ("eval.tasks", t["num_fewshot"]) for t in config["eval"]["tasks"]}
    for i, block in enumerate(config["grid"]):
        own = block.get("eval") or {}
        for kind in ("tasks", "add"):
            key = f"grid[{i}].eval.{kind}"
            tasks = own.get(kind, [])
            names = [t["name"] for t in tasks]
            dup = {n for n in names if names.count(n) > 1}
            if kind == "add":
                dup |= {n for n in names if n in {t["name"] for t in config["eval"]["tasks"]}}
            if dup:
                raise ConfigError(
                    f"{source}: key {key!r}: task(s) {sorted(dup)} listed twice (or already "
                    "in eval.tasks); list each task once"
                )
            for t in tasks:
                first = fewshot.setdefault(t["name"], (key, t["num_fewshot"]))
                if first[1] != t["num_fewshot"]:
                    raise ConfigError(
                        f"{source}: key {key!r}: task {t['name']!r} has num_fewshot "
                        f"{t['num_fewshot']} but {first[1]} in {first[0]}; a base's baselines "
                        "are scored once on every task its cells use, so give it one few-shot"
                    )


def check_oracle_config(config: Mapping[str, Any], source: str = "config") -> None:
    """Config-time check of ``report.oracle``, before any eval job runs.

    Every mapped row must be a single-adapter row of every base of the grid (an adapter
    some cell of that base merges), and single-adapter rows must be evaluated
    (``eval.baselines``). Raises :class:`ConfigError` naming ``report.oracle.<task>``
    (or ``eval.baselines``). ``config`` is the validated config (defaults filled).
    """
    oracle = (config.get("report") or {}).get("oracle") or {}
    if not oracle:
        return
    if not config["eval"]["baselines"]:
        raise ConfigError(
            f"{source}: key 'report.oracle' is set but eval.baselines is false: the oracle "
            "rows are the single-adapter baselines; set eval.baselines: true or drop "
            "report.oracle"
        )
    adapters: dict[str, set[str]] = {}
    for c in expand_grid(config):
        adapters.setdefault(c.base, set()).update(config["groups"][c.group])
    for task, name in oracle.items():
        for base, names in sorted(adapters.items()):
            if name not in names:
                raise ConfigError(
                    f"{source}: key 'report.oracle.{task}': {name!r} is not an adapter of "
                    f"base {base!r} (its cells merge {sorted(names)}); name an adapter every "
                    "base has"
                )


def _check_parameters(
    mname: str, method: dict, groups: set[str], config: dict, source: str, recipe: Path
) -> None:
    allowed = {split_member(a)[0] for g in groups for a in config["groups"][g]}
    for pname, value in method.get("parameters", {}).items():
        key = f"methods.{mname}.parameters.{pname}"
        values = value.items() if isinstance(value, dict) else [(None, value)]
        for adapter, v in values:
            k = key if adapter is None else f"{key}.{adapter}"
            if adapter is not None and groups and adapter not in allowed:
                raise ConfigError(
                    f"{source}: key {k!r}: adapter {adapter!r} is not in the group(s) "
                    f"{sorted(groups)} that use method {mname!r} (adapters: {sorted(allowed)})"
                )
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{source}: key {k!r}: {v} is not a finite number")
    spec = methods.get(recipe_method(recipe) or "")
    if spec is None:
        return
    try:
        methods.check_parameters(spec, method.get("parameters", {}), f"methods.{mname}.parameters")
    except MergebakeError as e:
        raise ConfigError(f"{source}: {e}") from None
    lo, hi = spec.adapters
    for group in sorted(groups):
        n = len(config["groups"][group])
        if n < lo or (hi is not None and n > hi):
            want = f"{lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
            raise ConfigError(
                f"{source}: key 'methods.{mname}': {spec.name} merges {want} adapter(s) "
                f"but group {group!r} has {n}; use it with another group"
            )


def method_space(method: Mapping[str, Any]) -> str:
    """``weight`` (bake each adapter, then mergekit) or ``adapter`` (PEFT's
    ``add_weighted_adapter`` over the adapters, then one bake) of a method's config."""
    return method.get("space") or "weight"


def _check_adapter_method(
    mname: str, method: dict, groups: set[str], config: dict, source: str
) -> None:
    """Config-time checks of an adapter-space method (``space: adapter``): a PEFT
    ``combination_type``, no recipe, only options that type uses (a per-adapter value only
    for ``weight``, naming adapters of the method's groups), values in range, and the
    options the type requires (``density`` for the pruning types). What needs the adapters
    themselves (equal ranks, target kinds) is :func:`mergebake.preflight.check_adapter_cells`.
    """
    key = f"methods.{mname}"
    if "recipe" in method:
        raise ConfigError(
            f"{source}: key '{key}.recipe': an adapter-space method has no mergekit recipe; "
            "remove it (the merge is PEFT's add_weighted_adapter with combination_type)"
        )
    if "combination_type" not in method:
        raise ConfigError(
            f"{source}: key '{key}.combination_type' is required with space: adapter; "
            f"choose one of {', '.join(methods.ADAPTER_METHODS)}"
        )
    try:
        spec = methods.adapter_method(method["combination_type"], f"{key}.combination_type")
    except MergebakeError as e:
        raise ConfigError(f"{source}: {e}") from None
    params = method.get("parameters", {})
    allowed = {a for g in groups for a in config["groups"][g]}
    for pname, value in params.items():
        k = f"{key}.parameters.{pname}"
        p = spec.param(pname)
        if p is None:
            raise ConfigError(
                f"{source}: key {k!r}: combination_type {spec.name!r} does not use {pname!r} "
                f"(its options: {', '.join(q.name for q in spec.params)}); remove it"
            )
        if isinstance(value, dict):
            for adapter in value:
                if groups and adapter not in allowed:
                    raise ConfigError(
                        f"{source}: key '{k}.{adapter}': adapter {adapter!r} is not in the "
                        f"group(s) {sorted(groups)} that use method {mname!r} "
                        f"(adapters: {sorted(allowed)})"
                    )
            if p.scope == "model":
                for group in sorted(groups):
                    missing = [a for a in config["groups"][group] if a not in value]
                    if missing:
                        raise ConfigError(
                            f"{source}: key {k!r}: no value for adapter(s) {missing} of group "
                            f"{group!r}; give one per adapter or a single number"
                        )
        for v in value.values() if isinstance(value, dict) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{source}: key {k!r}: {v} is not a finite number")
    for p in spec.params:
        if p.required and p.name not in params:
            raise ConfigError(
                f"{source}: key '{key}.parameters.{p.name}' is required by combination_type "
                f"{spec.name!r} ({p.doc}); set it, e.g. {p.name}: 0.2"
            )
    try:
        methods.check_parameters(spec, params, f"{key}.parameters")
    except MergebakeError as e:
        raise ConfigError(f"{source}: {e}") from None
    for pname, values in (method.get("sweep") or {}).items():
        p = spec.param(pname)
        if p is None:
            raise ConfigError(
                f"{source}: key '{key}.sweep.{pname}': combination_type {spec.name!r} does not "
                f"use {pname!r} (its options: {', '.join(q.name for q in spec.params)})"
            )
        for i, v in enumerate(values):
            try:
                methods.check_parameters(spec, {pname: v}, f"{key}.sweep")
            except MergebakeError as e:
                raise ConfigError(f"{source}: {e} (value {i} of {key}.sweep.{pname})") from None
    for group in sorted(groups):
        members = [a for a in config["groups"][group] if "@" in a]
        if members:
            raise ConfigError(
                f"{source}: key 'groups.{group}': adapter-space method {mname!r} merges adapter "
                f"folders, not checkpoint rows such as {members[0]!r}; name a fixed "
                "checkpoint's adapter under 'adapters' or use a weight-space method"
            )


def adapter_options(config: Mapping[str, Any], cell: Cell) -> dict[str, Any]:
    """Keyword arguments of :func:`mergebake.adapter_merge.merge_adapters` (and
    ``check_adapters``) for an adapter-space cell: ``combination_type``, ``weights``
    (``{adapter: float}`` in group order; a scalar applies to every adapter; default 1.0)
    and each option the type uses, its table default where the config gives none."""
    method = config["methods"][all_method_points(config)[cell.method].method]
    spec = methods.adapter_method(method["combination_type"])
    params = cell_parameters(config, cell)
    adapters = config["groups"][cell.group]
    w = params.get("weight", 1.0)
    out: dict[str, Any] = {
        "combination_type": spec.name,
        "weights": {a: float(w[a] if isinstance(w, dict) else w) for a in adapters},
    }
    for p in spec.params:
        if p.name != "weight":
            out[p.name] = params.get(p.name, p.default)
    return out


def recipe_method(recipe: Path) -> str | None:
    """The ``merge_method`` of a recipe template, or ``None`` if it cannot be read."""
    try:
        doc = yaml.safe_load(Path(recipe).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return doc.get("merge_method") if isinstance(doc, dict) else None


def recipe_path(
    method: Mapping[str, Any], method_name: str, recipes_dir: Path | None = None
) -> Path:
    """``recipes/<recipe>.yaml`` for a method (recipe defaults to the method's name)."""
    return (recipes_dir or RECIPES_DIR) / f"{method.get('recipe', method_name)}.yaml"


def cell_parameters(config: Mapping[str, Any], cell: Cell) -> dict[str, Any]:
    """The method parameters of ``cell`` (its sweep point's values in place), per-adapter
    mappings restricted to its group (members by adapter name: ``eng@best`` is ``eng``)."""
    adapters = [split_member(a)[0] for a in config["groups"][cell.group]]
    params = all_method_points(config)[cell.method].parameters(config)
    out: dict[str, Any] = {}
    for k, v in params.items():
        out[k] = {a: v[a] for a in adapters if a in v} if isinstance(v, dict) else v
    return out


def _placeholders(obj: Any) -> set[str]:
    if isinstance(obj, str):
        return set(_PLACEHOLDER.findall(obj))
    if isinstance(obj, dict):
        return set().union(*(_placeholders(v) for v in obj.values())) if obj else set()
    if isinstance(obj, list):
        return set().union(*(_placeholders(v) for v in obj)) if obj else set()
    return set()


def _substitute(obj: Any, values: Mapping[str, Any], recipe: Path) -> Any:
    if isinstance(obj, dict):
        return {k: _substitute(v, values, recipe) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_substitute(v, values, recipe) for v in obj]
    if isinstance(obj, str):
        whole = _PLACEHOLDER.fullmatch(obj)
        if whole:  # keep the value's type: a float stays a float, a bool a bool
            return values[whole.group(1)]
        return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), obj)
    return obj


def render_recipe(
    template: Path,
    *,
    base_model: str,
    models: Mapping[str, str],
    parameters: Mapping[str, Any],
    dtype: str,
) -> dict[str, Any]:
    """Render a mergekit recipe template for one cell.

    ``template`` is a mergekit YAML whose strings may hold ``${name}`` placeholders. A
    parameter's default comes from the method table (:mod:`mergebake.methods`, by the
    recipe's ``merge_method``), then from an optional top-level ``defaults:`` mapping (for
    a recipe of one's own; removed from the output), then from ``parameters``.
    Placeholders: ``base_model`` (path), ``dtype``, every method parameter, and,
    inside a ``models`` entry that uses ``${model}``, ``model``/``adapter`` and per-adapter
    parameters (a parameter given as ``{adapter: value}``) — that entry is repeated once
    per adapter, in group order. ``model_0``, ``adapter_0``, ... address adapters by
    position (e.g. SLERP's two endpoints). A placeholder that is a whole string keeps the
    value's YAML type.

    Raises :class:`ConfigError` naming the template for: an unreadable template, an
    unknown placeholder, a parameter the template never uses, a per-adapter parameter
    missing an adapter, or a per-adapter parameter used outside the per-model entry.
    """
    try:
        doc = yaml.safe_load(Path(template).read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{template}: recipe file not found") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{template}: not valid YAML: {e}") from e
    if not isinstance(doc, dict) or "merge_method" not in doc:
        raise ConfigError(f"{template}: a recipe is a mergekit YAML with merge_method")
    table = methods.get(str(doc["merge_method"]))
    defaults = {**(table.defaults if table else {}), **(doc.pop("defaults", None) or {})}
    params = {**defaults, **parameters}
    names = list(models)
    scalars = {k: v for k, v in params.items() if not isinstance(v, dict)}
    per_adapter = {k: v for k, v in params.items() if isinstance(v, dict)}
    values: dict[str, Any] = {"base_model": base_model, "dtype": dtype, **scalars}
    for i, name in enumerate(names):
        values[f"model_{i}"] = models[name]
        values[f"adapter_{i}"] = name
    used: set[str] = set()

    def check(obj: Any, allowed: set[str], where: str) -> None:
        for ph in _placeholders(obj):
            used.add(ph)
            if ph in allowed:
                continue
            if ph in per_adapter:
                raise ConfigError(
                    f"{template}: placeholder ${{{ph}}} in {where} is given per "
                    "adapter but is only allowed in the per-model entry"
                )
            m = _INDEXED.match(ph)
            if m and int(m.group(2)) >= len(names):
                raise ConfigError(
                    f"{template}: placeholder ${{{ph}}} needs at least "
                    f"{int(m.group(2)) + 1} adapters; the group has {len(names)}"
                )
            raise ConfigError(
                f"{template}: unknown placeholder ${{{ph}}} in {where}; give it under the "
                "method's parameters or the recipe's defaults (built-ins: "
                f"{', '.join(sorted(BUILTIN_PLACEHOLDERS))}, model_N, adapter_N)"
            )

    out: dict[str, Any] = {}
    for key, val in doc.items():
        if key == "models" and isinstance(val, list):
            entries = []
            for entry in val:
                if "model" in _placeholders(entry):
                    for name in names:
                        vals = dict(values, model=models[name], adapter=name)
                        for p, mapping in per_adapter.items():
                            if name in mapping:
                                vals[p] = mapping[name]
                        allowed = set(vals)
                        missing = [
                            p
                            for p in per_adapter
                            if p in _placeholders(entry) and name not in per_adapter[p]
                        ]
                        if missing:
                            raise ConfigError(
                                f"{template}: parameter {missing[0]!r} is given per "
                                f"adapter but has no value for {name!r}"
                            )
                        check(entry, allowed, "models")
                        entries.append(_substitute(entry, vals, template))
                else:
                    check(entry, set(values), "models")
                    entries.append(_substitute(entry, values, template))
            out[key] = entries
        else:
            check(val, set(values), key)
            out[key] = _substitute(val, values, template)
    expanded = any("model" in _placeholders(e) for e in doc.get("models") or [])
    indexed = {int(m.group(2)) for ph in used if (m := _INDEXED.match(ph))}
    if not expanded and len(indexed) != len(names):
        raise ConfigError(
            f"{template}: the recipe takes {len(indexed)} adapter(s) by position "
            f"but the group has {len(names)}; use a group of that size"
        )
    unused = sorted(set(parameters) - used)
    if unused:
        raise ConfigError(
            f"{template}: parameter(s) {unused} are not used by this recipe "
            "(misspelt?); remove them or add a ${...} placeholder for them"
        )
    return out
