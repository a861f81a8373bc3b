"""Model cards: metadata the Hub reads (base_model, tags, library, language, license,
model-index), a body with the recipe, sources, Δ table and loading snippet, and a round
trip through huggingface_hub's ModelCard.load with the metadata intact."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from huggingface_hub import EvalResult, ModelCard

from mergebake import MergebakeError
from mergebake.modelcard import build_cell_card, build_repo_card, cell_scores

BASE_SHA = "a" * 40
ADAPTER_SHA = "b" * 40


def _eval(path: Path, scores: dict[str, dict[str, float]], *, lower=()) -> Path:
    results = {t: {**{k: v for k, v in s.items()}, "alias": t} for t, s in scores.items()}
    hib = {t: {k.partition(",")[0]: (t, k) not in lower for k in s} for t, s in scores.items()}
    path.write_text(
        json.dumps(
            {
                "results": results,
                "n-shot": {t: 0 for t in scores},
                "higher_is_better": hib,
                "group_subtasks": {},
            }
        )
    )
    return path


@pytest.fixture
def work(tmp_path):
    """A merged cell (recipe + provenance with absolute input paths), fetched Hub sources
    (provenance with the pinned commits), the cell's and the baseline's eval JSONs."""
    text = tmp_path / "results/text/4b-std"
    cell = tmp_path / "results/merged/4b-std/eng-nob__ties"
    cell.mkdir(parents=True)
    recipe = {
        "merge_method": "ties",
        "base_model": str(text / "_base"),
        "models": [
            {"model": str(text / a), "parameters": {"weight": 1.0, "density": 0.5}}
            for a in ("eng", "nob")
        ],
        "dtype": "bfloat16",
    }
    (cell / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (cell / "provenance.json").write_text(
        json.dumps(
            {
                "inputs": {
                    "base": {"path": str(text / "_base")},
                    "model:eng": {"path": str(text / "eng")},
                    "model:nob": {"path": str(text / "nob")},
                }
            }
        )
    )
    for d, sha in (
        ("resources/bases/4b-std", BASE_SHA),
        ("resources/adapters/4b-std/eng", ADAPTER_SHA),
        ("resources/adapters/4b-std/nob", ADAPTER_SHA),
    ):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "provenance.json").write_text(json.dumps({"source": {"commit": sha}}))
    scores = _eval(
        tmp_path / "cell.json",
        {"demo_eng": {"acc,none": 0.9, "acc_norm,none": 0.8}, "demo_nob": {"acc,none": 1.0}},
    )
    base = _eval(
        tmp_path / "base.json", {"demo_eng": {"acc,none": 0.35}, "demo_nob": {"acc,none": 0.25}}
    )
    adapters = [
        {
            "name": a,
            "dir": str(tmp_path / f"resources/adapters/4b-std/{a}"),
            "source": {
                "hub": {"repo": "org/adapters", "subfolder": f"4b-std/{a}", "revision": "main"}
            },
        }
        for a in ("eng", "nob")
    ]
    spec = {
        "repo": "org/merges",
        "path_in_repo": "4b-std/eng-nob__ties",
        "private": True,
        "cell": {"size": "4b", "variant": "std", "group": "eng-nob", "method": "ties"},
        "base": {
            "name": "4b-std",
            "dir": str(tmp_path / "resources/bases/4b-std"),
            "source": {"hub": {"repo": "google/gemma-3-4b-it", "revision": "main"}},
        },
        "adapters": adapters,
        "license": "gemma",
        "languages": ["nb", "en"],
    }
    return dict(tmp=tmp_path, cell=cell, scores=scores, base=base, spec=spec, text=text)


def test_card_metadata_and_round_trip_through_modelcard_load(work, tmp_path):
    summary = cell_scores(work["scores"], work["base"], None, "_base")
    card = build_cell_card(work["cell"], work["spec"], summary)
    path = tmp_path / "README.md"
    card.save(path)
    loaded = ModelCard.load(path)
    assert loaded.data.to_dict() == card.data.to_dict()
    meta = loaded.data.to_dict()
    assert meta["base_model"] == "google/gemma-3-4b-it"
    assert meta["tags"] == ["merge", "mergekit", "lora", "ties"]
    assert meta["library_name"] == "transformers"
    assert meta["language"] == ["nb", "en"] and meta["license"] == "gemma"
    assert loaded.data.model_name == "org/merges/4b-std/eng-nob__ties"
    assert loaded.data.eval_results == [
        EvalResult(
            task_type="text-generation",
            dataset_type=t,
            dataset_name=t,
            dataset_args={"num_fewshot": 0},
            metric_type="acc",
            metric_name=f"{t}/acc",
            metric_value=v,
            metric_config="none",
        )
        for t, v in (("demo_eng", 0.9), ("demo_nob", 1.0))
    ]
    # The YAML block is what the Hub parses: model-index is there, plainly.
    head = yaml.safe_load(path.read_text().split("---")[1])
    assert head["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.9


def test_card_body_recipe_sources_deltas_and_loading(work):
    summary = cell_scores(work["scores"], work["base"], None, "_base")
    text = build_cell_card(work["cell"], work["spec"], summary).text
    assert str(work["tmp"]) not in text  # no local paths
    assert "base_model: google/gemma-3-4b-it" in text
    assert "- model: 4b-std+eng" in text and "- model: 4b-std+nob" in text
    assert f"| base | google/gemma-3-4b-it | `main` | `{BASE_SHA[:12]}` |" in text
    assert (
        f"| adapter `eng` | org/adapters (`4b-std/eng`) | `main` | `{ADAPTER_SHA[:12]}` |" in text
    )
    assert "| demo_eng | acc | 0 | 0.900 | 0.350 | +0.550 |" in text
    assert "| demo_nob | acc | 0 | 1.000 | 0.250 | +0.750 |" in text
    assert "Mean Δ over these metrics: +0.650." in text
    assert (
        'AutoModelForCausalLM.from_pretrained("org/merges", subfolder="4b-std/eng-nob__ties")'
    ) in text
    assert "private: log in first" in text


def test_card_without_baseline_or_hub_sources(work):
    spec = dict(
        work["spec"],
        private=False,
        base={
            "name": "4b-std",
            "dir": None,
            "source": {"demo": {"arch": "multimodal", "seed": 401}},
        },
        adapters=[
            {"name": a, "dir": None, "source": {"demo": {"skill": a, "seed": 1}}}
            for a in ("eng", "nob")
        ],
        license=None,
        languages=[],
    )
    summary = cell_scores(work["scores"], None, None, None)
    card = build_cell_card(work["cell"], spec, summary)
    meta = card.data.to_dict()
    assert "base_model" not in meta and "license" not in meta and "language" not in meta
    assert "no baseline scores, so no Δ" in card.text
    assert "| demo_eng | acc | 0 | 0.900 | – | – |" in card.text
    assert "base_model: 4b-std" in card.text
    assert ModelCard(str(card)).data.to_dict() == meta


def test_configured_metrics_and_lower_is_better(work, tmp_path):
    scores = _eval(
        tmp_path / "c.json", {"t": {"acc,none": 0.5, "ppl,none": 10.0}}, lower={("t", "ppl,none")}
    )
    base = _eval(
        tmp_path / "b.json", {"t": {"acc,none": 0.4, "ppl,none": 12.0}}, lower={("t", "ppl,none")}
    )
    s = cell_scores(scores, base, ["t/acc", "t/ppl"], "_base")
    assert [m["column"] for m in s["metrics"]] == ["t/acc", "t/ppl"]
    assert s["metrics"][1]["lower_is_better"] is True
    assert s["mean_delta"] == pytest.approx((0.1 + 2.0) / 2)  # ppl went down: a gain


def test_repo_card_lists_every_cell_with_links(work):
    summary = cell_scores(work["scores"], work["base"], None, "_base")
    rows = [
        dict(
            path_in_repo=f"{b}/eng-nob__{m}",
            size=b.split("-")[0],
            variant=b.split("-")[1],
            group="eng-nob",
            method=m,
            commit=c,
            summary=summary,
        )
        for b, m, c in (
            ("12b-std", "ties", "c" * 40),
            ("4b-std", "linear", None),
            ("4b-std", "ties", "d" * 40),
        )
    ]
    card = build_repo_card(
        rows,
        repo="org/merges",
        license="gemma",
        languages=["nb"],
        base_models=["google/gemma-3-4b-it"],
        private=True,
    )
    meta = ModelCard(str(card)).data.to_dict()
    assert meta["tags"] == ["merge", "mergekit", "lora", "linear", "ties"]
    assert meta["base_model"] == ["google/gemma-3-4b-it"] and meta["license"] == "gemma"
    lines = [ln for ln in card.text.splitlines() if ln.startswith("| [")]
    assert [ln.split("]")[0] for ln in lines] == [
        "| [4b-std/eng-nob__linear",
        "| [4b-std/eng-nob__ties",
        "| [12b-std/eng-nob__ties",
    ]
    assert (
        "[4b-std/eng-nob__ties](https://huggingface.co/org/merges/tree/main/4b-std/eng-nob__ties)"
    ) in lines[1]
    assert f"[`{'d' * 12}`](https://huggingface.co/org/merges/commit/{'d' * 40})" in lines[1]
    assert "0.900 (+0.550)" in lines[1] and lines[0].endswith("| – |")


def test_card_carries_delta_interval_and_retention(tmp_path):
    """With the uncertainty spec the card shows each Δ's 95% interval and the retention."""
    import numpy as np
    from test_report import N_DOCS, per_doc, write_eval

    from mergebake import stats

    def ev(name, eng, nob):
        return write_eval(
            tmp_path / f"{name}.json",
            {"demo_eng": {"acc,none": eng}, "demo_nob": {"acc,none": nob}},
        )

    cell, base = ev("cell", 0.65, 0.40), ev("base", 0.50, 0.40)
    adapters = {"eng": str(ev("eng", 0.80, 0.41)), "nob": str(ev("nob", 0.50, 0.40))}
    spec = {"bootstrap": 200, "seed": 3, "min_gain": 3.0, "oracle": {}, "base": str(base),
            "adapters": adapters}  # fmt: skip
    summary = cell_scores(cell, base, None, "_base", spec)
    eng, nob = summary["metrics"]
    counts = stats.resample_counts("demo_eng", N_DOCS, 200, 3)
    d = np.array(per_doc(0.65)) - np.array(per_doc(0.50))
    lo, hi = np.quantile(counts @ d / N_DOCS, [0.025, 0.975])
    assert (eng["delta_lo"], eng["delta_hi"]) == (pytest.approx(lo), pytest.approx(hi))
    assert eng["oracle"] == "eng" and eng["gain_pp"] == pytest.approx(30.0)
    assert eng["usable"] is True and eng["retained"] == pytest.approx(0.5)
    assert nob["oracle"] == "eng" and nob["usable"] is False  # 1 pp < 3 pp
    assert summary["mean_retained"] == pytest.approx(0.5)
    spec_card = {
        "repo": "org/m",
        "path_in_repo": "1b-std/eng-nob__ties",
        "cell": {"size": "1b", "variant": "std", "group": "eng-nob", "method": "ties"},
        "base": {"name": "1b-std", "source": {"demo": {"arch": "text"}}, "dir": None},
        "adapters": [],
    }
    text = str(build_cell_card(tmp_path, spec_card, summary))
    assert "| Δ 95% CI | oracle | oracle − base (pp) | retained |" in text
    assert f"| +0.150 | [{lo:+.3f}, {hi:+.3f}] | `eng` | +30.0 | 50% |" in text
    assert "| `eng` | +1.0 | 0%† |" in text
    assert "Mean retained: 50%." in text
    # A task without samples is an error naming the file.
    samples = tmp_path / "cell.samples.json.gz"
    samples.unlink()
    with pytest.raises(MergebakeError, match=r"cell\.samples\.json\.gz"):
        cell_scores(cell, base, None, "_base", spec)


