"""Every job's command, built without Snakemake: quoting, argv shape, and size at 10,000 cells."""

from __future__ import annotations

import shlex

import pytest
from _grid import big_config
from _workflow import ROOT, demo_config

from mergebake import commands
from mergebake.cli import build_parser
from mergebake.config import load_config
from mergebake.workflow import Plan

# What the rules add around {params.cmd}: " --threads N > {log} 2>&1", the log path being
# at most as long as the job's longest output path plus a few characters.
SHELL_SUFFIX = 300
LIMIT = 16 * 1024


@pytest.fixture(scope="module")
def plan_10k() -> Plan:
    cfg = load_config(big_config(10, 10, 100))
    return Plan(cfg, ROOT)


def test_no_job_command_exceeds_16_kib_at_10000_cells(plan_10k):
    assert len(plan_10k.cells) == 10_000
    counts: dict[str, int] = {}
    longest: dict[str, int] = {}
    for rule, wc in plan_10k.jobs():
        counts[rule] = counts.get(rule, 0) + 1
        if rule == "payload":  # a run: job inside Snakemake, no command line
            continue
        cmd = commands.command_line(plan_10k, rule, wc)
        longest[rule] = max(longest.get(rule, 0), len(cmd.encode()) + SHELL_SUFFIX)
    assert counts["merge"] == counts["eval_cell"] == counts["upload"] == 10_000
    assert counts["eval_baseline"] == 300 and counts["report"] == counts["hub_readme"] == 1
    assert counts["payload"] == 10_000 + 4
    assert set(longest) >= {"merge", "eval_cell", "report", "hub_readme", "upload", "bake"}
    assert max(longest.values()) <= LIMIT, longest
    # what grows with the grid is in the payloads, not on the command line
    report = commands.command_line(plan_10k, "report", {})
    assert "m099" not in report and "--rows-file results/payloads/report_rows.json" in report
    assert len(plan_10k.payload("report_rows")) > 128 * 1024  # would not fit an argument


def test_commands_parse_with_the_cli_and_round_trip_through_the_shell(tmp_path):
    """Names and paths with spaces and quotes survive: the argv the CLI sees is the model's."""
    cfg = demo_config()
    odd = str(tmp_path / "it's a base")
    cfg["bases"]["1b-std"] = {"path": odd}
    cfg["eval"]["include_path"] = str(tmp_path / "my 'tasks'")
    cfg["eval"]["tasks"] = [{"name": "o'neil task", "num_fewshot": 1}]
    plan = Plan(load_config(cfg), ROOT)
    parser = build_parser()
    seen = set()
    for rule, wc in plan.jobs():
        if rule == "payload":
            continue
        argv = commands.build(plan, rule, wc).argv()
        line = commands.command_line(plan, rule, wc)
        assert shlex.split(line) == argv
        parsed = parser.parse_args(argv[1:])  # argparse accepts every option the rule passes
        assert parsed.command == argv[1]
        seen.add(rule)
    assert seen >= {"bake", "merge", "eval_cell", "eval_baseline", "report", "upload"}
    bake = commands.build(plan, "bake", {"base": "1b-std", "adapter": "eng"})
    assert bake.base == odd and bake.expected_base == odd
    cell = {"base": "1b-std", "group": "eng-nob", "method": "ties"}
    assert commands.build(plan, "eval_cell", cell).include_path == cfg["eval"]["include_path"]
    # the task list is in the payload file only
    assert "o'neil" not in commands.command_line(plan, "eval_cell", cell)
    assert '"o\'neil task"' in plan.payload("eval_tasks")


def test_demo_commands_match_the_argv_the_rules_ran_before():
    """The argv recorded in provenance (demo, bake, normalise, merge) is unchanged."""
    plan = Plan(load_config(demo_config()), ROOT)
    wc = {"base": "4b-open", "group": "eng-nob", "method": "linear"}
    assert commands.build(plan, "merge", wc).argv() == [
        *["mergebake", "merge", "--recipe", str(ROOT / "recipes/linear.yaml")],
        *["--base", "results/text/4b-open/_base"],
        *["--model", "eng=results/text/4b-open/eng", "--model", "nob=results/text/4b-open/nob"],
        *["--parameters", '{"weight": {"eng": 0.5, "nob": 0.5}}', "--seed", "1234"],
        *["--out-shard-size", "5B", "--device", "auto"],
        *["--engine", "stream", "--selection", "exact"],  # merge.engine/selection (new)
        *["--out", "results/merged/4b-open/eng-nob__linear"],
    ]
    assert commands.command_line(plan, "demo_base", {"base": "12b-std"}) == (
        "mergebake demo-base --out resources/bases/12b-std --arch multimodal --layers 4 --seed 1201"
    )
    assert commands.command_line(plan, "bake", {"base": "1b-std", "adapter": "nob"}) == (
        "mergebake bake --base resources/bases/1b-std --adapter resources/adapters/1b-std/nob"
        " --out results/baked/1b-std/nob --engine stream --device cpu"
    )
    assert commands.command_line(plan, "upload", wc).endswith(
        "--repo mergebake/gemma-3-demo-merges --private"
    )


def test_hub_commands_carry_subfolder_pin_and_an_empty_repo_quoted(tmp_path):
    cfg = demo_config()
    cfg["bases"]["1b-std"] = {"hub": {"repo": "org/base", "revision": "main"}}
    cfg["adapters"]["1b-std"]["eng"] = {
        "hub": {"repo": "org/ad", "revision": "v1.0", "subfolder": "a dir/eng"}
    }
    cfg["allow_pickle"] = True
    cfg["hub"]["repo"] = None
    plan = Plan(load_config(cfg), ROOT)
    assert sorted(plan.pins) == ["org--ad@v1.0", "org--base@main"]
    assert commands.build(plan, "fetch_adapter", {"base": "1b-std", "adapter": "eng"}).argv() == [
        *["mergebake", "fetch", "--repo", "org/ad", "--revision", "v1.0"],
        *["--subfolder", "a dir/eng", "--config-key", "adapters.1b-std.eng.hub"],
        *["--pin", "resources/pins/org--ad@v1.0.json", "--allow-pickle"],
        *["--out", "resources/adapters/1b-std/eng"],
    ]
    assert commands.command_line(plan, "pin", {"pin": "org--base@main"}) == (
        "mergebake pin --repo org/base --revision main --config-key bases.1b-std.hub"
        " --out resources/pins/org--base@main.json"
    )
    up = commands.command_line(
        plan, "upload", {"base": "1b-std", "group": "eng-nob", "method": "ties"}
    )
    assert "--repo ''" in up
    with pytest.raises(KeyError, match="no mergebake command"):
        commands.build(plan, "payload", {"payload": "report_rows"})
