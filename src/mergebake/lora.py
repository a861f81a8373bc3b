"""What a PEFT LoRA adapter means: its config, its files, its keys, its scales.

PEFT (``peft.tuners.lora``) is the specification; this module reads an adapter folder the
way ``PeftModel.from_pretrained`` does, without loading a model:

- :func:`read_adapter_config` and :func:`adapter_weights_file`: ``adapter_config.json``
  and the weights file (safetensors; a pickle ``.bin`` only when allowed);
- :func:`split_key` and :func:`group_keys`: saved keys
  (``base_model.model.<module>.lora_A.weight``) grouped into LoRA modules, whole tensors
  the adapter replaces (``modules_to_save``, the ``base_layer`` copies PEFT saves beside an
  embedding LoRA) and trainable tokens;
- :func:`module_scale`: ``r`` and ``alpha`` from ``rank_pattern``/``alpha_pattern``
  (PEFT's ``get_pattern_key``) and the scale ``alpha / r`` or ``alpha / sqrt(r)``
  (rsLoRA, Kalajdzievski 2023); :func:`is_conv1d`: where PEFT sets ``fan_in_fan_out``;
- :func:`unsupported_options`: LoraConfig options whose merge is not
  ``W + scale · B @ A`` of the unchanged base;
- :func:`check_lora_shapes`, :func:`targets_unmatched`, :func:`check_base_name`: the
  checks of an adapter against its base.
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import MergebakeError
from .checkpoint import PICKLE_SUFFIXES
from .safetensors_io import SafetensorsFile, count_nonfinite, scan_nonfinite

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
LORA_MARKERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
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
# transformers model types whose projections are Conv1D (weights stored [in, out]); PEFT
# forces fan_in_fan_out=True on those and False on nn.Linear, whatever the config says.
CONV1D_MODULES: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj", "c_fc", "q_attn"),
    "imagegpt": ("c_attn", "c_proj", "c_fc", "q_attn"),
    "decision_transformer": ("c_attn", "c_proj", "c_fc", "q_attn"),
    "openai-gpt": ("c_attn", "c_proj", "c_fc"),
}
# LoraConfig options that change what a merge computes in ways the stream engine does not
# reproduce: (field, value that is fine).
UNSUPPORTED = (
    ("layer_replication", None),
    ("trainable_token_indices", None),
    ("target_parameters", None),
    ("use_bdlora", None),
    ("alora_invocation_tokens", None),
    ("arrow_config", None),
    ("velora_config", None),
    ("monteclora_config", None),
    ("kasa_config", None),
    ("use_qalora", False),
    ("megatron_config", None),
)
# init_lora_weights values after which the adapter is a plain LoRA on the unchanged base.
# PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA and MiCA change the base weights when PEFT loads the
# adapter (or add a merge variant), so their result is not W + scale * B @ A.
PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")


@dataclass
class AdapterPlan:
    """What :func:`mergebake.bake.preflight` learnt about a (base, adapter) pair.

    ``modules`` maps each LoRA-adapted module's parameter path in the loaded model
    (``model.language_model.layers.0.self_attn.q_proj``) to the base tensor name it
    changes, as stored on disk (``language_model.model.layers.0.self_attn.q_proj.weight``).
    ``replaced`` does the same for whole tensors the adapter carries, which PEFT loads over
    the base's: ``modules_to_save``, and the ``base_layer`` copies PEFT saves beside a LoRA
    on an embedding (its ``save_embedding_layers``). ``runtime`` maps every parameter name
    of the loaded model to its disk name (``tied`` holds the tied head's entry,
    ``lm_head.weight`` -> the embedding); ``shapes`` are the adapter tensors' shapes.
    ``renamed`` maps parameter names as the adapter spells them (an older transformers'
    module names) to the loaded model's (see :func:`group_keys`); ``ignored`` lists the
    base tensors its class ignores on load (:class:`mergebake.layouts.Layout`).
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
    renamed: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)

    @property
    def essentials(self) -> dict[str, Any]:
        """The LoraConfig fields recorded in provenance (JSON-ready)."""
        out: dict[str, Any] = {k: self.config.get(k) for k in LORA_ESSENTIALS}
        if isinstance(out["target_modules"], list):
            out["target_modules"] = sorted(out["target_modules"])
        return out