def test_card_says_which_engine_and_selection_made_the_cell(tmp_path):
    from mergebake.modelcard import _engine_lines

    prov = tmp_path / "provenance.json"
    assert _engine_lines(tmp_path) == []  # no provenance: nothing claimed
    prov.write_text(json.dumps({"params": {"engine": "stream", "selection": "exact"}}))
    assert _engine_lines(tmp_path)[1].startswith("Merged by mergebake's stream engine")
    assert "fast selection" not in _engine_lines(tmp_path)[1]
    prov.write_text(json.dumps({"params": {"engine": "mergekit", "selection": "fast"}}))
    line = _engine_lines(tmp_path)[1]
    assert line.startswith("Merged by mergekit.") and "fast selection" in line


def test_adapter_space_card_says_how_to_load_the_model_and_the_adapter(work):
    space = {
        "subfolder": "adapter",
        "combination_type": "ties",
        "weights": {"eng": 1.0, "nob": 1.0},
        "density": 0.5,
        "majority_sign_method": "total",
    }
    spec = dict(work["spec"], adapter_space=space)
    summary = cell_scores(work["scores"], None, None, None)
    text = build_cell_card(work["cell"], spec, summary).text
    path = spec["path_in_repo"]
    assert f'AutoModelForCausalLM.from_pretrained("org/merges", subfolder="{path}")' in text
    base = build_cell_card(work["cell"], spec, summary).data.to_dict()["base_model"]
    assert f'base = AutoModelForCausalLM.from_pretrained("{base}")' in text
    assert (
        f'model = PeftModel.from_pretrained(base, "org/merges", subfolder="{path}/adapter")'
    ) in text
    assert 'add_weighted_adapter` (`combination_type="ties"`)' in text
    assert '"density": 0.5' in text and "## Recipe" not in text
    assert "| demo_eng | acc | 0 | 0.900 | – | – |" in text  # scores as for any cell
    tags = build_cell_card(work["cell"], spec, summary).data.to_dict()["tags"]
    assert "peft" in tags and "mergekit" not in tags


