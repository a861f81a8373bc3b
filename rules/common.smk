# Config validation, grid expansion and every input function of the workflow.
import json
import re
from pathlib import Path

from snakemake.logging import logger

from mergebake.preflight import check_local_paths
from mergebake.config import (
    BASE_ROW,
    cell_parameters,
    expand_grid,
    load_config,
    recipe_path,
)

config = load_config(
    config,
    workflow_dir=Path(workflow.basedir),
    source=(workflow.configfiles or ["config"])[-1],
)
check_local_paths(config)
CELLS = expand_grid(config)
BASES = sorted({c.base for c in CELLS})
ADAPTERS = {
    base: sorted(
        {a for c in CELLS if c.base == base for a in config["groups"][c.group]}
    )
    for base in BASES
}
ENV = "../envs/mergebake.yaml"


def _alternation(names):
    """Regex matching exactly the given names (never matches when empty)."""
    names = sorted(set(names))
    return "|".join(re.escape(n) for n in names) if names else "(?!)"


def _bases_from(kind):
    return [b for b in BASES if kind in config["bases"][b]]


def _adapters_from(kind):
    return [a for b in BASES for a in ADAPTERS[b] if kind in config["adapters"][b][a]]


# Global wildcard constraints (applied in the Snakefile): names are only the configured ones.
WILDCARDS = dict(
    base=_alternation(BASES),
    adapter=_alternation(a for b in BASES for a in ADAPTERS[b]),
    group=_alternation(config["groups"]),
    method=_alternation(config["methods"]),
)


DEMO_BASES = _alternation(_bases_from("demo"))
HUB_BASES = _alternation(_bases_from("hub"))
DEMO_ADAPTERS = _alternation(_adapters_from("demo"))
HUB_ADAPTERS = _alternation(_adapters_from("hub"))
BASELINE_ROWS = _alternation([BASE_ROW, *(a for b in BASES for a in ADAPTERS[b])])
DEMO_TASKS_DIR = "resources/demo/tasks"


def run_preflight():
    """Preflight checks (local inputs, adapter/base fit, Hub token, disk) before any job."""
    from mergebake.preflight import preflight

    keep_going = workflow.execution_settings.keep_going
    for note in preflight(config, workdir=Path.cwd(), keep_going=keep_going):
        logger.warning(note)


def maybe_temp(path):
    """temp() for large intermediates when config temp_intermediates is set."""
    return temp(path) if config["temp_intermediates"] else path


# ---- sources ---------------------------------------------------------------


def get_base_dir(wildcards):
    """Folder of the base checkpoint: a local path as given, else the fetched/generated copy."""
    src = config["bases"][wildcards.base]
    if "path" in src:
        return src["path"]
    return f"resources/bases/{wildcards.base}"


def get_adapter_dir(wildcards):
    """Folder of the LoRA adapter for (base, adapter)."""
    src = config["adapters"][wildcards.base][wildcards.adapter]
    if "path" in src:
        return src["path"]
    return f"resources/adapters/{wildcards.base}/{wildcards.adapter}"


def _local_files(folder):
    """The weight and config files of a local checkpoint or adapter folder.

    Snakemake judges a folder input by the folder's own timestamp, which rewriting a file
    inside it does not change; listing the files makes new weights on disk rerun the
    bakes that read them.
    """
    d = Path(folder)
    if not d.is_dir():
        return [folder]  # missing: Snakemake reports it as a missing input
    pats = ("*.safetensors", "*.json", "*.bin")
    return sorted(str(p) for pat in pats for p in d.glob(pat) if p.is_file())


def get_bake_inputs(wildcards):
    """Named inputs of a bake: the base and adapter folders, plus the files of local ones."""
    base, adapter = get_base_dir(wildcards), get_adapter_dir(wildcards)
    files = []
    if "path" in config["bases"][wildcards.base]:
        files += _local_files(base)
    if "path" in config["adapters"][wildcards.base][wildcards.adapter]:
        files += _local_files(adapter)
    return dict(base=base, adapter=adapter, files=files)


def get_base_inputs(wildcards):
    """Inputs of a base's normalisation: its folder, plus its files when local."""
    base = get_base_dir(wildcards)
    local = "path" in config["bases"][wildcards.base]
    return dict(base=base, files=_local_files(base) if local else [])


def get_demo_base(wildcards):
    """Parameters of a generated demo base."""
    return config["bases"][wildcards.base]["demo"]


