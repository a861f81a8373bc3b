"""Adapter-space merges against PEFT's own add_weighted_adapter on the full model.

Each case merges the same adapters twice: with :func:`mergebake.adapter_merge.merge_adapters`
(PEFT's code over a skeleton of the targeted modules) and with PEFT on the real tiny model
(``PeftModel.from_pretrained`` + ``load_adapter``, ``torch.manual_seed(seed)`` immediately
before ``add_weighted_adapter``). Every merged tensor must be ``torch.equal``; the DARE types
are random and compared under the same seed. The model baked from the merged adapter by the
stream engine must equal PEFT's ``merge_and_unload`` of it.
"""

from __future__ import annotations

import inspect
import json
import typing

import pytest
import torch
from _models import load_model, make_gemma3_text, make_llama, make_lora, peft_merged

from mergebake import MergebakeError
from mergebake.adapter_merge import (
    COMBINATION_TYPES,
    check_adapters,
    merge_adapters,
    module_order,
)
from mergebake.bake import bake
from mergebake.methods import ADAPTER_METHODS, PEFT, adapter_markdown_table

SEED = 1234
WEIGHTS = [1.0, 0.5, -0.7]
DARE = [t for t in COMBINATION_TYPES if t.startswith("dare")]
SVD = [t for t in COMBINATION_TYPES if t.endswith("svd")]
BUILDERS = {"gemma": make_gemma3_text, "llama": make_llama}
TARGETS = {"gemma": ("q_proj", "o_proj", "down_proj"), "llama": ("q_proj", "v_proj", "gate_proj")}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Per model: the base, three adapters of rank 4 (alphas 8, 4, 16) and three of ranks
    4, 8, 2 (the second on q_proj only), each with its own random tensors."""
    root = tmp_path_factory.mktemp("adapter-merge")
    out = {}
    for model, build in BUILDERS.items():
        base = build(root / model / "base")
        targets = TARGETS[model]
        equal = [
            make_lora(base, root / model / f"eq{i}", targets, r=4, alpha=a, seed=10 + i)
            for i, a in enumerate((8, 4, 16))
        ]
        unequal = [
            make_lora(base, root / model / "un0", targets, r=4, alpha=8, seed=20),
            make_lora(base, root / model / "un1", ("q_proj",), r=8, alpha=8, seed=21),
            make_lora(base, root / model / "un2", targets, r=2, alpha=4, seed=22),
        ]
        out[model] = {"base": base, "equal": equal, "unequal": unequal}
    return out


_REFERENCE: dict = {}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one torch thread (no spinning pool on a busy machine), restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def peft_reference(base, adapters, combination_type, weights, **options):
    """PEFT on the full model: the merged adapter's state dict and config."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    key = (str(base), tuple(map(str, adapters)))
    if key not in _REFERENCE:  # one loaded model per adapter set; merged adapters deleted
        model = PeftModel.from_pretrained(load_model(base), adapters[0], adapter_name="a0")
        for i, a in enumerate(adapters[1:], 1):
            model.load_adapter(a, adapter_name=f"a{i}")
        _REFERENCE[key] = model
    model = _REFERENCE[key]
    names = [f"a{i}" for i in range(len(adapters))]
    torch.manual_seed(SEED)
    model.add_weighted_adapter(names, weights, "ref", combination_type=combination_type, **options)
    state = get_peft_model_state_dict(model, adapter_name="ref", save_embedding_layers=False)
    state = {k: v.detach().clone() for k, v in state.items()}
    config = model.peft_config["ref"]
    model.delete_adapter("ref")
    return state, config


def options_for(combination_type, unequal=False):
    params = {p.name for p in ADAPTER_METHODS[combination_type].params}
    opts = {}
    if "density" in params:
        opts["density"] = 0.5
    if "majority_sign_method" in params:
        opts["majority_sign_method"] = "frequency" if unequal else "total"
    if unequal and "svd_rank" in params:
        opts.update(svd_rank=3, svd_clamp=0.9)
    return opts


def ours(tmp_path, adapters, combination_type, weights, **kw):
    from safetensors.torch import load_file

    out = tmp_path / "merged"
    named = {f"ad{i}": a for i, a in enumerate(adapters)}
    summary = merge_adapters(
        named, out, combination_type=combination_type, weights=weights, seed=SEED, **kw
    )
    return out, summary, load_file(out / "adapter_model.safetensors")


def assert_same(mine, ref):
    assert sorted(mine) == sorted(ref)
    for k, v in ref.items():
        assert mine[k].dtype == v.dtype, k
        assert torch.equal(mine[k], v), k


