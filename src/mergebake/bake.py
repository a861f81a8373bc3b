"""Bake a LoRA adapter into its base model: ``W' = W + scale · B @ A``, once per pair.

:func:`preflight` checks the pair from safetensors headers and the (small) adapter
tensors, read one at a time, before anything heavy is loaded: the base's weights exist and
are safetensors, the adapter is a readable LoRA adapter whose every target exists in the
base with compatible shapes, its tensors are finite, and it names the expected base.
:func:`bake` then dispatches to an engine (:data:`ENGINES`):

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
import time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import MergebakeError
from .checkpoint import PICKLE_SUFFIXES, TOKENIZER_FILES, copy_assets, read_config, tensor_index
from .normalise import runtime_names, tie_word_embeddings
from .outputs import atomic_dir, describe_input, write_provenance

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
LORA_MARKERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
# Input embeddings a tied head shares (Llama/Gemma/Qwen, GPT-2, BLOOM/Falcon-style).
EMBEDDING_NAMES = ("embed_tokens.weight", ".wte.weight", "word_embeddings.weight")
# LoraConfig fields worth recording: they decide what the bake computes.
LORA_ESSENTIALS = (
    "peft_type",
    "r",
    "lora_alpha",
    "use_rslora",
    "use_dora",
    "target_modules",
    "modules_to_save",
    "fan_in_fan_out",
    "rank_pattern",
    "alpha_pattern",
    "bias",
    "layers_to_transform",
    "base_model_name_or_path",
    "peft_version",
)


@dataclass
class AdapterPlan:
    """What :func:`preflight` learnt about an (base, adapter) pair.

    ``modules`` maps each LoRA-adapted module's parameter path in the loaded model
    (``model.language_model.layers.0.self_attn.q_proj``) to the base tensor name it
    changes, as stored on disk (``language_model.model.layers.0.self_attn.q_proj.weight``).
    ``replaced`` does the same for whole tensors the adapter carries, which PEFT loads over
    the base's: ``modules_to_save``, and the ``base_layer`` copies PEFT saves beside a LoRA
    on an embedding (its ``save_embedding_layers``). ``runtime`` maps every parameter name
    of the loaded model to its disk name (``tied`` holds the tied head's entry,
    ``lm_head.weight`` -> the embedding); ``shapes`` are the adapter tensors' shapes.
    """

    config: dict[str, Any]
    weights: Path
    keys: list[str]
    modules: dict[str, str] = field(default_factory=dict)
    replaced: dict[str, str] = field(default_factory=dict)
    base_config: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, str] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def essentials(self) -> dict[str, Any]:
        """The LoraConfig fields recorded in provenance (JSON-ready)."""
        out: dict[str, Any] = {k: self.config.get(k) for k in LORA_ESSENTIALS}
        if isinstance(out["target_modules"], list):
            out["target_modules"] = sorted(out["target_modules"])
        return out


def read_adapter_config(adapter: Path) -> dict[str, Any]:
    """``adapter_config.json`` as a dict; :class:`MergebakeError` naming it when absent or bad."""
    path = adapter / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise MergebakeError(
            f"{path}: missing; {adapter} is not a PEFT adapter folder (it needs "
            f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"
        ) from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MergebakeError(f"{path}: not valid JSON ({e}); re-save the adapter") from e
    if not isinstance(config, dict):
        raise MergebakeError(f"{path}: expected a JSON object, got {type(config).__name__}")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise MergebakeError(f"{path}: peft_type is {peft_type!r}; mergebake bakes LORA adapters")
    return config


def adapter_weights_file(adapter: Path, *, allow_pickle: bool) -> Path:
    """The adapter's weight file: safetensors, or a pickle ``.bin`` only when allowed."""
    if (adapter / ADAPTER_WEIGHTS).is_file():
        return adapter / ADAPTER_WEIGHTS
    pickles = sorted(p.name for p in adapter.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not allow_pickle:
        raise MergebakeError(
            f"{adapter}: only pickle adapter weights {pickles}; mergebake reads safetensors "
            "only. Re-save the adapter with safe_serialization=True, or set allow_pickle: true"
        )
    if (adapter / ADAPTER_PICKLE).is_file():
        return adapter / ADAPTER_PICKLE
    raise MergebakeError(f"{adapter}: no {ADAPTER_WEIGHTS} found")


def load_adapter_tensors(path: Path) -> dict[str, Any]:
    """All adapter tensors: safetensors, or a ``.bin`` read with weights_only."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own SafetensorError
            raise MergebakeError(f"{path}: not a readable safetensors file ({e})") from e
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def adapter_shapes_and_nonfinite(path: Path) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Shapes of the adapter's tensors and the names of those holding NaN/Inf.

    A safetensors adapter is read one tensor at a time (memory: its largest tensor); a
    ``.bin`` one (only with ``allow_pickle``) is loaded whole.
    """
    if path.suffix == ".safetensors":
        from .stream import SafetensorsFile, nonfinite_tensors

        entries = SafetensorsFile.open(path).entries
        return {k: e.shape for k, e in entries.items()}, nonfinite_tensors(path)
    import torch

    tensors = load_adapter_tensors(path)
    bad = [
        k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    return {k: tuple(t.shape) for k, t in tensors.items()}, bad


def _split_key(key: str) -> tuple[str, str | None, str]:
    """Split a saved adapter key into ``(module path, LoRA marker or None, parameter)``.

    ``base_model.model.model.layers.0.q_proj.lora_A.weight`` gives
    ``("model.layers.0.q_proj", "lora_A", "weight")``.
    """
    name = key.removeprefix(PEFT_PREFIX)
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in LORA_MARKERS:
            return ".".join(parts[:i]), part, ".".join(parts[i + 1 :])
    return name, None, ""


def _check_lora_shapes(
    base_shape: tuple[int, ...], lora: Mapping[str, tuple], fan_in_fan_out: bool
) -> str | None:
    """Why the LoRA tensors of ``module`` cannot apply to a weight of ``base_shape``, or None."""
    a = lora.get("lora_A") or lora.get("lora_embedding_A")
    b = lora.get("lora_B") or lora.get("lora_embedding_B")
    if a is None or b is None:
        return "has only one of lora_A / lora_B"
    if len(base_shape) < 2:
        return f"targets a {len(base_shape)}-d weight {list(base_shape)}"
    if "lora_embedding_A" in lora:  # Embedding: A [r, num_embeddings], B [dim, r]
        out_dim, in_dim = base_shape[1], base_shape[0]
    elif fan_in_fan_out:  # Conv1D stores W as [in, out]
        out_dim, in_dim = base_shape[1], base_shape[0]
    else:  # Linear W [out, in]; Conv W [out, in, *kernel]
        out_dim, in_dim = base_shape[0], base_shape[1]
    if a[0] != b[1]:
        return f"lora_A {list(a)} and lora_B {list(b)} disagree on the rank"
    if a[1] != in_dim or b[0] != out_dim:
        return (
            f"lora_A {list(a)} / lora_B {list(b)} do not fit the base weight "
            f"{list(base_shape)} (in {in_dim}, out {out_dim})"
        )
    mag = lora.get("lora_magnitude_vector")
    if mag is not None and out_dim not in mag:
        return f"DoRA magnitude {list(mag)} does not fit out features {out_dim}"
    return None


def _tied_head_alias(runtime: Mapping[str, str], config: Mapping[str, Any]) -> dict[str, str]:
    """Map a tied ``lm_head.weight`` (saved nowhere) to the embedding tensor it shares."""
    if not tie_word_embeddings(config):
        return {}
    embeds = [r for r in runtime if r.endswith(EMBEDDING_NAMES) and "vision" not in r]
    if "lm_head.weight" in runtime or len(embeds) != 1:
        return {}
    return {"lm_head.weight": runtime[embeds[0]]}


def _targets_unmatched(targets: Any, modules: list[str]) -> list[str]:
    """Entries of ``target_modules`` that match no module (PEFT's matching rules)."""
    if targets is None or targets == "all-linear":
        return []
    if isinstance(targets, str):
        return [] if any(re.fullmatch(targets, m) for m in modules) else [targets]
    return [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]


def _check_base_name(
    config: Mapping[str, Any], path: Path, expected: str | None, strict: bool
) -> None:
    if expected is None:
        return
    recorded = config.get("base_model_name_or_path")

    def norm(s: str) -> str:
        return str(s).strip().rstrip("/").lower()

    ok = recorded is not None and (
        norm(recorded) == norm(expected)
        or norm(recorded).endswith("/" + norm(expected))
        or norm(expected).endswith("/" + norm(recorded))
    )
    if ok:
        return
    msg = (
        f"{path}: base_model_name_or_path is {recorded!r} but the config expects base "
        f"{expected!r}; the adapter may have been trained on another base"
    )
    if strict:
        raise MergebakeError(msg + " (strict_base_match is on)")
    log.warning(msg)
    warnings.warn(msg, stacklevel=3)


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
    from .stream import is_conv1d

    base, adapter = Path(base), Path(adapter)
    for what, p in (("base", base), ("adapter", adapter)):
        if not p.is_dir():
            raise MergebakeError(f"{p}: {what} folder does not exist; fetch it first")
    base_config = read_config(base)
    base_tensors = tensor_index(base, allow_pickle=allow_pickle)
    runtime = runtime_names(base, base_tensors)
    tied = _tied_head_alias(runtime, base_config)
    runtime.update(tied)

    config = read_adapter_config(adapter)
    _check_base_name(config, adapter / ADAPTER_CONFIG, expected_base, strict_base_match)
    wfile = adapter_weights_file(adapter, allow_pickle=allow_pickle)
    shapes, bad = adapter_shapes_and_nonfinite(wfile)
    if not shapes:
        raise MergebakeError(f"{wfile}: holds no tensors")
    if bad:
        raise MergebakeError(
            f"{wfile}: NaN/Inf in adapter tensor(s) {sorted(bad)[:5]} ({len(bad)} in all); "
            "the training run diverged. Use an earlier checkpoint of the adapter"
        )

    lora: dict[str, dict[str, tuple]] = {}
    whole: dict[str, tuple] = {}
    tokens: list[str] = []  # PEFT's trainable tokens (trainable_token_indices) on a module
    for key, shape in shapes.items():
        module, marker, param = _split_key(key)
        if ".token_adapter." in key:
            tokens.append(key.removeprefix(PEFT_PREFIX).split(".token_adapter.")[0])
        elif marker is None:
            whole[module.replace(".base_layer.", ".")] = shape
        elif param in ("weight", ""):  # a LoRA bias (lora_B.bias) is not a shape witness
            lora.setdefault(module, {})[marker] = shape

    plan = AdapterPlan(
        config=config,
        weights=wfile,
        keys=sorted(shapes),
        base_config=base_config,
        runtime=runtime,
        tied=tied,
        shapes=shapes,
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
        why = _check_lora_shapes(base_tensors[name].shape, lora_shapes, fan)
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
    unmatched = _targets_unmatched(config.get("target_modules"), modules)
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
        loaded = set(get_peft_model_state_dict(peft_model))
        expected = set(plan.keys)
        if not expected <= loaded:
            raise MergebakeError(
                f"{plan.weights}: PEFT did not load tensor(s) {sorted(expected - loaded)[:5]} "
                f"into {cls.__name__}; the adapter does not match the base {base}"
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
        nonfinite_tensors,
        tokenizer_problems,
    )

    cand, ref = tensor_index(tmp), tensor_index(base)
    untied = patch.get("tie_word_embeddings") is False
    problems = [
        p
        for p in compare_tensors(cand, ref)
        if not (untied and "lm_head" in p and p.endswith("unexpected (not in the reference)"))
    ]
    problems += diff_json(read_config(tmp), read_config(base), list(patch))
    written = set(plan.modules.values()) | set(plan.replaced.values()) | (set(cand) - set(ref))
    if scan_values:
        problems += nonfinite_tensors({k: v for k, v in cand.items() if k in written})
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
    plan = preflight(
        base,
        adapter,
        allow_pickle=allow_pickle,
        expected_base=expected_base,
        strict_base_match=strict_base_match,
    )
    write = ENGINES[engine](base, adapter, plan, trust_remote_code=trust_remote_code, device=dev)
    # Hash the inputs for provenance in the background while the engine works.
    hashing = ThreadPoolExecutor(1, thread_name_prefix="bake-provenance")
    described = hashing.submit(
        lambda: {k: describe_input(p) for k, p in (("base", base), ("adapter", adapter))}
    )
    hashing.shutdown(wait=False)
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
            described=described.result(),
            params={
                "engine": engine,
                "lora": plan.essentials,
                "allow_pickle": allow_pickle,
                "trust_remote_code": trust_remote_code,
                "expected_base": expected_base,
                **summary,
            },
        )
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    log.info("bake %s + %s -> %s: %s", base, adapter, out, summary)
    return summary


__all__ = [
    "DEFAULT_ENGINE",
    "ENGINES",
    "AdapterPlan",
    "Engine",
    "bake",
    "bake_device",
    "preflight",
    "read_adapter_config",
]
