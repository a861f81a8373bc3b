# Wiring only: the config is validated and turned into a mergebake.workflow.Plan (the
# domain model: sources, cells, baselines, path layout, payloads, job sizing), and the
# get_* functions below hand its answers to the rules. Commands come from
# mergebake.commands; all of it is unit-tested without Snakemake.
import os
import re
from pathlib import Path

from snakemake.logging import logger

from mergebake import commands
from mergebake.config import load_config
from mergebake.evalcache import environment as cache_environment
from mergebake.preflight import check_adapter_cells, check_local_paths
from mergebake.resources import KNOBS
from mergebake.workflow import LAYOUT, REPORT_OUTPUTS, Plan, write_payload
from mergebake.workflow.layout import PAYLOAD_PATTERN

config = load_config(
    config,
    workflow_dir=Path(workflow.basedir),
    source=(workflow.configfiles or ["config"])[-1],
)
check_local_paths(config)
check_adapter_cells(config)  # adapter-space cells whose adapters are on disk already
PLAN = Plan(config, workflow_dir=workflow.basedir)
ENV = "../envs/mergebake.yaml"

# envs/mergebake.yaml installs this checkout with `pip install -e ${MERGEBAKE_ROOT}`; set
# it before Snakemake creates the env (--sdm conda), whatever folder conda runs pip in.
os.environ.update(MERGEBAKE_ROOT=str(workflow.basedir))
# The eval cache (config `cache`) reaches the eval jobs through their environment, not
# their command, so turning it on or off or moving it reruns nothing.
os.environ.update(cache_environment(config["cache"], os.getcwd()))


def _alternation(names):
    """Regex matching exactly the given names (never matches when empty)."""
    names = sorted(set(names))
    return "|".join(re.escape(n) for n in names) if names else "(?!)"


# Global wildcard constraints (applied in the Snakefile): names are only the configured ones.
WILDCARDS = dict(
    base=_alternation(PLAN.bases),
    adapter=_alternation(PLAN.all_adapters()),
    group=_alternation(config["groups"]),
    method=_alternation(PLAN.method_names()),
)
DEMO_BASES = _alternation(PLAN.bases_from("demo"))
HUB_BASES = _alternation(PLAN.bases_from("hub"))
DEMO_ADAPTERS = _alternation(PLAN.adapters_from("demo"))
HUB_ADAPTERS = _alternation(PLAN.adapters_from("hub"))
BASELINE_ROWS = _alternation(PLAN.baseline_rows())
PIN_NAMES = _alternation(PLAN.pins)
SELECTED = _alternation(a for _, a in PLAN.selections)
WEIGHT_METHODS = _alternation(PLAN.methods_of_space("weight"))
ADAPTER_METHODS = _alternation(PLAN.methods_of_space("adapter"))
PAYLOADS = PAYLOAD_PATTERN
GGUF_TYPE_NAMES = _alternation(t for types in PLAN.gguf.values() for t in types)
GGUF_TOOLS = PLAN.gguf_tools()


def run_preflight():
    """Preflight checks (local inputs, adapter/base fit, Hub token, disk) before any job."""
    from mergebake.preflight import preflight

    keep_going = workflow.execution_settings.keep_going
    notes = preflight(
        config, workdir=Path.cwd(), keep_going=keep_going, check_gguf=True
    )
    for note in notes:
        logger.warning(note)


def maybe_temp(path):
    """temp() for large intermediates when config temp_intermediates is set."""
    return temp(path) if config["temp_intermediates"] else path


def _wc(wildcards):
    return dict(wildcards.items())


# ---- commands and payloads ---------------------------------------------------


def get_command(rule):
    """Params function: the shell-quoted `mergebake` command of a job of `rule`."""

    def command(wildcards):
        return commands.command_line(PLAN, rule, _wc(wildcards))

    return command


def get_payload(wildcards):
    """The content of a payload file (a param: a change rewrites it, and reruns its readers)."""
    return PLAN.payload(wildcards.payload)


def payload(name):
    """The path of payload file `name`."""
    return LAYOUT["payload"].format(payload=name)


# ---- inputs ------------------------------------------------------------------


def get_base_dir(wildcards):
    """Folder of the base checkpoint: a local path as given, else the fetched/generated copy."""
    return PLAN.base_dir(wildcards.base)


def get_bake_inputs(wildcards):
    """Named inputs of a bake: the base and adapter folders, plus the files of local ones."""
    return PLAN.bake_inputs(_wc(wildcards))


def get_base_inputs(wildcards):
    """Inputs of a base's normalisation: its folder, plus its files when local."""
    return PLAN.base_inputs(_wc(wildcards))


