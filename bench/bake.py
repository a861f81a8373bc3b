"""Benchmark: baking an r=64 all-linear LoRA into a bf16 Gemma-3 text checkpoint.

Generates (once, into the work folder) a Gemma-3 text checkpoint of hidden size 1536,
intermediate 6144, vocabulary 32000, 8 heads of 256 (4 KV heads), 16 layers (0.65B
parameters, 1.3 GB bf16), and a LoRA adapter of rank 64 on every linear layer of it (112
modules, fp32 as PEFT saves it), then times, each as a separate process with its imports:

- ``peft``: transformers load + ``PeftModel.from_pretrained`` + ``merge_and_unload`` +
  ``save_pretrained`` (what the ``peft`` engine does);
- ``stream``: ``mergebake bake --engine stream`` (preflight, bake, provenance with sha256s:
  the inputs' taken from the fetch record the base and adapter carry, as in the workflow,
  the outputs' computed while they are written); its layout cache (in the work folder)
  starts empty at each size, so the first stream run (``cold``, reported apart) builds
  the base's key layout with transformers and the others read it, as every bake into
  a base after its first does;
- ``cp``: ``cp -r`` of the base checkpoint folder;
- ``deltas``: a bare process that reads the adapter and computes every ``B @ A * scale``
  in fp32 (the arithmetic no bake can skip);

and prints wall seconds and peak RSS of each (``/usr/bin/time``'s maximum resident set,
i.e. ``wait4`` rusage of that process; the benchmark's own process never imports torch,
so no child inherits its pages), the ratios the engine is held to (PEFT / stream wall,
target >= 3x; stream / ``cp`` wall, target <= 1.5x; stream vs the floor ``cp`` +
``deltas`` for information), and whether every tensor of the stream output is
bit-identical to PEFT's (same names, dtypes, shapes and sha256 of every tensor's bytes).
Each figure is the minimum wall (and the maximum peak RSS) of ``--repeat`` runs (3) at
the small size, and of ``--large-repeat`` runs (1) at the large one (``--large-layers``,
64 by default: 4× the parameters of the linear layers, 4.9 GB), which also shows that the
streaming bake's peak RSS does not grow with the model. Every process starts from the
same page-cache state: each output is deleted right after its run (a 4.9 GB output left
in the cache makes the next writer pay the kernel's reclaim: measured here, the stream
bake took 14 s after a ``cp`` whose copy stayed, 11.5 s otherwise), and ``sync`` (not
timed) runs before each. The load average is printed before and after each size: the
figures mean little on a busy machine. The work folder (a temporary one by default)
keeps its generated checkpoints only with ``--keep``.

``--arithmetic`` instead times, in one process, the stream engine's delta arithmetic for
one layer of the large checkpoint's shapes (7 linear modules, 37.7M parameters) on one
thread: the full fp32 ``B @ A`` product then the scaled add, against row blocks of
``B @ A`` (:class:`mergebake.stream.RowBlocks`) of several sizes, in CPU milliseconds
(``time.thread_time``, so other processes on the machine disturb it less), at ranks 16,
64 and 256. Usage:

    python bench/bake.py [--work DIR] [--keep] [--repeat 3] [--large-repeat 1]
                         [--large-layers 64] [--skip-peft-large] [--threads N]
    python bench/bake.py --arithmetic
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable
BIN = Path(sys.executable).parent
HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 1536, 6144, 32000, 8, 4, 256
RANK, ALPHA = 64, 128

PEFT_SCRIPT = """
import sys
from transformers import Gemma3ForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = Gemma3ForCausalLM.from_pretrained(base, dtype="auto")
merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
merged.save_pretrained(out)
"""

DELTAS_SCRIPT = """
import json, sys, torch
from safetensors import safe_open
adapter = sys.argv[1]
cfg = json.load(open(adapter + "/adapter_config.json"))
scale = cfg["lora_alpha"] / cfg["r"]
n = 0
with safe_open(adapter + "/adapter_model.safetensors", framework="pt") as fh:
    for key in fh.keys():
        if key.endswith("lora_A.weight"):
            a = fh.get_tensor(key).float()
            b = fh.get_tensor(key.replace("lora_A", "lora_B")).float()
            delta = (b @ a) * scale
            n += 1
