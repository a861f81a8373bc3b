"""GGUF export with llama.cpp's own converter and quantiser, checked by llama.cpp.

The demo bases here have 6 layers: llama.cpp runs Gemma-3 with a fixed pattern of one
full-attention layer in six (the converter writes no per-layer pattern), which the demo's
2-4 layer bases (last layer full) do not follow; test_layer_pattern_mismatch_is_caught
shows the check refusing those.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from mergebake import MergebakeError, demo, export
from mergebake.normalise import normalise
from mergebake.outputs import sha256_file

gguf = pytest.importorskip("gguf")

REPO = Path(__file__).resolve().parents[2]
# The converter is fetched once (pip download of the pinned sdist) into the repository's
# ignored resources/ folder and reused by later runs.
TOOLS = REPO / "resources" / "tools"

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


@pytest.fixture(scope="module")
def conv() -> export.Converter:
    return export.converter(TOOLS)


@pytest.fixture(scope="module")
def cells(tmp_path_factory, conv) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cells")
    demo.make_base(root / "text", arch="text", num_layers=6, seed=3)
    demo.make_base(root / "mm", arch="multimodal", num_layers=6, seed=4)
    normalise(root / "mm", root / "mm-text")
    return {"text": root / "text", "multimodal": root / "mm-text", "wrapped": root / "mm"}


@pytest.fixture(scope="module")
def exported(cells, tmp_path_factory) -> dict[tuple[str, str], Path]:
    out_dir = tmp_path_factory.mktemp("gguf")
    parser = argparse.ArgumentParser()
    export.add_export_arguments(parser)
    out = {}
    for name in ("text", "multimodal"):
        argv = ["--cell", str(cells[name]), "--out", str(out_dir / f"{name}.{{type}}.gguf")]
        argv += ["--type", "bf16", "--type", "q8_0", "--tools", str(TOOLS), "--threads", "2"]
        export.cli_export(parser.parse_args(argv))
        for t in ("bf16", "q8_0"):
            out[name, t] = out_dir / f"{name}.{t}.gguf"
    return out


def _f32_reference(conv: export.Converter, cell: Path, out: Path) -> Path:
    subprocess.run(conv.command(cell, out, "f32"), check=True, capture_output=True)
    return out


# --------------------------------------------------------------------------- tools


def test_converter_comes_from_the_pinned_sdist(conv):
    import llama_cpp

    info = json.loads((conv.root / "tools.json").read_text())
    assert conv.version == llama_cpp.__version__ == export.LLAMA_CPP_PYTHON_VERSION == "0.3.36"
    assert info["sdist"] == "llama_cpp_python-0.3.36.tar.gz"
    assert info["sdist_sha256"] == export.SDIST_SHA256
    assert info["gguf_py_version"] == metadata.version("gguf") == "0.19.0"
    assert conv.script.is_file() and (conv.root / "conversion" / "gemma.py").is_file()
    assert (conv.root / "gguf-py" / "gguf" / "gguf_reader.py").is_file()
    # Nothing else of the sdist (no C++ sources) is extracted.
    assert not (conv.root / "src").exists()


def test_converter_refuses_an_sdist_with_another_checksum(tmp_path):
    fake = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    fake.write_bytes(b"not the sdist")
    with pytest.raises(MergebakeError, match="sha256 .* refusing it"):
        export.converter(tmp_path / "tools", sdist=fake)
    assert not export.tools_folder(tmp_path / "tools").exists()
    with pytest.raises(MergebakeError, match="mergebake gguf-tools"):
        export.converter(tmp_path / "none", fetch=False)


# --------------------------------------------------------------------------- support


def test_gguf_support_asks_the_converters_registry(cells):
    answers = export.gguf_support_many(
        [
            cells["text"],
            cells["wrapped"] / "config.json",
            {"architectures": ["MambaForCausalLM"]},
            {"architectures": ["FooBarForCausalLM"]},
            {"architectures": ["Gemma3ForConditionalGeneration"], "text_config": {}},
        ],
        tools=TOOLS,
    )
    assert answers[0] is None and answers[1] is None and answers[2] is None and answers[4] is None
    assert answers[3] == "architecture 'FooBarForCausalLM' is not in the converter's registry"


def test_unsupported_architecture_fails_without_output(tmp_path, cells):
    cell = tmp_path / "cell"
    cell.mkdir()
    for f in cells["text"].iterdir():
        (cell / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((cell / "config.json").read_text())
    cfg["architectures"] = ["FooBarForCausalLM"]
    (cell / "config.json").write_text(json.dumps(cfg))
    assert "FooBarForCausalLM" in export.gguf_support(cell, tools=TOOLS)
    out = tmp_path / "x.bf16.gguf"
    with pytest.raises(MergebakeError, match="FooBarForCausalLM"):
        export.export_gguf(cell, out, "bf16", tools=TOOLS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cell"]


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("name", ["text", "multimodal"])
@pytest.mark.parametrize("gguf_type", ["bf16", "q8_0"])
def test_export_is_checked_by_llama_cpp(cells, exported, conv, name, gguf_type):
    path = exported[name, gguf_type]
    side = json.loads(export.sidecar_path(path).read_text())
    assert side["sha256"] == sha256_file(path) and side["bytes"] == path.stat().st_size
    assert side["converter"]["version"] == "0.3.36"
    assert side["converter"]["sdist_sha256"] == export.SDIST_SHA256
    assert side["converter"]["script_sha256"] == sha256_file(conv.script)
    assert any(f"--outtype {gguf_type}" in c for c in side["commands"])

    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "gemma3"
    assert reader.fields["gemma3.block_count"].contents() == 6
    want = {"bf16": "BF16", "q8_0": "Q8_0"}[gguf_type]
    kinds = {t.tensor_type.name for t in reader.tensors}
    assert want in kinds and kinds <= {want, "F32"}
    # Text model only: no vision tensors in the file of the normalised multimodal cell.
    assert all(t.name.startswith(("token_embd", "blk.", "output_norm")) for t in reader.tensors)

    # The check's numbers, recomputed: llama.cpp's logits against transformers'.
    ids = export.prompt_ids(cells[name])
    ref = export.reference_logits(cells[name], ids)
    got = export.llama_logits(path, ids, threads=2)
    top_ref, top_got = ref[:, : got.shape[1]].argmax(1), got.argmax(1)
    logits = side["check"]["logits"]
    assert logits["top1_reference"] == top_ref.tolist() and logits["top1_gguf"] == top_got.tolist()
    diff = np.abs(ref[:, : got.shape[1]] - got).max(1)
    if gguf_type == "bf16":
        assert (top_ref == top_got).all()
        rtol, atol = export.LOGIT_TOLERANCE["bf16"]
        assert (diff <= rtol * np.abs(ref).max(1) + atol).all()
        assert diff.max() > 1e-4  # llama.cpp really computed (bf16 activations round)
    else:
        assert (top_ref == top_got).sum() >= export.QUANT_MIN_TOP1
        assert diff.max() < 0.5


def test_quantised_type_by_llama_cpp(cells, tmp_path):
    res = export.export_gguf(cells["text"], tmp_path / "t.q6_k.gguf", "q6_k", tools=TOOLS)
    reader = gguf.GGUFReader(res.path)
    # Rows of 64 are below the k-quant block of 256: llama.cpp's quantiser falls back to q8_0.
    assert {t.tensor_type.name for t in reader.tensors} == {"Q8_0", "F32"}
    assert reader.fields["general.file_type"].contents() == 18  # LLAMA_FTYPE_MOSTLY_Q6_K
    side = json.loads(res.sidecar.read_text())
    assert side["quantiser"] == {
        "function": "llama_cpp.llama_model_quantize",
        "ftype": "LLAMA_FTYPE_MOSTLY_Q6_K",
    }
    assert side["check"]["logits"]["top1_agree"] >= 4


def test_logit_rules():
    ref = np.array([[0.0, 3.0, 1.0, 9.0]] * 5, dtype=np.float32)
    got = ref[:, :3].copy()  # llama.cpp without the checkpoint's padding row
    assert export.logit_problems("bf16", ref, got)[0] == []
    got[0, 1] += 0.07  # tolerance 0.02 x 3 + 0.02 = 0.08
    assert export.logit_problems("bf16", ref, got)[0] == []
    got[0, 1] += 0.02
    assert export.logit_problems("bf16", ref, got)[0] == [
        "prompt 0: max |logit difference| 0.09 > tolerance 0.08 (0.02 x 3 + 0.02) for bf16"
    ]
    flip = ref[:, :3].copy()
    flip[1, 2] = 3.5
    problems, summary = export.logit_problems("bf16", ref, flip)
    assert problems[0].startswith("prompt 1: llama.cpp's top-1 token 2, transformers' 1")
    assert export.logit_problems("q4_k_m", ref, flip)[0] == []  # 4 of 5 is enough
    flip[3, 2] = 3.5
    problems, summary = export.logit_problems("q4_k_m", ref, flip)
    assert summary["top1_agree"] == 3 and problems == [
        "llama.cpp's top-1 token agrees with transformers' on 3 of 5 prompts; a q4_k_m GGUF "
        "needs 4 (reference [1, 1, 1, 1, 1], GGUF [1, 2, 1, 2, 1])"
    ]


# --------------------------------------------------------------------------- the check


def _rewrite(src: Path, dst: Path, new: dict) -> Path:
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, arch=reader.fields["general.architecture"].contents())
    details = {k: MetadataDetails(t, v) for k, (t, v) in new.items()}
    copy_with_new_metadata(reader, writer, details, [])
    return dst


def test_wrong_metadata_types_are_caught(cells, exported, tmp_path):
    T = gguf.GGUFValueType
    cfg = json.loads((cells["text"] / "config.json").read_text())
    good = exported["text", "bf16"]
    assert export.metadata_problems(good, cfg) == []
    pattern = [t == "sliding_attention" for t in cfg["layer_types"]]
    ok = _rewrite(
        good, tmp_path / "ok.gguf", {"gemma3.attention.sliding_window_pattern": (T.ARRAY, pattern)}
    )
    assert export.metadata_problems(ok, cfg) == []  # the same pattern as BOOLs is fine

    broken = _rewrite(
        good,
        tmp_path / "broken.gguf",
        {
            # the bool array written as int32, as an export script once did
            "gemma3.attention.sliding_window_pattern": (T.ARRAY, [int(b) for b in pattern]),
            "gemma3.block_count": (T.FLOAT32, 6.0),
            "tokenizer.ggml.add_bos_token": (T.INT32, 1),
            "gemma3.attention.sliding_window": (T.UINT32, 64),
        },
    )
    problems = export.metadata_problems(broken, cfg)
    assert problems == [
        "gemma3.block_count: stored as FLOAT32, but config.json num_hidden_layers is a int (6); "
        "the type must be kept",
        "gemma3.attention.sliding_window: 64, but config.json sliding_window is 32",
        "tokenizer.ggml.add_bos_token: stored as INT32, expected BOOL",
        "gemma3.attention.sliding_window_pattern: array of INT32, llama.cpp reads the per-layer "
        "sliding-window pattern as BOOL (a bool must stay a bool)",
    ]
    with pytest.raises(export.GGUFCheckError) as err:
        export.verify_gguf(broken, cells["text"], "bf16")
    assert err.value.problems[:4] == problems
    assert "gemma3.block_count" in str(err.value)


def test_corrupted_tensor_is_caught(cells, exported, conv, tmp_path):
    good = exported["text", "bf16"]
    ref = _f32_reference(conv, cells["text"], tmp_path / "ref.f32.gguf")
    assert export.tensor_problems(good, ref) == []

    flipped = tmp_path / "flipped.gguf"
    flipped.write_bytes(good.read_bytes())
    reader = gguf.GGUFReader(flipped, "r+")
    t = next(t for t in reader.tensors if t.name == "blk.2.ffn_down.weight")
    assert t.tensor_type.name == "BF16"
    t.data.view(np.uint8).reshape(-1)[1::2] ^= 0x80  # flip the sign of every bf16 value
    del reader
    problems = export.tensor_problems(flipped, ref)
    assert len(problems) == 1
    assert problems[0].startswith("tensor blk.2.ffn_down.weight (BF16): relative RMS error 2 ")
    with pytest.raises(export.GGUFCheckError, match="blk.2.ffn_down.weight"):
        export.verify_gguf(flipped, cells["text"], "bf16", reference=ref)

    nan = tmp_path / "nan.gguf"
    nan.write_bytes(good.read_bytes())
    reader = gguf.GGUFReader(nan, "r+")
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    t.data.view(np.uint8).reshape(-1)[:64] = 0xFF  # 32 bf16 NaNs
    del reader
    assert export.tensor_problems(nan) == [
        "tensor blk.0.attn_q.weight (BF16): 32 of 4096 values NaN/Inf"
    ]


def test_layer_pattern_mismatch_is_caught(tmp_path):
    # A 2-layer base whose last layer is global: llama.cpp's Gemma-3 pattern (one in six,
    # which its converter does not write per layer) runs it as sliding-window with the
    # local rope base.
    base = tmp_path / "b2"
    demo.make_base(base, arch="text", num_layers=2, seed=0)
    cfg = json.loads((base / "config.json").read_text())
    cfg["layer_types"] = ["sliding_attention", "full_attention"]
    (base / "config.json").write_text(json.dumps(cfg, indent=2))
    out = tmp_path / "b2.bf16.gguf"
    with pytest.raises(export.GGUFCheckError) as err:
        export.export_gguf(base, out, "bf16", tools=TOOLS)
    assert err.value.problems[0] == (
        "gemma3.attention.sliding_window_pattern: llama.cpp would run the layers' attention "
        "differently from config.json layer_types (layer 1: config full_attention, llama.cpp "
        "sliding)"
    )
    assert str(out) in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b2"]  # nothing left behind
