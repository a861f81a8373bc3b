"""Bake a LoRA adapter into its base model: ``W' = W + scale · B @ A``, once per pair.

:func:`preflight` checks the pair from safetensors headers and the (small) adapter
tensors, read one at a time, before anything heavy is loaded: the base's weights exist and
are safetensors, the adapter is a readable LoRA adapter whose every target exists in the
base with compatible shapes, its tensors are finite, and it names the expected base (what
an adapter means is :mod:`mergebake.lora`). :func:`bake` then dispatches to an engine
(:data:`ENGINES`):

- ``stream`` (the default, :mod:`mergebake.stream`): reads the base shard by shard and
  tensor by tensor, adds the LoRA deltas with PEFT's arithmetic, op for op, and writes
  the result without instantiating the model; bit-identical to ``peft``, in constant
  memory, at about the speed of copying the checkpoint;
- ``peft``: loads the base with the class its config names, applies PEFT's default
  ``merge_and_unload`` (fp32 delta added to the stored dtype, rounded once) and saves with
  ``save_pretrained``. The reference the stream engine is tested against.

An engine is called with the checked plan and returns a writer; everything it can check
happens before the writer runs (``stream`` plans every operation first), so a refusal
leaves nothing behind. The output folder is written atomically and carries the base's
config, tokenizer, chat template and generation files and a ``provenance.json``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from . import MergebakeError
from .checkpoint import TOKENIZER_FILES, copy_assets, read_config, tensor_index
from .layouts import build_layout
from .lora import (
    ADAPTER_CONFIG,
    AdapterPlan,
    adapter_param_names,
    adapter_shapes_and_nonfinite,
    adapter_weights_file,
    check_base_name,
    check_lora_shapes,
    group_keys,
    is_conv1d,
    loaded_names,
    read_adapter_config,
    targets_unmatched,
)
from .normalise import tie_word_embeddings
from .outputs import atomic_dir, describe_input, write_provenance

log = logging.getLogger(__name__)


def preflight(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    expected_base: str | None = None,
    strict_base_match: bool = False,
) -> AdapterPlan:
    """Check that ``adapter`` can be baked into ``base``, without loading the base.

    Reads the base's safetensors headers and config and the adapter's config and
    tensors. Raises :class:`MergebakeError` naming the file at fault when: either folder
    is missing; the base has only pickle weights (always refused: the bake reads headers)
    or the adapter only pickle weights and ``allow_pickle`` is off; the adapter config is
    missing, unreadable or not LORA; an adapter tensor targets a module whose weight the
    base lacks; a ``target_modules`` entry matches nothing in the base; LoRA A/B shapes do
    not fit the base weight (an adapter for another base); an adapter tensor holds NaN or
    Inf; ``base_model_name_or_path`` disagrees with ``expected_base`` while
    ``strict_base_match`` (otherwise a warning).
    """
    base, adapter = Path(base), Path(adapter)
    for what, p in (("base", base), ("adapter", adapter)):
        if not p.is_dir():
            raise MergebakeError(f"{p}: {what} folder does not exist; fetch it first")
    base_config = read_config(base)
    base_tensors = tensor_index(base, allow_pickle=allow_pickle)
    # runtime (loaded-model) parameter name -> disk name, tied names included; from
    # transformers' own classes and conversion mappings (mergebake.layouts)
    layout = build_layout(base, list(base_tensors), base_config)
    runtime = dict(layout.disk)
    tied = dict(layout.tied)

    config = read_adapter_config(adapter)
    check_base_name(config, adapter / ADAPTER_CONFIG, expected_base, strict_base_match)
    wfile = adapter_weights_file(adapter, allow_pickle=allow_pickle)
    shapes, bad = adapter_shapes_and_nonfinite(wfile)
    if not shapes:
        raise MergebakeError(f"{wfile}: holds no tensors")
    if bad:
        raise MergebakeError(
            f"{wfile}: NaN/Inf in adapter tensor(s) {sorted(bad)[:5]} ({len(bad)} in all); "
            "the training run diverged. Use an earlier checkpoint of the adapter"
        )

    # adapters name modules as the transformers version that trained them did (4.50/4.51:
    # language_model.model.layers.*); PEFT renames them with the model's renamings on load
    renamed = {
        name: layout.adapter_param(name)
        for name in adapter_param_names(group_keys(shapes))
        if name not in runtime and layout.adapter_param(name) != name
    }
    grouped = group_keys(shapes, renamed)
    # a LoRA bias (lora_B.bias) is not a shape witness
    lora = {
        module: {part: shapes[key] for part, key in parts.items() if "." not in part}
        for module, parts in grouped.lora.items()
    }
    whole = {param: shapes[key] for param, keys in grouped.whole.items() for key in keys}
    tokens = grouped.tokens  # PEFT's trainable tokens (trainable_token_indices) on a module

    plan = AdapterPlan(
        config=config,
        weights=wfile,
        keys=sorted(shapes),
        base_config=base_config,
        runtime=runtime,
        tied=tied,
        shapes=shapes,
        renamed=renamed,
        ignored=sorted(layout.ignored),
    )
    missing: list[str] = []
    problems: list[str] = []
    for module, lora_shapes in sorted(lora.items()):
        name = runtime.get(module + ".weight")
        if name is None:
            missing.append(module)
            continue
        # PEFT decides fan_in_fan_out by layer type: True on Conv1D, False on nn.Linear
        fan = is_conv1d(base_config, module)
        why = check_lora_shapes(base_tensors[name].shape, lora_shapes, fan)
        if why:
            problems.append(f"{module}: {why}")
        plan.modules[module] = name
    for param, shape in sorted(whole.items()):
        name = runtime.get(param)
        if name is None:
            missing.append(param)
        elif tuple(base_tensors[name].shape) != shape:
            problems.append(
                f"{param}: shape {list(shape)} but the base has {list(base_tensors[name].shape)}"
            )
        else:
            plan.replaced[param] = name
    missing += [m for m in sorted(set(tokens)) if m + ".weight" not in runtime]
    if missing:
        raise MergebakeError(
            f"{wfile}: targets module(s) {missing[:5]} ({len(missing)} in all) whose weight the "
            f"base {base} lacks; the adapter was trained on another base or key layout "
            f"(the base has e.g. {sorted(runtime)[:3]})"
        )
    if problems:
        raise MergebakeError(
            f"{wfile}: LoRA shapes do not fit the base {base}; is the adapter for another "
            f"base? {'; '.join(problems[:5])}"
            + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
        )
    modules = sorted({r.rsplit(".", 1)[0] for r in runtime})
    unmatched = targets_unmatched(config.get("target_modules"), modules)
    if unmatched:
        raise MergebakeError(
            f"{adapter / ADAPTER_CONFIG}: target_modules {unmatched} match no module of the "
            f"base {base}; the adapter was made for another architecture"
        )
    tied_targets = [m for m in plan.modules if m + ".weight" in tied]
    if tied_targets:
        log.warning(
            "%s: adapts the tied head %s; merging changes the shared input "
            "embeddings too (PEFT behaviour)",
            wfile,
            tied_targets,
        )
    return plan


def _model_class(config: Mapping[str, Any], base: Path, trust_remote_code: bool):
    """The transformers class named by ``config["architectures"][0]``."""
    import transformers

    archs = config.get("architectures") or []
    if not archs:
        raise MergebakeError(
            f"{base / 'config.json'}: no 'architectures' entry; cannot tell "
            "which model class to load"
        )
    cls = getattr(transformers, archs[0], None)
    if cls is not None:
        return cls
    if trust_remote_code:
        return transformers.AutoModelForCausalLM
    raise MergebakeError(
        f"{base / 'config.json'}: architecture {archs[0]!r} is not in transformers "
        f"{transformers.__version__}; it needs custom code (set trust_remote_code: true "
        "only if you trust the repository) or a newer transformers"
    )


Writer = Callable[[Path], dict[str, Any]]


class Engine(Protocol):
    """A bake engine: checks what it can, then returns the function that writes ``tmp``.

    Called as ``engine(base, adapter, plan, trust_remote_code=..., device=...)`` after
    :func:`preflight`; raising :class:`MergebakeError` here leaves nothing written. The
    writer fills the (empty, temporary) output folder with the weights and returns
    figures for the summary; a ``config_patch`` entry holds top-level ``config.json``
    keys the bake changes (``tie_word_embeddings: false`` when the adapter unties the
    head, as PEFT does).
    """

    def __call__(
        self, base: Path, adapter: Path, plan: AdapterPlan, *, trust_remote_code: bool, device: str
    ) -> Writer: ...


def _bake_peft(
    base: Path, adapter: Path, plan: AdapterPlan, *, trust_remote_code: bool, device: str = "cpu"
) -> Writer:
    """Engine ``peft``: load, ``PeftModel.from_pretrained``, ``merge_and_unload``, save.

    The base loads in its stored dtype (``dtype="auto"``) on CPU (moved to ``device``
    for the merge when that is not the CPU); PEFT's default merge keeps bf16/fp16 LoRA
    weights in fp32, forms ``scale · B @ A`` in fp32 and adds it to the stored weight
    (rounded once). The writer raises :class:`MergebakeError` when PEFT did not load
    every adapter tensor (a silent no-op bake otherwise).
    """

    def write(tmp: Path) -> dict[str, Any]:
        from peft import PeftModel
        from peft.utils import get_peft_model_state_dict

        config = read_config(base)
        cls = _model_class(config, base, trust_remote_code)
        model = cls.from_pretrained(base, dtype="auto", trust_remote_code=trust_remote_code)
        if device != "cpu":
            model.to(device)
        peft_model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
        # Every adapter tensor must be in the PEFT model with its saved values: PEFT 0.21
        # leaves LoRA modules at their initial (zero) B where it cannot rename a saved key
        # (e.g. the vision tower of a transformers 4.50/4.51 Gemma-3 adapter), a silent no-op.
        loaded = get_peft_model_state_dict(peft_model)
        missed = [
            key
            for key, name in loaded_names(plan.keys, plan.renamed).items()
            if name not in loaded or not _same_values(loaded[name], plan.weights, key)
        ]
        if missed:
            raise MergebakeError(
                f"{plan.weights}: PEFT did not load adapter tensor(s) {sorted(missed)[:5]} "
                f"({len(missed)} in all) into {cls.__name__}; the adapter does not match the "
                f"base {base} as PEFT names it (bake.engine: stream applies them under the "
                "names transformers gives them)"
            )
        merged = peft_model.merge_and_unload()
        if device != "cpu":
            merged.to("cpu")
        merged.save_pretrained(tmp)
        saved = read_config(tmp)
        patch = {}
        if tie_word_embeddings(saved) != tie_word_embeddings(config):
            patch["tie_word_embeddings"] = saved.get("tie_word_embeddings")
        (tmp / "generation_config.json").unlink(missing_ok=True)
        return {"config_patch": patch} if patch else {}

    return write


def _same_values(tensor, weights: Path, key: str) -> bool:
    import torch

    from .safetensors_io import TensorReader

    if weights.suffix != ".safetensors":
        return True  # a pickle adapter (allow_pickle): names only
    reader = TensorReader()
    try:
        saved = reader.read(weights, key)
    finally:
        reader.close()
    return torch.equal(tensor.detach().cpu().to(torch.float32), saved.to(torch.float32))


def _bake_stream(
    base: Path, adapter: Path, plan: AdapterPlan, *, trust_remote_code: bool, device: str = "cpu"
) -> Writer:
    """Engine ``stream`` (:mod:`mergebake.stream`): plan every operation now, write later."""
    from .stream import plan_stream, run_stream

    del trust_remote_code  # no model code runs: only headers, configs and tensors are read
    splan = plan_stream(base, adapter, plan)

    def write(tmp: Path) -> dict[str, Any]:
        summary = run_stream(splan, tmp, device=device)
        if splan.config_patch:
            summary["config_patch"] = splan.config_patch
        return summary

    return write


ENGINES: dict[str, Engine] = {"stream": _bake_stream, "peft": _bake_peft}
DEFAULT_ENGINE = "stream"


def bake_device(requested: str | None = "cpu") -> str:
    """The torch device a bake computes on, for ``cpu`` (default), ``auto`` or ``cuda[:N]``.

    ``cpu`` reproduces PEFT's CPU merge bit for bit; a GPU computes the same formulas
    (fp32 delta, rounded once) but its matmuls may round differently. ``auto`` takes CUDA
    when usable (:func:`mergebake.device.resolve_device`); ``cuda`` that is not usable
    falls back to the CPU with a :class:`RuntimeWarning` saying why. Raises
    :class:`MergebakeError` for any other value.
    """
    from . import device as devices

    requested = (requested or "cpu").strip().lower()
    if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", requested):
        raise MergebakeError(f"bake device {requested!r}: expected cpu, auto, cuda or cuda:N")
    if not requested.startswith("cuda"):
        return devices.resolve_device(requested)
    try:
        return devices.resolve_device(requested)
    except MergebakeError:
        index = int(requested.split(":", 1)[1]) if ":" in requested else 0
        msg = (
            f"bake device {requested!r}: CUDA is not usable ({devices.cuda_problem(index)}); "
            "baking on the CPU instead"
        )
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return "cpu"


def _write_config(base: Path, tmp: Path, patch: Mapping[str, Any]) -> None:
    """The base's ``config.json`` byte for byte, or with the top-level keys of ``patch`` set."""
    raw = (base / "config.json").read_bytes()
    if not patch:
        (tmp / "config.json").write_bytes(raw)
        return
    config = json.loads(raw)
    config.update(patch)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _verify_baked(
    tmp: Path,
    out: Path,
    base: Path,
    plan: AdapterPlan,
    patch: dict[str, Any],
    *,
    scan_values: bool = True,
) -> None:
    """Verify a bake before it counts as built: the base's tensor names, shapes and dtypes
    (plus ``lm_head.weight`` where the adapter unties the head), its config apart from
    ``patch``, the base's tokenizer files, and, where the layout differs from the base's,
    that it loads with every key matched (on the meta device) and its tokenizer loads;
    with ``scan_values``, no NaN/Inf in the tensors the bake wrote. The stream
    engine checks each tensor it writes while it is in memory, so it passes
    ``scan_values=False`` rather than read the checkpoint a second time; unchanged tensors
    are the base's own bytes either way. Raises
    :class:`mergebake.verify.VerificationError` naming ``out``."""
    from .verify import (
        VerificationError,
        compare_tensors,
        diff_json,
        load_problems,
        nonfinite_problems,
        tokenizer_problems,
    )

    cand, ref = tensor_index(tmp), tensor_index(base)
    untied = patch.get("tie_word_embeddings") is False
    # tensors the model class ignores on load (e.g. the redundant k/v of Gemma-4's
    # kv-shared layers): the stream engine copies them, save_pretrained (peft) drops them
    ignored = {f"tensor {n}: missing (the reference has it)" for n in plan.ignored}
    problems = [
        p
        for p in compare_tensors(cand, ref)
        if not (untied and "lm_head" in p and p.endswith("unexpected (not in the reference)"))
        and p not in ignored
    ]
    dropped = [n for n in plan.ignored if n not in cand]
    if dropped:
        log.info(
            "bake: %d tensor(s) the model class ignores on load are not in the output "
            "(save_pretrained drops them), e.g. %s",
            len(dropped),
            dropped[:3],
        )
    ref = {n: v for n, v in ref.items() if n in cand or n not in plan.ignored}
    problems += diff_json(read_config(tmp), read_config(base), list(patch))
    written = set(plan.modules.values()) | set(plan.replaced.values()) | (set(cand) - set(ref))
    if scan_values:
        problems += nonfinite_problems({k: v for k, v in cand.items() if k in written})
    if problems or patch or set(cand) != set(ref):
        # The layout differs from the base's (an untied head): prove it loads. Otherwise
        # names, shapes, dtypes and config equal the base's, so it loads as the base does,
        # and the import of transformers (seconds) is saved.
        problems += load_problems(tmp) + tokenizer_problems(tmp, base)
    else:  # tokenizer files are the base's bytes: check they are all there
        problems += [
            f"tokenizer: {name} missing (the reference has it)"
            for name in TOKENIZER_FILES
            if (base / name).is_file() and not (tmp / name).is_file()
        ]
    if problems:
        raise VerificationError(out, base, problems)


