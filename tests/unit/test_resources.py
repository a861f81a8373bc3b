"""Resources per job from checkpoint sizes (mergebake.resources and the rules' resource
functions): sizes are read from headers/index, never by loading; a dry run plans with
estimates from the config and never fails; memory and runtime grow with size, method
and retry attempt; knobs and figures can be overridden per rule."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from _workflow import ROOT, demo_config, write_config

from mergebake import MergebakeError
from mergebake import resources as R
from mergebake.methods import METHODS
from mergebake.resources import Size, estimate, job_resources, measure
from mergebake.safetensors_io import DTYPES

GB = 10**9


def _fake_shard(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> int:
    """A safetensors file with this header and a sparse (unwritten) data section.

    Returns the data bytes. Loading it would read gigabytes of zeros; measuring it must not.
    """
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = DTYPES[dtype].nbytes
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)
    return offset


def _fake_checkpoint(folder: Path, shards: list[dict], *, index: bool = True) -> int:
    folder.mkdir(parents=True)
    total, weight_map = 0, {}
    for i, tensors in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors" if index else "model.safetensors"
        total += _fake_shard(folder / name, tensors)
        weight_map.update(dict.fromkeys(tensors, name))
    if index:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
        )
    return total


def _twelve_b(folder: Path) -> int:
    """A 12b-sized bf16 checkpoint in two shards (about 24.4 GB, stored sparse)."""
    return _fake_checkpoint(
        folder,
        [
            {
                "model.embed_tokens.weight": ("BF16", (262_144, 3840)),
                "model.layers.0.mlp.weight": ("BF16", (2_000_000_000 // 3840, 3840)),
                "model.layers.1.mlp.weight": ("BF16", (2_000_000_000 // 3840, 3840)),
            },
            {
                "model.layers.2.mlp.weight": ("BF16", (3_700_000_000 // 3840, 3840)),
                "model.layers.3.mlp.weight": ("BF16", (3_700_000_000 // 3840, 3840)),
            },
        ],
    )


def test_measure_reads_the_index_and_headers_not_the_tensors(tmp_path, monkeypatch):
    import safetensors
    import safetensors.torch

    def never(*a, **k):
        raise AssertionError("measuring must not load tensors")

    monkeypatch.setattr(safetensors, "safe_open", never)
    monkeypatch.setattr(safetensors.torch, "load_file", never)
    total = _twelve_b(tmp_path / "12b")
    size = measure(tmp_path / "12b")
    assert size.total == total > 24 * GB
    assert size.bytes_per_param == 2
    largest = max(p.stat().st_size for p in (tmp_path / "12b").glob("*.safetensors"))
    assert size.largest_file == largest < total


def test_measure_without_index_sums_the_headers(tmp_path):
    total = _fake_checkpoint(
        tmp_path / "c", [{"w": ("F32", (1000, 1000)), "b": ("F32", (10,))}], index=False
    )
    assert total == 4_000_040
    size = measure(tmp_path / "c")
    assert (size.total, size.bytes_per_param) == (total, 4)


def test_measure_never_raises(tmp_path):
    assert measure(None) is None
    assert measure(tmp_path / "missing") is None
    (tmp_path / "empty").mkdir()
    assert measure(tmp_path / "empty") is None
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"\xff" * 20)
    assert measure(tmp_path / "broken") is None
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"x")
    assert measure(tmp_path / "pickle") is None


def test_estimate_from_the_config(tmp_path):
    assert estimate("12b").total == 24_400_000_000  # the table of real Gemma-3 sizes
    assert estimate("7b").total == 14 * GB  # a parameter count in the name, bf16
    assert estimate("1.5b").total == 3 * GB
    assert estimate("350m").total == 700_000_000
    assert estimate("small").total == R.DEFAULT_BYTES
    assert estimate(None).total == R.DEFAULT_BYTES
    assert estimate("12b", {"demo": {"arch": "text", "seed": 1}}).total == R.DEMO_BYTES
    assert estimate("12b", {"hub": {"repo": "a/b", "revision": "main"}}).total == 24_400_000_000
    total = _twelve_b(tmp_path / "local")
    assert estimate("1b", {"path": str(tmp_path / "local")}).total == total  # measured
    assert estimate("1b", {"path": str(tmp_path / "nope")}).total == 2 * GB
    assert [estimate(s).basis for s in ("12b", "7b", "small")] == ["table", "parameters", "default"]
    # a fetched base (``folder``) is measured before anything is guessed
    assert estimate("12b", {"hub": {"repo": "a/b"}}, folder=tmp_path / "local").total == total


def test_the_demo_estimate_bounds_the_largest_demo_base(tmp_path):
    """DEMO_BYTES is an upper bound of the largest demo base the schema allows (multimodal,
    8 layers, float32), and not a loose one."""
    from mergebake.demo import make_base

    make_base(tmp_path / "b", arch="multimodal", num_layers=8, seed=1, dtype="float32")
    real = measure(tmp_path / "b")
    assert real.total <= R.DEMO_BYTES < 4 * real.total
    assert estimate("12b", {"demo": {}}, folder=tmp_path / "b") == real


def test_preflight_disk_estimate_uses_the_same_estimator(tmp_path):
    """The demo grid before anything is built: per base a generated copy, a normalised
    base and, per adapter (eng, nob), a bake and its normalised copy; one merge per cell
    (4 bases x 3 methods + 12b x ties); each the size of a demo base, or of the size
    name for a Hub base."""
    from mergebake.config import load_config
    from mergebake.preflight import disk_needed

    config = load_config(write_config(tmp_path / "config.yaml", demo_config()))
    # + 16 cells, and the bakes of the two adapter-space cells (1b: eng-nob__ties-adapter)
    assert disk_needed(config, tmp_path) == (6 * (1 + 1 + 2 * 2) + 16 + 2) * R.DEMO_BYTES
    config["bases"] = {
        name: {"hub": {"repo": f"org/{name}", "revision": "main"}} for name in config["bases"]
    }
    gb = R.SIZE_BYTES  # 1b, 4b: 6 checkpoints + 3 merges per base; 12b: 6 + 1 (ties)
    # 1b also: the adapter-space cell (eng-nob__ties-adapter) and its bake
    want = 2 * (11 * gb["1b"] + 9 * gb["4b"] + 7 * gb["12b"])
    assert disk_needed(config, tmp_path) == want


def test_a_12b_ties_merge_asks_far_more_than_a_1b_linear_one():
    small = job_resources("merge", estimate("1b"), factor=R.method_factor("linear"))
    big = job_resources("merge", estimate("12b"), factor=R.method_factor("ties"))
    assert big["mem_mb"] > 5 * small["mem_mb"]
    assert big["runtime"] > 4 * small["runtime"]
    assert big["threads"] > small["threads"] == 1
    assert big["disk_mb"] > 10 * small["disk_mb"]
    assert R.method_factor("some_new_method") == max(m.factor for m in METHODS.values())


def test_every_figure_grows_with_size():
    for rule in ("bake", "normalise_base", "merge", "eval_cell", "fetch_base", "upload"):
        rows = [job_resources(rule, estimate(s)) for s in ("1b", "4b", "12b", "27b")]
        for key in ("mem_mb", "runtime", "threads", "disk_mb"):
            values = [r[key] for r in rows]
            assert values == sorted(values), (rule, key, values)


def test_a_retry_asks_for_more_memory_and_time():
    first = job_resources("demo_base", None)
    assert job_resources("demo_base", None, attempt=2)["mem_mb"] == 2 * first["mem_mb"]
    assert job_resources("demo_base", None, attempt=3)["runtime"] == 3 * first["runtime"]
    size = estimate("4b")
    one, two = job_resources("bake", size), job_resources("bake", size, attempt=2)
    assert 2 * one["mem_mb"] - 100 <= two["mem_mb"] <= 2 * one["mem_mb"]
    assert two["threads"] == one["threads"] and two["disk_mb"] == one["disk_mb"]


def test_threads_are_clamped():
    assert job_resources("eval_cell", Size(1, 1))["threads"] == 1
    assert job_resources("eval_cell", estimate("27b"))["threads"] == 16
    assert job_resources("bake", estimate("27b"))["threads"] == 8
    assert job_resources("normalise_base", estimate("27b"))["threads"] == 1


def test_gpu_only_for_steps_that_use_one_and_only_on_cuda():
    size = estimate("4b")
    for rule in ("bake", "merge", "eval_cell", "eval_baseline"):
        assert job_resources(rule, size, device="cuda")["gpu"] == 1
        assert job_resources(rule, size, device="auto")["gpu"] == 0
        assert job_resources(rule, size, device="cpu")["gpu"] == 0
    for rule in ("normalise_base", "fetch_base", "report", "upload", "demo_base"):
        assert job_resources(rule, size, device="cuda")["gpu"] == 0


def test_a_streaming_bake_needs_a_shard_of_memory_not_the_model():
    size = estimate("27b")
    peft = job_resources("bake", size)
    stream = job_resources("bake", size, model="bake_stream")
    assert stream["mem_mb"] < peft["mem_mb"] / 5
    assert stream["disk_mb"] == peft["disk_mb"]
    with pytest.raises(MergebakeError, match="set-resources bake:mem_base"):
        job_resources("bake", size, model="bake_stream", overrides={"mem_base": "x"})


def test_normalise_memory_follows_the_largest_shard_not_the_total():
    one_file = job_resources("normalise_base", Size(20 * 2**30, 20 * 2**30))
    sharded = job_resources("normalise_base", Size(20 * 2**30, 4 * 2**30))
    assert sharded["mem_mb"] < one_file["mem_mb"]
    assert sharded["disk_mb"] == one_file["disk_mb"]


def test_eval_in_a_wider_dtype_than_stored_needs_more_memory():
    bf16 = Size(8 * 2**30, 4 * 2**30, 2)
    assert R.dtype_factor("float32", bf16) == 2
    assert R.dtype_factor("auto", bf16) == R.dtype_factor(None, bf16) == 1
    assert R.dtype_factor("float16", Size(1, 1, 4)) == 1  # narrower: never below 1
    wide = job_resources("eval_cell", bf16, factor=R.dtype_factor("float32", bf16))
    assert wide["mem_mb"] > job_resources("eval_cell", bf16)["mem_mb"]


def test_knobs_can_be_overridden_and_are_checked():
    size = estimate("12b")
    base = job_resources("merge", size)
    more = job_resources("merge", size, overrides={"mem_per_gb": "2048", "runtime_base": 100})
    assert more["mem_mb"] > base["mem_mb"] and more["runtime"] == base["runtime"] + 90
    assert job_resources("merge", size, overrides={"slurm_partition": "gpu"}) == base
    assert job_resources("merge", size, overrides={"gb_per_thread": 1.5})["threads"] == 8
    with pytest.raises(MergebakeError, match="merge:mem_per_gb='lots'.*number >= 0"):
        job_resources("merge", size, overrides={"mem_per_gb": "lots"})
    with pytest.raises(MergebakeError, match="number >= 0"):
        job_resources("merge", size, overrides={"runtime_base": -1})
    assert job_resources("a_new_rule", size)["mem_mb"] > 4000  # the default model


def test_readme_shows_the_models_table():
    text = (ROOT / "README.md").read_text()
    assert R.markdown_table() in text, "regenerate with mergebake.resources.markdown_table()"
    assert R.knobs_table() in text, "regenerate with mergebake.resources.knobs_table()"


# ---- the rules' resource functions, through Snakemake dry runs ---------------