print(n, "deltas")
"""


def text_config(layers: int):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=4096,
        sliding_window=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=True,
        dtype="bfloat16",
    )


def generate(folder: Path, layers: int, seed: int = 0) -> tuple[Path, Path]:
    """Write the base checkpoint and its r=64 all-linear adapter (skipped when present)."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import Gemma3ForCausalLM

    base, adapter = folder / "base", folder / "adapter"
    if (base / "model.safetensors").is_file() and (adapter / "adapter_model.safetensors").is_file():
        record_fetch(base, adapter)
        return base, adapter
    shutil.rmtree(folder, ignore_errors=True)
    base.mkdir(parents=True)
    adapter.mkdir(parents=True)
    config = text_config(layers)
    with torch.device("meta"):
        model = Gemma3ForCausalLM(config)
    names = {n: tuple(p.shape) for n, p in model.state_dict().items() if n != "lm_head.weight"}
    g = torch.Generator().manual_seed(seed)
    tensors = {n: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for n, s in names.items()}
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    del tensors
    config.architectures = ["Gemma3ForCausalLM"]
    config.save_pretrained(base)
    lora = {}
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for n, (out_f, in_f) in ((n, s) for n, s in names.items() if n.rsplit(".", 2)[-2] in targets):
        module = "base_model.model." + n.removesuffix(".weight")
        lora[f"{module}.lora_A.weight"] = torch.randn(RANK, in_f, generator=g) * 0.01
        lora[f"{module}.lora_B.weight"] = torch.randn(out_f, RANK, generator=g) * 0.01
    save_file(lora, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=list(targets), base_model_name_or_path=str(base)
    )
    cfg.save_pretrained(adapter)
    record_fetch(base, adapter)
    return base, adapter


def record_fetch(*folders: Path) -> None:
    """Give each folder the ``provenance.json`` a ``mergebake fetch`` writes (its files'
    sizes and sha256s, hashed once at download), unless it has one: in the workflow the
    bake reads fetched folders and takes their hashes from that record instead of hashing
    gigabytes again, and so does the bake timed here."""
    from mergebake.outputs import write_provenance

    for folder in folders:
        if not (folder / "provenance.json").is_file():
            write_provenance(folder, step="fetch", inputs={}, params={"bench": True})


TIME = Path("/usr/bin/time")