def _in_background(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Start ``fn()`` in a daemon thread; return a function that waits for its result (or
    raises its error). A daemon, so a bake refused meanwhile exits without waiting."""
    result: list[Any] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as e:
            error.append(e)

    thread = threading.Thread(target=run, name="bake-provenance", daemon=True)
    thread.start()

    def wait() -> Any:
        thread.join()
        if error:
            raise error[0]
        return result[0]

    return wait


def bake(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    engine: str = DEFAULT_ENGINE,
    device: str | None = "cpu",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    expected_base: str | None = None,
    strict_base_match: bool = False,
) -> dict[str, Any]:
    """Bake the LoRA ``adapter`` into ``base`` and write the result to ``out``.

    The output has the base's key layout, dtypes and shapes, the base's ``config.json``
    (with ``tie_word_embeddings: false`` only where the adapter unties the head, as PEFT
    does), tokenizer, chat-template, generation and processor files verbatim, and
    ``provenance.json`` (base and adapter with sha256s; the engine and the LoraConfig
    essentials). ``engine`` is a key of :data:`ENGINES`: ``stream`` (default) writes the
    base's shard files with the changed tensors, ``peft`` what ``save_pretrained`` writes;
    both give bit-identical tensors. ``device`` (see :func:`bake_device`) is where the
    deltas are computed. All checks of :func:`preflight` and of the engine run first; any
    :class:`MergebakeError` leaves ``out`` untouched (no partial folder).

    Returns ``{"engine": str, "device": str, "modules_changed": int, "tensors_replaced":
    int, "adapter_tensors": int, "seconds": float}`` plus the engine's own figures.
    """
    t0 = time.perf_counter()
    if engine not in ENGINES:
        raise MergebakeError(f"bake engine {engine!r} is unknown; choose one of {sorted(ENGINES)}")
    base, adapter, out = Path(base), Path(adapter), Path(out)
    dev = bake_device(device)
    # Hash the inputs for provenance in the background from the start, while the checks
    # (mostly imports, on one core) and the engine run.
    described = _in_background(
        lambda: {k: describe_input(p) for k, p in (("base", base), ("adapter", adapter))}
    )
    plan = preflight(
        base,
        adapter,
        allow_pickle=allow_pickle,
        expected_base=expected_base,
        strict_base_match=strict_base_match,
    )
    write = ENGINES[engine](base, adapter, plan, trust_remote_code=trust_remote_code, device=dev)
    with atomic_dir(out) as tmp:
        extra = write(tmp) or {}
        patch = extra.pop("config_patch", {})
        _write_config(base, tmp, patch)
        copy_assets(base, tmp, processor=True, link=False)
        summary = {
            "engine": engine,
            "device": dev,
            "modules_changed": len(plan.modules),
            "tensors_replaced": len(plan.replaced),
            "adapter_tensors": len(plan.keys),
            **extra,
        }
        if patch:
            summary["config_changed"] = patch
        _verify_baked(tmp, out, base, plan, patch, scan_values=engine != "stream")
        write_provenance(
            tmp,
            step="bake",
            inputs={},
            described=described(),
            params={
                "engine": engine,
                "lora": plan.essentials,
                "allow_pickle": allow_pickle,
                "trust_remote_code": trust_remote_code,
                "expected_base": expected_base,
                **summary,
                # read by normalise, to say how many adapted tensors it drops with the towers
                "adapted_tensors": sorted(set(plan.modules.values()) | set(plan.replaced.values())),
            },
        )
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    log.info("bake %s + %s -> %s: %s", base, adapter, out, summary)
    return summary


__all__ = [
    "DEFAULT_ENGINE",
    "ENGINES",
    "Engine",
    "bake",
    "bake_device",
    "preflight",
]
