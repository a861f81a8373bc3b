"""merge_cell: numbers against the task-vector formulas mergekit implements, seeded
reproducibility, verification of mergekit's output and atomic failure."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _models import make_gemma3_text
from safetensors.torch import load_file

from mergebake import MergebakeError
from mergebake.config import RECIPES_DIR
from mergebake.merge import merge_cell
from mergebake.verify import VerificationError


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("merge")
    return {
        "base": make_gemma3_text(d / "base", seed=0),
        "eng": make_gemma3_text(d / "eng", seed=1),
        "nob": make_gemma3_text(d / "nob", seed=2),
    }


def _merge(models, out, method, **parameters):
    return merge_cell(
        RECIPES_DIR / f"{method}.yaml",
        base=models["base"],
        models={"eng": models["eng"], "nob": models["nob"]},
        parameters=parameters,
        out=out,
        seed=7,
    )


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_linear_is_the_weighted_average(models, tmp_path):
    _merge(models, tmp_path / "lin", "linear", weight={"eng": 0.7, "nob": 0.3})
    got, e, n = _tensors(tmp_path / "lin"), _tensors(models["eng"]), _tensors(models["nob"])
    assert set(got) == set(e)
    for k in got:
        torch.testing.assert_close(got[k], (0.7 * e[k] + 0.3 * n[k]) / 1.0, rtol=1e-6, atol=1e-6)


def test_task_arithmetic_adds_scaled_task_vectors(models, tmp_path):
    _merge(
        models,
        tmp_path / "ta",
        "task_arithmetic",
        weight={"eng": 1.0, "nob": 0.5},
        **{"lambda": 0.8},
    )
    got, b = _tensors(tmp_path / "ta"), _tensors(models["base"])
    e, n = _tensors(models["eng"]), _tensors(models["nob"])
    for k in got:
        want = b[k] + 0.8 * (1.0 * (e[k] - b[k]) + 0.5 * (n[k] - b[k]))
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6)


def test_output_is_verified_and_carries_recipe_and_provenance(models, tmp_path):
    import json

    import yaml

    res = _merge(models, tmp_path / "ties", "ties", density=0.4)
    out = tmp_path / "ties"
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe == res["recipe"]
    assert recipe["base_model"] == str(models["base"].resolve())
    assert [m["parameters"]["density"] for m in recipe["models"]] == [0.4, 0.4]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["seed"] == 7 and prov["params"]["recipe"] == recipe
    assert set(prov["inputs"]) == {"base", "model:eng", "model:nob"}
    assert (out / "tokenizer.json").read_bytes() == (models["base"] / "tokenizer.json").read_bytes()
    assert not any(p.name.startswith(".ties.tmp") for p in tmp_path.iterdir())


def test_dare_is_reproducible_with_its_seed(models, tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        merge_cell(
            RECIPES_DIR / "dare_ties.yaml",
            base=models["base"],
            models={"eng": models["eng"], "nob": models["nob"]},
            parameters={"density": 0.5},
            out=tmp_path / name,
            seed=seed,
        )
    a, b, c = (tmp_path / n / "model.safetensors" for n in "abc")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_mergekit_dropping_a_tensor_fails_verification_and_leaves_nothing(
    models, tmp_path, monkeypatch
):
    """mergekit can exit 0 with tensors missing; the verify step must catch it."""
    import mergekit.merge
    from safetensors.torch import save_file

    real = mergekit.merge.run_merge

    def lossy(config, out_path, **kw):
        real(config, out_path, **kw)
        f = Path(out_path) / "model.safetensors"
        t = load_file(f)
        t.pop("model.layers.1.mlp.down_proj.weight")
        save_file(t, f, metadata={"format": "pt"})

    monkeypatch.setattr(mergekit.merge, "run_merge", lossy)
    with pytest.raises(VerificationError, match="model.layers.1.mlp.down_proj.weight"):
        _merge(models, tmp_path / "bad", "linear")
    assert list(tmp_path.iterdir()) == []


def test_missing_model_is_refused_before_mergekit(models, tmp_path):
    with pytest.raises(MergebakeError, match="checkpoint folder does not exist"):
        merge_cell(
            RECIPES_DIR / "linear.yaml",
            base=models["base"],
            models={"eng": tmp_path / "nope"},
            parameters={},
            out=tmp_path / "o",
        )
    assert not (tmp_path / "o").exists()
