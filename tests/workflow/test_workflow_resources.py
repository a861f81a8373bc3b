"""Resources of planned jobs, read from Snakemake's dry run: every job planned from
estimates, the real grid by size and method, GPUs on cuda, set-resources overrides."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from _workflow import ROOT, demo_config, snakemake, write_config

from mergebake import resources as R
from mergebake.resources import estimate, job_resources

_BLOCK = re.compile(r"^(?:local)?rule (\w+):\n((?:    .*\n)+)", re.M)


def planned(workdir: Path, *args: str, config: Path | None = None) -> list[dict]:
    """Every job of a dry run: rule, first output, threads and resources (``all`` left out)."""
    p = snakemake(workdir, "-n", *args, config=config)
    jobs = []
    for rule, body in _BLOCK.findall(p.stdout + p.stderr):
        if rule == "all":
            continue
        fields = dict(re.findall(r"^    (\w+): (.*)$", body, re.M))
        res = dict(kv.split("=", 1) for kv in fields.get("resources", "").split(", ") if kv)
        jobs.append(
            {
                "rule": rule,
                "output": fields["output"].split(", ")[0],
                "threads": int(fields.get("threads", 1)),
                **{k: int(v) for k, v in res.items() if v.isdigit()},
            }
        )
    assert jobs, p.stdout[-3000:]
    return jobs


def _one(jobs, rule, output):
    found = [j for j in jobs if j["rule"] == rule and j["output"] == output]
    assert len(found) == 1, (rule, output)
    return found[0]


def test_dry_run_plans_every_job_from_estimates(tmp_path):
    write_config(tmp_path / "config.yaml", demo_config())
    jobs = planned(tmp_path, "--cores", "2")
    assert len(jobs) > 100
    for j in jobs:
        assert {"mem_mb", "runtime", "disk_mb"} <= set(j), j
        assert j.get("gpu", 0) == 0
    merge = _one(jobs, "merge", "results/merged/12b-std/eng-nob__ties")
    demo = estimate("12b", {"demo": {}})  # nothing exists yet: the demo estimate
    assert merge["mem_mb"] == job_resources("merge", demo, factor=1.5)["mem_mb"]
    assert merge["threads"] == 1


GEMMA = ROOT / "examples" / "gemma3-eng-nob.yaml"


def test_the_real_grid_is_planned_by_size_and_method(tmp_path):
    jobs = planned(tmp_path, "--cores", "64", config=GEMMA)
    ties12 = _one(jobs, "merge", "results/merged/12b-std/eng-nob__ties")
    lin1 = _one(jobs, "merge", "results/merged/1b-std/eng-nob__linear")
    want = job_resources("merge", estimate("12b"), factor=R.method_factor("ties"))
    assert {k: ties12[k] for k in want if k != "gpu"} == {
        k: v for k, v in want.items() if k != "gpu"
    }
    assert ties12["mem_mb"] > 5 * lin1["mem_mb"]
    fetch = _one(jobs, "fetch_base", "resources/bases/12b-std")
    assert fetch["disk_mb"] > 24_000  # room for the download
    ev = _one(jobs, "eval_cell", "results/eval/12b-std/eng-nob__ties.json")
    assert ev["threads"] == 12


@pytest.mark.parametrize("bake_device", ["cpu", "cuda"])
def test_device_cuda_asks_the_scheduler_for_gpus(tmp_path, bake_device):
    """device: cuda puts merge and eval on a GPU; the bake only with bake.device: cuda."""
    cfg = demo_config() | {"device": "cuda", "bake": {"device": bake_device}}
    write_config(tmp_path / "config.yaml", cfg)
    jobs = planned(tmp_path, "--cores", "2")
    gpu_rules = {"merge", "eval_cell", "eval_baseline"} | (
        {"bake"} if bake_device == "cuda" else set()
    )
    for j in jobs:
        assert j.get("gpu", 0) == int(j["rule"] in gpu_rules), j


def test_set_resources_overrides_a_knob_or_a_figure_per_rule(tmp_path):
    jobs = planned(
        tmp_path,
        "--cores",
        "64",
        "--set-resources",
        "merge:mem_per_gb=4096",
        "eval_cell:mem_mb=1234",
        "bake:runtime_per_gb=10",
        config=GEMMA,
    )
    ties12 = _one(jobs, "merge", "results/merged/12b-std/eng-nob__ties")
    want = job_resources("merge", estimate("12b"), factor=1.5, overrides={"mem_per_gb": 4096})
    assert ties12["mem_mb"] == want["mem_mb"]
    assert _one(jobs, "eval_cell", "results/eval/1b-std/eng-nob__ties.json")["mem_mb"] == 1234
    bake = _one(jobs, "bake", "results/baked/12b-std/eng")
    assert (
        bake["runtime"]
        == job_resources(
            "bake", estimate("12b"), model="bake_stream", overrides={"runtime_per_gb": 10}
        )["runtime"]
    )