def get_base_pin(wildcards):
    """The pin file of a Hub base (ancient: a later re-pin reruns nothing), or []."""
    pin = PLAN.pin_file(PLAN.base_sources[wildcards.base])
    return [ancient(pin)] if pin else []


def get_adapter_pin(wildcards):
    """The pin file of a Hub adapter, or []."""
    pin = PLAN.pin_file(PLAN.adapter_sources[(wildcards.base, wildcards.adapter)])
    return [ancient(pin)] if pin else []


def get_merge_models(wildcards):
    """Normalised baked checkpoints of the cell's adapters, in group order (eng@best: the
    selected checkpoint's, so a new selection with the same choice changes no input)."""
    return PLAN.merge_models(_wc(wildcards))


def _selection_file(base, adapter):
    """The selection JSON, once its checkpoint job is done (else Snakemake waits for it)."""
    return checkpoints.select_checkpoint.get(base=base, adapter=adapter).output[0]


PLAN.selection_file = _selection_file


def get_selection_scores(wildcards):
    """The eval JSON of each checkpoint of the adapter: what its selection reads."""
    return list(PLAN.selection_scores(_wc(wildcards)).values())


def get_adapter_merge_inputs(wildcards):
    """Adapter folders of an adapter-space cell (group order), the base folder, local files."""
    return PLAN.adapter_merge_inputs(_wc(wildcards))


def get_recipe(wildcards):
    """The recipe template of the cell's method."""
    return PLAN.recipe(wildcards.method)


def get_task_inputs(wildcards):
    """The task payload, the demo tasks, and each file of eval.include_path the tasks read."""
    return PLAN.task_inputs(_wc(wildcards))


def get_report_evals(wildcards):
    """Every eval JSON the report reads: cells and baselines; and every selection JSON."""
    return PLAN.report_evals() + PLAN.selection_files()


def get_hub_baseline_eval(wildcards):
    """The eval JSON of the cell's baseline row (Δ in the model card), or []."""
    return PLAN.baseline_eval(_wc(wildcards))


def get_hub_sources(wildcards):
    """Fetched folders of the cell's Hub base and adapters (their provenance has the commit)."""
    return PLAN.hub_source_dirs(_wc(wildcards))


def get_card_payload(wildcards):
    """The payload file holding the cell's model card spec."""
    return PLAN.card_payload(_wc(wildcards))


def get_gguf_files(wildcards):
    """The cell's GGUF files (export.gguf), published with it; [] when none."""
    return PLAN.gguf_files(_wc(wildcards))


def get_cell_adapter(wildcards):
    """The merged adapter of an adapter-space cell (uploaded beside it), else []."""
    return PLAN.cell_adapter(_wc(wildcards))


def get_hub_receipts(wildcards):
    """Every cell's upload receipt (the repo README is rebuilt when any changes)."""
    return PLAN.receipts()


def get_final_outputs():
    """Targets of the default target (all): the report, a receipt per cell, the repo README."""
    return PLAN.final_outputs()


# ---- resources (scale-out) ---------------------------------------------------
# What each job asks the scheduler for, from the size of the checkpoint it reads
# (mergebake.workflow.Plan.job_resources, mergebake.resources). Evaluated when a job is
# scheduled, once its inputs exist; a dry run plans with estimates and never fails.


def _knobs(rulename):
    """Knobs of the resource model set for this rule with set-resources (profile or CLI)."""
    given = workflow.resource_settings.overwrite_resources.get(rulename) or {}
    return {k: getattr(given[k], "raw", given[k]) for k in KNOBS if k in given}


def _resources(wildcards, attempt, rulename):
    return PLAN.job_resources(rulename, _wc(wildcards), attempt, _knobs(rulename))


def get_mem_mb(wildcards, attempt, rulename):
    """Memory (MiB): base + factor × checkpoint size, × attempt on a retry."""
    return _resources(wildcards, attempt, rulename)["mem_mb"]


def get_runtime(wildcards, attempt, rulename):
    """Wall time (minutes): base + minutes per GiB, × attempt on a retry."""
    return _resources(wildcards, attempt, rulename)["runtime"]


def get_disk_mb(wildcards, rulename):
    """Disk the job writes (MiB)."""
    return _resources(wildcards, 1, rulename)["disk_mb"]


def get_threads(wildcards, rulename):
    """Threads (SLURM: --cpus-per-task) from the checkpoint size."""
    return _resources(wildcards, 1, rulename)["threads"]


def get_gpu(wildcards, rulename):
    """1 for a GPU-capable step when its device is cuda, else 0."""
    return PLAN.gpu(rulename)