def get_demo_adapter(wildcards):
    """Parameters of a generated demo adapter."""
    return config["adapters"][wildcards.base][wildcards.adapter]["demo"]


def get_hub_base(wildcards):
    """Hub source (repo, revision, subfolder) of a base."""
    return config["bases"][wildcards.base]["hub"]


def get_hub_adapter(wildcards):
    """Hub source (repo, revision, subfolder) of an adapter."""
    return config["adapters"][wildcards.base][wildcards.adapter]["hub"]


def get_subfolder_arg(source):
    """`--subfolder DIR` of `mergebake fetch` when the Hub source names one."""
    import shlex

    sub = source.get("subfolder")
    return f"--subfolder {shlex.quote(sub)}" if sub else ""


# ---- bake ------------------------------------------------------------------


def get_expected_base(wildcards):
    """What the adapter's base_model_name_or_path should name: the Hub repo or the path."""
    src = config["bases"][wildcards.base]
    if "hub" in src:
        return src["hub"]["repo"]
    if "path" in src:
        return src["path"]
    return ""


def get_bake_flags(wildcards):
    """Flags of `mergebake bake` that come from the config."""
    flags = [
        f"--engine {config['bake']['engine']}",
        f"--device {config['bake']['device']}",
    ]
    expected = get_expected_base(wildcards)
    if expected:
        flags.append(f"--expected-base {expected}")
    if config["bake"]["strict_base_match"]:
        flags.append("--strict-base-match")
    if config["allow_pickle"]:
        flags.append("--allow-pickle")
    if config["trust_remote_code"]:
        flags.append("--trust-remote-code")
    return " ".join(flags)


# ---- merge -----------------------------------------------------------------


def _cell(wildcards):
    for c in CELLS:
        if (c.base, c.group, c.method) == (
            wildcards.base,
            wildcards.group,
            wildcards.method,
        ):
            return c
    raise ValueError(f"no cell {wildcards.base}/{wildcards.group}__{wildcards.method}")


def get_merge_models(wildcards):
    """Normalised baked checkpoints of the cell's adapters, in group order."""
    return [
        f"results/text/{wildcards.base}/{a}" for a in config["groups"][wildcards.group]
    ]


def get_model_args(wildcards):
    """`--model NAME=PATH` arguments of `mergebake merge`."""
    return " ".join(
        f"--model {a}=results/text/{wildcards.base}/{a}"
        for a in config["groups"][wildcards.group]
    )


def get_recipe(wildcards):
    """The recipe template of the cell's method."""
    m = wildcards.method
    return str(recipe_path(config["methods"][m], m, Path(workflow.basedir) / "recipes"))


def get_cell_parameters(wildcards):
    """The cell's method parameters as JSON (a rule param, so a change reruns the cell)."""
    return json.dumps(cell_parameters(config, _cell(wildcards)), sort_keys=True)


def get_merge_flags(wildcards):
    flags = [
        f"--seed {config['seed']}",
        f"--out-shard-size {config['merge']['out_shard_size']}",
        f"--device {config['device']}",
    ]
    if config["merge"]["dtype"]:
        flags.append(f"--dtype {config['merge']['dtype']}")
    if config["allow_pickle"]:
        flags.append("--allow-pickle")
    if config["trust_remote_code"]:
        flags.append("--trust-remote-code")
    return " ".join(flags)


# ---- eval and report -------------------------------------------------------


def get_task_inputs(wildcards):
    """Local task folders the evaluation reads (the generated demo tasks)."""
    return [DEMO_TASKS_DIR] if config["eval"]["demo_tasks"] else []


def get_include_path():
    """lm-eval --include_path: the configured folder and/or the demo tasks."""
    if config["eval"]["include_path"]:
        return config["eval"]["include_path"]
    return DEMO_TASKS_DIR if config["eval"]["demo_tasks"] else ""


def get_eval_flags(wildcards):
    e = config["eval"]
    flags = [
        f"--tasks '{json.dumps(e['tasks'])}'",
        f"--seed {config['seed']}",
        f"--batch-size {e['batch_size']}",
        f"--dtype {e['dtype']}",
        f"--device {config['device']}",
    ]
    if get_include_path():
        flags.append(f"--include-path {get_include_path()}")
    if e["limit"]:
        flags.append(f"--limit {e['limit']}")
    if config["trust_remote_code"]:
        flags.append("--trust-remote-code")
    return " ".join(flags)


