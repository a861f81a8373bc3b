"""The config: validation against ``schemas/config.schema.yaml``, grid expansion, recipes.

``load_config`` validates a config mapping with JSON schema (filling defaults), then runs
the checks a schema cannot express: every grid block names known sizes/variants/groups/
methods, every cell's base and adapters are configured, no cell appears twice, method
parameters are in range and only name adapters of the groups they are used with, and
every cell's recipe renders. All errors are :class:`ConfigError` naming the config key.
"""

from __future__ import annotations

import copy
import math
import re
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
    missing or have placeholders no parameter fills.
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


def expand_grid(config: Mapping[str, Any]) -> list[Cell]:
    """All cells of the grid in config order (block by block, sizes × variants × groups ×
    methods). Assumes a validated config."""
    cells: list[Cell] = []
    for block in config["grid"]:
        for size in block["sizes"]:
            for variant in block["variants"]:
                for group in block["groups"]:
                    for method in block["methods"]:
                        cells.append(Cell(size, variant, group, method))
    return cells


def _check_semantics(config: dict, source: str, recipes_dir: Path) -> None:
    for kind in ("groups", "methods"):
        for name in config[kind]:
            _no_double_underscore(name, f"{kind}.{name}", source)
    for base in config["bases"]:
        for ad in config.get("adapters", {}).get(base, {}):
            _no_double_underscore(ad, f"adapters.{base}.{ad}", source)
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
        for size in block["sizes"]:
            for variant in block["variants"]:
                base = f"{size}-{variant}"
                if base not in config["bases"]:
                    raise ConfigError(
                        f"{source}: key 'grid[{i}]': base {base!r} (size {size!r} × variant "
                        f"{variant!r}) is not in 'bases'; add bases.{base} or drop it from "
                        "the block"
                    )
                for group in block["groups"]:
                    for ad in config["groups"][group]:
                        if ad not in config.get("adapters", {}).get(base, {}):
                            raise ConfigError(
                                f"{source}: key 'groups.{group}': adapter {ad!r} is not "
                                f"configured for base {base!r}; add adapters.{base}.{ad}"
                            )
                    for method in block["methods"]:
                        cell = Cell(size, variant, group, method)
                        if cell in seen:
                            raise ConfigError(
                                f"{source}: key 'grid[{i}]': cell {cell.path_in_repo} is "
                                f"already in grid[{seen[cell]}]; each cell may appear once"
                            )
                        seen[cell] = i
    for base in config.get("adapters", {}):
        if base not in config["bases"]:
            raise ConfigError(
                f"{source}: key 'adapters.{base}': no base {base!r} in 'bases'; "
                "add it there or remove these adapters"
            )
    groups_of: dict[str, set[str]] = {}
    for cell in seen:
        groups_of.setdefault(cell.method, set()).add(cell.group)
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
        _check_parameters(mname, method, groups_of.get(mname, set()), config, source, recipe)
        for group in sorted(groups_of.get(mname, ())):
            adapters = config["groups"][group]
            try:
                render_recipe(
                    recipe,
                    base_model="/base",
                    models={a: f"/{a}" for a in adapters},
                    parameters=method.get("parameters", {}),
                    dtype="bfloat16",
                )
            except ConfigError as e:
                raise ConfigError(
                    f"{source}: key 'methods.{mname}' with group {group!r}: {e}"
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
    check_oracle_config(config, source)


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
    allowed = {a for g in groups for a in config["groups"][g]}
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


def adapter_options(config: Mapping[str, Any], cell: Cell) -> dict[str, Any]:
    """Keyword arguments of :func:`mergebake.adapter_merge.merge_adapters` (and
    ``check_adapters``) for an adapter-space cell: ``combination_type``, ``weights``
    (``{adapter: float}`` in group order; a scalar applies to every adapter; default 1.0)
    and each option the type uses, its table default where the config gives none."""
    method = config["methods"][cell.method]
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
    """The method parameters of ``cell``, per-adapter mappings restricted to its group."""
    adapters = config["groups"][cell.group]
    params = config["methods"][cell.method].get("parameters", {})
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