def test_a_selected_checkpoint_is_named_with_its_rule_and_its_own_source(work, tmp_path):
    """eng@best: the Sources row names the chosen checkpoint and the selection rule and
    shows that checkpoint's subfolder and pinned commit; with no selection file (a card
    made outside the workflow) the member's own entry, as before."""
    spec = copy.deepcopy(work["spec"])
    ckpt = {}
    for n, sha in ((500, "c" * 40), (1000, "d" * 40)):
        d = tmp_path / f"resources/adapters/4b-std/eng@{n}"
        d.mkdir(parents=True)
        (d / "provenance.json").write_text(json.dumps({"source": {"commit": sha}}))
        ckpt[str(n)] = {
            "name": f"eng@{n}",
            "dir": str(d),
            "source": {"hub": {"repo": "org/seams", "subfolder": f"ckpt-{n}", "revision": "main"}},
        }
    sel = tmp_path / "results/selection/4b-std/eng.json"
    sel.parent.mkdir(parents=True)
    sel.write_text(
        json.dumps(
            {"choice": 1000, "metric": "demo_eng/acc", "mode": "max", "scores": {"500": 0.4}}
        )
    )
    spec["adapters"][0] = {
        "name": "eng@best",
        "dir": None,
        "source": {
            "hub": {"repo": "org/seams", "subfolder": "ckpt-{checkpoint}", "revision": "main"}
        },
        "selection": str(sel),
        "checkpoints": ckpt,
    }
    summary = cell_scores(work["scores"], work["base"], None, "_base")
    text = build_cell_card(work["cell"], spec, summary).text
    row = next(line for line in text.splitlines() if "eng@best" in line and "org/seams" in line)
    assert row.startswith(
        "| adapter `eng@best`: checkpoint `eng@1000` (highest `demo_eng/acc` of 2 checkpoints) "
    )
    assert "org/seams (`ckpt-1000`)" in row and "d" * 7 in row and "c" * 7 not in row
    sel.unlink()
    text = build_cell_card(work["cell"], spec, summary).text
    row = next(line for line in text.splitlines() if "eng@best" in line and "org/seams" in line)
    assert row.startswith("| adapter `eng@best` |") and "ckpt-{checkpoint}" in row