def _report_rows():
    rows = []
    for c in CELLS:
        rows.append(
            dict(
                base=c.base,
                size=c.size,
                variant=c.variant,
                kind="merge",
                name=c.name,
                group=c.group,
                method=c.method,
                adapters=list(config["groups"][c.group]),
                eval=f"results/eval/{c.base}/{c.name}.json",
            )
        )
    if config["eval"]["baselines"]:
        for c in {(c.base, c.size, c.variant) for c in CELLS}:
            base, size, variant = c
            for name in [BASE_ROW, *ADAPTERS[base]]:
                rows.append(
                    dict(
                        base=base,
                        size=size,
                        variant=variant,
                        kind="base" if name == BASE_ROW else "adapter",
                        name=name,
                        group=None,
                        method=None,
                        eval=f"results/eval/{base}/{name}.json",
                    )
                )
    return sorted(rows, key=lambda r: (r["base"], r["kind"], r["name"]))


def get_report_evals(wildcards):
    """Every eval JSON the report reads, and its per-document samples: cells and baselines."""
    evals = [r["eval"] for r in _report_rows()]
    return evals + [re.sub(r"\.json$", ".samples.json.gz", e) for e in evals]


def get_report_rows(wildcards):
    """The report's rows (labels + eval paths) as JSON."""
    return json.dumps(_report_rows(), sort_keys=True)


def get_report_metrics(wildcards):
    return " ".join(f"--metric {m}" for m in (config["report"]["metrics"] or []))


# ---- upload ----------------------------------------------------------------


def get_upload_flags(wildcards):
    """Flags of `mergebake upload` and `mergebake hub-readme` from the config's hub section."""
    import shlex

    hub = config["hub"]
    flags = [f"--repo {shlex.quote(hub['repo'] or '')}"]
    if hub["enabled"]:
        flags.append("--enabled")
    if hub["private"]:
        flags.append("--private")
    return " ".join(flags)


REPORT_OUTPUTS = [
    "results/report/merge_eval_pivot.csv",
    "results/report/merge_eval_report.md",
    "results/report/merge_eval_report.html",
    "results/report/merge_eval_scores.png",
    "results/report/method_ranking.png",
]


def get_final_outputs():
    """Targets of the default rule (all), i.e. the report and an upload receipt per cell."""
    return (
        REPORT_OUTPUTS
        + [f"results/uploaded/{c.base}/{c.name}.json" for c in CELLS]
        + [HUB_README_RECEIPT]
    )


# ---- resources (scale-out) -------------------------------------------------
# What each job asks the scheduler for (mem_mb, runtime, threads, disk_mb, gpu), from the
# size of the checkpoint it reads; the model and its factors are mergebake.resources
# (README "Running on a cluster"). Snakemake evaluates these when a job is scheduled,
# once its inputs exist; before that (a dry run) they plan with an estimate from the
# config and never fail.
import os

from mergebake import resources as scaleout

# envs/mergebake.yaml installs this checkout with `pip install -e ${MERGEBAKE_ROOT}`; set
# it before Snakemake creates the env (--sdm conda), whatever folder conda runs pip in.
os.environ.update(MERGEBAKE_ROOT=str(workflow.basedir))

SIZE_OF_BASE = {c.base: c.size for c in CELLS}
# The input of each rule that holds the checkpoint the job reads (name, or position).
CHECKPOINT_INPUT = dict(
    demo_adapter="base",
    bake="base",
    normalise_base="base",
    normalise_baked=0,
    merge="base",
    eval_cell="model",
    eval_baseline="model",
    upload="cell",
)


def _job_size(wildcards, input, rulename):
    """Size of the job's checkpoint: measured when there, else the base's, else estimated."""
    key = CHECKPOINT_INPUT.get(rulename)
    folder = None
    if key is not None:
        try:
            folder = input[key] if isinstance(key, int) else getattr(input, key)
        except (IndexError, AttributeError, KeyError):
            folder = None
    size = scaleout.measure(folder)
    base = getattr(wildcards, "base", None)
    if size is not None or base not in config["bases"]:
        return size
    return scaleout.measure(get_base_dir(wildcards)) or scaleout.estimate(
        SIZE_OF_BASE.get(base), config["bases"][base]
    )


def _size_factor(wildcards, rulename, size):
    """Merge method (TIES costs more than linear) or eval dtype wider than stored."""
    if rulename == "merge":
        method = config["methods"].get(wildcards.method, {})
        return scaleout.method_factor(method.get("recipe") or wildcards.method)
    if rulename in ("eval_cell", "eval_baseline") and size is not None:
        return scaleout.dtype_factor(config["eval"]["dtype"], size)
    return 1.0