CASES = [(ct, model, n) for ct in COMBINATION_TYPES for model in BUILDERS for n in (2, 3)]


@pytest.mark.parametrize(("combination_type", "model", "n"), CASES)
def test_equal_ranks_match_peft(zoo, tmp_path, combination_type, model, n):
    z = zoo[model]
    adapters, weights = z["equal"][:n], WEIGHTS[:n]
    opts = options_for(combination_type)
    ref, ref_config = peft_reference(z["base"], adapters, combination_type, weights, **opts)
    # chunk_bytes=1: one skeleton per module wherever the type allows it
    out, summary, mine = ours(
        tmp_path, adapters, combination_type, weights, base=z["base"],
        chunk_bytes=1, **opts,
    )  # fmt: skip
    assert_same(mine, ref)
    assert summary["modules"] == {"gemma": 6, "llama": 6}[model]
    assert summary["chunks"] == (1 if combination_type in DARE else summary["modules"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == ref_config.r == config["lora_alpha"]
    assert config["target_modules"] == sorted(ref_config.target_modules)


UNEQUAL = [(ct, model) for ct in ["cat", *SVD] for model in BUILDERS]


@pytest.mark.parametrize(("combination_type", "model"), UNEQUAL)
def test_unequal_ranks_cat_and_svd_match_peft(zoo, tmp_path, combination_type, model):
    z = zoo[model]
    opts = options_for(combination_type, unequal=True)
    ref, ref_config = peft_reference(z["base"], z["unequal"], combination_type, WEIGHTS, **opts)
    _, summary, mine = ours(
        tmp_path, z["unequal"], combination_type, WEIGHTS, base=z["base"], **opts
    )
    assert_same(mine, ref)
    assert summary["rank"] == ref_config.r == (14 if combination_type == "cat" else 3)
    assert summary["chunks"] == 1  # un1 covers q_proj only: one skeleton for all


BAKED = [(ct, "gemma" if i % 2 else "llama", 2 + i % 2) for i, ct in enumerate(COMBINATION_TYPES)]


@pytest.mark.parametrize(("combination_type", "model", "n"), BAKED)
def test_model_baked_from_merged_adapter_equals_peft_merge_and_unload(
    zoo, tmp_path, combination_type, model, n
):
    z = zoo[model]
    opts = options_for(combination_type)
    out, _, _ = ours(
        tmp_path, z["equal"][:n], combination_type, WEIGHTS[:n], base=z["base"], **opts
    )
    bake(z["base"], out, tmp_path / "baked", engine="stream")
    ref = peft_merged(z["base"], out).state_dict()  # PeftModel.from_pretrained loads it
    mine = load_model(tmp_path / "baked").state_dict()
    assert sorted(mine) == sorted(ref)
    for k, v in ref.items():
        assert torch.equal(mine[k], v), k
    base = load_model(z["base"]).state_dict()
    assert sum(not torch.equal(v, base[k]) for k, v in ref.items()) >= 5  # every target moved


def test_dare_depends_on_the_seed_and_only_on_it(zoo, tmp_path):
    z = zoo["gemma"]
    runs = []
    for i, seed in enumerate((1, 1, 2)):
        out = tmp_path / f"m{i}"
        merge_adapters(
            {"a": z["equal"][0], "b": z["equal"][1]},
            out,
            combination_type="dare_linear",
            density=0.5,
            seed=seed,
            base=z["base"],
        )
        runs.append((out / "adapter_model.safetensors").read_bytes())
    assert runs[0] == runs[1] != runs[2]


def test_module_order_is_the_models(zoo):
    order = module_order(zoo["llama"]["base"])
    assert order.index("model.layers.0.self_attn.q_proj") < order.index(
        "model.layers.0.self_attn.k_proj"
    )
    assert order[-1] == "lm_head" and order[0] == "model"


def test_output_is_a_complete_peft_adapter_with_provenance(zoo, tmp_path):
    z = zoo["gemma"]
    out, summary, _ = ours(tmp_path, z["equal"], "ties", WEIGHTS, density=0.2, base=z["base"])
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "provenance.json",
    ]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["step"] == "adapter-merge" and prov["seed"] == SEED
    assert prov["params"]["weights"] == {"ad0": 1.0, "ad1": 0.5, "ad2": -0.7}
    assert set(prov["inputs"]) == {"ad0", "ad1", "ad2"}
    assert summary["effective_type"] == "ties" and summary["rank"] == 4


# --- refusals, before any tensor is read ---------------------------------------------


def refuse(adapters, match, **kw):
    kw.setdefault("combination_type", "ties")
    if ADAPTER_METHODS.get(kw["combination_type"], ADAPTER_METHODS["ties"]).param("density"):
        kw.setdefault("density", 0.5)
    with pytest.raises(MergebakeError, match=match):
        check_adapters(adapters, **kw)


def test_unequal_ranks_are_refused_for_factor_wise_types(zoo):
    z = zoo["gemma"]["unequal"]
    for ct in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"):
        refuse(
            {"eng": z[0], "nob": z[1]},
            rf"^adapter merge: combination_type '{ct}' needs adapters of equal rank \(PEFT "
            r"refuses others\); got eng \(r=4\), nob \(r=8\). Use 'cat' or an SVD type",
            combination_type=ct,
        )
    check_adapters({"eng": z[0], "nob": z[1]}, combination_type="cat")


def test_regex_target_modules_mixed_with_a_list_is_refused(zoo, tmp_path):
    base = zoo["gemma"]["base"]
    regex = make_lora(base, tmp_path / "rx", r".*\.q_proj", r=4, seed=3)
    refuse(
        {"eng": zoo["gemma"]["equal"][0], "rx": regex},
        r"target_modules mix a regex string with a list \(eng: list, rx: regex string\); "
        "PEFT's add_weighted_adapter refuses that",
    )


def test_missing_density_and_bad_options_are_refused(zoo):
    a = {"eng": zoo["gemma"]["equal"][0], "nob": zoo["gemma"]["equal"][1]}
    for ct in ("ties", "ties_svd", "dare_linear", "magnitude_prune_svd"):
        refuse(
            a, rf"combination_type '{ct}' needs option density", combination_type=ct, density=None
        )
    refuse(a, r"key 'density': 1.5 is outside \(0, 1\]", density=1.5)
    refuse(a, r"option density=0.5 is not used by combination_type 'linear'",
           combination_type="linear", density=0.5)  # fmt: skip
    refuse(a, r"key 'majority_sign_method': 'mean' is not one of 'total', 'frequency'",
           majority_sign_method="mean")  # fmt: skip
    refuse(a, r"svd_driver='gesvd' works only on CUDA", combination_type="svd", svd_driver="gesvd")
    refuse(a, r"1 weight\(s\) \[1.0\] for 2 adapters \['eng', 'nob'\]; give one weight per",
           weights=[1.0])  # fmt: skip
    refuse(a, r"key 'weights.nob': nan is not a finite number", weights=[1.0, float("nan")])
    refuse(a, r"'mean' is not a PEFT combination_type; choose one of svd, linear, cat",
           combination_type="mean")  # fmt: skip


def test_adapters_that_need_base_weights_are_refused(zoo, tmp_path):
    base = zoo["gemma"]["base"]
    dora = make_lora(base, tmp_path / "dora", ("q_proj",), r=4, seed=4, use_dora=True)
    refuse({"dora": dora}, r"adapter 'dora' \(.*adapter_config.json\): use_dora=True; merging "
           "it in adapter space needs the base's weights")  # fmt: skip
    mts = make_lora(base, tmp_path / "mts", ("q_proj",), r=4, seed=5, modules_to_save=["o_proj"])
    refuse({"mts": mts}, r"adapter 'mts' .*modules_to_save=\['o_proj'\]")
    refuse({"gone": tmp_path / "nope"}, r"adapter 'gone': .*nope does not exist; fetch it first")
    emb = make_lora(base, tmp_path / "emb", ("embed_tokens",), r=4, seed=6)
    refuse({"emb": emb}, r"adapter 'emb' \(.*adapter_model.safetensors\): holds whole tensors "
           r"\['base_model.model.model.embed_tokens.base_layer.weight'\] \(1 in all")  # fmt: skip


def test_single_adapter_is_peft_linear(zoo, tmp_path):
    z = zoo["llama"]
    ref, _ = peft_reference(z["base"], z["equal"][:1], "ties", [0.5], density=0.5)
    _, summary, mine = ours(tmp_path, z["equal"][:1], "ties", [0.5], density=0.5)
    assert summary["effective_type"] == "linear"
    assert_same(mine, ref)


# --- the table against PEFT ------------------------------------------------------------


def test_adapter_table_is_peft_add_weighted_adapter():
    from peft.tuners.lora import LoraModel

    sig = inspect.signature(LoraModel.add_weighted_adapter, eval_str=True)
    literal = typing.get_args(sig.parameters["combination_type"].annotation)
    assert COMBINATION_TYPES == literal
    options = {
        n: p.default
        for n, p in sig.parameters.items()
        if n not in ("self", "adapters", "weights", "adapter_name", "combination_type")
    }
    offered = {}
    for m in ADAPTER_METHODS.values():
        assert m.space == "adapter" and m.engines == ("peft",)
        assert m.params[0].name == "weight" and m.params[0].scope == "model"
        for p in m.params[1:]:
            assert p.origin == PEFT and p.scope == "global"
            assert p.default == options[p.name], p.name
            offered[p.name] = p
    assert set(offered) == set(options)
    majority = typing.get_args(sig.parameters["majority_sign_method"].annotation)
    assert offered["majority_sign_method"].choices == majority
    assert {m.name for m in ADAPTER_METHODS.values() if m.randomised} == set(DARE)
    equal = {m.name for m in ADAPTER_METHODS.values() if m.equal_ranks}
    assert equal == {"linear", "ties", "dare_ties", "dare_linear", "magnitude_prune"}
    assert "| [`ties`](https://arxiv.org/abs/2306.01708) | the group's rank" in (
        adapter_markdown_table()
    )


def test_dare_equals_peft_only_in_the_models_module_order(zoo, tmp_path):
    """Without ``base`` the modules run in natural name order (down_proj < o_proj < q_proj),
    not Gemma's (q_proj, o_proj, down_proj): PEFT's random draws land elsewhere."""
    z = zoo["gemma"]
    ref, _ = peft_reference(z["base"], z["equal"][:2], "dare_linear", WEIGHTS[:2], density=0.5)
    _, _, natural = ours(tmp_path / "n", z["equal"][:2], "dare_linear", WEIGHTS[:2], density=0.5)
    _, _, model = ours(
        tmp_path / "m", z["equal"][:2], "dare_linear", WEIGHTS[:2], density=0.5, base=z["base"]
    )
    assert_same(model, ref)
    assert not all(torch.equal(natural[k], ref[k]) for k in ref)


def test_all_linear_adapter_merged_with_a_list_adapter_matches_peft(zoo, tmp_path):
    z = zoo["gemma"]
    every = make_lora(z["base"], tmp_path / "all", "all-linear", r=4, alpha=8, seed=7)
    adapters = [every, z["equal"][0]]
    ref, ref_config = peft_reference(z["base"], adapters, "ties", [1.0, 1.0], density=0.3)
    out, summary, mine = ours(tmp_path, adapters, "ties", [1.0, 1.0], density=0.3, base=z["base"])
    assert_same(mine, ref)
    assert summary["modules"] == 14  # 7 linear modules x 2 layers
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(ref_config.target_modules)


def test_cli_entry_merges_like_the_function(zoo, tmp_path, capsys):
    import argparse

    from mergebake.adapter_merge import add_adapter_merge_arguments, cli_adapter_merge

    z = zoo["llama"]
    parser = argparse.ArgumentParser()
    add_adapter_merge_arguments(parser)
    args = parser.parse_args(
        [
            *("--adapter", f"eng={z['equal'][0]}", "--adapter", f"nob={z['equal'][1]}"),
            *("--weight", "nob=0.5", "--combination-type", "ties", "--density", "0.2"),
            *("--out", str(tmp_path / "cli"), "--base", str(z["base"])),
        ]
    )
    cli_adapter_merge(args)
    assert json.loads(capsys.readouterr().out)["combination_type"] == "ties"
    merge_adapters(
        {"eng": z["equal"][0], "nob": z["equal"][1]},
        tmp_path / "api",
        combination_type="ties",
        weights={"eng": 1.0, "nob": 0.5},
        density=0.2,
    )
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "api" / name).read_bytes()


@pytest.mark.parametrize("combination_type", ["ties", "cat", "svd"])
def test_embedding_lora_matches_peft(zoo, tmp_path, combination_type):
    """LoRA on the input embeddings (PEFT's Embedding layer), saved without the embedding
    copies (``save_embedding_layers=False``), merged like the linear ones."""
    from safetensors.torch import load_file, save_file

    z = zoo["gemma"]
    adapters = []
    for i in range(2):
        a = make_lora(z["base"], tmp_path / f"emb{i}", ("embed_tokens", "q_proj"), seed=30 + i)
        tensors = load_file(a / "adapter_model.safetensors")
        lora = {k: v for k, v in tensors.items() if "lora_" in k}
        assert len(lora) < len(tensors)  # PEFT saved the embedding copy: drop it
        save_file(lora, a / "adapter_model.safetensors", metadata={"format": "pt"})
        adapters.append(a)
    opts = options_for(combination_type)
    ref, _ = peft_reference(z["base"], adapters, combination_type, WEIGHTS[:2], **opts)
    _, _, mine = ours(tmp_path, adapters, combination_type, WEIGHTS[:2], base=z["base"], **opts)
    assert any("lora_embedding_A" in k for k in mine)
    assert_same(mine, ref)
