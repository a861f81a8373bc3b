"""Benchmark: adapter-space TIES merge of three r=64 LoRA adapters, ours vs PEFT's path.

Reuses ``bench/bake.py``'s bench model (a bf16 Gemma-3 text checkpoint of 16 layers, 0.65B
parameters, and an r=64 adapter on its seven linear projections) and adds two more adapters
of the same shapes with other random tensors. Then, each as a separate process measured
with ``/usr/bin/time`` (peak RSS of that process, as ``bench/bake.py`` does):

- ``ours``: :func:`mergebake.adapter_merge.merge_adapters` (``combination_type="ties"``,
  ``density=0.2``, weights 1, 1, 1): PEFT's ``add_weighted_adapter`` over a skeleton of
  the targeted modules, tensors streamed to disk; the base's weights are never read;
- ``bake``: ``mergebake bake --engine stream`` of the merged adapter into the base (the
  second job of an adapter-space cell);
- ``peft``: PEFT's own path: load the model, ``PeftModel.from_pretrained`` + two
  ``load_adapter``, ``add_weighted_adapter`` (same options), save the merged adapter, and
  ``merge_and_unload``;

prints wall seconds and peak RSS of each, ours as a share of PEFT's, and whether the two
merged adapters are tensor-for-tensor equal. The same at ``--large-layers`` (64 by default:
4x the linear parameters) shows whether ours grows with the base. Usage:

    python bench/adapter_merge.py [--work DIR] [--layers 16] [--large-layers 64] [--threads N]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench_bake", HERE / "bake.py")
bench_bake = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_bake)  # type: ignore[union-attr]

PY = sys.executable
DENSITY = 0.2

OURS_SCRIPT = """
import sys
from mergebake.adapter_merge import merge_adapters
a, b, c, out = sys.argv[1:5]
print(merge_adapters({"a": a, "b": b, "c": c}, out, combination_type="ties", density=DENSITY))
""".replace("DENSITY", repr(DENSITY))

PEFT_SCRIPT = """
import sys
from transformers import Gemma3ForCausalLM
from peft import PeftModel
base, a, b, c, out = sys.argv[1:6]
model = Gemma3ForCausalLM.from_pretrained(base, dtype="auto")
model = PeftModel.from_pretrained(model, a, adapter_name="a")
model.load_adapter(b, adapter_name="b")
model.load_adapter(c, adapter_name="c")
model.add_weighted_adapter(["a", "b", "c"], [1.0, 1.0, 1.0], "merged", combination_type="ties",
                           density=DENSITY)
model.save_pretrained(out, selected_adapters=["merged"])
model.set_adapter("merged")
merged = model.merge_and_unload(adapter_names=["merged"])
print(type(merged).__name__)
""".replace("DENSITY", repr(DENSITY))


def more_adapters(folder: Path, seeds=(1, 2)) -> list[Path]:
    """Adapters b and c: the shapes and config of ``folder/adapter`` with other tensors."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    first = folder / "adapter"
    out = [first]
    for seed in seeds:
        dst = folder / f"adapter{seed}"
        out.append(dst)
        if (dst / "adapter_model.safetensors").is_file():
            continue
        dst.mkdir(exist_ok=True)
        g = torch.Generator().manual_seed(100 + seed)
        with safe_open(first / "adapter_model.safetensors", framework="pt") as fh:
            shapes = {k: fh.get_slice(k).get_shape() for k in fh.keys()}
        tensors = {k: torch.randn(s, generator=g) * 0.01 for k, s in shapes.items()}
        save_file(tensors, dst / "adapter_model.safetensors", metadata={"format": "pt"})
        shutil.copy(first / "adapter_config.json", dst / "adapter_config.json")
    return out


def same_adapter(a: Path, b: Path) -> str:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    if set(x) != set(y):
        return f"no: names differ ({sorted(set(x) ^ set(y))[:3]})"
    bad = [k for k in x if x[k].dtype != y[k].dtype or not torch.equal(x[k], y[k])]
    return f"no: {bad[:3]} differ" if bad else f"yes, all {len(x)} tensors torch.equal"


