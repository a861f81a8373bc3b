"""How the eval step builds lm-eval's model: backend (``hf`` or ``vllm``), batch size,
model arguments, and the checks that refuse a vLLM eval where it cannot run.

Two lm-eval model types are offered (lm-eval 0.4.13):

- ``hf`` (``lm_eval.models.huggingface.HFLM``, the default): transformers on the CPU or a
  GPU. ``batch_size`` is a positive integer, ``"auto"`` (lm-eval runs five forward passes
  of ``max_batch_size`` (default 64) rows of the longest request and halves on an
  out-of-memory error, through accelerate's ``find_executable_batch_size``) or ``"auto:N"``
  (the same, redone N times over the length-sorted requests, as they get shorter).
- ``vllm`` (``lm_eval.models.vllm_causallms.VLLM``): vLLM on CUDA GPUs only. With
  ``"auto"`` lm-eval hands vLLM all requests at once and vLLM batches them itself
  (continuous batching; ``max_batch_size`` becomes vLLM's ``max_num_seqs``); with an
  integer, lm-eval hands them over in chunks of that many.

Where each check runs, and why: a Snakemake run parses the config on the machine that
plans the jobs (a login node on a cluster, often without a GPU or without vLLM, which
lives in the GPU nodes' environment), and again inside every job. So the config load only
refuses what is wrong everywhere (``eval.backend: vllm`` with ``device: cpu``);
``mergebake validate`` and the workflow's preflight only *warn* when vLLM or a GPU is
missing where they run (:func:`environment_notes`); the eval job itself refuses, before
loading tasks or weights, when vLLM or a CUDA GPU is missing where it runs
(:func:`check_vllm_runtime`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import MergebakeError

BACKENDS = ("hf", "vllm")
DEFAULT_BACKEND = "hf"
# lm-eval's own default of the hf model's max_batch_size (HFLM.__init__, lm-eval 0.4.13).
HF_MAX_BATCH_SIZE = 64
_BATCH = re.compile(r"^(?:[1-9][0-9]*|auto(?::[1-9][0-9]*)?)$")
BATCH_SIZE_FORMS = (
    "a positive integer (e.g. 8), auto (lm-eval finds the largest batch that fits, "
    "starting at eval.max_batch_size) or auto:N (N a positive integer: find it again "
    "N times as the requests get shorter)"
)
# What lm-eval 0.4.13 declares for its `vllm` extra, used when its metadata cannot be read.
VLLM_REQUIREMENT = "vllm>=0.18"
VLLM_INSTALL = "pip install 'lm_eval[vllm]'"


class BackendError(MergebakeError):
    """The eval backend cannot run here, or its settings conflict; the message names the
    config key (``eval.backend``, ``eval.batch_size``, ``eval.vllm.*``) and the fix."""


def check_batch_size(value: Any, key: str = "eval.batch_size") -> int | str:
    """Return ``value`` unchanged when it is a batch size lm-eval accepts, else raise.

    Accepted: an ``int`` >= 1 (not a bool), the string of one (``"8"``: the CLI's form),
    ``"auto"`` and ``"auto:N"`` with N an integer >= 1. Raises :class:`BackendError`
    naming ``key`` and the accepted forms for anything else (``0``, ``-1``, ``2.5``,
    ``"auto:0"``, ``"auto:1.5"``, ``"max"``, ``True``, ``None``).
    """
    ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 1) or (
        isinstance(value, str) and _BATCH.match(value) is not None
    )
    if not ok:
        raise BackendError(f"key '{key}': {value!r} is not a batch size; write {BATCH_SIZE_FORMS}")
    return value


def is_auto(batch_size: int | str) -> bool:
    """True for ``"auto"`` and ``"auto:N"``."""
    return isinstance(batch_size, str) and batch_size.startswith("auto")


@dataclass(frozen=True)
class VllmOptions:
    """The vLLM settings offered through ``eval.vllm`` (lm-eval's ``vllm`` model arguments).

    ``tensor_parallel_size``: GPUs one model is split over (lm-eval's default 1; the SLURM
    job asks for that many GPUs). ``gpu_memory_utilization``: fraction in (0, 1] of each
    GPU's memory vLLM may take for weights and KV cache; None passes nothing, so vLLM's
    own default applies (0.9 in vLLM's ``LLM``). ``max_model_len``: context length in
    tokens vLLM reserves KV cache for; None: the model's own (``max_position_embeddings``),
    which for long-context models can exceed the GPU's memory. Raises
    :class:`BackendError` naming the ``eval.vllm.*`` key for a value out of range.
    """

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        tp, gmu, mml = self.tensor_parallel_size, self.gpu_memory_utilization, self.max_model_len
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise BackendError(
                f"key 'eval.vllm.tensor_parallel_size': {tp!r}; write the number of GPUs "
                "(an integer >= 1) to split each model over"
            )
        if gmu is not None and (
            isinstance(gmu, bool) or not isinstance(gmu, int | float) or not 0 < gmu <= 1
        ):
            raise BackendError(
                f"key 'eval.vllm.gpu_memory_utilization': {gmu!r}; write a fraction of each "
                "GPU's memory in (0, 1], e.g. 0.9, or null for vLLM's default"
            )
        if mml is not None and (isinstance(mml, bool) or not isinstance(mml, int) or mml < 1):
            raise BackendError(
                f"key 'eval.vllm.max_model_len': {mml!r}; write a context length in tokens "
                "(an integer >= 1), or null for the model's own"
            )

    @classmethod
    def from_config(cls, eval_config: Mapping[str, Any]) -> VllmOptions:
        """The options of a validated config's ``eval`` mapping (missing keys: defaults)."""
        v = eval_config.get("vllm") or {}
        return cls(
            tensor_parallel_size=v.get("tensor_parallel_size", 1),
            gpu_memory_utilization=v.get("gpu_memory_utilization"),
            max_model_len=v.get("max_model_len"),
        )


@dataclass(frozen=True)
class LMSettings:
    """What :func:`lm_settings` hands to ``lm_eval.simple_evaluate``: ``model`` (the lm-eval
    model type), ``model_args`` (keyword arguments of that model's class), and the
    ``batch_size``, ``max_batch_size`` and ``device`` arguments (None: not passed, so the
    model's own default applies; ``simple_evaluate`` drops None values)."""

    model: str
    model_args: dict[str, Any] = field(default_factory=dict)
    batch_size: int | str = 1
    max_batch_size: int | None = None
    device: str | None = None

    def simple_evaluate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``lm_eval.simple_evaluate`` that build the model."""
        return {
            "model": self.model,
            "model_args": dict(self.model_args),
            "batch_size": self.batch_size,
            "max_batch_size": self.max_batch_size,
            "device": self.device,
        }


def lm_settings(
    backend: str,
    *,
    pretrained: str,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    seed: int = 1234,
    batch_size: int | str = 1,
    max_batch_size: int | None = None,
    device: str = "cpu",
    vllm: VllmOptions | None = None,
) -> LMSettings:
    """The lm-eval model type and arguments for one eval (no import of lm-eval or vLLM).

    ``hf``: ``model_args = {pretrained, dtype, trust_remote_code}`` (the arguments of
    ``HFLM.__init__``), ``device`` passed on. ``vllm``: ``model_args = {pretrained, dtype,
    trust_remote_code, seed, tensor_parallel_size}`` plus ``gpu_memory_utilization`` and
    ``max_model_len`` where set: all but ``gpu_memory_utilization`` are parameters of
    lm-eval's ``VLLM.__init__``, which forwards that one, with any other keyword, to
    ``vllm.LLM``; ``device`` is not passed (lm-eval's vLLM model ignores it; vLLM uses
    the GPUs ``CUDA_VISIBLE_DEVICES`` shows). ``seed`` seeds vLLM's sampler (lm-eval's
    ``VLLM`` default 1234); the hf model is seeded by ``simple_evaluate``'s seeds.

    Raises :class:`BackendError` for an unknown backend (naming ``eval.backend``), a bad
    batch size (:func:`check_batch_size`), a ``max_batch_size`` below 1, and, with vLLM,
    ``device`` ``cpu`` or ``cuda:N`` with N > 0.
    """
    if backend not in BACKENDS:
        raise BackendError(
            f"key 'eval.backend': {backend!r} is not an eval backend; write one of "
            f"{', '.join(BACKENDS)}"
        )
    check_batch_size(batch_size)
    mbs = max_batch_size
    if mbs is not None and (isinstance(mbs, bool) or not isinstance(mbs, int) or mbs < 1):
        raise BackendError(
            f"key 'eval.max_batch_size': {max_batch_size!r}; write an integer >= 1, or null "
            "for lm-eval's default"
        )
    args: dict[str, Any] = {
        "pretrained": pretrained,
        "dtype": dtype,
        "trust_remote_code": trust_remote_code,
    }
    if backend == "hf":
        return LMSettings("hf", args, batch_size, max_batch_size, device)
    vllm = vllm or VllmOptions()
    dev = str(device or "auto")
    if dev == "cpu":
        raise BackendError(
            "key 'eval.backend': vllm runs on CUDA GPUs only, but the device is cpu; "
            "set device: auto or cuda, or eval.backend: hf to score on the CPU"
        )
    if dev not in ("auto", "cuda", "cuda:0"):
        raise BackendError(
            f"key 'eval.backend': vllm ignores device {dev!r} (it uses the GPUs "
            "CUDA_VISIBLE_DEVICES shows); pass device auto or cuda and set "
            "CUDA_VISIBLE_DEVICES to choose the GPU"
        )
    args["seed"] = seed
    args["tensor_parallel_size"] = vllm.tensor_parallel_size
    if vllm.gpu_memory_utilization is not None:
        args["gpu_memory_utilization"] = vllm.gpu_memory_utilization
    if vllm.max_model_len is not None:
        args["max_model_len"] = vllm.max_model_len
    return LMSettings("vllm", args, batch_size, max_batch_size, None)


def vllm_requirement() -> str:
    """The vLLM requirement of lm-eval's ``vllm`` extra, read from lm-eval's installed
    metadata (``vllm>=0.18`` for lm-eval 0.4.13), else :data:`VLLM_REQUIREMENT`."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires("lm_eval") or []
    except PackageNotFoundError:
        return VLLM_REQUIREMENT
    for r in reqs:
        spec, _, marker = r.partition(";")
        if spec.strip().startswith("vllm") and "vllm" in marker:
            return spec.strip().replace(" ", "")
    return VLLM_REQUIREMENT


def vllm_problem() -> str | None:
    """Why vLLM cannot be used by lm-eval here, or None. Looks the package up without
    importing it (``importlib.util.find_spec``; importing vLLM takes seconds) and compares
    its installed version with :func:`vllm_requirement`."""
    from importlib.metadata import PackageNotFoundError, version
    from importlib.util import find_spec

    need = vllm_requirement()
    if find_spec("vllm") is None:
        return f"the vllm package is not installed here; install it with {VLLM_INSTALL} ({need})"
    try:
        have = version("vllm")
    except PackageNotFoundError:
        return None  # importable without metadata (a source checkout): let lm-eval try
    from packaging.requirements import Requirement

    if not Requirement(need).specifier.contains(have, prereleases=True):
        return f"vllm {have} is installed but lm-eval needs {need}; upgrade with {VLLM_INSTALL}"
    return None


def gpu_problem(gpus: int = 1) -> str | None:
    """Why ``gpus`` CUDA GPUs are not visible to torch here, or None.

    Uses ``torch.cuda.is_available()`` and ``torch.cuda.device_count()`` only, which do not
    create a CUDA context (vLLM starts its workers with fork only while none exists)."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible here (torch.cuda.is_available() is False)"
    count = torch.cuda.device_count()
    if count < gpus:
        return (
            f"eval.vllm.tensor_parallel_size is {gpus} but only {count} CUDA GPU(s) are "
            "visible here; lower it or run the job where that many GPUs are visible"
        )
    return None


def check_vllm_runtime(tensor_parallel_size: int = 1) -> None:
    """Refuse a vLLM eval where it cannot run: raises :class:`BackendError` naming
    ``eval.backend`` when vLLM is missing or too old (:func:`vllm_problem`), then when
    fewer than ``tensor_parallel_size`` CUDA GPUs are visible (:func:`gpu_problem`).
    Called at the start of the eval job, before tasks or weights are loaded."""
    problem = vllm_problem()
    if problem is None:
        problem = gpu_problem(tensor_parallel_size)
        if problem is not None:
            problem += (
                "; vLLM runs on CUDA GPUs only: run the eval jobs on a GPU node (the SLURM "
                "profile asks for one per eval job with this backend)"
            )
    if problem is not None:
        raise BackendError(f"key 'eval.backend' is vllm, but {problem}; or set eval.backend: hf")


def config_notes(eval_config: Mapping[str, Any], device: str) -> list[str]:
    """Config-time checks of a validated config's ``eval`` settings (no environment look-up).

    Raises :class:`BackendError` for what is wrong on every machine: a bad
    ``eval.batch_size``/``eval.max_batch_size``/``eval.vllm.*`` value, or ``eval.backend:
    vllm`` with ``device: cpu``. Returns warnings (strings) for settings that are likely
    mistakes: ``eval.vllm`` set while the backend is hf (ignored); vLLM with an integer
    batch size (lm-eval then hands vLLM that many requests at a time instead of letting it
    batch; lm-eval recommends auto); ``eval.max_batch_size`` with a fixed batch size on hf
    (it only bounds auto).
    """
    backend = eval_config.get("backend", DEFAULT_BACKEND)
    batch = eval_config.get("batch_size", 1)
    vllm = VllmOptions.from_config(eval_config)
    lm_settings(
        backend,
        pretrained="/model",
        batch_size=batch,
        max_batch_size=eval_config.get("max_batch_size"),
        device=device,
        vllm=vllm,
    )
    notes = []
    if backend == "hf" and vllm != VllmOptions():
        notes.append(
            "key 'eval.vllm' is set but eval.backend is hf, so it is ignored; "
            "set eval.backend: vllm to use it"
        )
    if backend == "vllm" and not is_auto(batch):
        notes.append(
            f"key 'eval.batch_size' is {batch!r} with eval.backend vllm: lm-eval hands vLLM "
            "that many requests at a time; auto lets vLLM batch them all itself (faster)"
        )
    if backend == "hf" and eval_config.get("max_batch_size") is not None and not is_auto(batch):
        notes.append(
            "key 'eval.max_batch_size' only bounds eval.batch_size: auto; it is ignored "
            f"with eval.batch_size {batch!r}"
        )
    return notes


def environment_notes(eval_config: Mapping[str, Any]) -> list[str]:
    """Warnings for ``mergebake validate`` and the workflow's preflight: with
    ``eval.backend: vllm``, vLLM missing or too old, or no CUDA GPU, *on this machine*.
    Warnings, not errors: on a cluster the eval jobs run elsewhere (GPU nodes, their own
    environment); each eval job checks again and refuses (:func:`check_vllm_runtime`)."""
    if eval_config.get("backend", DEFAULT_BACKEND) != "vllm":
        return []
    tp = VllmOptions.from_config(eval_config).tensor_parallel_size
    problems = [p for p in (vllm_problem(), gpu_problem(tp)) if p is not None]
    return [
        f"key 'eval.backend' is vllm, but {p}; the eval jobs will refuse to start unless "
        "they run where it is (e.g. GPU nodes with vLLM installed)"
        for p in problems
    ]
