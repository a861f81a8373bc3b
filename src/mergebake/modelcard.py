"""Model cards: one README.md per published cell, and the repo-level README of the grid.

A cell's card is built with huggingface_hub's :class:`~huggingface_hub.ModelCard` /
:class:`~huggingface_hub.ModelCardData`, so its metadata is what the Hub reads:
``base_model`` (the base's Hub repo id, when the base came from the Hub), ``tags`` (merge,
mergekit, lora and the method), ``library_name: transformers``, ``language`` and
``license`` from the config, and a ``model-index`` with the cell's lm-eval scores. The body
gives the rendered mergekit recipe (local paths replaced by the names of the checkpoints
they held), the base and adapters with their repo, revision and pinned commit, the scores
with Δ against the report's baseline row of the same base, and how to load the cell.

Metrics are chosen as in the report (:mod:`mergebake.report`): ``report.metrics`` when set,
else ``acc,none`` (or the first metric) of each top-level task; a Δ is the cell's value
minus the baseline's, in the metric's units.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from . import MergebakeError
from .config import BASE_ROW
from .hub import commit_url, hub_url
from .report import choose_columns, column_name, md_table, natural_key, read_eval

TAGS = ("merge", "mergekit", "lora")
LIBRARY = "transformers"
PIPELINE = "text-generation"


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    x = round(float(x), 3) + 0.0
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def _pinned(entry: dict[str, Any]) -> str | None:
    """The commit a fetched source was pinned to, from its folder's provenance.json."""
    d = entry.get("dir")
    prov = Path(d) / "provenance.json" if d else None
    if prov is None or not prov.is_file():
        return None
    return (json.loads(prov.read_text()).get("source") or {}).get("commit")


def describe_source(entry: dict[str, Any]) -> dict[str, Any]:
    """``{kind, repo, subfolder, revision, commit, detail}`` of a base or adapter entry.

    ``entry`` is ``{"name", "source": <config source>, "dir": <fetched folder or None>}``.
    """
    from .config import ConfigError
    from .workflow.sources import DemoSource, HubSource, PathSource, source_from_config

    try:
        src = source_from_config(entry.get("source") or {})
    except ConfigError:
        src = None
    if isinstance(src, HubSource):
        return {
            "kind": "hub",
            "repo": src.repo,
            "subfolder": src.subfolder,
            "revision": src.revision,
            "commit": _pinned(entry) or None,
            "detail": src.repo + (f" (`{src.subfolder}`)" if src.subfolder else ""),
        }
    if isinstance(src, DemoSource):
        spec = ", ".join(f"{k} {v}" for k, v in src.params)
        return {
            "kind": "demo",
            "repo": None,
            "subfolder": None,
            "revision": None,
            "commit": None,
            "detail": f"generated demo ({spec})",
        }
    if isinstance(src, PathSource):
        return {
            "kind": "path",
            "repo": None,
            "subfolder": None,
            "revision": None,
            "commit": None,
            "detail": f"local folder `{Path(src.path).name}`",
        }
    return {
        "kind": "unknown",
        "repo": None,
        "subfolder": None,
        "revision": None,
        "commit": None,
        "detail": "–",
    }


def render_recipe(cell_dir: Path, spec: dict[str, Any]) -> str:
    """The cell's rendered mergekit recipe, local paths replaced by checkpoint names.

    The base's path becomes its Hub repo id (or its name); each adapter's baked
    checkpoint becomes ``<base>+<adapter>``.
    """
    cell_dir = Path(cell_dir)
    recipe = cell_dir / "recipe.yaml"
    text = recipe.read_text() if recipe.is_file() else ""
    prov_path = cell_dir / "provenance.json"
    inputs = json.loads(prov_path.read_text()).get("inputs", {}) if prov_path.is_file() else {}
    base = spec["base"]
    base_src = describe_source(base)
    labels = {}
    if "base" in inputs:
        labels[inputs["base"]["path"]] = base_src["repo"] or base["name"]
    for a in spec["adapters"]:
        if f"model:{a['name']}" in inputs:
            labels[inputs[f"model:{a['name']}"]["path"]] = f"{base['name']}+{a['name']}"
    for path in sorted(labels, key=len, reverse=True):  # longest first: no prefix clashes
        text = text.replace(path, labels[path])
    return text


