"""Bake a LoRA adapter into its base model: ``W' = W + scale · B @ A``, once per pair.

:func:`preflight` checks the pair from safetensors headers and the (small) adapter
tensors before anything heavy is loaded: the base's weights exist and are safetensors,
the adapter is a readable LoRA adapter whose every target exists in the base with
compatible shapes, its tensors are finite, and it names the expected base.
:func:`bake` then dispatches to an engine (:data:`ENGINES`). The ``peft`` engine loads
the base with the class its config names, applies PEFT's default ``merge_and_unload``
(fp32 delta added to the stored dtype, rounded once) and saves with ``save_pretrained``.
The output folder is written atomically and carries the base's config, tokenizer,
chat template and generation files and a ``provenance.json``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import MergebakeError
from .checkpoint import PICKLE_SUFFIXES, copy_assets, read_config, tensor_index
from .normalise import runtime_names, tie_word_embeddings
from .outputs import atomic_dir, write_provenance

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
LORA_MARKERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                "lora_magnitude_vector")
# LoraConfig fields worth recording: they decide what the bake computes.
LORA_ESSENTIALS = ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "target_modules",
                   "modules_to_save", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "bias",
                   "layers_to_transform", "base_model_name_or_path", "peft_version")


@dataclass
class AdapterPlan:
    """What :func:`preflight` learnt about an (base, adapter) pair.

    ``modules`` maps each LoRA-adapted module's parameter path in the loaded model
    (``model.language_model.layers.0.self_attn.q_proj``) to the base tensor name it
    changes, as stored on disk (``language_model.model.layers.0.self_attn.q_proj.weight``).
    ``replaced`` does the same for whole tensors the adapter carries, which PEFT loads over
    the base's: ``modules_to_save``, and the ``base_layer`` copies PEFT saves beside a LoRA
    on an embedding (its ``save_embedding_layers``).
    """

    config: dict[str, Any]
    weights: Path
    keys: list[str]
    modules: dict[str, str] = field(default_factory=dict)
    replaced: dict[str, str] = field(default_factory=dict)

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
    """All adapter tensors (they are small): safetensors, or a ``.bin`` read with weights_only."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own SafetensorError
            raise MergebakeError(f"{path}: not a readable safetensors file ({e})") from e
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _split_key(key: str) -> tuple[str, str | None, str]:
    """Split a saved adapter key into ``(module path, LoRA marker or None, parameter)``.

    ``base_model.model.model.layers.0.q_proj.lora_A.weight`` gives
    ``("model.layers.0.q_proj", "lora_A", "weight")``.
    """
    name = key.removeprefix(PEFT_PREFIX)
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in LORA_MARKERS:
            return ".".join(parts[:i]), part, ".".join(parts[i + 1:])
    return name, None, ""


def _check_lora_shapes(base_shape: tuple[int, ...], lora: Mapping[str, tuple],
                       fan_in_fan_out: bool) -> str | None:
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
        return (f"lora_A {list(a)} / lora_B {list(b)} do not fit the base weight "
                f"{list(base_shape)} (in {in_dim}, out {out_dim})")
    mag = lora.get("lora_magnitude_vector")
    if mag is not None and out_dim not in mag:
        return f"DoRA magnitude {list(mag)} does not fit out features {out_dim}"
    return None


def _tied_head_alias(runtime: Mapping[str, str], config: Mapping[str, Any]) -> dict[str, str]:
    """Map a tied ``lm_head.weight`` (saved nowhere) to the embedding tensor it shares."""
    if not tie_word_embeddings(config):
        return {}
    embeds = [r for r in runtime if r.endswith("embed_tokens.weight")
              and "vision" not in r]
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


