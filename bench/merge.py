"""Benchmark: the stream merge engine against bare ``mergekit-yaml`` on the same recipe.

Generates (once, into the work folder) the 0.65B-parameter bf16 Gemma-3 text checkpoint of
``bench/bake.py`` (hidden 1536, 16 layers, vocabulary 32000) and two fine-tunes of it,
each the base with an r=64 low-rank delta baked into every linear layer
(``bf16(W + scale * B @ A)``, what a LoRA bake writes; embeddings and norms unchanged), then
renders ``recipes/{ties,linear,task_arithmetic}.yaml`` for the pair (TIES density 0.5) and
times, each as a separate process with its imports:

- ``mergekit``: bare ``mergekit-yaml recipe.yaml out`` (its defaults);
- ``stream``: a process that calls :func:`mergebake.merge_stream.stream_merge` on the same
  rendered recipe with mergekit's default options (``selection`` exact, and fast for TIES),
  with the workers capped at 2 and at 1;

and prints wall seconds (min of ``--repeat`` runs; the 1-worker runs once; every run
starts with nothing dirty and the inputs read through, see :func:`warm`), peak RSS
(``/usr/bin/time``'s maximum resident set of that process), the speed-up over mergekit,
and whether every safetensors file and the index are byte-identical to mergekit's. A
second size (``--large-layers``, 64 by default: 4x the linear layers' parameters) runs
once, with 2 workers, and shows whether the stream engine's peak RSS grows with the model
(mergekit's holds a whole output shard). Usage:

    nice python bench/merge.py [--work DIR] [--repeat 3] [--layers 16] [--large-layers 64]
                               [--methods ties,linear,task_arithmetic] [--keep]
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bake import BIN, PY, RANK, measure  # noqa: E402  (bench/bake.py: model shape, timing)

ROOT = Path(__file__).resolve().parent.parent
METHOD_PARAMETERS = {"ties": {"density": 0.5}, "linear": {}, "task_arithmetic": {}}

STREAM_SCRIPT = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions
from mergebake.merge_stream import stream_merge
recipe, out, workers, selection = sys.argv[1:5]
source = open(recipe).read()
config = MergeConfiguration.model_validate(yaml.safe_load(source))
res = stream_merge(config, out, MergeOptions(quiet=True), workers=int(workers),
                   selection=selection, config_source=source)
print(res)
"""


def generate(folder: Path, layers: int) -> None:
    """The base of bench/bake.py plus two baked fine-tunes ``a`` and ``b`` (skipped when
    present)."""
    import torch
    from bake import ALPHA
    from bake import generate as generate_base
    from safetensors import safe_open
    from safetensors.torch import save_file

    base, _adapter = generate_base(folder, layers)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for seed, name in ((1, "a"), (2, "b")):
        out = folder / name
        if (out / "model.safetensors").is_file():
            continue
        out.mkdir(exist_ok=True)
        g = torch.Generator().manual_seed(seed)
        tensors = {}
        with safe_open(base / "model.safetensors", framework="pt") as fh:
            for key in fh.keys():
                w = fh.get_tensor(key)
                if key.rsplit(".", 2)[-2] in targets:
                    a = torch.randn(RANK, w.shape[1], generator=g) * 0.01
                    b = torch.randn(w.shape[0], RANK, generator=g) * 0.01
                    w = (w.float() + (b @ a) * (ALPHA / RANK)).to(torch.bfloat16)
                tensors[key] = w
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        del tensors
        shutil.copy(base / "config.json", out / "config.json")


def render(folder: Path, method: str) -> Path:
    """The rendered recipe of ``method`` for the pair, as ``mergebake merge`` renders it."""
    import yaml

    from mergebake.config import RECIPES_DIR, render_recipe

    rendered = render_recipe(
        RECIPES_DIR / f"{method}.yaml",
        base_model=str(folder / "base"),
        models={"a": str(folder / "a"), "b": str(folder / "b")},
        parameters=METHOD_PARAMETERS[method],
        dtype="bfloat16",
    )
    path = folder / f"{method}.yaml"
    path.write_text(yaml.safe_dump(rendered, sort_keys=False))
    return path


