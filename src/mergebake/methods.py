"""The one table of merge methods.

Every fact mergebake keeps about a merge method lives here: the space it merges in, which
engine runs it, how many adapters a cell's group may have, each parameter with its scope,
default and valid range, whether it is randomised (seeded), its paper, and its resource
factor. Recipe defaults (:func:`mergebake.config.render_recipe`), parameter range checks
(:mod:`mergebake.config`), job sizing (:func:`mergebake.resources.method_factor`) and the
README's method list (:func:`markdown_table`) all read it; ``tests/unit/test_methods.py``
holds it against mergekit's own registry (``mergekit.merge_methods.registry``): the same
names, parameter names, scopes and defaults.

Parameter scopes follow mergekit's recipe layout: ``model`` parameters sit under each
``models[i].parameters`` entry (a config value may be a scalar or ``{adapter: value}``),
``global`` ones under the recipe's top-level ``parameters:``. A default of ``None`` means
mergekit has no default (the parameter is required there); mergebake then supplies the
documented default below so that a recipe renders without it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import MergebakeError

#: A parameter default mergekit itself does not define (it requires the value).
OURS = "mergebake"


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method.

    ``low``/``high`` bound a numeric value (``None``: unbounded); ``low_open`` makes the
    lower bound exclusive (density must be > 0). ``choices`` lists the only values a
    string option may take; ``nullable`` lets it be ``None`` (unset: the library decides);
    ``required`` means no default exists and the config must give the value (PEFT's
    ``density`` for the pruning combination types). ``origin`` is ``"mergekit"`` when the
    default is mergekit's own, :data:`OURS` when mergekit requires the value and the default
    is mergebake's. ``mergekit_name`` is the name mergekit knows it by when it differs
    (``base_weight`` is mergekit's ``weight`` on the base model's own entry).
    """

    name: str
    scope: str  # "model" | "global"
    type: type
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    origin: str = "mergekit"
    mergekit_name: str | None = None
    choices: tuple[Any, ...] | None = None
    nullable: bool = False
    required: bool = False

    def interval(self) -> str:
        """The valid range in interval notation, e.g. ``(0, 1]``; ``""`` when unbounded."""
        if self.low is None and self.high is None:
            return ""
        lo = "(-inf" if self.low is None else f"{'(' if self.low_open else '['}{self.low:g}"
        hi = "inf)" if self.high is None else f"{self.high:g}]"
        return f"{lo}, {hi}"

    def check(self, value: Any, key: str) -> None:
        """Raise :class:`MergebakeError` naming ``key`` when ``value`` has the wrong type or
        lies outside the parameter's range, or is not one of its ``choices``."""
        if value is None and self.nullable:
            return
        if self.choices is not None:
            if value not in self.choices:
                allowed = ", ".join(repr(c) for c in self.choices)
                raise MergebakeError(f"key {key!r}: {value!r} is not one of {allowed}")
            return
        if self.type is bool:
            if not isinstance(value, bool):
                raise MergebakeError(f"key {key!r}: {value!r} must be true or false")
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MergebakeError(f"key {key!r}: {value!r} must be a number")
        if isinstance(value, float) and not math.isfinite(value):
            raise MergebakeError(f"key {key!r}: {value} is not a finite number")
        if self.type is int and not float(value).is_integer():
            raise MergebakeError(f"key {key!r}: {value} must be a whole number")
        lo_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        hi_ok = self.high is None or value <= self.high
        if not (lo_ok and hi_ok):
            raise MergebakeError(f"key {key!r}: {value} is outside {self.interval()}")


