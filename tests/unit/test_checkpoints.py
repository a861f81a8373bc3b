"""The checkpoint axis in the domain model (no Snakemake): an adapter's ``checkpoints``
expand into baseline rows ``<adapter>@<step>`` with their own sources, folders, jobs and
commands; ``select`` picks one by a metric (ties: earliest); bad input is an error naming
the key before any job."""

from __future__ import annotations

import copy
import json
import shlex

import pytest
from _workflow import demo_config

from mergebake import MergebakeError, commands
from mergebake.config import ConfigError, load_config
from mergebake.selection import choose, select_checkpoint
from mergebake.workflow import Plan, path

B = "1b-std"
SELECT = {"metric": "demo_eng/acc", "mode": "max"}


def cfg(eng: dict | None = None, group=("eng@best", "nob")) -> dict:
    """The demo config on 1b-std × linear, ``eng`` replaced by ``eng`` and the group
    ``eng-nob`` by ``group``."""
    c = demo_config()
    c["grid"] = [
        {"sizes": ["1b"], "variants": ["std"], "groups": ["eng-nob"], "methods": ["linear"]}
    ]
    c["adapters"][B]["eng"] = eng or {
        "demo": {"skill": "eng", "seed": 11},
        "checkpoints": [10, 30, 60],
        "select": dict(SELECT),
    }
    c["groups"]["eng-nob"] = list(group)
    return c


HUB = {
    "hub": {
        "repo": "org/seams",
        "revision": "a" * 40,
        "subfolder": "adapters/checkpoint-{checkpoint}",
    },
    "checkpoints": [500, 1000],
    "select": dict(SELECT),
}


def test_each_checkpoint_is_a_baseline_row_with_its_own_folder_and_jobs():
    plan = Plan(load_config(cfg()))
    assert plan.adapters[B] == ["eng@10", "eng@30", "eng@60", "nob"]
    assert plan.baseline_rows_of(B) == ["_base", "eng@10", "eng@30", "eng@60", "nob"]
    # a demo run saves every checkpoint: one training job, one folder per checkpoint in it
    assert plan.adapter_dir(B, "eng@30") == f"resources/adapters/{B}/eng/checkpoint-30"
    assert plan.bake_inputs({"base": B, "adapter": "eng@30"})["adapter"] == (
        f"resources/adapters/{B}/eng"
    )
    jobs = list(plan.jobs())
    assert [wc for r, wc in jobs if r == "demo_adapter"] == [
        {"base": B, "adapter": "eng"},
        {"base": B, "adapter": "nob"},
    ]
    assert [wc["adapter"] for r, wc in jobs if r == "bake"] == plan.adapters[B]
    assert ("select_checkpoint", {"base": B, "adapter": "eng"}) in jobs
    cmd = commands.build(plan, "demo_adapter", {"base": B, "adapter": "eng"})
    assert "--checkpoints 10,30,60" in shlex.join(cmd.argv())
    nob = commands.build(plan, "demo_adapter", {"base": B, "adapter": "nob"})
    assert "--checkpoints" not in nob.argv()  # an adapter without checkpoints: as before
    bake = commands.build(plan, "bake", {"base": B, "adapter": "eng@30"})
    assert bake.adapter == f"resources/adapters/{B}/eng/checkpoint-30"


def test_hub_and_local_checkpoints_fill_the_placeholder():
    plan = Plan(load_config(cfg(HUB)))
    fetch = commands.build(plan, "fetch_adapter", {"base": B, "adapter": "eng@1000"})
    assert (fetch.subfolder, fetch.out, fetch.config_key) == (
        "adapters/checkpoint-1000",
        f"resources/adapters/{B}/eng@1000",
        f"adapters.{B}.eng.hub",
    )
    local = {"path": "/runs/eng/checkpoint-{checkpoint}", "checkpoints": [5, 7]}
    plan = Plan(load_config(cfg(local, group=("eng@7", "nob"))))
    assert plan.adapter_dir(B, "eng@5") == "/runs/eng/checkpoint-5"
    assert plan.merge_models({"base": B, "group": "eng-nob", "method": "linear"}) == [
        f"results/text/{B}/eng@7",
        f"results/text/{B}/nob",
    ]
    assert plan.selections == []  # no select: no selection job


