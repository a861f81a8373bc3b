# mergebake: bake LoRA adapters into their bases and merge them per cell with mergekit (or
# merge the adapters with PEFT and bake the result), score every cell with lm-eval, report,
# and publish. See README.md.
from snakemake.utils import min_version

min_version("9.0")


# The default config (the offline demo grid) unless --configfile names another; a config
# given with --configfile replaces it rather than being merged into it.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/fetch.smk"
include: "rules/bake.smk"
include: "rules/normalise.smk"
include: "rules/merge.smk"
include: "rules/adapter_merge.smk"
include: "rules/eval.smk"
include: "rules/report.smk"
include: "rules/upload.smk"
include: "rules/export.smk"
include: "rules/payload.smk"


wildcard_constraints:
    **WILDCARDS,


# Before any job runs (not in a dry run): local inputs, adapter/base fit, token, disk.
onstart:
    run_preflight()


rule all:
    default_target: True
    input:
        get_final_outputs(),