def _n_shot(path: Path) -> dict[str, int]:
    data = json.loads(Path(path).read_text())
    return {k: v for k, v in (data.get("n-shot") or {}).items() if isinstance(v, int)}


def cell_scores(
    scores: Path,
    baseline: Path | None,
    metrics: list[str] | None,
    baseline_name: str | None,
    uncertainty: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The cell's chosen metrics, the baseline's and the Δs, as the receipt's ``summary``.

    ``{"metrics": [{"task", "key", "column", "value", "baseline", "delta",
    "lower_is_better", "num_fewshot"}], "baseline": name or None, "mean_delta": float or
    None}``; ``mean_delta`` counts lower-is-better metrics negated (positive is a gain).
    With ``uncertainty`` (see :func:`_add_uncertainty`) each metric also gets its Δ's 95%
    interval and its retention against the task's oracle, as in the report.
    """
    evals = {0: read_eval(Path(scores))}
    if baseline is not None and Path(baseline).is_file():
        evals[1] = read_eval(Path(baseline))
    columns = choose_columns(evals, metrics)
    shots = _n_shot(Path(scores))
    out = []
    for task, key in columns:
        value = evals[0].scores.get(task, {}).get(key)
        ref = evals[1].scores.get(task, {}).get(key) if 1 in evals else None
        lower = (task, key) in evals[0].lower_better
        out.append(
            {
                "task": task,
                "key": key,
                "column": column_name(task, key),
                "value": value,
                "baseline": ref,
                "delta": (value - ref) if value is not None and ref is not None else None,
                "lower_is_better": lower,
                "num_fewshot": shots.get(task),
            }
        )
    deltas = [(-m["delta"] if m["lower_is_better"] else m["delta"]) for m in out]
    mean = (sum(deltas) / len(deltas)) if deltas and None not in deltas else None
    summary = {
        "metrics": out,
        "baseline": baseline_name if 1 in evals else None,
        "mean_delta": mean,
    }
    if uncertainty is not None:
        _add_uncertainty(summary, Path(scores), baseline if 1 in evals else None, uncertainty)
    return summary


def _add_uncertainty(summary: dict, scores: Path, baseline: Path | None, spec: dict) -> None:
    """Add each metric's Δ interval and retention to ``summary``, as the report computes them.

    ``spec`` (the card spec's ``uncertainty``): ``bootstrap`` (resamples), ``seed``,
    ``min_gain`` (pp), ``oracle`` (``{task: adapter}``), ``base`` (the ``_base`` row's eval
    JSON or None), ``adapters`` (``{adapter: eval JSON}`` of the cell's group, in order).
    Adds to each metric ``delta_lo``/``delta_hi`` (95% paired bootstrap; None without a
    baseline), ``oracle``, ``gain_pp`` (oracle − base), ``usable`` and ``retained``, and
    to ``summary`` ``mean_retained`` (over usable metrics; None when none). Raises
    :class:`MergebakeError` naming a missing samples file.
    """
    from . import stats

    boot = stats.Bootstrap(
        int(spec.get("bootstrap", stats.DEFAULT_RESAMPLES)), spec.get("seed", 1234)
    )
    cell_samples = stats.load_samples(scores)
    ref_samples = stats.load_samples(baseline) if baseline is not None else None
    base = (
        read_eval(Path(spec["base"])) if spec.get("base") and Path(spec["base"]).is_file() else None
    )
    adapters = {
        a: read_eval(Path(p)) for a, p in (spec.get("adapters") or {}).items() if Path(p).is_file()
    }
    oracle_map = spec.get("oracle") or {}
    min_gain = float(spec.get("min_gain", stats.DEFAULT_MIN_GAIN_PP))
    first_of_task: dict[str, dict] = {}
    kept = []
    for m in summary["metrics"]:
        task, key = m["task"], m["key"]
        m["delta_lo"] = m["delta_hi"] = None
        if m["delta"] is not None and ref_samples is not None:
            c = stats.column(cell_samples, scores, task, key)
            r = stats.column(ref_samples, baseline, task, key)
            stats.check_paired(c, r, str(scores), str(baseline))
            m["delta_lo"], m["delta_hi"] = boot.interval(boot.replicates(c) - boot.replicates(r))
        first = first_of_task.setdefault(task, m)
        if task in oracle_map:
            name = oracle_map[task]
            if name not in adapters:
                raise MergebakeError(
                    f"report.oracle.{task}: {name!r} has no eval results among this cell's "
                    f"oracle candidates {sorted(adapters)}; name an adapter of the base"
                )
        else:
            name = stats.choose_oracle(
                {a: ev.scores.get(task, {}).get(first["key"]) for a, ev in adapters.items()},
                lower_is_better=first["lower_is_better"],
            )
        b = base.scores.get(task, {}).get(key) if base else None
        o = adapters[name].scores.get(task, {}).get(key) if name else None
        gain = stats.oracle_gain_pp(b, o, lower_is_better=m["lower_is_better"])
        m["oracle"] = name
        m["gain_pp"] = None if math.isnan(gain) else gain
        m["usable"] = None if math.isnan(gain) else stats.usable(gain, min_gain)
        ret = stats.retained(m["value"], b, o)
        m["retained"] = None if math.isnan(ret) else ret
        if m["usable"] and m["retained"] is not None:
            kept.append(m["retained"])
    summary["mean_retained"] = sum(kept) / len(kept) if kept else None
    summary["min_gain"] = min_gain


def _eval_results(summary: dict[str, Any]) -> list:
    from huggingface_hub import EvalResult

    results = []
    for m in summary["metrics"]:
        if m["value"] is None:
            continue
        metric, _, filt = m["key"].partition(",")
        results.append(
            EvalResult(
                task_type=PIPELINE,
                dataset_type=m["task"],
                dataset_name=m["task"],
                dataset_args={"num_fewshot": m["num_fewshot"]}
                if m["num_fewshot"] is not None
                else None,
                metric_type=metric,
                metric_name=m["column"],
                metric_value=float(m["value"]),
                metric_config=filt or None,
            )
        )
    return results


def _loading_snippet(repo: str, path_in_repo: str) -> str:
    return "\n".join(
        [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}", subfolder="{path_in_repo}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}", subfolder="{path_in_repo}")',
            "```",
        ]
    )


def _adapter_snippet(base_repo: str | None, repo: str, path_in_repo: str, sub: str) -> str:
    base = base_repo or "<the base model>"
    return "\n".join(
        [
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(base, "{repo}", subfolder="{path_in_repo}/{sub}")',
            "```",
        ]
    )


def _commit_cell(commit: str | None) -> str:
    return f"`{commit[:12]}`" if commit else "–"


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def _gguf_files(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The GGUF file entries of a cell spec that were published (with their size)."""
    return [f for f in (spec.get("gguf") or {}).get("files") or [] if "bytes" in f]


def _gguf_links(entries: list[dict[str, Any]]) -> str:
    """``q8_0, bf16`` as links to each GGUF file on the Hub, for the repo README."""
    return ", ".join(
        f"[{e['type']}]({hub_url(e['repo'], e['path_in_repo']).replace('/tree/', '/blob/', 1)})"
        if e.get("repo")
        else e["type"]
        for e in entries
    )


def _gguf_section(spec: dict[str, Any]) -> list[str]:
    """The card's GGUF section: each file (name, type, size, llama.cpp's check) and how to
    run it with llama.cpp; [] when the cell has no GGUF files (spec without ``gguf``)."""
    gguf = spec.get("gguf") or {}
    files = _gguf_files(spec)
    if not files:
        return []
    repo = gguf.get("repo") or spec["repo"]
    where = "this folder" if not gguf.get("repo") else f"[{repo}]({hub_url(repo)})"
    lines = [
        "",
        "## GGUF (llama.cpp)",
        "",
        f"GGUF files of this cell, in {where}: made by llama.cpp's own converter "
        "(`convert_hf_to_gguf.py`) and quantiser at the llama.cpp commit of "
        f"{files[0]['checked_by'].removeprefix('llama.cpp (').rstrip(')')}, and checked by "
        "llama.cpp: metadata types, tensors, and next-token logits on fixed prompts against "
        "this checkpoint in transformers.",
        "",
    ]
    rows = []
    for f in files:
        check = f.get("check") or {}
        agree = f"{check.get('top1_agree')}/{check.get('prompts')}" if check else "–"
        diffs = check.get("max_abs_diff") or []
        rows.append(
            [
                f"`{Path(f['path_in_repo']).name}`",
                f["type"],
                _size(f["bytes"]),
                agree,
                f"{max(diffs):.3g}" if diffs else "–",
            ]
        )
    lines += md_table(
        ["file", "type", "size", "same top-1 as transformers", "max abs Δlogit"],
        rows,
        ["l", "l", "r", "r", "r"],
    )
    first = files[0]["path_in_repo"]
    lines += [
        "",
        "Run with llama.cpp:",
        "",
        "```bash",
        f"hf download {repo} {first} --local-dir .",
        f'llama-cli -m {first} -p "The capital of Norway is" -n 32',
        "```",
        "",
        "or from Python with llama-cpp-python:",
        "",
        "```python",
        "from llama_cpp import Llama",
        "",
        f'llm = Llama.from_pretrained(repo_id="{repo}", filename="{first}")',
        'print(llm("The capital of Norway is", max_tokens=32)["choices"][0]["text"])',
        "```",
    ]
    return lines


def build_cell_card(cell_dir: Path, spec: dict[str, Any], summary: dict[str, Any]):
    """The :class:`~huggingface_hub.ModelCard` of one cell.

    ``spec`` (from the workflow): ``repo``, ``path_in_repo``, ``cell`` (``size``,
    ``variant``, ``group``, ``method``), ``base`` and ``adapters`` (``{"name", "source",
    "dir"}``), ``license``, ``languages``, ``private``; ``summary`` from
    :func:`cell_scores`.
    """
    from huggingface_hub import ModelCard, ModelCardData

    cell, repo, path = spec["cell"], spec["repo"], spec["path_in_repo"]
    base = describe_source(spec["base"])
    results = _eval_results(summary)
    data = ModelCardData(
        base_model=base["repo"],
        tags=[*TAGS, cell["method"], *(["gguf"] if _gguf_files(spec) else [])],
        library_name=LIBRARY,
        pipeline_tag=PIPELINE,
        language=list(spec.get("languages") or []) or None,
        license=spec.get("license"),
        model_name=f"{repo}/{path}" if results else None,
        eval_results=results or None,
    )
    adapters = spec["adapters"]
    space = spec.get("adapter_space")
    if space:
        return _adapter_space_card(cell_dir, spec, summary, data, base, space)
    lines = [
        f"# {path}",
        "",
        f"`{cell['group']}` ({' + '.join(a['name'] for a in adapters)}) merged with "
        f"`{cell['method']}` into the {cell['size']}-{cell['variant']} base: each LoRA "
        "adapter is baked into the base (W' = W + scale·B·A), the result is normalised to "
        "the text-only causal-LM layout, and the baked checkpoints are merged with "
        "[mergekit](https://github.com/arcee-ai/mergekit). Built by mergebake; one folder "
        f"of [{repo}]({hub_url(repo)}).",
        "",
        "## Loading",
        "",
        _loading_snippet(repo, path),
        "",
    ]
    if spec.get("private"):
        lines += ["The repo is private: log in first (`hf auth login`, or set `HF_TOKEN`).", ""]
    lines += _sources_and_scores(spec, summary, base)
    lines += _gguf_section(spec)
    recipe = render_recipe(cell_dir, spec)
    lines += [
        "",
        "## Recipe",
        "",
        f"The rendered mergekit recipe (`{cell['method']}`); `{spec['base']['name']}+"
        "<adapter>` stands for the base with that adapter baked in.",
        *_engine_lines(cell_dir),
        "",
        "```yaml",
        recipe.rstrip("\n"),
        "```",
        "",
    ]
    body = "\n".join(lines)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _adapter_space_card(cell_dir, spec, summary, data, base, space):
    """The card of an adapter-space cell: the merged adapter and the merged model, and how
    to load either (:func:`build_cell_card`)."""
    from huggingface_hub import ModelCard

    cell, repo, path = spec["cell"], spec["repo"], spec["path_in_repo"]
    data.tags = ["peft" if t == "mergekit" else t for t in data.tags]  # PEFT merged it
    sub = space.get("subfolder", "adapter")
    options = {k: v for k, v in space.items() if k not in ("subfolder", "combination_type")}
    lines = [
        f"# {path}",
        "",
        f"`{cell['group']}` ({' + '.join(a['name'] for a in spec['adapters'])}) merged in "
        f"adapter space with `{cell['method']}`: PEFT's `add_weighted_adapter` "
        f'(`combination_type="{space["combination_type"]}"`) merges the LoRA adapters into '
        f"one adapter (`{sub}/`), which is then baked into the {cell['size']}-"
        f"{cell['variant']} base (W' = W + scale·B·A) and normalised to the text-only "
        "causal-LM layout (this folder). Built by mergebake; one folder of "
        f"[{repo}]({hub_url(repo)}).",
        "",
        "## Loading",
        "",
        "The merged model:",
        "",
        _loading_snippet(repo, path),
        "",
        f"Or the merged adapter (`{sub}/`) on the base, with PEFT:",
        "",
        _adapter_snippet(base["repo"], repo, path, sub),
        "",
    ]
    if spec.get("private"):
        lines += ["The repo is private: log in first (`hf auth login`, or set `HF_TOKEN`).", ""]
    lines += _sources_and_scores(spec, summary, base)
    lines += _gguf_section(spec)
    lines += [
        "",
        "## Merge",
        "",
        f"PEFT `add_weighted_adapter`, `combination_type={space['combination_type']}`:",
        "",
        "```json",
        json.dumps(options, indent=2, sort_keys=True),
        "```",
        "",
    ]
    body = "\n".join(lines)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _role(entry: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The Sources table's role of an adapter entry, and the entry whose source the row
    shows. For a selected checkpoint (``eng@best``: the entry has ``selection``, the path
    of its selection JSON, and ``checkpoints``, each step's entry) the role names the
    step the selection chose and by which rule, and the row shows that checkpoint's
    source; without a readable selection file (a card made outside the workflow) the
    member's own entry, as for any adapter."""
    role = f"adapter `{entry['name']}`"
    sel = entry.get("selection")
    if not sel:
        return role, entry
    try:
        chosen = json.loads(Path(sel).read_text())
        step = str(chosen["choice"])
        picked = entry["checkpoints"][step]
    except (OSError, ValueError, KeyError, TypeError):
        return role, entry
    rule = "highest" if chosen.get("mode") == "max" else "lowest"
    return (
        f"{role}: checkpoint `{picked['name']}` ({rule} `{chosen.get('metric')}` of "
        f"{len(entry['checkpoints'])} checkpoints)",
        picked,
    )


def _sources_and_scores(spec: dict[str, Any], summary: dict[str, Any], base: dict) -> list[str]:
    """The card's Sources and Evaluation sections, as lines."""
    adapters = spec["adapters"]
    lines = ["## Sources", ""]
    rows = [
        [
            "base",
            base["detail"],
            f"`{base['revision']}`" if base["revision"] else "–",
            _commit_cell(base["commit"]),
        ]
    ]
    for a in adapters:
        role, a = _role(a)
        s = describe_source(a)
        rows.append(
            [
                role,
                s["detail"],
                f"`{s['revision']}`" if s["revision"] else "–",
                _commit_cell(s["commit"]),
            ]
        )
    lines += md_table(["role", "source", "revision", "commit"], rows, ["l", "l", "l", "l"])
    lines += ["", "## Evaluation", ""]
    ref = summary.get("baseline")
    if summary["metrics"]:
        ref_label = (
            ("the base model" if ref == BASE_ROW else f"the base + `{ref}` adapter")
            if ref
            else None
        )
        lines.append(
            "lm-eval scores in each metric's own units (acc: fraction correct, 0-1)"
            + (
                f"; Δ is this cell minus {ref_label} (`{ref}` row of the report), same units."
                if ref
                else "; no baseline scores, so no Δ."
            )
        )
        lines.append("")
        rich = "retained" in (summary["metrics"][0] if summary["metrics"] else {})
        rows = []
        for m in summary["metrics"]:
            row = [
                m["task"],
                m["key"].replace(",none", ""),
                str(m["num_fewshot"]) if m["num_fewshot"] is not None else "–",
                _fmt(m["value"]),
                _fmt(m["baseline"]),
                _fmt(m["delta"], signed=True),
            ]
            if rich:
                lo, hi = m.get("delta_lo"), m.get("delta_hi")
                row += [
                    f"[{_fmt(lo, True)}, {_fmt(hi, True)}]" if lo is not None else "–",
                    f"`{m['oracle']}`" if m.get("oracle") else "–",
                    f"{m['gain_pp'] + 0.0:+.1f}" if m.get("gain_pp") is not None else "–",
                    (f"{round(100 * m['retained']) + 0:d}%" if m["retained"] is not None else "–")
                    + ("†" if m.get("usable") is False else ""),
                ]
            rows.append(row)
        header = ["task", "metric", "n-shot", "this cell", f"baseline ({ref or '–'})", "Δ"]
        align = ["l", "l", "r", "r", "r", "r"]
        if rich:
            header += ["Δ 95% CI", "oracle", "oracle − base (pp)", "retained"]
            align += ["r", "l", "r", "r"]
        lines += md_table(header, rows, align)
        if summary.get("mean_delta") is not None:
            lines += ["", f"Mean Δ over these metrics: {_fmt(summary['mean_delta'], True)}."]
        if rich:
            mr = summary.get("mean_retained")
            lines += [
                "",
                "Δ 95% CI: paired bootstrap over the same documents. Retention: the oracle of "
                "a task is the single adapter trained for it (the best-scoring adapter of the "
                "group unless configured); retained = (cell − base)/(oracle − base). "
                f"† oracle − base below {summary.get('min_gain', 3.0):g} pp: not usable, left "
                "out of the mean."
                + (f" Mean retained: {round(100 * mr) + 0:d}%." if mr is not None else ""),
            ]
    else:
        lines.append("No scores.")
    return lines


def _engine_lines(cell_dir: Path) -> list[str]:
    """Which merge engine and magnitude selection made the cell, from its provenance."""
    prov = Path(cell_dir) / "provenance.json"
    try:
        params = json.loads(prov.read_text()).get("params") or {}
    except (OSError, ValueError):
        return []
    engine, selection = params.get("engine"), params.get("selection")
    if not engine:
        return []
    what = {
        "stream": "mergebake's stream engine (mergekit's own per-tensor code, byte-identical "
        "to `mergekit-yaml`)",
        "mergekit": "mergekit",
    }.get(engine, f"`{engine}`")
    sel = (
        " Magnitude trimming used the fast selection (ties at the cut-off broken by lowest "
        "index), which can differ from mergekit among entries equal to the cut-off."
        if selection == "fast"
        else ""
    )
    return ["", f"Merged by {what}.{sel}"]


def build_repo_card(
    rows: list[dict[str, Any]],
    *,
    repo: str,
    license: str | None = None,
    languages: list[str] | None = None,
    base_models: list[str] | None = None,
    private: bool = False,
):
    """The repo-level README: the grid table with a link to every cell and its commit.

    ``rows``: one per cell, ``{"path_in_repo", "size", "variant", "group", "method",
    "commit", "summary"}`` (``summary`` from :func:`cell_scores`, as kept in the receipt),
    optionally ``"gguf"`` (the receipt's GGUF entries: a GGUF column links each file, and
    the README is tagged ``gguf``).
    """
    from huggingface_hub import ModelCard, ModelCardData

    rows = sorted(
        rows,
        key=lambda r: (
            natural_key(r["size"]),
            natural_key(r["variant"]),
            natural_key(r["group"]),
            natural_key(r["method"]),
        ),
    )
    methods = sorted({r["method"] for r in rows}, key=natural_key)
    gguf = any(r.get("gguf") for r in rows)
    data = ModelCardData(
        base_model=sorted(set(base_models or [])) or None,
        tags=[*TAGS, *methods, *(["gguf"] if gguf else [])],
        library_name=LIBRARY,
        pipeline_tag=PIPELINE,
        language=list(languages or []) or None,
        license=license,
    )
    columns: list[str] = []
    for r in rows:
        for m in (r.get("summary") or {}).get("metrics", []):
            if m["column"] not in columns:
                columns.append(m["column"])
    baselines = sorted({(r.get("summary") or {}).get("baseline") or "–" for r in rows})
    table = []
    for r in rows:
        vals = {m["column"]: m for m in (r.get("summary") or {}).get("metrics", [])}
        cells = []
        for c in columns:
            m = vals.get(c)
            cells.append(
                "–"
                if m is None
                else _fmt(m["value"])
                + (f" ({_fmt(m['delta'], True)})" if m["delta"] is not None else "")
            )
        mean = (r.get("summary") or {}).get("mean_delta")
        commit = r.get("commit")
        table.append(
            [
                f"[{r['path_in_repo']}]({hub_url(repo, r['path_in_repo'])})",
                r["method"],
                r["group"],
                *cells,
                _fmt(mean, True),
                *([_gguf_links(r.get("gguf") or []) or "–"] if gguf else []),
                f"[`{commit[:12]}`]({commit_url(repo, commit)})" if commit else "–",
            ]
        )
    example = rows[0]["path_in_repo"] if rows else "<size>-<variant>/<group>__<method>"
    lines = [
        f"# {repo.split('/')[-1]}",
        "",
        f"{len(rows)} merged checkpoint(s), one folder per cell of a size × variant × adapter "
        "group × merge method grid: LoRA adapters baked into their base, merged with "
        "[mergekit](https://github.com/arcee-ai/mergekit) and scored with lm-eval, built "
        "and published by mergebake. Each folder is a complete text-only causal-LM "
        "checkpoint with its own model card (recipe, sources, scores).",
        "",
        "## Cells",
        "",
        "Scores are lm-eval metric values (acc: fraction correct, 0-1); in brackets the Δ "
        f"against the baseline row of the same base ({', '.join(baselines)}).",
        "",
    ]
    lines += md_table(
        ["cell", "method", "group", *columns, "mean Δ", *(["GGUF"] if gguf else []), "commit"],
        table,
        ["l", "l", "l", *["r"] * (len(columns) + 1), *(["l"] if gguf else []), "l"],
    )
    lines += ["", "## Loading", "", _loading_snippet(repo, example), ""]
    if private:
        lines += ["The repo is private: log in first (`hf auth login`, or set `HF_TOKEN`).", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def load_spec(text: str) -> dict[str, Any]:
    """Parse a card spec given as JSON (or ``@FILE``)."""
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise MergebakeError(f"--card: not valid JSON ({e})") from e
    for key in ("cell", "base", "adapters"):
        if key not in spec:
            raise MergebakeError(f"--card: missing {key!r}")
    return spec