def test_best_resolves_through_the_selection_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = Plan(load_config(cfg()))
    sel = tmp_path / path("selection", base=B, adapter="eng")
    sel.parent.mkdir(parents=True)
    sel.write_text(json.dumps({"choice": 30}))
    wc = {"base": B, "group": "eng-nob", "method": "linear"}
    assert plan.merge_models(wc) == [f"results/text/{B}/eng@30", f"results/text/{B}/nob"]
    merge = commands.build(plan, "merge", wc)
    assert [n for n, _ in merge.models] == ["eng", "nob"]  # per-adapter weights by name
    assert json.loads(merge.parameters) == {"weight": {"eng": 0.5, "nob": 0.5}}
    select = commands.build(plan, "select_checkpoint", {"base": B, "adapter": "eng"})
    assert select.argv()[-2:] == ["--out", f"results/selection/{B}/eng.json"]
    assert [a for a in select.argv() if "=" in a] == [
        f"{n}=results/eval/{B}/eng@{n}.json" for n in (10, 30, 60)
    ]
    rows = {r["name"]: r for r in plan.report_rows()}
    assert rows["eng@30"]["checkpoint"] == {
        "adapter": "eng",
        "step": 30,
        "selection": f"results/selection/{B}/eng.json",
    }
    assert "checkpoint" not in rows["nob"]
    # the oracle candidates of a cell with eng@best: every checkpoint of eng
    assert rows["eng-nob__linear"]["adapters"] == ["eng@10", "eng@30", "eng@60", "nob"]


def test_a_grid_without_checkpoints_plans_as_before():
    before = demo_config()
    plan = Plan(load_config(before))
    assert plan.adapters["1b-std"] == ["eng", "nob"]
    assert plan.selections == []
    assert all("checkpoint" not in r for r in plan.report_rows())


# ---- selection ---------------------------------------------------------------------


def _eval(tmp_path, name: str, acc: float) -> str:
    f = tmp_path / f"{name}.json"
    f.write_text(json.dumps({"results": {"demo_eng": {"acc,none": acc, "alias": "demo_eng"}}}))
    return str(f)


def test_selection_takes_the_best_and_breaks_ties_by_the_earliest_step(tmp_path):
    scores = {1500: _eval(tmp_path, "c", 0.8), 500: _eval(tmp_path, "a", 0.8)}
    scores[1000] = _eval(tmp_path, "b", 0.6)
    got = select_checkpoint(scores, "demo_eng/acc", "max")
    assert got == {
        "choice": 500,
        "metric": "demo_eng/acc",
        "mode": "max",
        "scores": {"500": 0.8, "1000": 0.6, "1500": 0.8},
    }
    assert select_checkpoint(scores, "demo_eng/acc", "min")["choice"] == 1000
    assert choose({3: 1.0, 2: 1.0, 1: 0.5}, "max") == 2
    with pytest.raises(MergebakeError, match="no score 'demo_nob/acc'"):
        select_checkpoint(scores, "demo_nob/acc")


# ---- bad input -------------------------------------------------------------------------


def _bad(eng=None, group=("eng@best", "nob"), **kw) -> str:
    with pytest.raises(ConfigError) as e:
        c = cfg(eng, group)
        for k, v in kw.items():
            c[k] = v
        load_config(c)
    return str(e.value)


def test_a_checkpoint_placeholder_missing_from_the_subfolder_or_path_names_the_key():
    hub = copy.deepcopy(HUB)
    hub["hub"]["subfolder"] = "adapters"
    msg = _bad(hub)
    assert f"key 'adapters.{B}.eng.hub.subfolder'" in msg and "{checkpoint}" in msg
    msg = _bad({"path": "/runs/eng", "checkpoints": [5]}, group=("eng@5", "nob"))
    assert f"key 'adapters.{B}.eng.path'" in msg
    msg = _bad({"path": "/runs/eng-{checkpoint}"}, group=("eng", "nob"))
    assert "lists no checkpoints" in msg