@dataclass(frozen=True)
class Method:
    """One merge method: what a cell with it needs and computes.

    ``adapters`` is the (min, max) number of adapters in the cell's group (``None``: no
    upper bound); ``base`` is how mergekit uses the normalised base (``required``: task
    vectors against it; ``optional``; ``ignored``: the recipe still names it, as mergebake
    always gives an explicit base_model). ``randomised`` methods draw from mergekit's RNG
    and are seeded with the config's ``seed``. ``factor`` scales the size term of the merge
    job's memory and runtime (:mod:`mergebake.resources`; 1 = a weighted sum).
    ``applies`` is ``False`` for a method that builds no merge of a group (the reason in
    ``doc``); it has no recipe. ``engines`` names the merge engines that can run it
    (:mod:`mergebake.merge_stream` for ``stream``, byte-identical to mergekit): every
    deterministic method; randomised ones (and ``arcee_fusion``, which samples quantiles with
    torch's global RNG on large tensors) only through ``mergekit``, whose RNG order decides
    their result.
    Adapter-space methods (:data:`ADAPTER_METHODS`, ``space = "adapter"``) are PEFT
    ``combination_type`` values; ``equal_ranks`` says PEFT requires the adapters to have the
    same rank, ``rank`` how PEFT picks the merged adapter's rank.
    """

    name: str
    title: str
    reference: str
    doc: str
    params: tuple[Param, ...]
    adapters: tuple[int, int | None] = (1, None)
    base: str = "required"
    space: str = "weight"
    engines: tuple[str, ...] = ("stream", "mergekit")
    randomised: bool = False
    factor: float = 1.0
    applies: bool = True
    equal_ranks: bool = False
    rank: str = ""

    def param(self, name: str) -> Param | None:
        """The parameter called ``name``, or ``None``."""
        return next((p for p in self.params if p.name == name), None)

    @property
    def defaults(self) -> dict[str, Any]:
        """Default value of every parameter, by name (the recipe's ``defaults``)."""
        return {p.name: p.default for p in self.params}


def _weight(doc: str = "scaling of this adapter's task vector") -> Param:
    return Param("weight", "model", float, 1.0, doc, origin=OURS)


_DENSITY = Param(
    "density",
    "model",
    float,
    1.0,
    "fraction of task-vector entries kept (1 keeps all)",
    low=0.0,
    high=1.0,
    low_open=True,
)
_INT8_MASK = Param("int8_mask", "global", bool, False, "store intermediate masks as int8")
_LAMBDA = Param("lambda", "global", float, 1.0, "scaling of the summed task vector")


def _gta(
    name: str,
    title: str,
    reference: str,
    doc: str,
    *,
    normalize: bool,
    rescale: bool,
    extra: tuple[Param, ...] = (),
    randomised: bool = False,
    factor: float = 1.0,
) -> Method:
    """A method of mergekit's generalised task arithmetic family (its shared parameters)."""
    params = (
        _weight(),
        _DENSITY,
        *extra,
        _LAMBDA,
        Param("normalize", "global", bool, normalize, "divide by the sum of weights"),
        Param("rescale", "global", bool, rescale, "rescale kept entries by 1/density"),
        _INT8_MASK,
    )
    engines = ("mergekit",) if randomised else ("stream", "mergekit")
    return Method(
        name, title, reference, doc, params, engines=engines, randomised=randomised, factor=factor
    )


