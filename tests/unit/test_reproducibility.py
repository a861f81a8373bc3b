"""Rebuilding from scratch gives byte-identical checkpoints: every merge method (DARE
seeded), the bake and the normalisation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _models import make_gemma3_mm, make_gemma3_text, make_lora

from mergebake.bake import bake
from mergebake.config import RECIPES_DIR
from mergebake.merge import merge_cell
from mergebake.methods import METHODS
from mergebake.normalise import normalise

RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def weights(folder: Path) -> dict[str, bytes]:
    out = {p.name: p.read_bytes() for p in folder.glob("*.safetensors")}
    assert out
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("repro")
    return {
        n: make_gemma3_text(d / n, dtype=torch.bfloat16, seed=s)
        for n, s in (("base", 0), ("eng", 1), ("nob", 2))
    }


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_method_rebuilds_byte_identical(models, tmp_path, recipe):
    runs = []
    for name in ("a", "b"):
        merge_cell(
            RECIPES_DIR / f"{recipe}.yaml",
            base=models["base"],
            models={
                a: models[a]
                for a in ("eng", "nob")[
                    : METHODS[recipe].adapters[0] if METHODS[recipe].adapters[1] == 1 else 2
                ]
            },
            parameters={},
            out=tmp_path / name,
            seed=1234,
        )
        runs.append(weights(tmp_path / name))
    assert runs[0] == runs[1]


def test_bake_and_normalise_rebuild_byte_identical(tmp_path):
    base = make_gemma3_mm(tmp_path / "base", dtype=torch.bfloat16)
    adapter = make_lora(base, tmp_path / "adapter")
    for name in ("a", "b"):
        bake(base, adapter, tmp_path / f"baked-{name}")
        normalise(tmp_path / f"baked-{name}", tmp_path / f"text-{name}")
    assert weights(tmp_path / "baked-a") == weights(tmp_path / "baked-b")
    assert weights(tmp_path / "text-a") == weights(tmp_path / "text-b")