def _check_base_name(config: Mapping[str, Any], path: Path, expected: str | None,
                     strict: bool) -> None:
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
    msg = (f"{path}: base_model_name_or_path is {recorded!r} but the config expects base "
           f"{expected!r}; the adapter may have been trained on another base")
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
    import torch

    base, adapter = Path(base), Path(adapter)
    for what, p in (("base", base), ("adapter", adapter)):
        if not p.is_dir():
            raise MergebakeError(f"{p}: {what} folder does not exist; fetch it first")
    base_config = read_config(base)
    base_tensors = tensor_index(base, allow_pickle=allow_pickle)
    runtime = runtime_names(base, base_tensors)
    runtime.update(_tied_head_alias(runtime, base_config))

    config = read_adapter_config(adapter)
    _check_base_name(config, adapter / ADAPTER_CONFIG, expected_base, strict_base_match)
    wfile = adapter_weights_file(adapter, allow_pickle=allow_pickle)
    tensors = load_adapter_tensors(wfile)
    if not tensors:
        raise MergebakeError(f"{wfile}: holds no tensors")

    bad = [k for k, t in tensors.items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise MergebakeError(
            f"{wfile}: NaN/Inf in adapter tensor(s) {sorted(bad)[:5]} ({len(bad)} in all); "
            "the training run diverged. Use an earlier checkpoint of the adapter"
        )

    lora: dict[str, dict[str, tuple]] = {}
    whole: dict[str, tuple] = {}
    for key, t in tensors.items():
        module, marker, param = _split_key(key)
        if marker is None:
            whole[module.replace(".base_layer.", ".")] = tuple(t.shape)
        elif param in ("weight", ""):  # a LoRA bias (lora_B.bias) is not a shape witness
            lora.setdefault(module, {})[marker] = tuple(t.shape)

    plan = AdapterPlan(config=config, weights=wfile, keys=sorted(tensors))
    missing: list[str] = []
    problems: list[str] = []
    fan = bool(config.get("fan_in_fan_out"))
    for module, shapes in sorted(lora.items()):
        name = runtime.get(module + ".weight")
        if name is None:
            missing.append(module)
            continue
        why = _check_lora_shapes(base_tensors[name].shape, shapes, fan)
        if why:
            problems.append(f"{module}: {why}")
        plan.modules[module] = name
    for param, shape in sorted(whole.items()):
        name = runtime.get(param)
        if name is None:
            missing.append(param)
        elif tuple(base_tensors[name].shape) != shape:
            problems.append(f"{param}: shape {list(shape)} but the base has "
                            f"{list(base_tensors[name].shape)}")
        else:
            plan.replaced[param] = name
    if missing:
        raise MergebakeError(
            f"{wfile}: targets module(s) {missing[:5]} ({len(missing)} in all) whose weight the "
            f"base {base} lacks; the adapter was trained on another base or key layout "
            f"(the base has e.g. {sorted(runtime)[:3]})"
        )
    if problems:
        raise MergebakeError(
            f"{wfile}: LoRA shapes do not fit the base {base}; is the adapter for another "
            f"base? {'; '.join(problems[:5])}" + (f" (+{len(problems) - 5} more)"
                                                  if len(problems) > 5 else "")
        )
    modules = sorted({r.rsplit(".", 1)[0] for r in runtime})
    unmatched = _targets_unmatched(config.get("target_modules"), modules)
    if unmatched:
        raise MergebakeError(
            f"{adapter / ADAPTER_CONFIG}: target_modules {unmatched} match no module of the "
            f"base {base}; the adapter was made for another architecture"
        )
    tied_targets = [m for m, name in plan.modules.items()
                    if name.endswith("embed_tokens.weight") and m.endswith("lm_head")]
    if tied_targets:
        log.warning("%s: adapts the tied head %s; merging changes the shared input "
                    "embeddings too (PEFT behaviour)", wfile, tied_targets)
    return plan


def _model_class(config: Mapping[str, Any], base: Path, trust_remote_code: bool):
    """The transformers class named by ``config["architectures"][0]``."""
    import transformers

    archs = config.get("architectures") or []
    if not archs:
        raise MergebakeError(f"{base / 'config.json'}: no 'architectures' entry; cannot tell "
                             "which model class to load")
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


def _bake_peft(base: Path, adapter: Path, tmp: Path, plan: AdapterPlan, *,
               trust_remote_code: bool) -> None:
    """Engine ``peft``: load, ``PeftModel.from_pretrained``, ``merge_and_unload``, save.

    The base loads in its stored dtype (``dtype="auto"``) on CPU; PEFT's default merge
    keeps bf16/fp16 LoRA weights in fp32, forms ``scale · B @ A`` in fp32 and adds it to
    the stored weight (rounded once). Raises :class:`MergebakeError` when PEFT did not
    load every adapter tensor (a silent no-op bake otherwise).
    """
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    config = read_config(base)
    cls = _model_class(config, base, trust_remote_code)
    model = cls.from_pretrained(base, dtype="auto", trust_remote_code=trust_remote_code)
    peft_model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
    loaded = set(get_peft_model_state_dict(peft_model))
    expected = set(plan.keys)
    if not expected <= loaded:
        raise MergebakeError(
            f"{plan.weights}: PEFT did not load tensor(s) {sorted(expected - loaded)[:5]} into "
            f"{cls.__name__}; the adapter does not match the base {base}"
        )
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp)


Engine = Callable[..., None]
ENGINES: dict[str, Engine] = {"peft": _bake_peft}


def bake(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    engine: str = "peft",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    expected_base: str | None = None,
    strict_base_match: bool = False,
) -> dict[str, Any]:
    """Bake the LoRA ``adapter`` into ``base`` and write the result to ``out``.

    The output has the base's key layout, dtypes and shapes (``save_pretrained`` of the
    base's class), the base's ``config.json``, tokenizer, chat-template, generation and
    processor files verbatim, and ``provenance.json`` (base and adapter with sha256s; the
    engine and the LoraConfig essentials). All checks of :func:`preflight` run first;
    any :class:`MergebakeError` leaves ``out`` untouched (no partial folder).

    Returns ``{"engine": str, "modules_changed": int, "tensors_replaced": int,
    "adapter_tensors": int, "seconds": float}``.
    """
    t0 = time.perf_counter()
    if engine not in ENGINES:
        raise MergebakeError(f"bake engine {engine!r} is unknown; choose one of {sorted(ENGINES)}")
    base, adapter, out = Path(base), Path(adapter), Path(out)
    plan = preflight(base, adapter, allow_pickle=allow_pickle, expected_base=expected_base,
                     strict_base_match=strict_base_match)
    with atomic_dir(out) as tmp:
        ENGINES[engine](base, adapter, tmp, plan, trust_remote_code=trust_remote_code)
        # Baking changes values, not architecture: keep the base's files byte for byte.
        (tmp / "config.json").write_bytes((base / "config.json").read_bytes())
        (tmp / "generation_config.json").unlink(missing_ok=True)
        copy_assets(base, tmp, processor=True, link=False)
        summary = {
            "engine": engine,
            "modules_changed": len(plan.modules),
            "tensors_replaced": len(plan.replaced),
            "adapter_tensors": len(plan.keys),
        }
        write_provenance(
            tmp, step="bake", inputs={"base": base, "adapter": adapter},
            params={"engine": engine, "lora": plan.essentials, "allow_pickle": allow_pickle,
                    "trust_remote_code": trust_remote_code, "expected_base": expected_base,
                    **summary},
        )
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    log.info("bake %s + %s -> %s: %s", base, adapter, out, summary)
    return summary


__all__ = ["ENGINES", "AdapterPlan", "bake", "preflight", "read_adapter_config"]