_GAMMA = Param(
    "gamma",
    "model",
    float,
    0.01,
    "fraction of largest-magnitude entries dropped as outliers",
    low=0.0,
    high=1.0,
)
_EPSILON = Param(
    "epsilon",
    "model",
    float,
    0.15,
    "spread of keep-probabilities around density (by magnitude rank)",
    low=0.0,
    high=1.0,
)

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "linear",
            "Linear",
            "https://arxiv.org/abs/2203.05482",
            "weighted average of the baked checkpoints (model soups)",
            (
                _weight("weight of this adapter's checkpoint in the average"),
                Param(
                    "base_weight",
                    "model",
                    float,
                    0.0,
                    "weight of the base model's own entry (0: average of the adapters only)",
                    origin=OURS,
                    mergekit_name="weight",
                ),
                Param("normalize", "global", bool, True, "divide by the sum of weights"),
            ),
            base="ignored",
        ),
        _gta(
            "task_arithmetic",
            "Task Arithmetic",
            "https://arxiv.org/abs/2212.04089",
            "base + lambda · Σ weight · (model − base)",
            normalize=False,
            rescale=False,
        ),
        _gta(
            "ties",
            "TIES",
            "https://arxiv.org/abs/2306.01708",
            "trim each task vector by magnitude to density, elect a sign, merge agreeing entries",
            normalize=True,
            rescale=False,
            factor=1.5,
        ),
        _gta(
            "dare_linear",
            "Linear DARE",
            "https://arxiv.org/abs/2311.03099",
            "drop task-vector entries at random (keep-probability density), rescale, sum",
            normalize=False,
            rescale=True,
            randomised=True,
            factor=1.25,
        ),
        _gta(
            "dare_ties",
            "DARE TIES",
            "https://arxiv.org/abs/2311.03099",
            "DARE random drop and rescale, then TIES sign election",
            normalize=False,
            rescale=True,
            randomised=True,
            factor=1.5,
        ),
        _gta(
            "breadcrumbs",
            "Model Breadcrumbs",
            "https://arxiv.org/abs/2312.06795",
            "drop the smallest and the largest (gamma) task-vector entries, sum",
            normalize=False,
            rescale=False,
            extra=(_GAMMA,),
            factor=1.5,
        ),
        _gta(
            "breadcrumbs_ties",
            "Model Breadcrumbs with TIES",
            "https://arxiv.org/abs/2312.06795",
            "breadcrumbs sparsification, then TIES sign election",
            normalize=False,
            rescale=False,
            extra=(_GAMMA,),
            factor=1.5,
        ),
        _gta(
            "della",
            "DELLA",
            "https://arxiv.org/abs/2406.11617",
            "MagPrune: drop entries with magnitude-ranked odds, rescale, TIES sign election",
            normalize=True,
            rescale=True,
            extra=(_EPSILON,),
            randomised=True,
            factor=1.5,
        ),
        _gta(
            "della_linear",
            "Linear DELLA",
            "https://arxiv.org/abs/2406.11617",
            "DELLA's MagPrune drop and rescale, then a weighted sum",
            normalize=False,
            rescale=True,
            extra=(_EPSILON,),
            randomised=True,
            factor=1.5,
        ),
        Method(
            "slerp",
            "SLERP",
            "https://en.wikipedia.org/wiki/Slerp",
            "spherical interpolation between the group's two checkpoints (t=0: the first)",
            (
                Param(
                    "t",
                    "global",
                    float,
                    0.5,
                    "interpolation factor",
                    low=0.0,
                    high=1.0,
                    origin=OURS,
                ),
            ),
            adapters=(2, 2),
        ),
        Method(
            "nuslerp",
            "NuSLERP",
            "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
            "spherical interpolation of the two adapters' task vectors against the base",
            (
                _weight("relative weight of this adapter in the interpolation"),
                Param("nuslerp_row_wise", "global", bool, False, "interpolate row vectors"),
                Param("nuslerp_flatten", "global", bool, True, "interpolate flattened tensors"),
            ),
            adapters=(2, 2),
            base="optional",
        ),
        Method(
            "multislerp",
            "Multi-SLERP",
            "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
            "barycentric spherical interpolation of any number of task vectors",
            (
                _weight("weight of this adapter"),
                Param("normalize_weights", "global", bool, True, "weights sum to 1"),
                Param("eps", "global", float, 1e-8, "numerical floor", low=0.0),
            ),
            base="optional",
            factor=1.25,
        ),
        Method(
            "karcher",
            "Karcher Mean",
            "https://arxiv.org/abs/2603.04972",
            "Riemannian (Karcher) mean of the checkpoints on the sphere",
            (
                Param("max_iter", "global", int, 10, "iterations at most", low=1),
                Param("tol", "global", float, 1e-5, "convergence tolerance", low=0.0),
            ),
            adapters=(2, None),
            base="ignored",
            factor=2.0,
        ),
        Method(
            "model_stock",
            "Model Stock",
            "https://arxiv.org/abs/2403.19522",
            "interpolate the adapters' average toward the base by their angle",
            (Param("filter_wise", "global", bool, False, "one ratio per row, not per tensor"),),
            adapters=(2, None),
            factor=1.5,
        ),
        Method(
            "sce",
            "SCE",
            "https://arxiv.org/abs/2408.07990",
            "select high-variance entries (select_topk), calculate weights, erase minority signs",
            (
                Param(
                    "select_topk",
                    "global",
                    float,
                    1.0,
                    "fraction of entries with the highest variance kept",
                    low=0.0,
                    high=1.0,
                    low_open=True,
                ),
                _INT8_MASK,
            ),
            factor=1.5,
        ),
        Method(
            "nearswap",
            "NearSwap",
            "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
            "take the adapter's values where they lie within t of the base's",
            (
                Param(
                    "t",
                    "global",
                    float,
                    0.001,
                    "similarity threshold",
                    low=0.0,
                    low_open=True,
                    origin=OURS,
                ),
            ),
            adapters=(1, 1),
        ),
        Method(
            "arcee_fusion",
            "Arcee Fusion",
            "https://arcee.ai",
            "fuse the adapter into the base where their difference is salient",
            (),
            adapters=(1, 1),
            engines=("mergekit",),  # quantiles sampled with torch's global RNG (> 1M entries)
            factor=1.5,
        ),
        Method(
            "ram",
            "Reinforced Agent Merging",
            "https://arxiv.org/abs/2601.13572",
            "average each entry over the task vectors that change it",
            (Param("epsilon", "global", float, 1e-5, "threshold of a changed entry", low=0.0),),
            factor=1.5,
        ),
        Method(
            "ramplus_tl",
            "Reinforced Agent Merging Plus (Tensor-Local)",
            "https://arxiv.org/abs/2601.13572",
            "RAM with rescaling of entries shared by few task vectors",
            (
                Param("r", "global", float, 0.1, "overlap ratio", low=0.0, high=1.0),
                Param("alpha", "global", float, 0.2, "rescaling strength", low=0.0),
                Param("epsilon", "global", float, 1e-5, "threshold of a changed entry", low=0.0),
            ),
            factor=1.5,
        ),
        Method(
            "passthrough",
            "Passthrough",
            "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
            "copies one model's tensors (layer stacking/frankenmerges): it builds no merge "
            "of a group, so no cell uses it",
            (),
            adapters=(1, 1),
            base="ignored",
            engines=("mergekit",),
            applies=False,
        ),
    )
}

