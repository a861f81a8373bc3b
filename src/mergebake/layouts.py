"""How a family's checkpoint names map to the text causal LM and to runtime module names.

Everything here is derived from transformers itself, by building the checkpoint's model
class on the ``meta`` device (no tensor memory, no weights read) and asking it:

- **runtime names** (the parameter names of the loaded model, which PEFT adapters use):
  each tensor name on disk goes through the model's checkpoint conversion mapping
  (``transformers.conversion_mapping.get_model_conversion_mapping``, the renamings that
  ``from_pretrained`` applies, ``legacy`` ones included) and the ``base_model_prefix``
  add/strip step, exactly as ``core_model_loading.convert_and_load_state_dict_in_model``
  does in transformers 5.x (``rename_source_key``);
- **ignored tensors**: names the class drops on load (``_keys_to_ignore_on_load_unexpected``,
  e.g. the redundant ``k_proj``/``v_proj``/``k_norm``/``v_norm`` of Gemma-4's kv-shared
  layers);
- **tied parameters**: runtime names with no tensor on disk that share their ``Parameter``
  with one that has (a tied ``lm_head``), read from the built model itself;
- **the text causal LM** of a wrapped (vision-language, audio) model: the text sub-config
  (``config.get_text_config()``) and its causal-LM class (``MODEL_FOR_CAUSAL_LM_MAPPING``
  for the text config's ``model_type``); the wrapped model's decoder
  (``get_decoder()``) and head (``get_output_embeddings()``) are found by identity among
  its modules and mapped onto the text model's, whose save names come from reversing
  its own conversion mapping, as ``save_pretrained`` does. Everything else (vision and
  audio towers, projectors, multimodal embedders) is dropped.

Hand-written rules only where transformers has none: :data:`TEXT_CAUSAL_LM`, a text
``model_type`` with no causal-LM class of its own (Qwen2.5-VL's and Qwen3-VL's text
models are Qwen2's and Qwen3's decoders with multimodal rotary positions, which equal the
plain ones on text-only input).

Adapters name modules as the transformers version that trained them did: 4.50/4.51 called
Gemma-3's text layers ``language_model.model.layers.*``, 4.52-4.57 and 5.x
``model.language_model.layers.*``. :meth:`Layout.adapter_param` maps such a name through the
same renamings PEFT 0.21 applies to adapter keys (``peft.utils.transformers_weight_conversion``
uses the model's ``WeightRenaming`` list).

Building the model class costs seconds, nearly all of it importing transformers, so a
layout is cached on disk (:func:`layout_cache_file`): ``<cache dir>/layout/<key[:2]>/<key>.json``
under the eval cache's root (:mod:`mergebake.cachedir`, off with ``MERGEBAKE_NO_CACHE``). The
key is the sha256 of the config, the tensor names, :data:`TEXT_CAUSAL_LM`, the versions of
transformers and mergebake and the sha256 of this file's source; a hit imports no
transformers (its renamings are kept pickled until :meth:`Layout.adapter_param` needs them,
and are unpickled allowing transformers' weight-transform classes only).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import pickle
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache, cached_property
from importlib import metadata
from pathlib import Path
from typing import Any

from . import MergebakeError, __version__
from .cachedir import default_dir, disabled_by_env
from .checkpoint import read_config, tensor_index

log = logging.getLogger(__name__)

#: Text ``model_type`` -> the ``model_type`` of the causal LM that runs its weights, for text
#: models transformers gives no causal-LM class of their own. Each entry has its own test
#: (tests/unit/test_layouts.py): the normalised checkpoint loads with every key matched and
#: gives the wrapped model's language-model logits on text input.
TEXT_CAUSAL_LM: dict[str, str] = {
    # Qwen2_5_VLTextModel is Qwen2Model with 3-D (t, h, w) rotary positions; on text
    # input all three equal the token position, which is Qwen2's 1-D rotary embedding.
    "qwen2_5_vl_text": "qwen2",
    "qwen2_vl_text": "qwen2",
    # Qwen3VLTextModel is Qwen3Model with interleaved 3-D rotary positions (and deepstack
    # visual features, only with images); on text input it is Qwen3's.
    "qwen3_vl_text": "qwen3",
}
#: Keys of a text sub-config that describe the multimodal wrapper's rotary positions and
#: mean nothing to the text causal LM a :data:`TEXT_CAUSAL_LM` rule names.
_MULTIMODAL_ROPE_KEYS = ("mrope_section", "mrope_interleaved")


@dataclass(frozen=True)
class Layout:
    """The key layout of one checkpoint, as transformers loads it.

    ``runtime``: disk name -> parameter (or persistent buffer) name of the loaded model.
    ``text``: disk name -> name in the text-only causal-LM checkpoint, or None when
    normalisation drops it (a tower, a tensor the class ignores, a tied head's copy).
    ``ignored``: disk names the class ignores on load. ``converted``: disk names whose
    values a transformers ``WeightConverter`` changes on load (fused experts, transposes):
    renaming cannot carry them. ``tied``: runtime names with no tensor of their own ->
    the disk name of the tensor they share. ``towers``: disk names of non-text parts.
    ``renamings``: the model's checkpoint renamings (transformers ``WeightRenaming``
    objects, legacy ones included), for :meth:`adapter_param`; a layout read from the
    cache holds them pickled and unpickles them (importing transformers) on first use.
    ``bias_renames``: :meth:`adapter_param` of the ``.bias`` of every runtime module whose
    ``.weight`` has no bias beside it (a LoRA adapter names both), computed with
    ``renamings`` when the layout is built, only where it is not the name itself; None:
    not computed.
    """

    folder: Path
    architecture: str
    model_type: str
    text_architecture: str
    text_model_type: str
    text_config_key: str | None
    runtime: Mapping[str, str]
    text: Mapping[str, str | None]
    ignored: frozenset[str]
    converted: frozenset[str]
    tied: Mapping[str, str]
    tie_word_embeddings: bool
    towers: frozenset[str]
    text_config: Mapping[str, Any] | None = None
    renamings: Sequence[Any] = field(default=(), repr=False)
    bias_renames: Mapping[str, str] | None = field(default=None, repr=False)

    @property
    def wrapped(self) -> bool:
        """Whether the checkpoint wraps its text model (a vision-language or audio model)."""
        return self.text_config_key is not None

    @cached_property
    def disk(self) -> dict[str, str]:
        """Runtime name -> disk name (the inverse of ``runtime``), tied names included."""
        out = {r: d for d, r in self.runtime.items()}
        out.update(self.tied)
        return out

    @cached_property
    def _bias_sibling_names(self) -> set[str]:
        return _bias_siblings(self.disk)

    def adapter_param(self, name: str) -> str:
        """The runtime parameter name of ``name`` as an adapter (of any transformers version)
        calls it: ``name`` itself when the model has it, else ``name`` through the model's
        checkpoint renamings, as PEFT renames adapter keys on load (the ``.bias`` of a
        bias-less module from ``bias_renames``, without importing transformers)."""
        if name in self.disk:
            return name
        if self.bias_renames is not None and name in self._bias_sibling_names:
            return self.bias_renames.get(name, name)
        return _renamed(name, self.renamings)


def _bias_siblings(disk: Iterable[str]) -> set[str]:
    """``<module>.bias`` for every ``<module>.weight`` in ``disk`` with no bias there."""
    return {
        n.removesuffix(".weight") + ".bias"
        for n in disk
        if n.endswith(".weight") and n.removesuffix(".weight") + ".bias" not in disk
    }


def _renamed(name: str, renamings: Sequence[Any]) -> str:
    """``name`` through the checkpoint ``renamings`` (transformers' ``rename_source_key``,
    no converters, no prefix step), as PEFT renames adapter keys."""
    from transformers.core_model_loading import rename_source_key

    renamed, _ = rename_source_key(name, list(renamings), [])
    return renamed


# ----------------------------------------------------------------------------- building


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _architecture(config: Mapping[str, Any], folder: Path) -> str:
    archs = config.get("architectures") or []
    if not archs:
        raise MergebakeError(
            f"{folder / 'config.json'}: no 'architectures' entry; mergebake needs it to know "
            "the key layout. Re-save the checkpoint with save_pretrained"
        )
    return archs[0]


def _meta_model(cls, config, where: str):
    """``cls(config)`` on the meta device: the module tree and parameter names, no memory."""
    import torch

    try:
        with _quiet(), torch.device("meta"):
            return cls(config)
    except Exception as e:
        raise MergebakeError(
            f"{where}: cannot build {cls.__name__} from its config with transformers "
            f"({type(e).__name__}: {' '.join(str(e).split())[:300]}); this architecture is "
            "not supported for this config. Re-save the checkpoint with the class it names"
        ) from e


_TOWER_CONFIGS = ("text_config", "vision_config", "audio_config")


def _in_transformers(arch: str) -> bool:
    import transformers

    return getattr(transformers, arch, None) is not None


def _model_class(arch: str, where: str):
    import transformers

    cls = getattr(transformers, arch, None)
    if cls is None:
        raise MergebakeError(
            f"{where}: architecture {arch!r} is not in transformers {transformers.__version__}; "
            "mergebake reads key layouts from transformers' own classes (custom-code models "
            "are not supported here). Use a newer transformers or a supported family"
        )
    return cls


def _path_of(model, module) -> str | None:
    if module is None:
        return None
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


def _weight_conversions(model, *, legacy: bool):
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    conv = get_model_conversion_mapping(model, add_legacy=legacy)
    renamings = [c for c in conv if isinstance(c, WeightRenaming)]
    converters = [c for c in conv if isinstance(c, WeightConverter)]
    return renamings, converters


def _load_names(model, names) -> tuple[dict[str, str], set[str], set[str], list[str]]:
    """Disk name -> runtime name as ``from_pretrained`` renames it (transformers 5.x
    ``convert_and_load_state_dict_in_model``), plus the names a converter changes, the
    names the class ignores and the names that fit nothing."""
    from transformers.core_model_loading import rename_source_key

    renamings, converters = _weight_conversions(model, legacy=True)
    meta = model.state_dict()
    prefix = model.base_model_prefix
    ignore = [re.compile(p) for p in (model._keys_to_ignore_on_load_unexpected or ())]
    runtime: dict[str, str] = {}
    converted: set[str] = set()
    ignored: set[str] = set()
    unknown: list[str] = []
    for name in names:
        new, pattern = rename_source_key(name, renamings, converters, prefix, meta)
        if new not in meta and name in meta:
            new, pattern = rename_source_key(name, [], [], prefix, meta)
        if new in meta:
            runtime[name] = new
            if pattern is not None:
                converted.add(name)
        elif any(p.search(new) for p in ignore):
            ignored.add(name)
        else:
            unknown.append(name)
    return runtime, converted, ignored, unknown


def _tied(model, runtime: Mapping[str, str]) -> dict[str, str]:
    """Runtime names without a disk tensor that share their Parameter with one that has."""
    disk_of = {r: d for d, r in runtime.items()}
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    out: dict[str, str] = {}
    for names in groups.values():
        owners = [n for n in names if n in disk_of]
        if len(owners) == 1:
            out.update({n: disk_of[owners[0]] for n in names if n not in disk_of})
    return out


def _is_tied(model) -> bool:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embed is not None and head.weight is embed.weight


def _save_names(model) -> dict[str, str]:
    """Runtime name -> the name ``save_pretrained`` writes (the model's conversion mapping
    reversed, legacy renamings left out, as transformers' ``revert_weight_conversion``)."""
    from transformers.core_model_loading import PrefixChange, apply_renamings

    renamings, converters = _weight_conversions(model, legacy=False)
    if converters:
        raise MergebakeError(
            f"{type(model).__name__}: transformers converts tensor values on load "
            "(fused or transposed weights); normalising into it is not supported"
        )
    reverse = [r.reverse_transform() for r in renamings[::-1] if not isinstance(r, PrefixChange)]
    return {n: apply_renamings(n, reverse) for n in model.state_dict()}


def _text_class_and_config(config, raw: Mapping[str, Any], where: str):
    """``(text config key, text config dict as it will be written, text model type, class)``."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    text_cfg = config.get_text_config()
    key = next(
        (
            k
            for k in (getattr(config, "sub_configs", None) or {})
            if getattr(config, k, None) is text_cfg
        ),
        None,
    )
    if key is None:
        raise MergebakeError(f"{where}: cannot tell which sub-config is the text config")
    stored = raw.get(key)
    out = dict(stored) if isinstance(stored, dict) else text_cfg.to_dict()
    model_type = text_cfg.model_type
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if name is None and model_type in TEXT_CAUSAL_LM:
        model_type = TEXT_CAUSAL_LM[model_type]
        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
        rope = out.get("rope_parameters") or out.get("rope_scaling")
        if isinstance(rope, dict):
            rope = {k: v for k, v in rope.items() if k not in _MULTIMODAL_ROPE_KEYS}
            if rope.get("type") == "mrope" or rope.get("rope_type") == "mrope":
                rope["rope_type"] = "default"
                rope.pop("type", None)
            out["rope_parameters" if "rope_parameters" in out else "rope_scaling"] = rope
        out["model_type"] = model_type
    if name is None:
        raise MergebakeError(
            f"{where}: multimodal architecture {raw.get('architectures')} is not supported: "
            f"transformers has no causal LM for its text model type {text_cfg.model_type!r}. "
            "Add a rule to mergebake.layouts.TEXT_CAUSAL_LM (README: Supported model families)"
        )
    out.setdefault("model_type", model_type)
    out["architectures"] = [name]
    for k in ("dtype", "torch_dtype", "transformers_version"):
        if k in raw:
            out[k] = raw[k]
    return key, out, model_type, _model_class(name, where), CONFIG_MAPPING[model_type]


def build_layout(
    folder: str | os.PathLike, names: Any = None, config: Mapping[str, Any] | None = None
) -> Layout:
    """The :class:`Layout` of the checkpoint in ``folder``.

    ``names`` are its tensor names (default: read from its safetensors headers);
    ``config`` its ``config.json`` (default: read). Builds the model class on the meta
    device (seconds for a 30B config, no tensor memory), or reads the layout from the
    layout cache (:func:`layout_cache_file`) without importing transformers; a layout
    built is stored there (a failure to store only logs a warning). Raises :class:`MergebakeError`
    naming the file for a missing ``architectures`` entry, a class transformers does not
    have, tensors that fit no parameter of the class (``fit no rule``), a wrapped model
    whose text model type has no causal LM (add a :data:`TEXT_CAUSAL_LM` rule), or text
    tensors that do not give the text model's parameters one to one.
    """
    folder = Path(folder)
    raw = dict(config) if config is not None else read_config(folder)
    arch = _architecture(raw, folder)
    if names is None:
        names = tensor_index(folder)
    names = sorted(names)
    entry = layout_cache_file(raw, names)
    if entry is not None:
        hit = _load_entry(entry, folder)
        if hit is not None:
            log.debug("%s: layout from the layout cache %s", folder, entry)
            return hit
    layout = _build_layout(folder, raw, arch, names)
    if entry is not None:
        _store_entry(entry, layout)
    return layout


def _build_layout(folder: Path, raw: dict[str, Any], arch: str, names: list[str]) -> Layout:
    """:func:`build_layout` without the cache: from transformers' own classes."""
    from transformers import AutoConfig

    where = str(folder / "config.json")
    if not _in_transformers(arch) and not any(k in raw for k in _TOWER_CONFIGS):
        # a text-only model transformers lacks (custom code): its names are taken as they
        # are, as it would load them; nothing is known to be tied or ignored
        log.info(
            "%s: %s is not in transformers; its tensor names are taken as they are", where, arch
        )
        identity = {n: n for n in names}
        return Layout(
            folder=folder,
            architecture=arch,
            model_type=str(raw.get("model_type")),
            text_architecture=arch,
            text_model_type=str(raw.get("model_type")),
            text_config_key=None,
            runtime=identity,
            text=dict(identity),
            ignored=frozenset(),
            converted=frozenset(),
            tied={},
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            towers=frozenset(),
            bias_renames={},  # no renamings: every name is itself
        )
    cls = _model_class(arch, where)
    try:
        with _quiet():
            cfg = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as e:
        raise MergebakeError(f"{where}: transformers cannot read it ({e})") from e
    model = _meta_model(cls, cfg, where)
    runtime, converted, ignored, unknown = _load_names(model, names)
    if unknown:
        raise MergebakeError(
            f"{folder}: tensor(s) {unknown[:5]} ({len(unknown)} in all) fit no rule of the "
            f"{arch} layout: transformers' {arch} has no parameter they load into (nor does "
            "it ignore them). Is the checkpoint for another architecture?"
        )
    tied = _tied(model, runtime)
    tie = _is_tied(model)
    renamings, _ = _weight_conversions(model, legacy=True)
    siblings = _bias_siblings({*runtime.values(), *tied})
    bias_renames = {n: r for n in sorted(siblings) if (r := _renamed(n, renamings)) != n}
    text_cfg = cfg.get_text_config()
    common = dict(
        folder=folder,
        architecture=arch,
        model_type=cfg.model_type,
        runtime=runtime,
        ignored=frozenset(ignored),
        converted=frozenset(converted),
        tied=tied,
        tie_word_embeddings=tie,
        renamings=tuple(renamings),
        bias_renames=bias_renames,
    )
    if text_cfg is cfg:  # a text-only causal LM: names stay, ignored tensors go
        return Layout(
            **common,
            text_architecture=arch,
            text_model_type=cfg.model_type,
            text_config_key=None,
            text={n: (None if n in ignored else n) for n in names},
            towers=frozenset(),
        )

    key, text_dict, text_type, text_cls, text_cfg_cls = _text_class_and_config(cfg, raw, where)
    text_dict["tie_word_embeddings"] = tie
    with _quiet():
        tcfg = text_cfg_cls.from_dict({k: v for k, v in text_dict.items() if k != "model_type"})
    if text_type != text_cfg.model_type:
        # a TEXT_CAUSAL_LM rule: write the config as transformers saves the target class's
        # (every key it fills in), so that a save/load round trip (mergekit's) changes nothing
        import json

        tcfg.architectures = [text_cls.__name__]
        text_dict = {
            **json.loads(tcfg.to_json_string()),
            **{
                k: text_dict[k]
                for k in ("dtype", "torch_dtype", "transformers_version")
                if k in text_dict
            },
        }
    text_model = _meta_model(text_cls, tcfg, where)
    decoder, t_decoder = (
        _path_of(model, model.get_decoder()),
        _path_of(text_model, text_model.get_decoder()),
    )
    head = _path_of(model, model.get_output_embeddings())
    t_head = _path_of(text_model, text_model.get_output_embeddings())
    if decoder is None or t_decoder is None:
        raise MergebakeError(f"{where}: cannot find the language model inside {arch}")
    save = _save_names(text_model)
    t_tied = _tied_aliases(text_model)
    text: dict[str, str | None] = {}
    towers: set[str] = set()
    for name in names:
        r = runtime.get(name)
        if r is None:  # ignored on load
            text[name] = None
            continue
        if r.startswith(decoder + "."):
            t = f"{t_decoder}.{r[len(decoder) + 1 :]}" if t_decoder else r[len(decoder) + 1 :]
        elif head is not None and t_head is not None and r.startswith(head + "."):
            t = t_head + r[len(head) :]
        else:
            text[name] = None
            towers.add(name)
            continue
        if t in t_tied:  # transformers ignores a saved head when it is tied
            text[name] = None
            continue
        if name in converted:
            raise MergebakeError(
                f"{folder}: tensor {name} is converted by transformers on load (its values "
                "change, not only its name); normalising this layout is not supported"
            )
        text[name] = save.get(t, t)
    want = {save[n] for n in save if n not in t_tied}
    got = {t for t in text.values() if t is not None}
    if got != want:
        raise MergebakeError(
            f"{folder}: the text tensors of {arch} do not give {text_cls.__name__}'s "
            f"parameters one to one (missing {sorted(want - got)[:5]}, unexpected "
            f"{sorted(got - want)[:5]})"
        )
    return Layout(
        **common,
        text_architecture=text_cls.__name__,
        text_model_type=text_type,
        text_config_key=key,
        text=text,
        towers=frozenset(towers),
        text_config=text_dict,
    )


def _tied_aliases(model) -> set[str]:
    """Parameter names that are a second name of a Parameter registered earlier."""
    seen: set[int] = set()
    out: set[str] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            out.add(name)
        seen.add(id(p))
    return out


# ----------------------------------------------------------------------------- the cache

#: Bump when what an entry holds, or what the key describes, changes meaning.
CACHE_FORMAT = "mergebake-layout-cache/1"
#: Subfolder of the cache root (:func:`mergebake.cachedir.default_dir`) holding layouts.
CACHE_SUBDIR = "layout"
_SETS = ("ignored", "converted", "towers")


#: The only globals a renamings pickle may name besides transformers' weight transforms
#: (what a ``WeightRenaming``'s slots hold), so a cache entry cannot run other code.
_PICKLE_GLOBALS = frozenset(
    {("builtins", "list"), ("builtins", "set"), ("collections", "defaultdict"), ("re", "_compile")}
)


class _RenamingsUnpickler(pickle.Unpickler):
    """Unpickles transformers' weight transforms and the few builtins they hold, nothing else
    (the "restricting globals" pattern of the :mod:`pickle` documentation)."""

    def find_class(self, module: str, name: str):
        if (module, name) in _PICKLE_GLOBALS:
            return super().find_class(module, name)
        if module == "transformers.core_model_loading":
            from transformers.core_model_loading import WeightTransform

            cls = super().find_class(module, name)
            if isinstance(cls, type) and issubclass(cls, WeightTransform):
                return cls
        raise pickle.UnpicklingError(f"{module}.{name} is not a transformers weight transform")


def _unpickle_renamings(blob: bytes) -> tuple[Any, ...]:
    return tuple(_RenamingsUnpickler(io.BytesIO(blob)).load())


class _PickledRenamings(Sequence):
    """A cached layout's renamings: pickled bytes, unpickled (which imports transformers)
    the first time they are read."""

    __slots__ = ("_blob", "_items", "_where")

    def __init__(self, blob: bytes, where: str):
        self._blob, self._where, self._items = blob, where, None

    def _load(self) -> tuple[Any, ...]:
        if self._items is None:
            try:
                self._items = _unpickle_renamings(self._blob)
            except Exception as e:
                raise MergebakeError(
                    f"{self._where}: cannot unpickle the renamings of this layout cache entry "
                    f"({type(e).__name__}: {e}); delete the file (or set MERGEBAKE_NO_CACHE=1)"
                ) from e
        return self._items

    def __getitem__(self, i):
        return self._load()[i]

    def __len__(self) -> int:
        return len(self._load())

    def __iter__(self):
        return iter(self._load())

    def __eq__(self, other) -> bool:
        if isinstance(other, (tuple, _PickledRenamings)):
            return self._load() == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self._items) if self._items is not None else "<pickled renamings>"


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@cache
def _source_sha256() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def layout_cache_key(config: Mapping[str, Any], names: Sequence[str]) -> str | None:
    """Hex sha256 keying the layout of a checkpoint with ``config`` (its ``config.json``
    dict) and tensor ``names``: of the canonical JSON (sorted keys, no spaces) of
    :data:`CACHE_FORMAT`, the config, the sorted names, :data:`TEXT_CAUSAL_LM`, the
    installed transformers version (from its metadata; transformers is not imported),
    mergebake's version and the sha256 of this module's source (any code change is a
    new key). None when the config is not JSON (no caching then)."""
    desc = {
        "format": CACHE_FORMAT,
        "config": config,
        "names": sorted(names),
        "text_causal_lm": TEXT_CAUSAL_LM,
        "transformers": _dist_version("transformers"),
        "mergebake": __version__,
        "layouts_py": _source_sha256(),
    }
    try:
        text = json.dumps(desc, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def layout_cache_file(config: Mapping[str, Any], names: Sequence[str]) -> Path | None:
    """The layout cache entry for ``config`` and ``names`` (:func:`layout_cache_key`):
    ``<cache dir>/layout/<key[:2]>/<key>.json``, the cache dir being
    :func:`mergebake.cachedir.default_dir`; None when ``MERGEBAKE_NO_CACHE`` turns the
    cache off or the config is not JSON."""
    if disabled_by_env():
        return None
    key = layout_cache_key(config, names)
    if key is None:
        return None
    return default_dir() / CACHE_SUBDIR / key[:2] / f"{key}.json"


def _to_entry(layout: Layout, key: str) -> dict[str, Any]:
    blob = pickle.dumps(tuple(layout.renamings), protocol=pickle.HIGHEST_PROTOCOL)
    data: dict[str, Any] = {}
    for f in dataclasses.fields(Layout):
        if f.name in ("folder", "renamings"):
            continue
        value = getattr(layout, f.name)
        data[f.name] = sorted(value) if f.name in _SETS else value
    return {
        "format": CACHE_FORMAT,
        "key": key,
        "layout": data,
        "renamings": {
            "pickle": base64.b64encode(blob).decode("ascii"),
            "sha256": hashlib.sha256(blob).hexdigest(),
            "repr": [repr(r) for r in layout.renamings],
        },
    }


def _from_entry(entry: Mapping[str, Any], folder: Path, where: str) -> Layout:
    """The :class:`Layout` an entry holds; KeyError/TypeError/ValueError when malformed."""
    data = dict(entry["layout"])
    for name in _SETS:
        data[name] = frozenset(data[name])
    blob = base64.b64decode(entry["renamings"]["pickle"], validate=True)
    if hashlib.sha256(blob).hexdigest() != entry["renamings"]["sha256"]:
        raise ValueError("renamings do not match their sha256")
    return Layout(folder=folder, renamings=_PickledRenamings(blob, where), **data)


def _load_entry(path: Path, folder: Path) -> Layout | None:
    """The cached layout at ``path`` with ``folder`` set, or None (a miss) when the entry
    is absent, unreadable, damaged or of another key or format."""
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        if entry.get("format") != CACHE_FORMAT or entry.get("key") != path.stem:
            raise ValueError("another format or key")
        return _from_entry(entry, folder, str(path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("%s: damaged layout cache entry (%s); building the layout again", path, e)
        return None


def _same_fields(a: Layout, b: Layout) -> bool:
    return all(
        getattr(a, f.name) == getattr(b, f.name)
        for f in dataclasses.fields(Layout)
        if f.name not in ("folder", "renamings")
    )


def _store_entry(path: Path, layout: Layout) -> None:
    """Write ``layout``'s entry to ``path`` atomically (a temporary file beside it, then
    ``os.replace``). Stores nothing when the entry would not read back as ``layout`` (a
    config value JSON cannot hold) and only logs a warning when the cache cannot be
    written (read-only, full)."""
    try:
        entry = _to_entry(layout, path.stem)
        text = json.dumps(entry, separators=(",", ":"), allow_nan=False)
        back = _from_entry(json.loads(text), layout.folder, str(path))
        renamings = _unpickle_renamings(back.renamings._blob)
    except (TypeError, ValueError, AttributeError, pickle.PickleError) as e:
        log.info("%s: layout not cached (%s)", layout.folder, e)
        return
    if not _same_fields(back, layout) or [repr(r) for r in renamings] != [
        repr(r) for r in layout.renamings
    ]:
        log.info("%s: layout not cached (it does not read back the same)", layout.folder)
        return
    # one writer per process and thread; the umask decides the mode, as for every output
    tmp: Path | None = path.parent / f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        log.warning(
            "%s: cannot store the layout cache entry (%s); the layout is built again next "
            "time (set MERGEBAKE_CACHE to a writable folder, or MERGEBAKE_NO_CACHE=1)",
            path,
            e,
        )
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


__all__ = [
    "CACHE_FORMAT",
    "TEXT_CAUSAL_LM",
    "Layout",
    "build_layout",
    "layout_cache_file",
    "layout_cache_key",
]
