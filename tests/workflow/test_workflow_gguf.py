"""GGUF export in the workflow, end to end: a small demo grid (one 1b and one 4b cell)
with ``export: {gguf: [bf16, q8_0]}``; each file is made and checked by llama.cpp, and
appears in its cell's upload receipt and model card."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from _workflow import demo_config, snakemake, write_config

from mergebake import export

pytestmark = pytest.mark.workflow
pytest.importorskip("llama_cpp")

CELLS = [("1b-std", "eng-nob__ties"), ("4b-std", "eng-nob__linear")]
TYPES = ["bf16", "q8_0"]


def gguf_config() -> dict:
    c = demo_config()
    c["grid"] = [
        {"sizes": ["1b"], "variants": ["std"], "groups": ["eng-nob"], "methods": ["ties"]},
        {"sizes": ["4b"], "variants": ["std"], "groups": ["eng-nob"], "methods": ["linear"]},
    ]
    c["bases"] = {b: c["bases"][b] for b in ("1b-std", "4b-std")}
    c["adapters"] = {b: c["adapters"][b] for b in ("1b-std", "4b-std")}
    c["eval"]["baselines"] = False
    c["export"] = {"gguf": list(TYPES)}
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    wd = tmp_path_factory.mktemp("gguf-wd")
    write_config(wd / "config.yaml", gguf_config())
    snakemake(wd, "--cores", "2")
    return wd


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_each_gguf_is_made_and_checked_by_llama_cpp(run):
    tools = json.loads(
        (
            run / f"resources/tools/llama.cpp-{export.LLAMA_CPP_PYTHON_VERSION}/tools.json"
        ).read_text()
    )
    assert tools["sdist_sha256"] == export.SDIST_SHA256
    made = sorted(
        p.relative_to(run / "results/gguf").as_posix()
        for p in (run / "results/gguf").rglob("*.gguf")
    )
    assert made == sorted(f"{b}/{c}.{t}.gguf" for b, c in CELLS for t in TYPES)
    for base, cell in CELLS:
        for t in TYPES:
            f = run / "results/gguf" / base / f"{cell}.{t}.gguf"
            side = json.loads((run / "results/gguf" / base / f"{cell}.{t}.gguf.json").read_text())
            assert side["type"] == t and side["sha256"] == _sha256(f)
            assert side["bytes"] == f.stat().st_size
            assert side["inputs"]["cell"]["path"].endswith(f"results/merged/{base}/{cell}")
            assert side["converter"]["version"] == export.LLAMA_CPP_PYTHON_VERSION
            logits = side["check"]["logits"]
            n = len(export.DEFAULT_PROMPTS)
            assert logits["prompts"] == n
            if t == "bf16":
                assert logits["top1_agree"] == n
                assert logits["top1_gguf"] == logits["top1_reference"]
                assert all(
                    0 <= d <= tol
                    for d, tol in zip(logits["max_abs_diff"], logits["tolerance"], strict=True)
                )
            else:
                assert logits["top1_agree"] >= export.QUANT_MIN_TOP1
            assert side["check"]["metadata"] == [] and side["check"]["tensors"] == []
            log = run / "logs/export_gguf" / base / f"{cell}.{t}.log"
            assert log.is_file()


def test_gguf_files_are_in_the_receipt_and_the_card(run):
    for base, cell in CELLS:
        receipt = json.loads((run / "results/uploaded" / base / f"{cell}.json").read_text())
        assert receipt["dry_run"] is True
        got = {e["type"]: e for e in receipt["gguf"]}
        assert sorted(got) == sorted(TYPES)
        card = (run / "results/cards" / base / f"{cell}.md").read_text()
        assert "## GGUF (llama.cpp)" in card and "llama-cli -m" in card
        for t in TYPES:
            name = f"{cell}.{t}.gguf"
            f = run / "results/gguf" / base / name
            e = got[t]
            assert e["path_in_repo"] == f"{base}/{cell}/{name}"
            assert e["repo"] == "mergebake/gemma-3-demo-merges"
            assert e["sha256"] == _sha256(f) and e["bytes"] == f.stat().st_size
            assert e["check"]["top1_agree"] >= export.QUANT_MIN_TOP1
            # same repo: the files go up in the cell's own commit, sidecar included
            assert receipt["files"][name] == {"bytes": e["bytes"], "sha256": e["sha256"]}
            assert name in receipt["changed"] and f"{name}.json" in receipt["files"]
            assert f"`{name}`" in card
        assert "\n- gguf\n" in card.split("---")[1]  # the card's tags
    # the repo README links every cell's GGUF files and is tagged gguf
    readme = (run / "results/cards/README.md").read_text()
    assert "\n- gguf\n" in readme.split("---")[1] and "| GGUF |" in readme
    for base, cell in CELLS:
        row = next(ln for ln in readme.splitlines() if ln.startswith(f"| [{base}/{cell}]"))
        for t in TYPES:
            assert f"/blob/main/{base}/{cell}/{cell}.{t}.gguf)" in row


def test_preflight_asked_llama_cpp_once_per_architecture(run):
    cache = run / f"resources/tools/llama.cpp-{export.LLAMA_CPP_PYTHON_VERSION}.support.json"
    answers = json.loads(cache.read_text())
    archs = sorted(json.loads(k)["architectures"][0] for k in answers)
    assert archs == ["Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"]
    assert set(answers.values()) == {None}


def test_second_run_schedules_nothing(run):
    p = snakemake(run, "-n", "--cores", "1")
    assert "Nothing to be done" in p.stdout + p.stderr