def run_size(label: str, folder: Path, layers: int, env: dict[str, str]) -> dict:
    bench_bake.helper("--generate", str(folder), str(layers))
    subprocess.run([PY, __file__, "--more", str(folder)], check=True, env=env)
    base = folder / "base"
    adapters = [str(p) for p in (folder / "adapter", folder / "adapter1", folder / "adapter2")]
    gb = (base / "model.safetensors").stat().st_size / 1e9
    mb = sum(Path(a, "adapter_model.safetensors").stat().st_size for a in adapters) / 1e6
    print(f"\n[{label}] {layers} layers: base {gb:.2f} GB bf16, three adapters {mb:.0f} MB")
    outs = {k: folder / f"out-{k}" for k in ("ours", "bake", "peft")}
    for o in outs.values():
        shutil.rmtree(o, ignore_errors=True)
    res = {}
    res["ours"] = bench_bake.measure([PY, "-c", OURS_SCRIPT, *adapters, str(outs["ours"])], env)
    print(f"  ours  {res['ours'][0]:7.2f} s {res['ours'][1]:8.0f} MB", flush=True)
    cmd = [str(bench_bake.BIN / "mergebake"), "bake", "--engine", "stream"]
    cmd += ["--base", str(base), "--adapter", str(outs["ours"]), "--out", str(outs["bake"])]
    res["bake"] = bench_bake.measure(cmd, env)
    print(f"  bake  {res['bake'][0]:7.2f} s {res['bake'][1]:8.0f} MB", flush=True)
    cmd = [PY, "-c", PEFT_SCRIPT, str(base), *adapters, str(outs["peft"])]
    res["peft"] = bench_bake.measure(cmd, env)
    print(f"  peft  {res['peft'][0]:7.2f} s {res['peft'][1]:8.0f} MB", flush=True)
    res["same"] = (
        subprocess.run(
            [PY, __file__, "--same", str(outs["ours"]), str(outs["peft"] / "merged")],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    for o in outs.values():
        shutil.rmtree(o, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, help="folder for checkpoints (kept); default: temp")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--large-layers", type=int, default=64, help="0 to skip the second size")
    ap.add_argument("--threads", type=int, help="OMP/MKL threads of every process")
    ap.add_argument("--more", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--same", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.more:
        more_adapters(args.more)
        return
    if args.same:
        print(same_adapter(*args.same))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="mergebake-bench-adapter-merge-"))
    env = dict(
        os.environ,
        PATH=f"{bench_bake.BIN}{os.pathsep}{os.environ['PATH']}",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
    )
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    print(f"bench/adapter_merge.py: {os.cpu_count()} CPUs, work {work}, TIES density {DENSITY}")
    sizes = [("small", args.layers)] + ([("large", args.large_layers)] if args.large_layers else [])
    results = {label: run_size(label, work / label, n, env) for label, n in sizes}
    print("\npeak RSS MB (wall s) of each process")
    print(f"  {'':<8}{'ours (merge)':>16}{'bake (stream)':>16}{'peft (all)':>16}{'ours/peft':>11}")
    for label, r in results.items():
        cells = "".join(f"{r[k][1]:>9.0f} ({r[k][0]:4.0f})" for k in ("ours", "bake", "peft"))
        share = 100 * max(r["ours"][1], r["bake"][1]) / r["peft"][1]
        print(f"  {label:<8}{cells}{share:>10.0f}%   merged adapters equal: {r['same']}")
    if len(results) == 2:
        s, big = results["small"], results["large"]
        print(
            f"\nours {s['ours'][1]:.0f} -> {big['ours'][1]:.0f} MB, bake {s['bake'][1]:.0f} -> "
            f"{big['bake'][1]:.0f} MB, peft {s['peft'][1]:.0f} -> {big['peft'][1]:.0f} MB "
            f"({args.layers} -> {args.large_layers} layers); target: ours flat and <= 30% of peft"
        )
    if not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