def warm(folder: Path) -> None:
    """Start every timed process from the same page-cache state (not timed): nothing dirty
    (``sync``) and the three input checkpoints read through, so they are cached as far as
    memory allows. Without it a process pays the disk reads its predecessor caused (at
    4.9 GB, mergekit's 19 GB of RSS pushes the inputs out of the cache and the next
    process reads them from disk)."""
    os.sync()
    buf = bytearray(64 << 20)
    for name in ("base", "a", "b"):
        with open(folder / name / "model.safetensors", "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def same_bytes(a: Path, b: Path) -> str:
    """'yes' when every safetensors file and the index of ``a`` equal ``b``'s byte for byte."""
    names = sorted(p.name for p in a.iterdir() if "safetensors" in p.name)
    if names != sorted(p.name for p in b.iterdir() if "safetensors" in p.name):
        return "no: different files"
    bad = [n for n in names if not filecmp.cmp(a / n, b / n, shallow=False)]
    return f"no: {', '.join(bad)}" if bad else f"yes ({len(names)} files)"


def run_size(
    label: str, folder: Path, layers: int, repeat: int, methods, env, worker_caps=(2, 1)
) -> list[tuple]:
    t0 = time.perf_counter()
    subprocess.run([PY, __file__, "--generate", str(folder), str(layers)], check=True, env=env)
    gb = (folder / "base" / "model.safetensors").stat().st_size / 1e9
    print(
        f"\n[{label}] {layers} layers, {gb:.2f} GB bf16 per checkpoint "
        f"(generated/checked in {time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    rows = []
    for method in methods:
        recipe = render(folder, method)
        ref = folder / f"out-{method}-mergekit"

        def timed(cmd: list[str], out: Path, n: int) -> tuple[float, float]:
            best = None
            for _ in range(n):
                shutil.rmtree(out, ignore_errors=True)
                warm(folder)
                wall, rss = measure(cmd, env)
                print(f"  {out.name:<40}{wall:8.2f} s {rss:8.0f} MB", flush=True)
                best = (wall, rss) if best is None else (min(best[0], wall), max(best[1], rss))
            return best

        mk = timed([str(BIN / "mergekit-yaml"), str(recipe), str(ref)], ref, repeat)
        rows.append((label, method, "mergekit-yaml", "-", mk, mk, "reference"))
        selections = ("exact", "fast") if method == "ties" else ("exact",)
        for selection in selections:
            for workers in worker_caps:
                out = folder / f"out-{method}-{selection}-{workers}"
                cmd = [PY, "-c", STREAM_SCRIPT, str(recipe), str(out), str(workers), selection]
                res = timed(cmd, out, repeat if workers == 2 else 1)
                same = same_bytes(out, ref) if selection == "exact" else "n/a (fast selection)"
                rows.append((label, method, f"stream {selection}", workers, res, mk, same))
                shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(ref, ignore_errors=True)
    return rows


def table(rows: list[tuple]) -> None:
    print("\nwall s (min of runs) / peak RSS MB of each process; speed-up = mergekit / this")
    head = f"  {'size':<6}{'method':<17}{'engine':<15}{'workers':>8}{'wall s':>9}{'RSS MB':>9}"
    print(head + f"{'speed-up':>10}  byte-identical to mergekit-yaml")
    for label, method, engine, workers, (wall, rss), (mk_wall, _), same in rows:
        print(
            f"  {label:<6}{method:<17}{engine:<15}{workers!s:>8}{wall:>9.2f}{rss:>9.0f}"
            f"{mk_wall / wall:>9.2f}x  {same}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, help="folder for checkpoints (kept); default: a temp dir")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--large-layers", type=int, default=64, help="0 to skip the second size")
    ap.add_argument("--methods", default="ties,linear,task_arithmetic")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--generate", nargs=2, metavar=("DIR", "LAYERS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate:
        generate(Path(args.generate[0]), int(args.generate[1]))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="mergebake-bench-merge-"))
    env = dict(
        os.environ,
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
    )
    methods = [m for m in args.methods.split(",") if m]
    load = os.getloadavg()[0]
    print(f"bench/merge.py: {os.cpu_count()} CPUs, load average {load:.1f}, work {work}")
    rows = run_size("small", work / "small", args.layers, args.repeat, methods, env)
    table(rows)
    if args.large_layers:
        rows += run_size(
            "large", work / "large", args.large_layers, 1, methods, env, worker_caps=(2,)
        )
        table(rows)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (figures are disturbed if > CPUs)")
    if not args.work and not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