# ----------------------------------------------------------------------------- files


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


def adapter_shapes_and_nonfinite(path: Path) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Shapes of the adapter's tensors and the names of those holding NaN/Inf.

    A safetensors adapter is read one tensor at a time
    (:func:`mergebake.safetensors_io.scan_nonfinite`; memory: its largest tensor); a
    ``.bin`` one (only with ``allow_pickle``) is loaded whole with ``weights_only``.
    """
    if path.suffix == ".safetensors":
        tensors = SafetensorsFile.open(path).tensors
        bad = [name for name, _, _ in scan_nonfinite(tensors)]
        return {k: t.shape for k, t in tensors.items()}, bad
    import torch

    loaded = torch.load(path, map_location="cpu", weights_only=True)
    bad = [k for k, t in loaded.items() if count_nonfinite(t)]
    return {k: tuple(t.shape) for k, t in loaded.items()}, bad


# ----------------------------------------------------------------------------- keys


def split_key(key: str) -> tuple[str, str | None, str]:
    """Split a saved adapter key into ``(module path, LoRA marker or None, parameter)``.

    ``base_model.model.model.layers.0.q_proj.lora_A.weight`` gives
    ``("model.layers.0.q_proj", "lora_A", "weight")``; a key without a LoRA marker
    (a whole tensor) gives ``(path, None, "")``.
    """
    name = key.removeprefix(PEFT_PREFIX)
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in LORA_MARKERS:
            return ".".join(parts[:i]), part, ".".join(parts[i + 1 :])
    return name, None, ""


@dataclass
class AdapterKeys:
    """An adapter's saved keys, grouped as PEFT loads them.

    ``lora``: module path -> ``{part: key}``, ``part`` a LoRA marker (``lora_A``,
    ``lora_embedding_B``, ``lora_magnitude_vector``, ...) or ``lora_B.bias`` (``lora_bias``).
    ``whole``: parameter path (``.base_layer.`` removed) -> ``{key: module path}`` of the
    whole tensors loaded over the base's (``modules_to_save`` copies, ``base_layer`` copies).
    ``tokens``: modules carrying PEFT trainable tokens (``trainable_token_indices``).
    """

    lora: dict[str, dict[str, str]] = field(default_factory=dict)
    whole: dict[str, dict[str, str]] = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)


def group_keys(keys: Iterable[str], renamed: Mapping[str, str] | None = None) -> AdapterKeys:
    """Group saved adapter ``keys`` into an :class:`AdapterKeys` (see :func:`split_key`).

    ``renamed`` maps parameter names as the adapter spells them (``<module>.weight`` for a
    LoRA module, the parameter for a whole tensor) to the loaded model's; the groups are
    keyed by the loaded model's names, the keys stay the adapter file's.
    """
    renamed = renamed or {}

    def module_name(module: str) -> str:
        return renamed.get(module + ".weight", module + ".weight").removesuffix(".weight")

    out = AdapterKeys()
    for key in keys:
        module, marker, param = split_key(key)
        if ".token_adapter." in key:
            mod = key.removeprefix(PEFT_PREFIX).split(".token_adapter.")[0]
            out.tokens.append(module_name(mod))
        elif marker is None:
            name = module.replace(".base_layer.", ".")
            out.whole.setdefault(renamed.get(name, name), {})[key] = module
        else:
            part = marker if param in ("weight", "") else f"{marker}.{param}"
            out.lora.setdefault(module_name(module), {})[part] = key
    return out


def loaded_names(keys: Iterable[str], renamed: Mapping[str, str] | None = None) -> dict[str, str]:
    """Saved adapter key -> the key ``get_peft_model_state_dict`` gives it once loaded
    (module names as the loaded model has them, see :func:`group_keys`)."""
    renamed = renamed or {}
    out = {}
    for key in keys:
        module, marker, param = split_key(key)
        if marker is None:
            name = renamed.get(module, module)
        else:
            mod = renamed.get(module + ".weight", module + ".weight").removesuffix(".weight")
            name = f"{mod}.{marker}" + (f".{param}" if param else "")
        out[key] = PEFT_PREFIX + name
    return out


def adapter_param_names(grouped: AdapterKeys) -> list[str]:
    """The parameter names an adapter's groups refer to: ``<module>.weight`` (and
    ``.bias``) for LoRA modules and trainable tokens, the parameter for whole tensors."""
    names = set(grouped.whole)
    for module in list(grouped.lora) + grouped.tokens:
        names |= {module + ".weight", module + ".bias"}
    return sorted(names)


# ----------------------------------------------------------------------------- PEFT options


def get_pattern_key(pattern_keys: Any, key_to_match: str) -> str:
    """PEFT's ``peft.utils.other.get_pattern_key``: the first pattern that ends ``key``."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def module_scale(config: Mapping[str, Any], module: str) -> tuple[int, Any, float]:
    """``(r, alpha, scale)`` PEFT gives ``module``.

    ``r`` and ``alpha`` come from ``rank_pattern``/``alpha_pattern`` (else ``r``,
    ``lora_alpha``, PEFT's defaults 8); ``scale`` is ``alpha / r``, or ``alpha / sqrt(r)``
    with ``use_rslora`` (rank-stabilised LoRA, Kalajdzievski 2023; PEFT's ``LoraLayer.
    update_layer``).
    """
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.get("r", 8))
    alpha = alpha_pattern.get(
        get_pattern_key(alpha_pattern.keys(), module), config.get("lora_alpha", 8)
    )
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return r, alpha, scale