def _knobs(rulename):
    """Knobs of the resource model set for this rule with set-resources (profile or CLI)."""
    given = workflow.resource_settings.overwrite_resources.get(rulename) or {}
    return {k: getattr(given[k], "raw", given[k]) for k in scaleout.KNOBS if k in given}


def _model_name(rulename):
    """The rule's resource model: a bake's depends on its engine."""
    if rulename == "bake" and config["bake"].get("engine") == "stream":
        return "bake_stream"
    return rulename


def _device(rulename):
    """The device a job computes on: the bake's own device, else the merge and eval one."""
    return config["bake"]["device"] if rulename == "bake" else config["device"]


def _job_resources(wildcards, input, attempt, rulename):
    size = _job_size(wildcards, input, rulename)
    return scaleout.job_resources(
        rulename,
        size,
        model=_model_name(rulename),
        attempt=attempt,
        factor=_size_factor(wildcards, rulename, size),
        device=_device(rulename),
        overrides=_knobs(rulename),
    )


def get_mem_mb(wildcards, input, attempt, rulename):
    """Memory (MiB): base + factor × checkpoint size, × attempt on a retry."""
    return _job_resources(wildcards, input, attempt, rulename)["mem_mb"]


def get_runtime(wildcards, input, attempt, rulename):
    """Wall time (minutes): base + minutes per GiB, × attempt on a retry."""
    return _job_resources(wildcards, input, attempt, rulename)["runtime"]


def get_disk_mb(wildcards, input, rulename):
    """Disk the job writes (MiB)."""
    return _job_resources(wildcards, input, 1, rulename)["disk_mb"]


def get_threads(wildcards, input, rulename):
    """Threads (SLURM: --cpus-per-task) from the checkpoint size."""
    return _job_resources(wildcards, input, 1, rulename)["threads"]


def get_gpu(wildcards, rulename):
    """1 for a GPU-capable step when its device is cuda, else 0."""
    return scaleout.job_resources(rulename, None, device=_device(rulename))["gpu"]


# ---- hub (publishing) ------------------------------------------------------
# Fetch pins (a branch or tag resolved once to a commit, shared by every fetch of that
# repo@revision), and the inputs and parameters of the per-cell upload (model card) and
# of the repo-level README. See mergebake.fetch, mergebake.upload, mergebake.modelcard.
from mergebake.fetch import is_commit_sha, pin_name

HUB_README_RECEIPT = "results/uploaded/README.json"


def _hub_sources():
    """(config key, Hub source) of every base and adapter the grid fetches from the Hub."""
    out = []
    for b in BASES:
        if "hub" in config["bases"][b]:
            out.append((f"bases.{b}.hub", config["bases"][b]["hub"]))
        for a in ADAPTERS[b]:
            if "hub" in config["adapters"][b][a]:
                out.append((f"adapters.{b}.{a}.hub", config["adapters"][b][a]["hub"]))
    return out


# pin file name -> (repo, revision, first config key naming it); commit shas need no pin.
PINS = {}
for _key, _src in _hub_sources():
    if not is_commit_sha(_src["revision"]):
        PINS.setdefault(
            pin_name(_src["repo"], _src["revision"]),
            (_src["repo"], _src["revision"], _key),
        )
PIN_NAMES = _alternation(PINS)


def _pin_path(source):
    """The pin file of a Hub source (as ancient(): a later re-pin reruns nothing), or []."""
    if is_commit_sha(source["revision"]):
        return []
    return [
        ancient(f"resources/pins/{pin_name(source['repo'], source['revision'])}.json")
    ]


def get_pin_args(wildcards):
    """Arguments of `mergebake pin` for one pin file."""
    import shlex

    repo, revision, key = PINS[wildcards.pin]
    return f"--repo {repo} --revision {shlex.quote(revision)} --config-key {key}"


def get_base_pin(wildcards):
    return _pin_path(get_hub_base(wildcards))


def get_adapter_pin(wildcards):
    return _pin_path(get_hub_adapter(wildcards))


def _fetch_flags(source, key, pickle):
    flags = [get_subfolder_arg(source), f"--config-key {key}"]
    pin = _pin_path(source)
    if pin:
        flags.append(f"--pin {pin[0]}")
    if pickle:
        flags.append("--allow-pickle")
    return " ".join(f for f in flags if f)