def measure(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run ``cmd``; return (wall seconds, peak RSS in MB) of that process.

    With ``/usr/bin/time`` the RSS is that of a process forked from ``time`` itself;
    otherwise ``wait4``'s rusage of the child, which also counts the pages it shares with
    this process between fork and exec (this process stays small for that reason).
    """
    with tempfile.TemporaryDirectory() as tmp:
        rec, log = Path(tmp) / "rss", Path(tmp) / "log"
        full = [str(TIME), "-f", "%M", "-o", str(rec), *cmd] if TIME.exists() else cmd
        with open(log, "wb") as out:
            t0 = time.perf_counter()
            proc = subprocess.Popen(full, env=env, stdout=out, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                f"{log.read_text(errors='replace')[-3000:]}"
            )
        rss_kb = float(rec.read_text().split()[-1]) if TIME.exists() else usage.ru_maxrss
    return wall, rss_kb / 1024


def digest(folder: Path, record: Path) -> None:
    """Write ``{tensor name: [dtype, shape, sha256 of its bytes]}`` of checkpoint ``folder``
    to the JSON file ``record`` (equal digests: bit-identical tensors, whatever the file
    layout)."""
    import hashlib
    import json

    import torch
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            for name in fh.keys():
                t = fh.get_tensor(name).contiguous()
                raw = t.reshape(-1).view(torch.uint8).numpy()
                out[name] = [str(t.dtype), list(t.shape), hashlib.sha256(raw).hexdigest()]
    record.write_text(json.dumps(out, sort_keys=True))


def identical(a: Path, b: Path) -> str:
    """'yes' when the digests (:func:`digest`) ``a`` and ``b`` name the same tensors with the
    same dtypes, shapes and bytes."""
    import json

    da, db = json.loads(a.read_text()), json.loads(b.read_text())
    if set(da) != set(db):
        return f"no: names differ ({sorted(set(da) ^ set(db))[:3]})"
    for name in sorted(da):
        if da[name] != db[name]:
            return f"no: {name} differs"
    return f"yes, all {len(da)} tensors bit-identical (dtype, shape, sha256 of the bytes)"


def helper(*args: str) -> str:
    """Run this file's ``--generate``/``--digest`` in a child (torch stays out of here)."""
    return (
        subprocess.run([PY, __file__, *args], check=True, capture_output=True, text=True)
        .stdout.strip()
        .splitlines()[-1]
    )


def run_size(
    label: str, folder: Path, layers: int, repeat: int, with_peft: bool, env: dict[str, str]
) -> dict[str, tuple[float, float]]:
    t0 = time.perf_counter()
    helper("--generate", str(folder), str(layers))
    base, adapter = folder / "base", folder / "adapter"
    gb = (base / "model.safetensors").stat().st_size / 1e9
    print(
        f"\n[{label}] {layers} layers, {gb:.2f} GB bf16 (generated/checked in "
        f"{time.perf_counter() - t0:.0f} s); {repeat} run(s) each; {load()}",
        flush=True,
    )
    runs: dict[str, list[tuple[float, float]]] = {}
    digests = {k: folder / f"digest-{k}.json" for k in ("stream", "peft")}

    def once(name: str, cmd: list[str], out: Path, last: bool) -> None:
        """Measure one process from the same page-cache state as the others: no output of
        an earlier one left behind (it would crowd the cache, and the next writer pays the
        reclaim), nothing dirty (``sync``, not timed). Its output is then deleted, after a
        digest of the last stream and PEFT outputs for the bit-identity check."""
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
        runs.setdefault(name, []).append(measure(cmd, env))
        print(f"  {name:<7} {runs[name][-1][0]:7.2f} s {runs[name][-1][1]:8.0f} MB", flush=True)
        if last and name in digests:
            helper("--digest", str(out), str(digests[name]))
        shutil.rmtree(out, ignore_errors=True)

    outs = {k: folder / f"out-{k}" for k in ("peft", "stream", "cp")}
    # the layout cache (mergebake.layouts) starts empty: the first stream bake builds the
    # base's layout with transformers (cold), the others read it (warm, as every bake into
    # a base after its first)
    cache = folder / "layout-cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**env, "MERGEBAKE_CACHE": str(cache)}
    stream_cmd = [
        str(BIN / "mergebake"),
        "bake",
        "--engine",
        "stream",
        "--base",
        str(base),
        "--adapter",
        str(adapter),
        "--out",
        str(outs["stream"]),
    ]
    once("cold", stream_cmd, outs["stream"], False)
    for i in range(repeat):
        last = i == repeat - 1
        once("cp", ["cp", "-r", str(base), str(outs["cp"])], outs["cp"], last)
        once("deltas", [PY, "-c", DELTAS_SCRIPT, str(adapter)], outs["cp"].with_name("none"), last)
        once("stream", stream_cmd, outs["stream"], last)
        if with_peft:
            once(
                "peft",
                [PY, "-c", PEFT_SCRIPT, str(base), str(adapter), str(outs["peft"])],
                outs["peft"],
                last,
            )
    best = {k: (min(w for w, _ in v), max(r for _, r in v)) for k, v in runs.items()}
    print(f"  {load()}", flush=True)
    if with_peft:
        best["_identical"] = identical(digests["stream"], digests["peft"])
    for d in digests.values():
        d.unlink(missing_ok=True)
    return best


def load() -> str:
    """The load average, as ``uptime`` says it."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} CPUs"


def table(label: str, res: dict) -> None:
    floor = res["cp"][0] + res["deltas"][0]
    print(f"\n{label}: min wall s / peak RSS MB of each process")
    print(f"  {'process':<28}{'wall s':>9}{'peak RSS MB':>14}")
    rows = [
        ("peft (load+merge+save)", "peft"),
        ("stream (mergebake bake)", "stream"),
        ("stream, layout cache cold", "cold"),
        ("cp -r", "cp"),
        ("deltas only (fp32 B@A)", "deltas"),
    ]
    for text, key in rows:
        if key in res:
            print(f"  {text:<28}{res[key][0]:>9.2f}{res[key][1]:>14.0f}")
    print(f"  {'floor = cp + deltas':<28}{floor:>9.2f}")
    s, cp = res["stream"], res["cp"]
    if "peft" in res:
        p = res["peft"]
        print(
            f"  stream vs PEFT: PEFT / stream wall = {p[0] / s[0]:.2f}x (target >= 3x); "
            f"cold layout cache {p[0] / res['cold'][0]:.2f}x; "
            f"stream RSS / PEFT RSS = {100 * s[1] / p[1]:.0f}%"
        )
    print(f"  stream vs cp:   stream / cp wall = {s[0] / cp[0]:.2f}x (target <= 1.5x)")
    print(f"  stream vs floor: stream / (cp + deltas) wall = {s[0] / floor:.2f}x")
    if "peft" in res:
        print(f"  stream output bit-identical to PEFT: {res['_identical']}")


ARITHMETIC_SCRIPT = """
import sys, time, torch
from mergebake.stream import LoraOp, RowBlocks, Scratch, apply_op
torch.set_num_threads(1)
torch.manual_seed(0)
H, I = 1536, 6144
shapes = [(2048, H), (1024, H), (1024, H), (H, 2048), (I, H), (I, H), (H, I)]
print("one layer of the large checkpoint (q, k, v, o, gate, up, down: 37.7M parameters, "
      "75 MB bf16) on one thread: CPU ms, min / median of 6 after a first pass")
for r in (16, 64, 256):
    layer = []
    for k, (rows, cols) in enumerate(shapes):
        w = (torch.randn(rows, cols) * 0.02).to(torch.bfloat16)
        t = {f"a{k}": torch.randn(r, cols) * 0.01, f"b{k}": torch.randn(rows, r) * 0.01}
        layer.append((w, LoraOp(f"m{k}", "linear", 2.0, f"a{k}", f"b{k}"), t))
    def run(blocks):
        scratch, times = Scratch(), []
        for _ in range(7):
            t0 = time.thread_time()
            for w, op, t in layer:
                apply_op(w, op, t, scratch, blocks)
            times.append(time.thread_time() - t0)
        times = sorted(times[1:])
        return f"{1000 * times[0]:6.1f} / {1000 * times[3]:6.1f}"
    print(f"  r={r:<3}: full fp32 B@A, then the scaled add  {run(None)}")
    for kib in (256, 512, 1024, 2048, 4096):
        blocks = RowBlocks(kib * 1024)
        ms = run(blocks)
        how = "by row blocks" if all(blocks.verdicts.values()) else "NOT bit-identical: full"
        print(f"  r={r:<3}: row blocks of {kib:4d} KiB fp32           {ms}  ({how})")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, help="folder for the checkpoints; default: a temp dir")
    ap.add_argument(
        "--keep", action="store_true", help="keep the generated checkpoints for the next run"
    )
    ap.add_argument("--repeat", type=int, default=3, help="runs at the small size (min taken)")
    ap.add_argument("--large-repeat", type=int, default=1, help="runs at the large size")
    ap.add_argument(
        "--arithmetic",
        action="store_true",
        help="time the delta arithmetic per layer (full product vs row blocks) and exit",
    )
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--large-layers", type=int, default=64, help="0 to skip the second size")
    ap.add_argument("--skip-peft-large", action="store_true")
    ap.add_argument("--threads", type=int, help="OMP/MKL threads of every process")
    ap.add_argument("--generate", nargs=2, metavar=("DIR", "LAYERS"), help=argparse.SUPPRESS)
    ap.add_argument("--digest", nargs=2, metavar=("DIR", "JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate:
        generate(Path(args.generate[0]), int(args.generate[1]))
        print("generated")
        return
    if args.digest:
        digest(Path(args.digest[0]), Path(args.digest[1]))
        print("digested")
        return
    if args.arithmetic:
        subprocess.run([PY, "-c", ARITHMETIC_SCRIPT], check=True)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="mergebake-bench-bake-"))
    env = dict(
        os.environ,
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
    )
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    print(f"bench/bake.py: {os.cpu_count()} CPUs, work {work}, repeat {args.repeat}")
    results = {"small": run_size("small", work / "small", args.layers, args.repeat, True, env)}
    table(f"{args.layers} layers", results["small"])
    if args.large_layers:
        results["large"] = run_size(
            "large",
            work / "large",
            args.large_layers,
            args.large_repeat,
            not args.skip_peft_large,
            env,
        )
        table(f"{args.large_layers} layers", results["large"])
        print(
            f"\nstream peak RSS {results['small']['stream'][1]:.0f} MB at {args.layers} layers, "
            f"{results['large']['stream'][1]:.0f} MB at {args.large_layers} layers"
        )
    if not args.keep:
        for size in ("small", "large"):
            shutil.rmtree(work / size, ignore_errors=True)
        if not args.work or not any(work.iterdir()):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