def is_conv1d(base_config: Mapping[str, Any], module: str) -> bool:
    """Whether ``module`` of a model with ``base_config`` is a ``Conv1D`` (GPT-2 family),
    where PEFT forces ``fan_in_fan_out=True`` (``False`` on ``nn.Linear``)."""
    names = CONV1D_MODULES.get(str(base_config.get("model_type")), ())
    return module.rsplit(".", 1)[-1] in names


def unsupported_options(config: Mapping[str, Any]) -> list[str]:
    """LoraConfig options set to values whose merge is not ``W + scale · B @ A`` of the
    unchanged base (what the stream engine reproduces), as ``name=value``."""
    out = [
        f"{k}={config[k]!r}"
        for k, ok in UNSUPPORTED
        if config.get(k) not in (ok, None, False, {}, [])
    ]
    init = config.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        out.append(f"init_lora_weights={init!r}")
    return out


# ----------------------------------------------------------------------------- checks


def check_lora_shapes(
    base_shape: tuple[int, ...], lora: Mapping[str, tuple], fan_in_fan_out: bool
) -> str | None:
    """Why LoRA tensors of shapes ``lora`` (``{marker: shape}``) cannot apply to a weight
    of ``base_shape``, or None. PEFT's layouts: ``nn.Linear`` W ``[out, in]``, A ``[r, in]``,
    B ``[out, r]``; ``Conv1D`` W ``[in, out]``; ``nn.Embedding`` W ``[num, dim]``, A
    ``[r, num]``, B ``[dim, r]``; DoRA magnitude ``[out]``."""
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


def targets_unmatched(targets: Any, modules: list[str]) -> list[str]:
    """Entries of ``target_modules`` that match no module (PEFT's matching rules: a string
    is a full-match regex, a list entry matches a module or a suffix after a dot)."""
    if targets is None or targets == "all-linear":
        return []
    if isinstance(targets, str):
        return [] if any(re.fullmatch(targets, m) for m in modules) else [targets]
    return [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]


def check_base_name(
    config: Mapping[str, Any], path: Path, expected: str | None, strict: bool
) -> None:
    """Compare the adapter's ``base_model_name_or_path`` with the ``expected`` base.

    Names match case-insensitively, or when one ends with ``/`` + the other. A mismatch
    warns (``UserWarning`` and log), or raises :class:`MergebakeError` when ``strict``.
    """
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


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterKeys",
    "AdapterPlan",
    "adapter_param_names",
    "loaded_names",
    "adapter_shapes_and_nonfinite",
    "adapter_weights_file",
    "check_base_name",
    "check_lora_shapes",
    "get_pattern_key",
    "group_keys",
    "is_conv1d",
    "module_scale",
    "read_adapter_config",
    "split_key",
    "targets_unmatched",
    "unsupported_options",
]