def get_fetch_base_flags(wildcards):
    """`mergebake fetch` flags of a base: subfolder, config key, pin file."""
    key = f"bases.{wildcards.base}.hub"
    return _fetch_flags(get_hub_base(wildcards), key, False)


def get_fetch_adapter_flags(wildcards):
    """`mergebake fetch` flags of an adapter: also --allow-pickle when the config allows."""
    key = f"adapters.{wildcards.base}.{wildcards.adapter}.hub"
    return _fetch_flags(get_hub_adapter(wildcards), key, config["allow_pickle"])


def _hub_entry(source, name, folder):
    return dict(name=name, source=source, dir=folder if "hub" in source else None)


def get_hub_sources(wildcards):
    """Fetched folders of the cell's Hub base and adapters (their provenance has the commit)."""
    entries = _card_entries(wildcards)
    return [e["dir"] for e in [entries[0], *entries[1]] if e["dir"]]


def _card_entries(wildcards):
    base = _hub_entry(
        config["bases"][wildcards.base], wildcards.base, get_base_dir(wildcards)
    )
    adapters = [
        _hub_entry(
            config["adapters"][wildcards.base][a],
            a,
            f"resources/adapters/{wildcards.base}/{a}",
        )
        for a in config["groups"][wildcards.group]
    ]
    return base, adapters


def _baseline_row(base):
    """The report's baseline row name for a base, if it is scored (else None)."""
    if not config["eval"]["baselines"]:
        return None
    name = config["report"]["baseline"]
    name = BASE_ROW if name in ("base", BASE_ROW) else name
    return name if name == BASE_ROW or name in ADAPTERS[base] else None


def get_hub_baseline_eval(wildcards):
    """Eval JSONs (and per-document samples) the card reads: the cell's own samples, the
    baseline row (Δ), the base and the group's adapters (retention), or []."""
    row = _baseline_row(wildcards.base)
    if not row:
        return []
    names = sorted({row, BASE_ROW, *config["groups"][wildcards.group]})
    cell = f"{wildcards.group}__{wildcards.method}"
    return [f"results/eval/{wildcards.base}/{n}.json" for n in names] + [
        f"results/eval/{wildcards.base}/{n}.samples.json.gz" for n in [cell, *names]
    ]


def get_hub_card(wildcards):
    """The model card spec of a cell as JSON (a param: a config change reruns the upload)."""
    c = _cell(wildcards)
    base, adapters = _card_entries(wildcards)
    row = _baseline_row(c.base)
    spec = dict(
        cell=dict(size=c.size, variant=c.variant, group=c.group, method=c.method),
        base=base,
        adapters=adapters,
        license=config["hub"]["license"],
        languages=config["hub"]["languages"],
        metrics=config["report"]["metrics"],
        baseline=(
            dict(name=row, eval=f"results/eval/{c.base}/{row}.json") if row else None
        ),
        uncertainty=(
            dict(
                bootstrap=config["report"]["bootstrap"],
                seed=config["seed"],
                min_gain=config["report"]["min_gain"],
                oracle=config["report"]["oracle"],
                base=f"results/eval/{c.base}/{BASE_ROW}.json",
                adapters={
                    a: f"results/eval/{c.base}/{a}.json"
                    for a in config["groups"][c.group]
                },
            )
            if row
            else None
        ),
    )
    return json.dumps(spec, sort_keys=True)


def get_hub_receipts(wildcards):
    """Every cell's upload receipt (the repo README is rebuilt when any changes)."""
    return [f"results/uploaded/{c.base}/{c.name}.json" for c in CELLS]


def get_hub_readme_rows(wildcards):
    """The cells of the repo README (labels + receipt paths) as JSON."""
    rows = [
        dict(
            path_in_repo=c.path_in_repo,
            size=c.size,
            variant=c.variant,
            group=c.group,
            method=c.method,
            receipt=f"results/uploaded/{c.base}/{c.name}.json",
        )
        for c in CELLS
    ]
    return json.dumps(rows, sort_keys=True)


def get_hub_meta(wildcards):
    """Repo README metadata: license, languages, and the Hub repos of the bases."""
    bases = sorted(
        {
            config["bases"][b]["hub"]["repo"]
            for b in BASES
            if "hub" in config["bases"][b]
        }
    )
    hub = config["hub"]
    return json.dumps(
        dict(license=hub["license"], languages=hub["languages"], base_models=bases),
        sort_keys=True,
    )
