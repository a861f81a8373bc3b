"""``mergebake`` command line: one subcommand per pipeline stage.

The Snakemake rules call these; each is a thin wrapper over one module's function, so
every stage can also be run by hand. Errors the user can fix (:class:`MergebakeError`)
print one line naming the file or key at fault and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import MergebakeError, __version__
from .demo import ARCHES as DEMO_ARCHES
from .eval_backend import BACKENDS, BATCH_SIZE_FORMS, VllmOptions, check_batch_size


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _kv(items: list[str] | None, flag: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise MergebakeError(f"{flag} {item!r}: expected NAME=PATH")
        out[name] = Path(path)
    return out


def _read(path: Path, flag: str) -> str:
    """The text of the file a ``--*-file`` option names; a clear error when unreadable."""
    try:
        return Path(path).read_text()
    except OSError as e:
        raise MergebakeError(
            f"{flag} {path}: cannot read the file ({e.strerror or e}); the workflow writes it "
            "with its payload rule, so run that rule (or give the option a readable file)"
        ) from e


def _json(text: str, flag: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MergebakeError(f"{flag}: not valid JSON ({e})") from e


def cmd_validate(a: argparse.Namespace) -> None:
    from .config import expand_grid, load_config
    from .eval_backend import environment_notes

    cfg = load_config(a.config)
    cells = expand_grid(cfg)
    for note in environment_notes(cfg["eval"]):  # the eval jobs may run elsewhere
        print(f"mergebake validate: warning: {a.config}: {note}", file=sys.stderr)
    print(f"{a.config}: valid; {len(cells)} cell(s)")
    for c in cells:
        print(f"  {c.path_in_repo}")


def cmd_demo_base(a: argparse.Namespace) -> None:
    from .demo import cli_base

    cli_base(a.out, arch=a.arch, layers=a.layers, seed=a.seed, threads=a.threads)


def cmd_demo_adapter(a: argparse.Namespace) -> None:
    from .demo import cli_adapter

    kw = {"checkpoints": a.checkpoints} if a.checkpoints else {}
    cli_adapter(a.base, a.out, skill=a.skill, seed=a.seed, threads=a.threads, **kw)


def cmd_select_checkpoint(a: argparse.Namespace) -> None:
    from .selection import cli_select

    cli_select(a.score, a.metric, a.mode, a.out)


def cmd_demo_tasks(a: argparse.Namespace) -> None:
    from .demo import cli_tasks

    cli_tasks(a.out)


def cmd_pin(a: argparse.Namespace) -> None:
    from .fetch import cli_pin

    cli_pin(a)


def cmd_fetch(a: argparse.Namespace) -> None:
    from .fetch import cli_fetch

    cli_fetch(a)


def cmd_bake(a: argparse.Namespace) -> None:
    from .bake import bake

    _threads(a.threads)
    summary = bake(
        a.base,
        a.adapter,
        a.out,
        engine=a.engine,
        device=a.device,
        allow_pickle=a.allow_pickle,
        trust_remote_code=a.trust_remote_code,
        expected_base=a.expected_base,
        strict_base_match=a.strict_base_match,
    )
    print(json.dumps(summary, indent=2, default=str))


def cmd_normalise(a: argparse.Namespace) -> None:
    from .normalise import normalise

    print(json.dumps(normalise(a.src, a.out), indent=2, default=str))


def cmd_merge(a: argparse.Namespace) -> None:
    from .merge import merge_cell

    _threads(a.threads)
    res = merge_cell(
        a.recipe,
        base=a.base,
        models=_kv(a.model, "--model"),
        parameters=_json(a.parameters, "--parameters"),
        out=a.out,
        dtype=a.dtype,
        seed=a.seed,
        out_shard_size=a.out_shard_size,
        allow_pickle=a.allow_pickle,
        trust_remote_code=a.trust_remote_code,
        device=a.device,
        engine=a.engine,
        selection=a.selection,
        workers=a.workers or a.threads,
    )
    print(json.dumps(res, indent=2, default=str))


def cmd_adapter_merge(a: argparse.Namespace) -> None:
    from .adapter_merge import cli_adapter_merge

    cli_adapter_merge(a)


def cmd_adapter_cell(a: argparse.Namespace) -> None:
    from .adapter_cell import finish_adapter_cell

    print(json.dumps(finish_adapter_cell(a.baked, a.base, a.adapter, a.out), indent=2))


def cmd_verify(a: argparse.Namespace) -> None:
    from .verify import verify_checkpoint

    verify_checkpoint(a.candidate, a.reference, allowed_config_keys=a.allow_config_key or ())
    print(f"{a.candidate}: verified against {a.reference}")


def cmd_eval(a: argparse.Namespace) -> None:
    from .device import resolve_device
    from .evalcache import EvalCache, evaluate_cached

    _threads(a.threads)
    # auto: CUDA if usable, else CPU with a warning; vLLM checks its GPUs itself
    device = a.device if a.backend == "vllm" else resolve_device(a.device)
    evaluate_cached(
        EvalCache.configured(a.cache_dir, enabled=not a.no_cache),
        a.model,
        a.out,
        tasks=(
            _json(_read(a.tasks_file, "--tasks-file"), "--tasks-file")
            if a.tasks_file
            else _json(a.tasks, "--tasks")
        ),
        include_path=a.include_path,
        seed=a.seed,
        batch_size=a.batch_size,
        limit=a.limit,
        dtype=a.dtype,
        device=device,
        trust_remote_code=a.trust_remote_code,
        backend=a.backend,
        max_batch_size=a.max_batch_size,
        vllm=VllmOptions(a.tensor_parallel_size, a.gpu_memory_utilization, a.max_model_len),
    )


def cmd_report(a: argparse.Namespace) -> None:
    from .report import build_report

    if a.rows_file:
        rows = _json(_read(a.rows_file, "--rows-file"), "--rows-file")
    else:
        text = _read(Path(a.rows[1:]), "--rows @") if a.rows.startswith("@") else a.rows
        rows = _json(text, "--rows")
    ranking = build_report(
        rows,
        a.out_dir,
        baseline=a.baseline,
        metrics=a.metric,
        oracle=_json(a.oracle, "--oracle"),
        min_gain=a.min_gain,
        resamples=a.bootstrap,
        seed=a.seed,
    )
    print(json.dumps(ranking, indent=2, default=str))


def cmd_upload(a: argparse.Namespace) -> None:
    from .upload import cli_upload

    if a.card_file:  # the workflow's payload file; cli_upload reads --card
        a.card = _read(a.card_file, "--card-file")
    cli_upload(a)


def cmd_hub_readme(a: argparse.Namespace) -> None:
    from .upload import cli_hub_readme

    if a.rows_file:  # the workflow's payload files; cli_hub_readme reads --rows/--meta
        a.rows = _read(a.rows_file, "--rows-file")
    if a.meta_file:
        a.meta = _read(a.meta_file, "--meta-file")
    cli_hub_readme(a)


def cmd_export(a: argparse.Namespace) -> None:
    from .export import cli_export

    cli_export(a)


def cmd_gguf_tools(a: argparse.Namespace) -> None:
    from .export import cli_gguf_tools

    cli_gguf_tools(a)


def _batch_size(text: str) -> str:
    """argparse type of ``--batch-size``: the text unchanged when lm-eval accepts it."""
    try:
        return check_batch_size(text, "--batch-size")
    except MergebakeError:
        raise argparse.ArgumentTypeError(f"{text!r}: write {BATCH_SIZE_FORMS}") from None


DEVICE_HELP = (
    "auto (CUDA when usable, else CPU with a warning), cpu, or cuda[:N] "
    "(an error when CUDA cannot be used)"
)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``mergebake`` with one subparser per stage."""
    from . import adapter_merge as adapter_merge_cli
    from . import export as export_cli
    from . import fetch as fetch_cli
    from . import upload as upload_cli

    p = argparse.ArgumentParser(prog="mergebake", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"mergebake {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        return sp

    sp = add("validate", cmd_validate, "validate a config and list its cells")
    sp.add_argument("config", type=Path, nargs="?", default=Path("config.yaml"))

    sp = add("demo-base", cmd_demo_base, "generate a tiny Gemma-3 or Gemma-4 base (demo grids)")
    sp.add_argument("--out", type=Path, required=True)
    sp.add_argument("--arch", choices=list(DEMO_ARCHES), required=True)
    sp.add_argument("--layers", type=int, default=2)
    sp.add_argument("--seed", type=int, required=True)
    sp.add_argument("--threads", type=int)

    sp = add("demo-adapter", cmd_demo_adapter, "train a demo LoRA adapter on one skill")
    sp.add_argument("--base", type=Path, required=True)
    sp.add_argument("--out", type=Path, required=True)
    sp.add_argument("--skill", required=True)
    sp.add_argument("--seed", type=int, required=True)
    sp.add_argument("--threads", type=int)
    sp.add_argument(
        "--checkpoints",
        type=lambda s: [int(x) for x in s.split(",")],
        help="steps at which to save checkpoint-<step>/ (comma-separated)",
    )

    sp = add(
        "select-checkpoint",
        cmd_select_checkpoint,
        "pick an adapter's checkpoint from its scores (max/min of a metric; ties: earliest)",
    )
    sp.add_argument("--score", action="append", required=True, help="STEP=EVAL_JSON")
    sp.add_argument("--metric", required=True, help="task/metric, e.g. demo_eng/acc")
    sp.add_argument("--mode", choices=["max", "min"], default="max")
    sp.add_argument("--out", type=Path, required=True)

    sp = add("demo-tasks", cmd_demo_tasks, "write the demo lm-eval tasks and their data")
    sp.add_argument("--out", type=Path, required=True)

    sp = add("pin", cmd_pin, "resolve a Hub branch or tag to its commit, once, into a pin file")
    fetch_cli.add_pin_arguments(sp)

    sp = add("fetch", cmd_fetch, "download a base or adapter from the Hub, pinned to a commit")
    fetch_cli.add_fetch_arguments(sp)

    sp = add("bake", cmd_bake, "bake a LoRA adapter into its base (W' = W + scale·B·A)")
    sp.add_argument("--base", type=Path, required=True)
    sp.add_argument("--adapter", type=Path, required=True)
    sp.add_argument("--out", type=Path, required=True)
    sp.add_argument(
        "--engine",
        default="stream",
        choices=["stream", "peft"],
        help="stream (default): constant memory; peft: merge_and_unload",
    )
    sp.add_argument(
        "--device",
        default="cpu",
        help="device of the stream engine's matmuls: cpu (default), auto, cuda[:N]",
    )
    sp.add_argument("--expected-base", help="the configured base (repo id or path)")
    sp.add_argument("--strict-base-match", action="store_true")
    sp.add_argument("--allow-pickle", action="store_true")
    sp.add_argument("--trust-remote-code", action="store_true")
    sp.add_argument("--threads", type=int)

    sp = add("normalise", cmd_normalise, "rewrite a checkpoint to the text-only causal-LM layout")
    sp.add_argument("--src", type=Path, required=True)
    sp.add_argument("--out", type=Path, required=True)

    sp = add("merge", cmd_merge, "merge one cell with mergekit and verify it")
    sp.add_argument("--recipe", type=Path, required=True, help="recipes/<method>.yaml")
    sp.add_argument("--base", type=Path, required=True, help="normalised base folder")
    sp.add_argument(
        "--model",
        action="append",
        metavar="ADAPTER=PATH",
        required=True,
        help="normalised baked checkpoint per adapter, in group order",
    )
    sp.add_argument("--parameters", default="{}", help="method parameters as JSON")
    sp.add_argument("--out", type=Path, required=True)
    sp.add_argument("--dtype")
    sp.add_argument("--seed", type=int)
    sp.add_argument("--out-shard-size", default="5B")
    sp.add_argument("--allow-pickle", action="store_true")
    sp.add_argument("--trust-remote-code", action="store_true")
    sp.add_argument("--device", default="auto", help=DEVICE_HELP)
    sp.add_argument(
        "--engine",
        choices=["stream", "mergekit"],
        default="mergekit",
        help="stream: mergekit's per-tensor code in worker threads, byte-identical to "
        "mergekit-yaml (randomised methods and unsupported recipe features run mergekit)",
    )
    sp.add_argument(
        "--selection",
        choices=["exact", "fast"],
        default="exact",
        help="magnitude trimming: exact (mergekit's sort) or fast (linear-time, lowest index "
        "first among magnitudes equal to the cut-off; stream engine only)",
    )
    sp.add_argument("--workers", type=int, help="stream engine workers (default: --threads)")
    sp.add_argument("--threads", type=int)

    sp = add(
        "adapter-merge",
        cmd_adapter_merge,
        "merge LoRA adapters into one adapter with PEFT's add_weighted_adapter (adapter space)",
    )
    adapter_merge_cli.add_adapter_merge_arguments(sp)

    sp = add(
        "adapter-cell",
        cmd_adapter_cell,
        "normalise and verify a base with a merged adapter baked in (adapter-space cell)",
    )
    sp.add_argument("--baked", type=Path, required=True, help="base + merged adapter, baked")
    sp.add_argument("--base", type=Path, required=True, help="normalised base folder")
    sp.add_argument("--adapter", type=Path, required=True, help="merged adapter folder")
    sp.add_argument("--out", type=Path, required=True)

    sp = add("verify", cmd_verify, "verify a checkpoint against a reference checkpoint")
    sp.add_argument("--candidate", type=Path, required=True)
    sp.add_argument("--reference", type=Path, required=True)
    sp.add_argument("--allow-config-key", action="append")

    sp = add("eval", cmd_eval, "score a checkpoint with lm-eval")
    sp.add_argument("--model", type=Path, required=True)
    sp.add_argument("--out", type=Path, required=True)
    tasks = sp.add_mutually_exclusive_group(required=True)
    tasks.add_argument("--tasks", help='JSON list of {"name", "num_fewshot"}')
    tasks.add_argument("--tasks-file", type=Path, help="file holding that JSON list")
    sp.add_argument("--include-path", type=Path)
    sp.add_argument("--seed", type=int, default=1234)
    sp.add_argument("--batch-size", default=1, type=_batch_size, help="N, auto or auto:N")
    sp.add_argument("--limit", type=int)
    sp.add_argument("--dtype", default="auto")
    sp.add_argument("--device", default="auto", help=DEVICE_HELP)
    sp.add_argument("--trust-remote-code", action="store_true")
    sp.add_argument("--threads", type=int)
    sp.add_argument("--backend", choices=BACKENDS, default="hf", help="lm-eval model type")
    sp.add_argument("--max-batch-size", type=int, help="upper bound of auto (eval.max_batch_size)")
    sp.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs per model")
    sp.add_argument("--gpu-memory-utilization", type=float, help="vllm: fraction of GPU memory")
    sp.add_argument("--max-model-len", type=int, help="vllm: context length in tokens")
    sp.add_argument(
        "--cache-dir",
        type=Path,
        help="eval cache folder (default: $MERGEBAKE_CACHE, else $XDG_CACHE_HOME/mergebake, "
        "else ~/.cache/mergebake)",
    )
    sp.add_argument(
        "--no-cache",
        action="store_true",
        help="always run lm-eval, store nothing (also: MERGEBAKE_NO_CACHE=1)",
    )

    sp = add("report", cmd_report, "write the pivot CSV, Markdown report and plots")
    rows = sp.add_mutually_exclusive_group(required=True)
    rows.add_argument("--rows", help="JSON list of rows, or @FILE holding it")
    rows.add_argument("--rows-file", type=Path, help="file holding the JSON list of rows")
    sp.add_argument("--out-dir", type=Path, required=True)
    sp.add_argument("--baseline", default="base")
    sp.add_argument("--metric", action="append")
    sp.add_argument("--oracle", default="{}", help='JSON {"task": "adapter row"} (report.oracle)')
    sp.add_argument("--min-gain", type=float, default=3.0, help="pp (report.min_gain)")
    sp.add_argument("--bootstrap", type=int, default=1000, help="resamples (report.bootstrap)")
    sp.add_argument("--seed", type=int, default=1234)

    sp = add(
        "upload",
        cmd_upload,
        "upload a cell with its model card to the Hub (or write a dry-run receipt)",
    )
    upload_cli.add_upload_arguments(sp)

    sp = add("hub-readme", cmd_hub_readme, "publish the results repo's README (grid table)")
    upload_cli.add_hub_readme_arguments(sp)

    sp = add(
        "export",
        cmd_export,
        "export a cell to GGUF with llama.cpp's converter/quantiser, checked by llama.cpp",
    )
    export_cli.add_export_arguments(sp)

    sp = add(
        "gguf-tools",
        cmd_gguf_tools,
        "fetch llama.cpp's converter (pinned llama-cpp-python sdist) into resources/tools",
    )
    export_cli.add_gguf_tools_arguments(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mergebake`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        args.func(args)
    except MergebakeError as e:
        print(f"mergebake {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