# ---------------------------------------------------------------------------------------
# Adapter space: PEFT's add_weighted_adapter (peft.tuners.lora.LoraModel), one entry per
# combination_type. ``tests/unit/test_methods.py`` holds these against its signature.

#: Where an adapter-space default comes from: PEFT's ``add_weighted_adapter`` signature.
PEFT = "peft"

_A_WEIGHT = Param(
    "weight",
    "model",
    float,
    1.0,
    "weight of this adapter (PEFT's weights[i]; negative subtracts it)",
    origin=OURS,
)
_A_DENSITY = Param(
    "density",
    "global",
    float,
    None,
    "fraction of entries kept by the pruning step (PEFT has no default: required)",
    low=0.0,
    high=1.0,
    low_open=True,
    origin=PEFT,
    required=True,
)
_A_SIGN = Param(
    "majority_sign_method",
    "global",
    str,
    "total",
    "how TIES elects each entry's sign: by summed value or by count",
    origin=PEFT,
    choices=("total", "frequency"),
)
_A_SVD = (
    Param(
        "svd_rank",
        "global",
        int,
        None,
        "rank of the merged adapter (unset: the largest rank of the group)",
        low=1,
        origin=PEFT,
        nullable=True,
    ),
    Param(
        "svd_clamp",
        "global",
        float,
        None,
        "quantile at which the SVD factors are clamped (unset: no clamping)",
        low=0.0,
        high=1.0,
        origin=PEFT,
        nullable=True,
    ),
    Param(
        "svd_full_matrices",
        "global",
        bool,
        True,
        "full (not reduced) SVD, as torch.linalg.svd's full_matrices",
        origin=PEFT,
    ),
    Param(
        "svd_driver",
        "global",
        str,
        None,
        "cuSOLVER driver of torch.linalg.svd (CUDA only; unset on the CPU)",
        origin=PEFT,
        nullable=True,
        choices=("gesvd", "gesvdj", "gesvda"),
    ),
)

