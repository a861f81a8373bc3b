"""The method table against mergekit's own registry, and the recipes against the table."""

from __future__ import annotations

import pytest
import yaml
from mergekit.merge_methods.base import BasePolicy, ParameterScope
from mergekit.merge_methods.registry import registered_methods

from mergebake import MergebakeError
from mergebake.config import RECIPES_DIR, _placeholders, render_recipe
from mergebake.methods import METHODS, OURS, check_parameters, markdown_table

MERGEKIT = {m.spec.name: m.spec for m in registered_methods()}
SCOPES = {
    ParameterScope.SHARED: "global",
    ParameterScope.NON_BASE: "model",
    ParameterScope.INPUT: "model",
}
BASES = {BasePolicy.REQUIRED: "required", BasePolicy.OPTIONAL: "optional"}
BASES[BasePolicy.IGNORED] = "ignored"
RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def test_the_table_names_every_mergekit_method():
    assert set(METHODS) == set(MERGEKIT)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_parameters_scopes_and_defaults_are_mergekits(name):
    ours, spec = METHODS[name], MERGEKIT[name]
    theirs = {p.name: p for p in spec.parameters}
    for p in ours.params:
        mk = theirs[p.mergekit_name or p.name]
        assert SCOPES[mk.scope] == p.scope, p.name
        required = mk.default is not None and type(mk.default) is object  # mergekit's sentinel
        if p.origin == OURS:
            assert required, f"{name}.{p.name}: mergekit has a default ({mk.default!r})"
        else:
            assert not required and mk.default == p.default, (p.name, mk.default, p.default)
            assert type(p.default) is type(mk.default), p.name
    if ours.applies:  # passthrough builds no cell; its parameters are not offered
        assert {p.mergekit_name or p.name for p in ours.params} == set(theirs)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_base_policy_and_group_size_agree_with_mergekits_contract(name):
    ours, c = METHODS[name], MERGEKIT[name].contract
    assert ours.base == BASES[c.base]
    lo, hi = ours.adapters
    # mergekit counts the base among its inputs where the recipe passes it as a model
    counted = 1 if c.base == BasePolicy.REQUIRED else 0
    if name == "slerp":  # its recipe passes the first adapter as base_model
        counted = 0
    if c.max_inputs is not None and ours.applies:
        assert hi is not None and hi + counted <= c.max_inputs
    if c.max_non_base is not None:
        assert hi is not None and hi <= c.max_non_base
    assert lo + counted >= c.min_inputs
    if c.min_non_base is not None:
        assert lo >= c.min_non_base


def test_dare_ties_does_not_normalise_as_in_mergekit():
    assert METHODS["dare_ties"].defaults["normalize"] is False


def test_a_recipe_for_every_method_that_applies():
    assert set(RECIPES) == {m.name for m in METHODS.values() if m.applies}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_uses_exactly_the_tables_parameters(recipe):
    doc = yaml.safe_load((RECIPES_DIR / f"{recipe}.yaml").read_text())
    assert doc["merge_method"] == recipe
    assert "defaults" not in doc  # defaults live in the table
    builtins = {"base_model", "model", "dtype"} | {f"model_{i}" for i in range(2)}
    assert _placeholders(doc) - builtins == {p.name for p in METHODS[recipe].params}


@pytest.mark.parametrize("recipe", RECIPES)
def test_rendered_recipe_carries_every_default(recipe):
    lo, hi = METHODS[recipe].adapters
    names = ["eng", "nob", "sme"][: max(lo, min(hi or 2, 2))]
    r = render_recipe(
        RECIPES_DIR / f"{recipe}.yaml",
        base_model="/b",
        models={n: f"/{n}" for n in names},
        parameters={},
        dtype="bfloat16",
    )
    for p in METHODS[recipe].params:
        if p.name == "base_weight":
            assert r["models"][0]["parameters"]["weight"] == p.default
        elif p.scope == "global":
            assert r["parameters"][p.name] == p.default
        else:
            assert all(m["parameters"][p.name] == p.default for m in r["models"][-len(names) :])


def test_check_parameters_names_the_key():
    with pytest.raises(MergebakeError, match=r"key 'm.p.density': 1.5 is outside \(0, 1\]"):
        check_parameters(METHODS["ties"], {"density": 1.5}, "m.p")
    with pytest.raises(MergebakeError, match=r"key 'm.p.density.eng': 0 is outside \(0, 1\]"):
        check_parameters(METHODS["ties"], {"density": {"eng": 0, "nob": 0.5}}, "m.p")
    with pytest.raises(MergebakeError, match=r"key 'm.p.normalize': 1 must be true or false"):
        check_parameters(METHODS["ties"], {"normalize": 1}, "m.p")
    with pytest.raises(MergebakeError, match=r"key 'm.p.t': .* one value for the whole merge"):
        check_parameters(METHODS["slerp"], {"t": {"eng": 0.5}}, "m.p")
    with pytest.raises(MergebakeError, match=r"key 'm.p.max_iter': 2.5 must be a whole number"):
        check_parameters(METHODS["karcher"], {"max_iter": 2.5}, "m.p")
    check_parameters(METHODS["ties"], {"density": 1.0, "lambda": -2, "normalize": False}, "m")


def test_readme_method_list_is_the_tables():
    from _workflow import ROOT

    assert markdown_table() in (ROOT / "README.md").read_text()
