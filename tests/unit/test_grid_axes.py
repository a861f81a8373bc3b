"""The grid's axes in the domain model (no Snakemake): sweep points, exclusions and
per-block eval suites expand into cells, paths, payloads and commands; bad input is an
error naming the key before any job."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
from _workflow import ROOT, demo_config

from mergebake import commands
from mergebake.config import (
    ConfigError,
    ConfigWarning,
    cell_parameters,
    expand_grid,
    load_config,
    method_points,
)
from mergebake.workflow import Plan, path

SMALL_GRID = [
    {"sizes": ["1b"], "variants": ["std", "open"], "groups": ["eng-nob"], "methods": ["ties"]}
]


def cfg(**changes) -> dict:
    """The demo config, one block (1b × std/open × ties), with ``changes`` applied."""
    c = demo_config()
    c["grid"] = copy.deepcopy(SMALL_GRID)
    for k, v in changes.items():
        c[k] = v
    return c


def swept(values=(0.3, 0.5, 0.7), **changes) -> dict:
    c = cfg(**changes)
    c["methods"]["ties"]["sweep"] = {"density": list(values)}
    return c


def names(config: dict) -> list[str]:
    return [c.path_in_repo for c in expand_grid(load_config(config))]


# ---- sweeps --------------------------------------------------------------------------


def test_a_sweep_expands_a_method_into_named_points_sharing_the_bakes():
    config = load_config(swept())
    assert [c.path_in_repo for c in expand_grid(config)] == [
        "1b-std/eng-nob__ties.density-0.3",
        "1b-std/eng-nob__ties.density-0.5",
        "1b-std/eng-nob__ties.density-0.7",
        "1b-open/eng-nob__ties.density-0.3",
        "1b-open/eng-nob__ties.density-0.5",
        "1b-open/eng-nob__ties.density-0.7",
    ]
    plan = Plan(config, ROOT)
    cell = plan.cells[0]
    assert cell_parameters(config, cell) == {"weight": 1.0, "density": 0.3}
    wc = dict(base="1b-std", group="eng-nob", method="ties.density-0.7")
    assert plan.recipe(wc["method"]) == str(ROOT / "recipes" / "ties.yaml")
    cmd = commands.build(plan, "merge", wc)
    assert json.loads(cmd.parameters) == {"weight": 1.0, "density": 0.7}
    assert cmd.out == "results/merged/1b-std/eng-nob__ties.density-0.7"
    # every point merges the same baked checkpoints: one bake per (base, adapter)
    jobs = list(plan.jobs())
    assert sorted(wc["adapter"] for r, wc in jobs if r == "bake" and wc["base"] == "1b-std") == [
        "eng",
        "nob",
    ]
    assert sum(r == "merge" for r, _ in jobs) == 6
    assert "ties.density-0.3" in plan.method_names() and "ties" not in plan.method_names()
    row = next(r for r in plan.report_rows() if r["name"] == "eng-nob__ties.density-0.5")
    assert row["sweep"] == {"method": "ties", "parameters": {"density": 0.5}}
    assert plan.card_spec(wc)["cell"]["method"] == "ties.density-0.7"


def test_several_swept_parameters_and_per_adapter_values():
    c = cfg()
    c["methods"]["linear"]["sweep"] = {"weight": [{"eng": 0.3, "nob": 0.7}, {"eng": 0.7, "nob": 1}]}
    c["methods"]["ties"]["sweep"] = {"density": [0.2, 1], "lambda": [1.0, 0.5]}
    c["grid"][0].update(variants=["std"], methods=["linear", "ties"])
    config = load_config(c)
    assert [p.name for p in method_points(config, "linear")] == [
        "linear.weight-eng0.3-nob0.7",
        "linear.weight-eng0.7-nob1",
    ]
    assert [p.name for p in method_points(config, "ties")] == [
        "ties.density-0.2.lambda-1",
        "ties.density-0.2.lambda-0.5",
        "ties.density-1.lambda-1",
        "ties.density-1.lambda-0.5",
    ]
    plan = Plan(config, ROOT)
    wc = dict(base="1b-std", group="eng-nob", method="linear.weight-eng0.7-nob1")
    assert plan.cell_parameters(wc) == {"weight": {"eng": 0.7, "nob": 1}}


def test_no_sweep_keeps_the_method_name():
    assert names(cfg()) == ["1b-std/eng-nob__ties", "1b-open/eng-nob__ties"]


def test_adding_a_sweep_value_adds_only_its_jobs():
    before = set(_job_keys(Plan(load_config(swept((0.3, 0.5))), ROOT)))
    after = set(_job_keys(Plan(load_config(swept((0.3, 0.5, 0.7))), ROOT)))
    assert before < after
    assert {(r, m) for r, m in after - before} == {
        (r, f"{b}/eng-nob__ties.density-0.7")
        for r in ("merge", "eval_cell", "upload")
        for b in ("1b-std", "1b-open")
    } | {("payload", f"cards/{b}/eng-nob__ties.density-0.7") for b in ("1b-std", "1b-open")}


def _job_keys(plan: Plan):
    for rule, wc in plan.jobs():
        if "method" in wc:
            yield rule, f"{wc['base']}/{wc['group']}__{wc['method']}"
        else:
            yield rule, "/".join(wc.values())


@pytest.mark.parametrize(
    "sweep, message",
    [
        (
            {"density": [0.3, 1.5]},
            "key 'methods.ties.sweep.density[1]': 1.5 is outside (0, 1]",
        ),
        (
            {"density": [0.5, {"eng": 0.5, "nob": 0}]},
            "key 'methods.ties.sweep.density[1].nob'",
        ),
        ({"lambda": [1, 1.0]}, "the points {'lambda': 1} and {'lambda': 1.0} would both be"),
        ({"density": [0.3, 0.3]}, "would both be named 'ties.density-0.3'"),
        ({"weight": [1e300]}, "would be named 'ties.weight-1e+300', which is not path-safe"),
        ({"densty": [0.3]}, "parameter(s) ['densty'] are not used by this recipe"),
    ],
    ids=["out-of-range", "per-adapter-out-of-range", "same-name", "repeated", "unsafe", "typo"],
)
def test_bad_sweeps_name_the_key(sweep, message):
    c = cfg()
    c["methods"]["ties"]["sweep"] = sweep
    with pytest.raises(ConfigError) as e:
        load_config(c, source="c.yaml")
    assert str(e.value).startswith("c.yaml: ")
    assert message in str(e.value)


# ---- exclusions ------------------------------------------------------------------------


def test_exclusions_leave_cells_out_and_unknown_bases_may_be_excluded():
    c = swept()
    c["grid"][0]["sizes"] = ["1b", "27b"]
    c["grid"][0]["exclude"] = ["27b-*/*", "1b-open/*", "*/eng-nob__ties.density-0.7"]
    assert names(c) == ["1b-std/eng-nob__ties.density-0.3", "1b-std/eng-nob__ties.density-0.5"]
    del c["grid"][0]["exclude"]
    with pytest.raises(ConfigError, match=r"base '27b-std'.*grid\[0\].exclude: \['27b-std/\*'\]"):
        load_config(c)


def test_an_exclusion_matching_nothing_is_a_warning():
    c = cfg()
    c["grid"][0]["exclude"] = ["1b-std/*", "*/eng-nob__linear"]
    with pytest.warns(ConfigWarning) as w:
        assert names(c) == ["1b-open/eng-nob__ties"]
    assert [str(x.message) for x in w] == [
        "config: key 'grid[0].exclude[1]': pattern '*/eng-nob__linear' matches no cell of "
        "the block (patterns match <size>-<variant>/<group>__<method>)"
    ]
    c["grid"][0]["exclude"] = ["1b-std/*"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(c)


# ---- per-block eval suites ---------------------------------------------------------------

TASKS = [{"name": "demo_eng", "num_fewshot": 0}, {"name": "demo_nob", "num_fewshot": 0}]
EXTRA = {"name": "demo_pref", "num_fewshot": 2}


def _blocks() -> dict:
    c = cfg()
    c["grid"] = [
        {"sizes": ["1b"], "variants": ["std"], "groups": ["eng-nob"], "methods": ["linear"]},
        {
            "sizes": ["1b"],
            "variants": ["std"],
            "groups": ["eng-nob"],
            "methods": ["ties"],
            "eval": {"add": [EXTRA]},
        },
        {
            "sizes": ["1b"],
            "variants": ["open"],
            "groups": ["eng-nob"],
            "methods": ["ties"],
            "eval": {"tasks": [{"name": "demo_eng"}]},
        },
    ]
    return c


def test_a_block_adds_or_replaces_tasks_and_baselines_take_the_union():
    plan = Plan(load_config(_blocks()), ROOT)
    lin = dict(base="1b-std", group="eng-nob", method="linear")
    ties = dict(base="1b-std", group="eng-nob", method="ties")
    opn = dict(base="1b-open", group="eng-nob", method="ties")
    assert plan.eval_tasks(lin) == TASKS
    assert plan.eval_tasks(ties) == [*TASKS, EXTRA]
    assert plan.eval_tasks(opn) == [{"name": "demo_eng", "num_fewshot": 0}]
    assert plan.eval_tasks(dict(base="1b-std", row="eng")) == [*TASKS, EXTRA]
    assert plan.eval_tasks(dict(base="1b-open", row="_base")) == [TASKS[0]]
    assert plan.tasks_payload(lin) == "eval_tasks"
    assert plan.tasks_payload(ties) == "eval_tasks/1b-std/eng-nob__ties"
    assert plan.tasks_payload(dict(base="1b-std", row="nob")) == "eval_tasks/1b-std"
    own = [n for n in plan.payload_names() if n.startswith("eval_tasks/")]
    assert own == [
        "eval_tasks/1b-open",
        "eval_tasks/1b-open/eng-nob__ties",
        "eval_tasks/1b-std",
        "eval_tasks/1b-std/eng-nob__ties",
    ]
    assert json.loads(plan.payload("eval_tasks/1b-std")) == [*TASKS, EXTRA]
    assert json.loads(plan.payload("eval_tasks/1b-open/eng-nob__ties")) == [TASKS[0]]
    assert commands.build(plan, "eval_cell", ties).tasks_file == (
        "results/payloads/eval_tasks/1b-std/eng-nob__ties.json"
    )
    assert plan.task_inputs(dict(base="1b-std", row="_base"))[0] == path(
        "payload", payload="eval_tasks/1b-std"
    )
    assert commands.build(plan, "eval_cell", lin).tasks_file == "results/payloads/eval_tasks.json"


def test_without_block_suites_every_eval_reads_the_global_tasks():
    plan = Plan(load_config(cfg()), ROOT)
    assert not [n for n in plan.payload_names() if n.startswith("eval_tasks/")]
    for rule, wc in plan.jobs():
        if rule.startswith("eval_"):
            assert plan.tasks_payload(wc) == "eval_tasks"


@pytest.mark.parametrize(
    "block_eval, message",
    [
        (
            {"add": [{"name": "demo_eng"}]},
            "key 'grid[0].eval.add': task(s) ['demo_eng'] listed twice (or already in eval.tasks)",
        ),
        (
            {"tasks": [{"name": "demo_eng", "num_fewshot": 5}]},
            "key 'grid[0].eval.tasks': task 'demo_eng' has num_fewshot 5 but 0 in eval.tasks",
        ),
        ({"add": [], "tasks": [EXTRA]}, "key 'grid[0].eval'"),
    ],
    ids=["add-duplicate", "fewshot-conflict", "both"],
)
def test_bad_block_suites_name_the_key(block_eval, message):
    c = cfg()
    c["grid"][0]["eval"] = block_eval
    with pytest.raises(ConfigError) as e:
        load_config(c)
    assert message in str(e.value)


def test_sweep_curves_follow_one_swept_value_with_the_others_fixed(tmp_path):
    import pandas as pd

    from mergebake import plots, report

    def row(d, lam):
        return {"sweep": {"method": "ties", "parameters": {"density": d, "lambda": lam}}}

    rows = [row(0.5, 1), row(0.3, 1), row(0.3, 2), {"name": "eng"}]
    df = pd.DataFrame(
        {
            "_row": [0, 1, 2, 3],
            "_base": ["1b-std"] * 4,
            "_group": ["eng-nob", "eng-nob", "eng-nob", None],
            report.MEAN_DELTA: [0.2, 0.1, 0.4, 0.0],
        }
    )
    assert report._sweep_curves(df, rows) == [
        {
            "label": "1b-std eng-nob__ties lambda=1",
            "parameter": "density",
            "x": [0.3, 0.5],
            "y": [0.1, 0.2],
        },
        {
            "label": "1b-std eng-nob__ties density=0.3",
            "parameter": "lambda",
            "x": [1.0, 2.0],
            "y": [0.1, 0.4],
        },
    ]
    out = tmp_path / "s.png"
    plots.plot_sweep(report._sweep_curves(df, rows), out, title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