_PEFT_DOC = "https://huggingface.co/docs/peft/package_reference/lora"
_TIES_REF = "https://arxiv.org/abs/2306.01708"
_DARE_REF = "https://arxiv.org/abs/2311.03099"
_SVD_RANK = "svd_rank, or the largest rank of the group"


def _adapter(
    name: str,
    title: str,
    reference: str,
    doc: str,
    params: tuple[Param, ...],
    *,
    rank: str,
    equal_ranks: bool = False,
    randomised: bool = False,
) -> Method:
    return Method(
        name,
        title,
        reference,
        doc,
        (_A_WEIGHT, *params),
        base="ignored",
        space="adapter",
        engines=("peft",),
        randomised=randomised,
        equal_ranks=equal_ranks,
        rank=rank,
    )


#: PEFT ``combination_type`` values, in the order of ``add_weighted_adapter``'s Literal.
ADAPTER_METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        _adapter(
            "svd",
            "SVD",
            _PEFT_DOC,
            "Σ weight · ΔW per module, truncated to the merged rank by SVD",
            _A_SVD,
            rank=_SVD_RANK,
        ),
        _adapter(
            "linear",
            "Linear",
            _PEFT_DOC,
            "weighted sum of the A factors and of the B factors (√(weight·scale) on each)",
            (),
            rank="the group's rank (all equal)",
            equal_ranks=True,
        ),
        _adapter(
            "cat",
            "Concatenation",
            _PEFT_DOC,
            "A and B factors stacked: exactly Σ weight · ΔW",
            (),
            rank="the sum of the group's ranks",
        ),
        _adapter(
            "ties",
            "TIES",
            _TIES_REF,
            "TIES on the A factors and on the B factors separately",
            (_A_DENSITY, _A_SIGN),
            rank="the group's rank (all equal)",
            equal_ranks=True,
        ),
        _adapter(
            "ties_svd",
            "TIES + SVD",
            _TIES_REF,
            "TIES on each module's ΔW, truncated to the merged rank by SVD",
            (_A_DENSITY, _A_SIGN, *_A_SVD),
            rank=_SVD_RANK,
        ),
        _adapter(
            "dare_ties",
            "DARE TIES",
            _DARE_REF,
            "DARE random drop and rescale, then TIES sign election, on A and on B",
            (_A_DENSITY, _A_SIGN),
            rank="the group's rank (all equal)",
            equal_ranks=True,
            randomised=True,
        ),
        _adapter(
            "dare_linear",
            "Linear DARE",
            _DARE_REF,
            "DARE random drop and rescale, then a weighted sum, on A and on B",
            (_A_DENSITY,),
            rank="the group's rank (all equal)",
            equal_ranks=True,
            randomised=True,
        ),
        _adapter(
            "dare_ties_svd",
            "DARE TIES + SVD",
            _DARE_REF,
            "DARE TIES on each module's ΔW, truncated to the merged rank by SVD",
            (_A_DENSITY, _A_SIGN, *_A_SVD),
            rank=_SVD_RANK,
            randomised=True,
        ),
        _adapter(
            "dare_linear_svd",
            "Linear DARE + SVD",
            _DARE_REF,
            "linear DARE on each module's ΔW, truncated to the merged rank by SVD",
            (_A_DENSITY, *_A_SVD),
            rank=_SVD_RANK,
            randomised=True,
        ),
        _adapter(
            "magnitude_prune",
            "Magnitude pruning",
            _PEFT_DOC,
            "keep the largest-magnitude entries (density), weighted sum, on A and on B",
            (_A_DENSITY,),
            rank="the group's rank (all equal)",
            equal_ranks=True,
        ),
        _adapter(
            "magnitude_prune_svd",
            "Magnitude pruning + SVD",
            _PEFT_DOC,
            "magnitude pruning of each module's ΔW, truncated to the merged rank by SVD",
            (_A_DENSITY, *_A_SVD),
            rank=_SVD_RANK,
        ),
    )
}


def adapter_method(combination_type: str, key: str = "combination_type") -> Method:
    """The :data:`ADAPTER_METHODS` entry of a PEFT ``combination_type``.

    Raises :class:`MergebakeError` naming ``key`` and listing the valid types otherwise.
    """
    m = ADAPTER_METHODS.get(combination_type)
    if m is None:
        raise MergebakeError(
            f"key {key!r}: {combination_type!r} is not a PEFT combination_type; choose one of "
            f"{', '.join(ADAPTER_METHODS)}"
        )
    return m