def test_best_without_select_a_missing_checkpoint_and_a_bare_name_are_errors():
    no_select = {"demo": {"skill": "eng", "seed": 11}, "checkpoints": [10, 30]}
    msg = _bad(no_select)
    assert "key 'groups.eng-nob'" in msg and f"adapters.{B}.eng.select" in msg
    msg = _bad(group=("eng@20", "nob"))
    assert "key 'groups.eng-nob'" in msg and "checkpoint 20" in msg and "[10, 30, 60]" in msg
    msg = _bad(group=("eng", "nob"))
    assert "has checkpoints" in msg and "eng@best" in msg
    msg = _bad(group=("eng@10", "eng@best"))
    assert "named more than once" in msg
    msg = _bad({"demo": {"skill": "eng", "seed": 11}, "checkpoints": [10, 90]})
    assert f"key 'adapters.{B}.eng.checkpoints'" in msg
    msg = _bad({"path": "/x", "select": dict(SELECT)}, group=("eng", "nob"))
    assert f"key 'adapters.{B}.eng.select'" in msg


def test_a_selection_metric_no_task_produces_names_the_key():
    eng = {"demo": {"skill": "eng", "seed": 11}, "checkpoints": [10, 30]}
    eng["select"] = {"metric": "hellaswag/acc", "mode": "max"}
    msg = _bad(eng)
    assert f"key 'adapters.{B}.eng.select.metric'" in msg and "'hellaswag'" in msg
    eng["select"] = dict(SELECT)
    msg = _bad(eng, eval={**demo_config()["eval"], "baselines": False})
    assert "eval.baselines" in msg


# ---- the demo saves checkpoints while it trains ------------------------------------------


def test_demo_checkpoints_are_peft_adapters_and_leave_the_final_adapter_unchanged(tmp_path):
    from mergebake.demo import make_base, train_adapter

    base = tmp_path / "base"
    make_base(base, arch="text", num_layers=1, seed=3)
    plain = train_adapter(base, tmp_path / "plain", skill="eng", seed=5, steps=12)
    ck = train_adapter(base, tmp_path / "ck", skill="eng", seed=5, steps=12, checkpoints=[4, 12])
    assert ck["checkpoints"] == [4, 12] and "checkpoints" not in plain
    final = "adapter_model.safetensors"
    assert (tmp_path / "ck" / final).read_bytes() == (tmp_path / "plain" / final).read_bytes()
    # the last checkpoint is the final adapter; an earlier one differs
    assert (tmp_path / "ck/checkpoint-12" / final).read_bytes() == (
        tmp_path / "plain" / final
    ).read_bytes()
    assert (tmp_path / "ck/checkpoint-4" / final).read_bytes() != (
        tmp_path / "plain" / final
    ).read_bytes()
    assert (tmp_path / "ck/checkpoint-4/adapter_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ck", "plain"]  # no leftovers


def test_the_card_spec_of_a_best_member_carries_its_selection_and_every_checkpoint():
    """The card of a cell with eng@best learns the choice when it is made (from the
    selection JSON) and shows that checkpoint's own source (subfolder, fetched folder)."""
    plan = Plan(load_config(cfg(HUB)))
    spec = plan.card_spec({"base": B, "group": "eng-nob", "method": "linear"})
    best, nob = spec["adapters"]
    assert best["name"] == "eng@best" and best["dir"] is None
    assert best["selection"] == f"results/selection/{B}/eng.json"
    assert best["checkpoints"] == {
        str(n): {
            "name": f"eng@{n}",
            "source": {
                "hub": {
                    "repo": "org/seams",
                    "revision": "a" * 40,
                    "subfolder": f"adapters/checkpoint-{n}",
                }
            },
            "dir": f"resources/adapters/{B}/eng@{n}",
        }
        for n in (500, 1000)
    }
    assert set(nob) == {"name", "source", "dir"}  # a plain member: as before
