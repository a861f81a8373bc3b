"""The grid as the workflow builds it: cells, sources, baselines, inputs, payloads, sizing.

:class:`Plan` is built once from a validated config (:func:`mergebake.config.load_config`)
and answers every question a rule asks: which folder holds a base, which files a bake
reads, which rows the report has, what a cell's model card says, which pins exist, what a
job asks the scheduler for, and which jobs the grid has at all. ``rules/common.smk`` only
wires these answers to rules; nothing here imports Snakemake, so all of it is unit-tested
directly. Paths are relative to the working directory and come from
:data:`mergebake.workflow.layout.LAYOUT`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

from .. import resources
from ..config import (
    BASE_ROW,
    BEST,
    ROOT,
    Cell,
    adapter_checkpoints,
    adapter_options,
    adapter_rows,
    all_method_points,
    block_tasks,
    cell_parameters,
    checkpoint_row,
    gguf_types,
    grid_cells,
    member_rows,
    method_space,
    recipe_path,
    split_member,
)
from ..fetch import is_commit_sha, pin_name
from .layout import (
    LAYOUT,
    PAYLOAD_BASE_TASKS,
    PAYLOAD_CARD,
    PAYLOAD_CELL_TASKS,
    PAYLOAD_EVAL_TASKS,
    PAYLOAD_HUB_META,
    PAYLOAD_HUB_ROWS,
    PAYLOAD_REPORT_ROWS,
    REPORT_OUTPUTS,
    path,
    payload_path,
    samples_of,
)
from .sources import DemoSource, HubSource, PathSource, Source, source_from_config
from .tasks import build_index, task_files

Wildcards = Mapping[str, str]

#: Per rule, the layout entry of the checkpoint its job reads (what sizes the job);
#: ``base`` is the base's folder, wherever it is (fetched, generated or local).
CHECKPOINT_OF = {
    "demo_adapter": "base",
    "bake": "base",
    "normalise_base": "base",
    "normalise_baked": "baked",
    "merge": "text_base",
    "bake_cell": "base",
    "normalise_cell": "baked_cell",
    "eval_cell": "merged",
    "eval_baseline": "baseline_model",
    "upload": "merged",
    "export_gguf": "merged",
}
#: Weight and config files of a local folder that are inputs of the jobs reading it.
LOCAL_PATTERNS = ("*.safetensors", "*.json", "*.bin")


def local_files(folder: str) -> list[str]:
    """The weight and config files of a local checkpoint or adapter folder, sorted.

    Snakemake judges a folder input by the folder's own timestamp, which rewriting a file
    inside it does not change; listing the files makes new weights on disk rerun the jobs
    that read them. A missing folder gives ``[folder]`` (Snakemake then names it missing).
    """
    d = Path(folder)
    if not d.is_dir():
        return [folder]
    return sorted(str(p) for pat in LOCAL_PATTERNS for p in d.glob(pat) if p.is_file())


def dumps(obj: Any) -> str:
    """The canonical JSON of a payload or rule parameter (sorted keys)."""
    return json.dumps(obj, sort_keys=True)


class Plan:
    """The workflow's view of a validated config.

    ``config`` is what :func:`mergebake.config.load_config` returns (defaults filled);
    ``workflow_dir`` holds ``recipes/`` (default: this checkout). Building a plan reads no
    file; the task index of ``eval.include_path`` is read on first use.
    """

    def __init__(self, config: Mapping[str, Any], workflow_dir: str | os.PathLike | None = None):
        self.config = config
        self.workflow_dir = Path(workflow_dir) if workflow_dir else ROOT
        placed = grid_cells(config)
        self.cells: list[Cell] = [c for c, _ in placed]
        #: The grid block (index into ``grid``) of each cell.
        self.block_of: dict[Cell, int] = dict(placed)
        #: Cell method name (a sweep point's name) -> its method and swept values.
        self.points = all_method_points(config)
        self._cell = {(c.base, c.group, c.method): c for c in self.cells}
        self.size_of: dict[str, str] = {}
        adapters: dict[str, set[str]] = {}
        self.cells_of: dict[str, list[Cell]] = {}
        for c in self.cells:
            self.size_of.setdefault(c.base, c.size)
            self.cells_of.setdefault(c.base, []).append(c)
            adapters.setdefault(c.base, set()).update(config["groups"][c.group])
        #: Bases of the grid, sorted; adapter rows per base (an adapter's name, or one
        #: ``<adapter>@<step>`` per declared checkpoint), by adapter name.
        self.bases: list[str] = sorted(adapters)
        names = {b: sorted({split_member(m)[0] for m in adapters[b]}) for b in self.bases}
        self.adapters: dict[str, list[str]] = {
            b: [r for a in names[b] for r in adapter_rows(config, b, a)] for b in self.bases
        }
        self.base_sources: dict[str, Source] = {
            b: source_from_config(config["bases"][b], f"bases.{b}") for b in self.bases
        }
        self.adapter_sources: dict[tuple[str, str], Source] = {}
        for b in self.bases:
            for row in self.adapters[b]:
                a, step = split_member(row)
                self.adapter_sources[(b, row)] = source_from_config(
                    config["adapters"][b][a], f"adapters.{b}.{a}", int(step) if step else None
                )
        #: (base, adapter) of every adapter with ``select``: one selection job each.
        self.selections: list[tuple[str, str]] = [
            (b, a) for b in self.bases for a in names[b] if "select" in config["adapters"][b][a]
        ]
        #: The selection JSON of (base, adapter); common.smk replaces it with Snakemake's
        #: ``checkpoints.<rule>.get(...)``, so a merge waits for the selection it reads.
        self.selection_file: Callable[[str, str], str] = lambda b, a: path(
            "selection", base=b, adapter=a
        )

    # ---- names -------------------------------------------------------------------

    def cell(self, wc: Wildcards) -> Cell:
        """The cell of wildcards ``base``, ``group``, ``method``; KeyError if not in the grid."""
        key = (wc["base"], wc["group"], wc["method"])
        if key not in self._cell:
            raise KeyError(f"no cell {wc['base']}/{wc['group']}__{wc['method']} in the grid")
        return self._cell[key]

    def method_names(self) -> list[str]:
        """Every name the ``{method}`` wildcard may take: methods, sweep points by name."""
        return list(self.points)

    def bases_from(self, kind: str) -> list[str]:
        """Bases whose source is of ``kind`` (``hub``, ``path``, ``demo``)."""
        return [b for b in self.bases if self.base_sources[b].kind == kind]

    def adapters_from(self, kind: str) -> list[str]:
        """Adapter rows with a source of ``kind`` for some base (may repeat a name); for
        ``demo``, the training runs' names (a run saves every checkpoint of its adapter)."""
        rows = [a for (b, a), s in self.adapter_sources.items() if s.kind == kind]
        return [split_member(a)[0] for a in rows] if kind == "demo" else rows

    def demo_runs(self, base: str) -> list[str]:
        """The demo adapters trained for ``base`` (one ``demo_adapter`` job each), sorted."""
        rows = [a for a in self.adapters[base] if self.adapter_sources[(base, a)].kind == "demo"]
        return sorted({split_member(a)[0] for a in rows})

    def checkpoints(self, base: str, adapter: str) -> list[int]:
        """The declared checkpoints of ``adapters.<base>.<adapter>`` ([] when none)."""
        return adapter_checkpoints(self.config, base, adapter)

    def all_adapters(self) -> list[str]:
        return [a for b in self.bases for a in self.adapters[b]]

    def baseline_rows(self) -> list[str]:
        """Names of baseline rows: the base alone and each base + single adapter."""
        return [BASE_ROW, *self.all_adapters()]

    # ---- sources -----------------------------------------------------------------

    def base_dir(self, base: str) -> str:
        """Folder of the base checkpoint: a local path as given, else the fetched/generated copy."""
        src = self.base_sources[base]
        return src.path if isinstance(src, PathSource) else path("base", base=base)

    def adapter_dir(self, base: str, adapter: str) -> str:
        """Folder of the LoRA adapter for (base, adapter row): a local path as given (its
        ``{checkpoint}`` filled), a demo checkpoint's ``checkpoint-<step>/`` inside its
        training run, else the fetched or generated copy."""
        src = self.adapter_sources[(base, adapter)]
        if isinstance(src, PathSource):
            return src.path
        name, step = split_member(adapter)
        if step is not None and isinstance(src, DemoSource):
            return path("demo_checkpoint", base=base, adapter=name, checkpoint=step)
        return path("adapter", base=base, adapter=adapter)

    def adapter_input(self, base: str, adapter: str) -> str:
        """What a bake of (base, adapter row) depends on: :meth:`adapter_dir`, except for a
        demo checkpoint, whose training run's folder (the ``demo_adapter`` output)."""
        name, step = split_member(adapter)
        if step is not None and self.adapter_sources[(base, adapter)].kind == "demo":
            return path("adapter", base=base, adapter=name)
        return self.adapter_dir(base, adapter)

    def bake_inputs(self, wc: Wildcards) -> dict[str, Any]:
        """Named inputs of a bake: the base and adapter folders, plus the files of local ones."""
        base, adapter = wc["base"], wc["adapter"]
        bdir, adir = self.base_dir(base), self.adapter_input(base, adapter)
        files = []
        if isinstance(self.base_sources[base], PathSource):
            files += local_files(bdir)
        if isinstance(self.adapter_sources[(base, adapter)], PathSource):
            files += local_files(adir)
        return dict(base=bdir, adapter=adir, files=files)

    def base_inputs(self, wc: Wildcards) -> dict[str, Any]:
        """Inputs of a base's normalisation: its folder, plus its files when local."""
        bdir = self.base_dir(wc["base"])
        local = isinstance(self.base_sources[wc["base"]], PathSource)
        return dict(base=bdir, files=local_files(bdir) if local else [])

    def expected_base(self, base: str) -> str | None:
        """What an adapter's ``base_model_name_or_path`` should name (repo or path), if known."""
        return self.base_sources[base].expected_base

    # ---- pins (Hub branches and tags resolved once) ------------------------------

    def hub_sources(self) -> list[tuple[str, HubSource]]:
        """(config key, source) of every base and adapter the grid fetches from the Hub."""
        out: list[tuple[str, HubSource]] = []
        for b in self.bases:
            if isinstance(src := self.base_sources[b], HubSource):
                out.append((f"bases.{b}.hub", src))
            for a in self.adapters[b]:
                if isinstance(asrc := self.adapter_sources[(b, a)], HubSource):
                    out.append((f"adapters.{b}.{a}.hub", asrc))
        return out

    @cached_property
    def pins(self) -> dict[str, tuple[str, str, str]]:
        """Pin file name -> (repo, revision, first config key naming it); shas need none."""
        pins: dict[str, tuple[str, str, str]] = {}
        for key, src in self.hub_sources():
            if not is_commit_sha(src.revision):
                pins.setdefault(pin_name(src.repo, src.revision), (src.repo, src.revision, key))
        return pins

    def pin_file(self, source: HubSource) -> str | None:
        """The pin file of a Hub source, or None for a commit sha."""
        if is_commit_sha(source.revision):
            return None
        return path("pin", pin=pin_name(source.repo, source.revision))

    # ---- merge -------------------------------------------------------------------

    def merge_models(self, wc: Wildcards) -> list[str]:
        """Normalised baked checkpoints of the cell's adapters, in group order; ``eng@best``
        is the selected checkpoint's (:meth:`resolve`)."""
        b = wc["base"]
        return [path("text", base=b, adapter=self.resolve(b, m)) for m in self.group(wc)]

    def group(self, wc: Wildcards) -> list[str]:
        """The members of the cell's group (``eng``, ``eng@500``, ``eng@best``)."""
        return list(self.config["groups"][wc["group"]])

    def resolve(self, base: str, member: str) -> str:
        """The adapter row a group member names on ``base``: itself, or for ``eng@best``
        the row of the checkpoint its selection chose (read from :attr:`selection_file`;
        in Snakemake that waits for the selection job)."""
        adapter, step = split_member(member)
        if step != BEST:
            return member
        choice = json.loads(Path(self.selection_file(base, adapter)).read_text())["choice"]
        return checkpoint_row(adapter, choice)

    # ---- checkpoint selection ----------------------------------------------------

    def selection_scores(self, wc: Wildcards) -> dict[str, str]:
        """The eval JSON of each checkpoint of the adapter (wildcards ``base``,
        ``adapter``), keyed by step: what its selection reads."""
        b, a = wc["base"], wc["adapter"]
        return {
            str(n): path("eval_baseline", base=b, row=checkpoint_row(a, n))
            for n in self.checkpoints(b, a)
        }

    def selection_files(self) -> list[str]:
        """Every selection JSON of the grid (the report shows them)."""
        return [path("selection", base=b, adapter=a) for b, a in self.selections]

    def recipe(self, method: str) -> str:
        """The recipe template of ``method`` (a method or sweep point name; absolute:
        ``<workflow>/recipes/<recipe>.yaml``)."""
        m = self.points[method].method
        return str(recipe_path(self.config["methods"][m], m, self.workflow_dir / "recipes"))

    def is_adapter_cell(self, method: str) -> bool:
        """True when ``method`` (a method or sweep point name) merges in adapter space
        (``space: adapter``)."""
        m = self.points[method].method
        return method_space(self.config["methods"][m]) == "adapter"

    def methods_of_space(self, space: str) -> list[str]:
        """Every ``{method}`` name (methods and their sweep points) of ``space``
        (``weight`` or ``adapter``)."""
        return [n for n in self.points if self.is_adapter_cell(n) == (space == "adapter")]

    def adapter_merge_inputs(self, wc: Wildcards) -> dict[str, Any]:
        """Named inputs of an adapter-space merge: the group's adapter folders (group
        order), the base folder (only its ``config.json`` is read: PEFT's module order),
        and the files of local adapters."""
        base = wc["base"]
        adapters = [self.adapter_dir(base, a) for a in self.config["groups"][wc["group"]]]
        files = []
        for a, folder in zip(self.config["groups"][wc["group"]], adapters, strict=True):
            if isinstance(self.adapter_sources[(base, a)], PathSource):
                files += local_files(folder)
        return dict(adapters=adapters, base=self.base_dir(base), files=files)

    def adapter_options(self, wc: Wildcards) -> dict[str, Any]:
        """The PEFT options of an adapter-space cell
        (:func:`mergebake.config.adapter_options`)."""
        return adapter_options(self.config, self.cell(wc))

    def cell_parameters(self, wc: Wildcards) -> dict[str, Any]:
        """The cell's method parameters (per-adapter mappings restricted to its group)."""
        return cell_parameters(self.config, self.cell(wc))

    # ---- eval --------------------------------------------------------------------

    def include_path(self) -> str | None:
        """lm-eval's include path: ``eval.include_path``, else the demo tasks, else None."""
        e = self.config["eval"]
        if e["include_path"]:
            return e["include_path"]
        return LAYOUT["demo_tasks"] if e["demo_tasks"] else None

    def eval_tasks(self, wc: Wildcards | None = None) -> list[dict[str, Any]]:
        """The tasks an eval runs (``[{"name", "num_fewshot"}]``): a cell's are its block's
        (``eval.tasks``, extended or replaced by ``grid[].eval``); a baseline's (wildcard
        ``row``) the union of its base's cells' tasks, in order of first use; without
        wildcards ``eval.tasks``."""
        if wc is None or "base" not in wc:
            return list(self.config["eval"]["tasks"])
        if "row" in wc:
            out: dict[str, dict[str, Any]] = {}
            for c in self.cells_of[wc["base"]]:
                for t in self._cell_tasks(c):
                    out.setdefault(t["name"], t)
            return list(out.values())
        return self._cell_tasks(self.cell(wc))

    def _cell_tasks(self, cell: Cell) -> list[dict[str, Any]]:
        return block_tasks(self.config, self.config["grid"][self.block_of[cell]])

    def tasks_payload(self, wc: Wildcards) -> str:
        """Name of the payload holding the eval's tasks: ``eval_tasks`` when they are
        ``eval.tasks``, else the cell's or the base's own (:data:`PAYLOAD_CELL_TASKS`,
        :data:`PAYLOAD_BASE_TASKS`)."""
        if self.eval_tasks(wc) == self.eval_tasks():
            return PAYLOAD_EVAL_TASKS
        if "row" in wc:
            return PAYLOAD_BASE_TASKS.format(base=wc["base"])
        return PAYLOAD_CELL_TASKS.format(**{k: wc[k] for k in ("base", "group", "method")})

    @cached_property
    def task_index(self):
        """Index of ``eval.include_path`` (:func:`mergebake.workflow.tasks.build_index`)."""
        folder = self.config["eval"]["include_path"]
        return build_index(folder) if folder else {}

    def task_inputs(self, wc: Wildcards | None = None) -> list[str]:
        """Files an eval reads besides its model: the task payload, the generated demo
        tasks, and every file of ``eval.include_path`` that its tasks read."""
        files = [payload_path(self.tasks_payload(wc) if wc else PAYLOAD_EVAL_TASKS)]
        if self.config["eval"]["demo_tasks"]:
            files.append(LAYOUT["demo_tasks"])
        names = [t["name"] for t in self.eval_tasks(wc)]
        return files + task_files(self.task_index, names)

    # ---- report ------------------------------------------------------------------

    def report_rows(self) -> list[dict[str, Any]]:
        """The report's rows: one per cell and, with ``eval.baselines``, per baseline row;
        each ``{base, size, variant, kind, name, group, method, eval}`` (a cell's also
        ``adapters``, its group: the oracle candidates), sorted by (base, kind, name)."""
        rows = [
            dict(
                base=c.base,
                size=c.size,
                variant=c.variant,
                kind="merge",
                name=c.name,
                group=c.group,
                method=c.method,
                adapters=self._candidates(c.base, c.group),  # the oracle candidates
                eval=path("eval_cell", base=c.base, group=c.group, method=c.method),
                **self._sweep_of(c),
            )
            for c in self.cells
        ]
        if self.config["eval"]["baselines"]:
            for base in self.bases:
                size, variant = self.size_of[base], base[len(self.size_of[base]) + 1 :]
                for name in self.baseline_rows_of(base):
                    rows.append(
                        dict(
                            base=base,
                            size=size,
                            variant=variant,
                            kind="base" if name == BASE_ROW else "adapter",
                            name=name,
                            group=None,
                            method=None,
                            eval=path("eval_baseline", base=base, row=name),
                            **self._checkpoint_of(base, name),
                        )
                    )
        return sorted(rows, key=lambda r: (r["base"], r["kind"], r["name"]))

    def _candidates(self, base: str, group: str) -> list[str]:
        """The baseline rows a cell's group stands for (``eng@best``: every checkpoint)."""
        return [r for m in self.config["groups"][group] for r in member_rows(self.config, base, m)]

    def _checkpoint_of(self, base: str, row: str) -> dict[str, Any]:
        """``{"checkpoint": {"adapter", "step", "selection"}}`` for a checkpoint's row (the
        selection JSON or None), else ``{}``."""
        adapter, step = split_member(row)
        if step is None:
            return {}
        sel = (base, adapter) in self.selections
        return dict(
            checkpoint=dict(
                adapter=adapter,
                step=int(step),
                selection=path("selection", base=base, adapter=adapter) if sel else None,
            )
        )

    def _sweep_of(self, c: Cell) -> dict[str, Any]:
        """``{"sweep": {"method", "parameters"}}`` for a sweep point's cell, else ``{}``."""
        point = self.points[c.method]
        if not point.sweep:
            return {}
        return dict(sweep=dict(method=point.method, parameters=dict(point.sweep)))

    def baseline_rows_of(self, base: str) -> list[str]:
        """The baseline rows of one base: ``_base`` and each of its adapters."""
        return [BASE_ROW, *self.adapters[base]]

    def report_evals(self) -> list[str]:
        """Every eval JSON the report reads, and its per-document samples: cells and
        baselines."""
        evals = [r["eval"] for r in self.report_rows()]
        return evals + [samples_of(e) for e in evals]

    # ---- GGUF export -------------------------------------------------------------

    @cached_property
    def gguf(self) -> dict[Cell, list[str]]:
        """GGUF types per exported cell (:func:`mergebake.config.gguf_types`)."""
        return gguf_types(self.config)

    def gguf_types(self, wc: Wildcards) -> list[str]:
        """The GGUF types of the cell of wildcards ``base``, ``group``, ``method`` ([] if none)."""
        return list(self.gguf.get(self.cell(wc), []))

    def gguf_files(self, wc: Wildcards) -> list[str]:
        """The cell's GGUF files (``LAYOUT["gguf"]``), one per type, in config order."""
        cell = {k: wc[k] for k in ("base", "group", "method")}
        return [path("gguf", type=t, **cell) for t in self.gguf_types(wc)]

    def gguf_tools(self) -> str:
        """The converter's record file, written by the ``gguf_tools`` rule."""
        from ..export import LLAMA_CPP_PYTHON_VERSION

        return path("gguf_tools", version=LLAMA_CPP_PYTHON_VERSION)

    def gguf_bases(self) -> list[str]:
        """Bases with at least one exported cell, sorted."""
        return sorted({c.base for c in self.gguf})

    def all_gguf_files(self) -> list[str]:
        """Every GGUF file of the grid, cell by cell."""
        return [
            f
            for c in self.gguf
            for f in self.gguf_files(dict(base=c.base, group=c.group, method=c.method))
        ]

    # ---- publishing --------------------------------------------------------------

    def baseline_row(self, base: str) -> str | None:
        """The report's baseline row for ``base`` (Δ in cards), if it is scored, else None."""
        if not self.config["eval"]["baselines"]:
            return None
        name = self.config["report"]["baseline"]
        name = BASE_ROW if name in ("base", BASE_ROW) else name
        return name if name == BASE_ROW or name in self.adapters[base] else None

    def baseline_eval(self, wc: Wildcards) -> list[str]:
        """Eval JSONs (and per-document samples) a cell's card reads: the cell's own samples,
        the baseline row (Δ), the base and the group's adapters (retention); [] when no
        baseline is scored."""
        row = self.baseline_row(wc["base"])
        if not row:
            return []
        names = sorted({row, BASE_ROW, *self._candidates(wc["base"], wc["group"])})
        evals = [path("eval_baseline", base=wc["base"], row=n) for n in names]
        return evals + [samples_of(e) for e in [path("eval_cell", **wc), *evals]]

    def _card_entries(self, wc: Wildcards) -> tuple[dict, list[dict]]:
        base = wc["base"]
        bsrc = self.base_sources[base]
        entry = dict(
            name=base,
            source=bsrc.to_config(),
            dir=self.base_dir(base) if isinstance(bsrc, HubSource) else None,
        )
        adapters = []
        for a in self.config["groups"][wc["group"]]:
            name, step = split_member(a)
            if step == BEST:  # which checkpoint: the selection's JSON says, when the card is made
                entry_cfg = self.config["adapters"][base][name]
                adapters.append(
                    dict(
                        name=a,
                        source=dict(entry_cfg),
                        dir=None,
                        selection=path("selection", base=base, adapter=name),
                        checkpoints={
                            str(n): self._adapter_entry(base, checkpoint_row(name, n))
                            for n in self.checkpoints(base, name)
                        },
                    )
                )
                continue
            adapters.append(self._adapter_entry(base, a))
        return entry, adapters

    def _adapter_entry(self, base: str, row: str) -> dict[str, Any]:
        """A card's ``{name, source, dir}`` of the adapter row ``row`` on ``base``."""
        asrc = self.adapter_sources[(base, row)]
        folder = path("adapter", base=base, adapter=row)
        return dict(
            name=row, source=asrc.to_config(), dir=folder if isinstance(asrc, HubSource) else None
        )

    def hub_source_dirs(self, wc: Wildcards) -> list[str]:
        """Fetched folders of the cell's Hub base and adapters (their provenance has the commit)."""
        base, adapters = self._card_entries(wc)
        return [e["dir"] for e in [base, *adapters] if e["dir"]]

    def cell_adapter(self, wc: Wildcards) -> list[str]:
        """``[merged adapter folder]`` of an adapter-space cell (published beside the model
        as ``<cell>/adapter/``), else ``[]``."""
        return [path("merged_adapter", **wc)] if self.is_adapter_cell(wc["method"]) else []

    def card_spec(self, wc: Wildcards) -> dict[str, Any]:
        """The model card spec of a cell (see :mod:`mergebake.modelcard`)."""
        c = self.cell(wc)
        base, adapters = self._card_entries(wc)
        row = self.baseline_row(c.base)
        extra = {}
        if self.is_adapter_cell(c.method):  # only then: other cells' specs stay as they were
            extra["adapter_space"] = dict(subfolder="adapter", **self.adapter_options(wc))
        spec = dict(
            **extra,
            cell=dict(size=c.size, variant=c.variant, group=c.group, method=c.method),
            base=base,
            adapters=adapters,
            license=self.config["hub"]["license"],
            languages=self.config["hub"]["languages"],
            metrics=self.config["report"]["metrics"],
            baseline=(
                dict(name=row, eval=path("eval_baseline", base=c.base, row=row)) if row else None
            ),
            uncertainty=(
                dict(
                    bootstrap=self.config["report"]["bootstrap"],
                    seed=self.config["seed"],
                    min_gain=self.config["report"]["min_gain"],
                    oracle=self.config["report"]["oracle"],
                    base=path("eval_baseline", base=c.base, row=BASE_ROW),
                    adapters={
                        a: path("eval_baseline", base=c.base, row=a)
                        for a in self._candidates(c.base, c.group)
                    },
                )
                if row
                else None
            ),
        )
        if self.gguf_types(wc):  # only then: the specs of cells without GGUF stay as they were
            spec["gguf"] = self.gguf_spec(wc)
        return spec

    def gguf_spec(self, wc: Wildcards) -> dict[str, Any]:
        """Where a cell's GGUF files go: ``{repo, files: [{type, file, path_in_repo}]}``;
        ``repo`` is ``export.gguf_repo`` (None: the cell's own repo), ``file`` the local path,
        ``path_in_repo`` ``<base>/<group>__<method>/<file name>`` in either repo."""
        c = self.cell(wc)
        files = [
            dict(type=t, file=f, path_in_repo=f"{c.path_in_repo}/{Path(f).name}")
            for t, f in zip(self.gguf_types(wc), self.gguf_files(wc), strict=True)
        ]
        return dict(repo=(self.config.get("export") or {}).get("gguf_repo"), files=files)

    def receipts(self) -> list[str]:
        """Every cell's upload receipt (the repo README is rebuilt when any changes)."""
        return [path("receipt", base=c.base, group=c.group, method=c.method) for c in self.cells]

    def hub_readme_rows(self) -> list[dict[str, Any]]:
        """The cells of the repo README: labels and receipt paths."""
        return [
            dict(
                path_in_repo=c.path_in_repo,
                size=c.size,
                variant=c.variant,
                group=c.group,
                method=c.method,
                receipt=path("receipt", base=c.base, group=c.group, method=c.method),
            )
            for c in self.cells
        ]

    def hub_meta(self) -> dict[str, Any]:
        """Repo README metadata: license, languages, and the Hub repos of the bases."""
        bases = sorted({s.repo for s in self.base_sources.values() if isinstance(s, HubSource)})
        hub = self.config["hub"]
        return dict(license=hub["license"], languages=hub["languages"], base_models=bases)

    # ---- payloads ----------------------------------------------------------------

    def payload_names(self) -> list[str]:
        """Every payload file the grid needs (see :data:`LAYOUT` ``payload``)."""
        names = [PAYLOAD_REPORT_ROWS, PAYLOAD_HUB_ROWS, PAYLOAD_HUB_META, PAYLOAD_EVAL_TASKS]
        names += [
            PAYLOAD_CARD.format(base=c.base, group=c.group, method=c.method) for c in self.cells
        ]
        wcs = [dict(base=c.base, group=c.group, method=c.method) for c in self.cells]
        if self.config["eval"]["baselines"]:
            wcs += [dict(base=b, row=BASE_ROW) for b in self.bases]
        own = {self.tasks_payload(wc) for wc in wcs} - {PAYLOAD_EVAL_TASKS}
        return names + sorted(own)

    def payload(self, name: str) -> str:
        """The content (canonical JSON) of payload ``name``; KeyError for an unknown name."""
        if name == PAYLOAD_REPORT_ROWS:
            return dumps(self.report_rows())
        if name == PAYLOAD_HUB_ROWS:
            return dumps(self.hub_readme_rows())
        if name == PAYLOAD_HUB_META:
            return dumps(self.hub_meta())
        if name == PAYLOAD_EVAL_TASKS:
            return dumps(self.eval_tasks())
        kind, _, rest = name.partition("/")
        base, _, cell = rest.partition("/")
        group, sep, method = cell.partition("__")
        if kind == "cards" and sep:
            return dumps(self.card_spec(dict(base=base, group=group, method=method)))
        if kind == PAYLOAD_EVAL_TASKS and base in self.cells_of:
            wc = dict(base=base, group=group, method=method) if sep else dict(base=base, row="")
            return dumps(self.eval_tasks(wc))
        raise KeyError(f"no payload {name!r}")

    def card_payload(self, wc: Wildcards) -> str:
        """The payload file of a cell's model card spec."""
        return payload_path(PAYLOAD_CARD.format(**{k: wc[k] for k in ("base", "group", "method")}))

    # ---- targets and jobs --------------------------------------------------------

    def final_outputs(self) -> list[str]:
        """Targets of the default rule: the report, a receipt per cell, the repo README,
        and the GGUF files when ``export.gguf`` lists types."""
        return [
            *REPORT_OUTPUTS,
            *self.receipts(),
            LAYOUT["hub_readme_receipt"],
            *self.all_gguf_files(),
        ]

    def jobs(self) -> Iterator[tuple[str, dict[str, str]]]:
        """Every job a fresh run of the grid has, as ``(rule, wildcards)``.

        Shell rules only, in dependency order; the ``payload`` jobs are ``(payload,
        {"payload": name})``. Used to check commands without Snakemake."""
        for pin in self.pins:
            yield "pin", {"pin": pin}
        if self.config["eval"]["demo_tasks"]:
            yield "demo_tasks", {}
        for b in self.bases:
            kind = self.base_sources[b].kind
            if kind != "path":
                yield ("demo_base" if kind == "demo" else "fetch_base"), {"base": b}
            trained: set[str] = set()
            for a in self.adapters[b]:
                akind, run = self.adapter_sources[(b, a)].kind, split_member(a)[0]
                if akind == "demo" and run not in trained:  # one run saves every checkpoint
                    trained.add(run)
                    yield "demo_adapter", {"base": b, "adapter": run}
                elif akind == "hub":
                    yield "fetch_adapter", {"base": b, "adapter": a}
                yield "bake", {"base": b, "adapter": a}
                yield "normalise_baked", {"base": b, "adapter": a}
            yield "normalise_base", {"base": b}
            if self.config["eval"]["baselines"]:
                for row in self.baseline_rows_of(b):
                    yield "eval_baseline", {"base": b, "row": row}
            for sb, a in self.selections:
                if sb == b:
                    yield "select_checkpoint", {"base": b, "adapter": a}
        if self.gguf:
            yield "gguf_tools", {}
        for c in self.cells:
            wc = {"base": c.base, "group": c.group, "method": c.method}
            if self.is_adapter_cell(c.method):
                yield "adapter_merge", wc
                yield "bake_cell", wc
                yield "normalise_cell", wc
            else:
                yield "merge", wc
            yield "eval_cell", wc
            for t in self.gguf.get(c, []):
                yield "export_gguf", {**wc, "type": t}
            yield "upload", wc
        yield "report", {}
        yield "hub_readme", {}
        for name in self.payload_names():
            yield "payload", {"payload": name}

    # ---- job sizing (scheduler resources) ----------------------------------------

    def checkpoint_of(self, rule: str, wc: Wildcards) -> str | None:
        """The checkpoint folder a job of ``rule`` reads (sizes the job), or None."""
        entry = CHECKPOINT_OF.get(rule)
        if entry is None:
            return None
        if entry == "base":
            return self.base_dir(wc["base"])
        return path(entry, **wc)

    def job_size(self, rule: str, wc: Wildcards) -> resources.Size | None:
        """Size of the job's checkpoint: measured when there, else the base's measured or
        estimated size (:func:`mergebake.resources.estimate`); None for jobs without one."""
        size = resources.measure(self.checkpoint_of(rule, wc))
        base = wc.get("base")
        if size is not None or base not in self.config["bases"]:
            return size
        return resources.measure(self.base_dir(base)) or resources.estimate(
            self.size_of.get(base), self.config["bases"][base]
        )

    def size_factor(self, rule: str, wc: Wildcards, size: resources.Size | None) -> float:
        """Merge method (TIES costs more than linear) or eval dtype wider than stored."""
        if rule == "merge":
            point = self.points.get(wc["method"])
            name = point.method if point else wc["method"]
            method = self.config["methods"].get(name, {})
            return resources.method_factor(method.get("recipe") or name)
        if rule in ("eval_cell", "eval_baseline") and size is not None:
            return resources.dtype_factor(self.config["eval"]["dtype"], size)
        return 1.0

    def resource_model(self, rule: str) -> str:
        """The rule's resource model: a bake's depends on its engine."""
        if rule in ("bake", "bake_cell"):
            return "bake_stream" if self.config["bake"].get("engine") == "stream" else "bake"
        return rule

    def vllm_eval(self, rule: str) -> bool:
        """True for the eval rules when ``eval.backend`` is vllm (they need CUDA GPUs)."""
        evals = ("eval_cell", "eval_baseline")
        return rule in evals and self.config["eval"].get("backend", "hf") == "vllm"

    def device(self, rule: str) -> str:
        """The device a job computes on: the bake's own, else the merge and eval one;
        ``cuda`` for a vLLM eval, which runs on CUDA GPUs only."""
        bakes = ("bake", "bake_cell")
        if self.vllm_eval(rule):
            return "cuda"
        return self.config["bake"]["device"] if rule in bakes else self.config["device"]

    def gpus_per_job(self, rule: str) -> int:
        """GPUs a job asks for when it asks for any: ``eval.vllm.tensor_parallel_size``
        for a vLLM eval, else 1."""
        if self.vllm_eval(rule):
            return int((self.config["eval"].get("vllm") or {}).get("tensor_parallel_size", 1))
        return 1

    def job_resources(
        self,
        rule: str,
        wc: Wildcards,
        attempt: int = 1,
        overrides: Mapping[str, float] | None = None,
    ) -> dict[str, int]:
        """``{mem_mb, runtime, threads, disk_mb, gpu}`` of one job
        (:func:`mergebake.resources.job_resources` on :meth:`job_size`)."""
        size = self.job_size(rule, wc)
        res = resources.job_resources(
            rule,
            size,
            model=self.resource_model(rule),
            attempt=attempt,
            factor=self.size_factor(rule, wc, size),
            device=self.device(rule),
            overrides=overrides,
        )
        res["gpu"] *= self.gpus_per_job(rule)
        return res

    def gpu(self, rule: str) -> int:
        """GPUs a job of ``rule`` asks for: :meth:`gpus_per_job` for a GPU-capable step whose
        device is cuda (a vLLM eval always), else 0."""
        gpu = resources.job_resources(rule, None, device=self.device(rule))["gpu"]
        return gpu * self.gpus_per_job(rule)

    # ---- preflight: disk ---------------------------------------------------------

    def disk_needed(self, workdir: str | os.PathLike = ".") -> int:
        """Upper estimate, in bytes, of what the outputs not yet under ``workdir`` take.

        Counts a fetched copy of each missing base, a baked and a normalised checkpoint per
        missing (base, adapter), a normalised base and a merged checkpoint per missing cell
        (an adapter-space cell also its baked checkpoint),
        each the size of its base (:func:`mergebake.resources.estimate`; a base whose size
        nothing tells counts 0, so an unknown size name never fails the disk check).
        With ``temp_intermediates`` the baked and normalised checkpoints are deleted as the
        run goes, so the estimate is an upper bound.
        """
        workdir = Path(workdir)
        total = 0
        for base in self.bases:
            src = self.base_sources[base]
            folder = (
                Path(src.path) if isinstance(src, PathSource) else workdir / self.base_dir(base)
            )
            size = resources.estimate(self.size_of[base], self.config["bases"][base], folder=folder)
            nbytes = 0 if size.basis == "default" else size.total  # unknown size: not counted
            missing = [not folder.exists(), not (workdir / path("text_base", base=base)).exists()]
            for a in self.adapters[base]:
                for entry in ("baked", "text"):
                    missing.append(not (workdir / path(entry, base=base, adapter=a)).exists())
            for c in self.cells_of[base]:
                wc = dict(base=base, group=c.group, method=c.method)
                missing.append(not (workdir / path("merged", **wc)).exists())
                if self.is_adapter_cell(c.method):  # its bake (the adapter is small)
                    missing.append(not (workdir / path("baked_cell", **wc)).exists())
            total += nbytes * sum(missing)
        return total


def write_payload(
    out: str | os.PathLike, content: str, log: str | os.PathLike | None = None
) -> None:
    """Write a payload file (``content``, JSON text) atomically; note its size in ``log``.

    The ``payload`` rule runs this inside Snakemake (a local ``run:`` job: no process)."""
    from ..outputs import atomic_file

    with atomic_file(out) as fh:
        fh.write(content)
        fh.write("\n")
    if log is not None:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        Path(log).write_text(f"wrote {out} ({len(content) + 1} bytes)\n")


__all__ = ["CHECKPOINT_OF", "Plan", "dumps", "local_files", "write_payload"]
