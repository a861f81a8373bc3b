"""Config validation: defaults, grid expansion and the exact error for each bad config."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from mergebake.config import (
    RECIPES_DIR,
    Cell,
    ConfigError,
    cell_parameters,
    expand_grid,
    load_config,
    render_recipe,
)
from mergebake.methods import METHODS

ROOT = Path(__file__).resolve().parents[2]
DEMO = yaml.safe_load((ROOT / "config.yaml").read_text())


def cfg(**changes):
    c = copy.deepcopy(DEMO)
    for dotted, value in changes.items():
        keys = dotted.split("__")
        node = c
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        if value is DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    return c


DELETE = object()


def test_demo_config_expands_to_the_14_cell_grid_plus_two_adapter_space_cells():
    c = load_config(ROOT / "config.yaml")
    cells = expand_grid(c)
    assert len(cells) == 16
    assert len(set(cells)) == 16
    assert sorted(c.base for c in cells if c.method == "ties-adapter") == ["1b-open", "1b-std"]
    assert {c.base for c in cells} == {
        "1b-std",
        "1b-open",
        "4b-std",
        "4b-open",
        "12b-std",
        "12b-open",
    }
    assert sorted(c.method for c in cells if c.size == "12b") == ["ties", "ties"]
    assert Cell("4b", "open", "eng-nob", "ties").path_in_repo == "4b-open/eng-nob__ties"
    # defaults filled from the schema
    assert c["bake"] == {"engine": "stream", "device": "cpu", "strict_base_match": False}
    assert c["device"] == "auto"
    assert c["allow_pickle"] is False and c["trust_remote_code"] is False
    assert c["merge"]["dtype"] is None
    assert c["eval"]["tasks"][0] == {"name": "demo_eng", "num_fewshot": 0}


def test_cell_parameters_restrict_per_adapter_values_to_the_group():
    c = load_config(cfg(methods__linear__parameters__weight={"eng": 0.7, "nob": 0.3}))
    cell = Cell("1b", "std", "eng-nob", "linear")
    assert cell_parameters(c, cell) == {"weight": {"eng": 0.7, "nob": 0.3}}


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"colour": "red"},
            "key '<top level>': Additional properties are not allowed ('colour' was unexpected) "
            "(unknown key",
        ),
        (
            {"methods__ties__parameters__density": 1.5},
            "key 'methods.ties.parameters.density': 1.5 is outside (0, 1]",
        ),
        (
            {"methods__ties__parameters__density": 0},
            "key 'methods.ties.parameters.density': 0 is outside (0, 1]",
        ),
        (
            {"grid__0__methods": ["linear", "bogus"]},
            "key 'grid[0].methods': unknown method 'bogus'; define it under 'methods'",
        ),
        (
            {"grid__1__methods": ["ties", "linear"], "grid__0__sizes": ["1b", "4b", "12b"]},
            "key 'grid[1]': cell 12b-std/eng-nob__ties is already in grid[0]",
        ),
        (
            {"methods__linear__parameters__weight": {"eng": 0.5, "nob": 0.5, "deu": 1.0}},
            "key 'methods.linear.parameters.weight.deu': adapter 'deu' is not in the group(s) "
            "['eng-nob']",
        ),
        ({"groups": {"eng/../x": ["eng"]}}, "key 'groups': 'eng/../x' does not match"),
        (
            {"bases__1b-std": DELETE},
            "key 'grid[0]': base '1b-std' (size '1b' × variant 'std') is not in 'bases'",
        ),
        (
            {"groups__eng-nob": ["eng", "deu"]},
            "key 'groups.eng-nob': adapter 'deu' is not configured for base '1b-std'",
        ),
        ({"methods__ties__recipe": "nosuch"}, "key 'methods.ties.recipe': no recipe file"),
        (
            {"methods__ties__parameters__lamda": 2.0},
            "parameter(s) ['lamda'] are not used by this recipe (misspelt?)",
        ),
        (
            {"bases__1b-std": {"hub": {"repo": "google/gemma-3-1b-pt"}}},
            "key 'bases.1b-std.hub': 'revision' is a required property",
        ),
        (
            {"bases__1b-std": {"path": "/x", "demo": {"arch": "text", "seed": 1}}},
            "key 'bases.1b-std'",
        ),
        (
            {"report": {"baseline": "deu"}},
            "key 'report.baseline': 'deu' is neither 'base' nor an adapter name",
        ),
        (
            {"methods": {**DEMO["methods"], "a__b": {}}},
            "key 'methods.a__b': name 'a__b' contains '__'",
        ),
        (
            {"eval__tasks": [{"name": "x"}, {"name": "x"}]},
            "key 'eval.tasks': task(s) ['x'] listed twice",
        ),
    ],
    ids=[
        "unknown-key",
        "density>1",
        "density=0",
        "unknown-method",
        "duplicate-cell",
        "weight-for-adapter-not-in-group",
        "name-with-slash",
        "missing-base",
        "adapter-not-configured",
        "missing-recipe",
        "unused-parameter",
        "hub-no-revision",
        "two-sources",
        "bad-baseline",
        "double-underscore",
        "duplicate-task",
    ],
)
def test_bad_config_names_the_key(changes, message):
    with pytest.raises(ConfigError) as e:
        load_config(cfg(**changes), source="config.yaml")
    assert str(e.value).startswith("config.yaml: ")
    assert message in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_render_keeps_types_and_expands_per_adapter(tmp_path):
    r = render_recipe(
        RECIPES_DIR / "ties.yaml",
        base_model="/b",
        models={"eng": "/e", "nob": "/n"},
        parameters={"density": 0.3, "weight": {"eng": 0.6, "nob": 0.4}},
        dtype="bfloat16",
    )
    assert r == {
        "merge_method": "ties",
        "base_model": "/b",
        "models": [
            {"model": "/e", "parameters": {"weight": 0.6, "density": 0.3}},
            {"model": "/n", "parameters": {"weight": 0.4, "density": 0.3}},
        ],
        "parameters": {"lambda": 1.0, "normalize": True, "rescale": False, "int8_mask": False},
        "dtype": "bfloat16",
        "out_dtype": "bfloat16",
    }


def test_render_slerp_by_position_and_group_size():
    r = render_recipe(
        RECIPES_DIR / "slerp.yaml",
        base_model="/b",
        models={"eng": "/e", "nob": "/n"},
        parameters={"t": 0.25},
        dtype="float32",
    )
    assert r["base_model"] == "/e" and r["models"] == [{"model": "/e"}, {"model": "/n"}]
    assert r["parameters"] == {"t": 0.25}
    with pytest.raises(ConfigError, match="takes 2 adapter"):
        render_recipe(
            RECIPES_DIR / "slerp.yaml",
            base_model="/b",
            models={"a": "/a", "b": "/b", "c": "/c"},
            parameters={},
            dtype="float32",
        )


def test_render_unknown_placeholder(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "merge_method: linear\nbase_model: ${base_model}\n"
        "models:\n  - model: ${model}\n    parameters:\n      weight: ${wieght}\n"
    )
    with pytest.raises(ConfigError) as e:
        render_recipe(bad, base_model="/b", models={"eng": "/e"}, parameters={}, dtype="float32")
    assert str(e.value).startswith(f"{bad}: unknown placeholder ${{wieght}} in models")


def test_per_adapter_parameter_missing_an_adapter():
    with pytest.raises(ConfigError, match="no value for 'nob'"):
        render_recipe(
            RECIPES_DIR / "linear.yaml",
            base_model="/b",
            models={"eng": "/e", "nob": "/n"},
            parameters={"weight": {"eng": 1.0}},
            dtype="float32",
        )


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_every_recipe_is_valid_for_mergekit(recipe):
    from mergekit.config import MergeConfiguration

    r = render_recipe(
        RECIPES_DIR / f"{recipe}.yaml",
        base_model="/b",
        models={"eng": "/e", "nob": "/n"} if METHODS[recipe].adapters[1] != 1 else {"eng": "/e"},
        parameters={},
        dtype="bfloat16",
    )
    MergeConfiguration.model_validate(r)
    assert r["base_model"] in ("/b", "/e")