#: The factor of a recipe that is not in :data:`METHODS` (a user's own): the largest.
DEFAULT_FACTOR = max(m.factor for m in METHODS.values())


def get(name: str) -> Method | None:
    """The table entry of a mergekit method name (a recipe's ``merge_method``), or ``None``."""
    return METHODS.get(name)


def factor(name: str | None) -> float:
    """Resource factor of a method (1 = a weighted sum); :data:`DEFAULT_FACTOR` if unknown."""
    m = METHODS.get(name or "")
    return m.factor if m else DEFAULT_FACTOR


def check_parameters(method: Method, parameters: Mapping[str, Any], key: str) -> None:
    """Check configured parameters against ``method``'s table entry.

    ``parameters`` maps a name to a scalar or ``{adapter: value}``; ``key`` is the config
    key of the mapping (``methods.<m>.parameters``), used in messages. Unknown names are left
    to the recipe check (a recipe may add placeholders of its own). Raises
    :class:`MergebakeError` naming ``key.<name>[.<adapter>]`` for a global parameter given
    per adapter, a wrong type, or a value out of range.
    """
    for name, value in parameters.items():
        p = method.param(name)
        if p is None:
            continue
        if isinstance(value, Mapping):
            if p.scope == "global":
                raise MergebakeError(
                    f"key '{key}.{name}': {method.name}'s {name!r} is one value for the "
                    "whole merge; give a scalar, not one per adapter"
                )
            for adapter, v in value.items():
                p.check(v, f"{key}.{name}.{adapter}")
        else:
            p.check(value, f"{key}.{name}")


def markdown_table() -> str:
    """The README's method list: one row per method with its parameters and defaults."""

    def fmt(p: Param) -> str:
        d = str(p.default).lower() if isinstance(p.default, bool) else f"{p.default:g}"
        rng = f" in {p.interval()}" if p.interval() else ""
        per = " (per adapter)" if p.scope == "model" else ""
        return f"`{p.name}`={d}{per}{rng}"

    def count(m: Method) -> str:
        lo, hi = m.adapters
        return f"{lo}" if lo == hi else f"≥ {lo}" if hi is None else f"{lo}–{hi}"

    lines = [
        "| method | adapters | base | parameters (default) | what it computes |",
        "| --- | --- | --- | --- | --- |",
    ]
    for m in METHODS.values():
        params = ", ".join(fmt(p) for p in m.params) or "none"
        seeded = "; seeded" if m.randomised else ""
        name = f"[`{m.name}`]({m.reference})"
        if not m.applies:
            lines.append(f"| {name} | – | – | – | {m.doc} |")
            continue
        lines.append(f"| {name} | {count(m)} | {m.base} | {params} | {m.doc}{seeded} |")
    return "\n".join(lines)


def adapter_markdown_table() -> str:
    """The README's list of adapter-space methods (PEFT combination types) and options."""

    def fmt(p: Param) -> str:
        if p.required:
            d = "required"
        elif p.default is None:
            d = "unset"
        elif isinstance(p.default, bool):
            d = str(p.default).lower()
        elif isinstance(p.default, str):
            d = p.default
        else:
            d = f"{p.default:g}"
        rng = f" in {p.interval()}" if p.interval() else ""
        if p.choices:
            rng = " in {" + ", ".join(map(str, p.choices)) + "}"
        per = " (per adapter)" if p.scope == "model" else ""
        return f"`{p.name}`={d}{per}{rng}"

    lines = [
        "| combination_type | merged rank | options (default) | what it computes |",
        "| --- | --- | --- | --- |",
    ]
    for m in ADAPTER_METHODS.values():
        seeded = "; random, seeded" if m.randomised else ""
        params = ", ".join(fmt(p) for p in m.params)
        lines.append(f"| [`{m.name}`]({m.reference}) | {m.rank} | {params} | {m.doc}{seeded} |")
    return "\n".join(lines)