def test_repo_card_links_each_cells_gguf_files_and_is_tagged_gguf(work):
    """Cells with GGUF files (from their receipts) get a GGUF column linking each file in
    the repo it went to; cards of a grid without GGUF stay as they were (no column, no tag)."""
    summary = cell_scores(work["scores"], work["base"], None, "_base")
    gguf = [
        {"type": t, "repo": "org/ggufs", "path_in_repo": f"4b-std/eng-nob__ties/c.{t}.gguf"}
        for t in ("bf16", "q8_0")
    ]
    rows = [
        dict(path_in_repo="4b-std/eng-nob__ties", size="4b", variant="std", group="eng-nob",
             method="ties", commit=None, summary=summary, gguf=gguf),
        dict(path_in_repo="4b-std/eng-nob__linear", size="4b", variant="std", group="eng-nob",
             method="linear", commit=None, summary=summary),
    ]  # fmt: skip
    card = build_repo_card(rows, repo="org/merges")
    assert ModelCard(str(card)).data.to_dict()["tags"][-1] == "gguf"
    lines = [ln for ln in card.text.splitlines() if ln.startswith("| [") or ln.startswith("| cell")]
    assert "| GGUF | commit |" in lines[0]
    url = "https://huggingface.co/org/ggufs/blob/main/4b-std/eng-nob__ties/c.q8_0.gguf"
    assert f"[q8_0]({url})" in lines[2] and "[bf16](" in lines[2]
    assert lines[1].endswith("| – | – |")  # linear: no GGUF, no commit
    plain = build_repo_card(rows[1:], repo="org/merges")
    assert "GGUF" not in plain.text and "gguf" not in ModelCard(str(plain)).data.to_dict()["tags"]


def test_a_cell_card_with_gguf_files_is_tagged_gguf(work):
    summary = cell_scores(work["scores"], work["base"], None, "_base")
    tags = build_cell_card(work["cell"], work["spec"], summary).data.to_dict()["tags"]
    assert "gguf" not in tags
    entry = {
        "type": "q8_0",
        "file": "c.q8_0.gguf",
        "repo": "org/merges",
        "path_in_repo": "4b-std/eng-nob__ties/c.q8_0.gguf",
        "bytes": 9,
        "checked_by": "llama.cpp (llama-cpp-python 0.3.36)",
        "check": None,
    }
    spec = {**work["spec"], "gguf": {"repo": None, "files": [entry]}}
    tags = build_cell_card(work["cell"], spec, summary).data.to_dict()["tags"]
    assert tags[-1] == "gguf"
    spec["gguf"]["files"] = [{"type": "q8_0"}]  # planned, not (yet) published: no tag
    assert "gguf" not in build_cell_card(work["cell"], spec, summary).data.to_dict()["tags"]
