"""Export a cell to GGUF with llama.cpp's own converter and quantiser, checked by llama.cpp.

Nothing here converts a tensor itself. The tools are llama.cpp's, at one pinned commit:

- **converter**: ``convert_hf_to_gguf.py`` with its ``conversion/`` package and its
  ``gguf-py``, taken from the source distribution of the pinned ``llama-cpp-python``
  (:data:`LLAMA_CPP_PYTHON`, the same version constraints.txt installs), whose
  ``vendor/llama.cpp`` is the llama.cpp commit that package builds. :func:`converter`
  downloads that sdist once with pip (``pip download --no-deps --no-binary :all:``), checks
  its sha256 against :data:`SDIST_SHA256`, and extracts only those files into a cache
  folder (``resources/tools/llama.cpp-<version>/``, never committed); ``--sdist`` takes a
  local copy instead, for machines without PyPI. The converter runs as a subprocess with
  this Python.
- **quantiser**: ``llama_model_quantize`` of the installed ``llama-cpp-python`` (llama.cpp's
  C API), for the types the converter cannot write (:data:`QUANT_TYPES`).
- **runtime**: ``llama_cpp.Llama`` of the same package loads each GGUF for the check.

The installed ``llama-cpp-python`` must be the version the converter comes from, so the
converter, the quantiser and the runtime are one llama.cpp commit; :func:`converter`
refuses otherwise.

:func:`export_gguf` writes ``<out>.gguf`` and a provenance sidecar ``<out>.gguf.json``.
Each file is checked (:func:`verify_gguf`) before it is renamed into place:

1. **metadata**: the typed GGUF fields that carry a ``config.json`` value (layer count,
   widths, heads, epsilon, rope bases, sliding window, token ids, ...) have that value and
   a GGUF type of the same kind (a bool stays a bool, an int an integer type, a float a
   float type), and the sliding-window layer pattern llama.cpp will run (an explicit
   ``<arch>.attention.sliding_window_pattern``, which must be a BOOL array or an integer,
   else llama.cpp's built-in default for the architecture) equals the config's
   ``layer_types``;
2. **tensors**: every tensor is finite, and has the names, shapes and values of the
   converter's own float32 output for the same cell within the precision of its type
   (:data:`TENSOR_RTOL`, relative RMS error);
3. **logits**: llama.cpp's next-token logits on :data:`DEFAULT_PROMPTS` (tokenized by the
   cell's tokenizer, the same ids fed to both) against the cell's own
   ``AutoModelForCausalLM`` in float32: for f32/f16/bf16 the same top-1 token on every
   prompt and ``max |Δlogit| <= rtol * max|reference logit| + atol`` with
   :data:`LOGIT_TOLERANCE`; for quantised types the same top-1 on at least
   :data:`QUANT_MIN_TOP1` of the prompts.

A GGUF that fails is removed and :class:`GGUFCheckError` lists what differed.
:func:`gguf_support` asks the converter's own architecture registry whether a family can
be converted at all, before any job.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from . import MergebakeError
from .outputs import describe_input, package_versions, sha256_file, write_json

log = logging.getLogger(__name__)

#: The registry package the converter, quantiser and runtime come from, and its pin.
LLAMA_CPP_PYTHON = "llama-cpp-python"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
#: sha256 of ``llama_cpp_python-0.3.36.tar.gz`` as served by PyPI.
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
#: Default cache folder for the extracted converter (relative to the working directory).
DEFAULT_TOOLS = Path("resources/tools")

#: Types ``convert_hf_to_gguf.py --outtype`` writes itself.
CONVERTER_TYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0")
#: Types made by llama.cpp's quantiser from the converter's f32 output: name -> the
#: ``llama_cpp.LLAMA_FTYPE_*`` constant.
QUANT_TYPES: dict[str, str] = {
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
    "q3_k_s": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q3_k_l": "LLAMA_FTYPE_MOSTLY_Q3_K_L",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
#: Every type :func:`export_gguf` accepts.
GGUF_TYPES: tuple[str, ...] = CONVERTER_TYPES + tuple(QUANT_TYPES)
#: Types held to the strict logit check (same top-1 everywhere, bounded difference).
FLOAT_TYPES: tuple[str, ...] = ("f32", "f16", "bf16")

#: Fixed prompts of the logit check. Counting in English and Norwegian is ordinary text
#: for a real model and the two skills of the demo models.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "one two three four five six",
    "en to tre fire fem seks",
    "seven",
    "sju",
    "The capital of Norway is",
)
#: ``(rtol, atol)`` of the logit check per float type: ``max |Δ| <= rtol * S + atol`` with
#: ``S`` the largest absolute reference logit of the prompt. Measured on the demo models
#: (logits up to ~5): f32 GGUFs differ from transformers by ~1.3e-3 (summation order);
#: bf16/f16 by ~0.015-0.02, because llama.cpp's CPU matmul rounds the activations to the
#: weight type (ggml's ``vec_dot_type``) where transformers computes in float32.
LOGIT_TOLERANCE: dict[str, tuple[float, float]] = {
    "f32": (1e-3, 1e-3),
    "f16": (0.02, 0.02),
    "bf16": (0.02, 0.02),
}
#: Quantised types: how many of the prompts must keep the reference top-1 token.
QUANT_MIN_TOP1 = 4
#: Relative RMS error of a GGUF tensor against the converter's float32 output, by the
#: tensor's GGML type (the rounding of the format: bf16 keeps 8 significant bits, f16 11,
#: q8_0 ~7 per 32-value block; k-quants and 4/5-bit types lose more). Types not listed: 0.5.
TENSOR_RTOL: dict[str, float] = {
    "F32": 0.0,
    "F16": 1e-3,
    "BF16": 5e-3,
    "Q8_0": 2e-2,
    "Q6_K": 0.05,
    "Q5_0": 0.1,
    "Q5_1": 0.1,
    "Q5_K": 0.1,
    "Q4_0": 0.2,
    "Q4_1": 0.2,
    "Q4_K": 0.2,
}
_DEFAULT_TENSOR_RTOL = 0.5

#: llama.cpp's sliding-window layer pattern where a GGUF has a sliding window but no
#: ``<arch>.attention.sliding_window_pattern``: GGUF architecture -> n (layer ``i`` is
#: sliding iff ``i % n < n - 1``; llama.cpp ``llama_hparams::set_swa_pattern``). From
#: llama.cpp ``src/models/gemma3.cpp`` (``load_swa_pattern(ml, 6)``) and ``gemma2.cpp`` (2).
SWA_DEFAULT_PATTERN: dict[str, int] = {"gemma3": 6, "gemma2": 2}


class GGUFCheckError(MergebakeError):
    """A GGUF failed its check; ``problems`` lists what differed, one line each."""

    def __init__(self, path: str | os.PathLike, problems: Sequence[str]):
        self.path = Path(path)
        self.problems = list(problems)
        lines = "\n  - ".join(self.problems)
        super().__init__(f"{path}: GGUF check failed ({len(self.problems)}):\n  - {lines}")


# --------------------------------------------------------------------------- the tools


@dataclass(frozen=True)
class Converter:
    """llama.cpp's converter, extracted from the pinned ``llama-cpp-python`` sdist.

    ``root`` holds ``convert_hf_to_gguf.py``, ``conversion/``, ``gguf-py/`` and
    ``tools.json`` (``version``, ``sdist``, ``sdist_sha256``, ``gguf_py_version``).
    """

    root: Path
    version: str
    sdist: str
    sdist_sha256: str
    gguf_py_version: str

    @property
    def script(self) -> Path:
        return self.root / "convert_hf_to_gguf.py"

    def command(self, model_dir: Path, outfile: Path, outtype: str) -> list[str]:
        """argv that converts ``model_dir`` to ``outfile`` in ``outtype``."""
        return [
            sys.executable,
            str(self.script),
            str(model_dir),
            "--outfile",
            str(outfile),
            "--outtype",
            outtype,
        ]

    def record(self) -> dict[str, Any]:
        return {
            "package": LLAMA_CPP_PYTHON,
            "version": self.version,
            "sdist": self.sdist,
            "sdist_sha256": self.sdist_sha256,
            "gguf_py_version": self.gguf_py_version,
            "script_sha256": sha256_file(self.script),
        }


def llama_cpp_version() -> str:
    """Version of the installed ``llama-cpp-python``.

    Raises :class:`MergebakeError` when it is not installed or differs from the pin
    :data:`LLAMA_CPP_PYTHON_VERSION`, saying how to install it.
    """
    try:
        version = metadata.version(LLAMA_CPP_PYTHON)
    except metadata.PackageNotFoundError:
        raise MergebakeError(
            f"{LLAMA_CPP_PYTHON} is not installed; GGUF export needs it: "
            f"pip install -c constraints.txt {LLAMA_CPP_PYTHON}=={LLAMA_CPP_PYTHON_VERSION} "
            "(builds llama.cpp from source; see README, GGUF export)"
        ) from None
    if version != LLAMA_CPP_PYTHON_VERSION:
        raise MergebakeError(
            f"{LLAMA_CPP_PYTHON} {version} is installed but mergebake pins "
            f"{LLAMA_CPP_PYTHON_VERSION} (converter and runtime must be one llama.cpp commit); "
            f"pip install -c constraints.txt {LLAMA_CPP_PYTHON}=={LLAMA_CPP_PYTHON_VERSION}"
        )
    return version


def tools_folder(tools: str | os.PathLike = DEFAULT_TOOLS) -> Path:
    """The converter's cache folder under ``tools``: ``<tools>/llama.cpp-<version>``."""
    return Path(tools) / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


def _download_sdist(dest: Path) -> Path:
    """``pip download`` the pinned sdist into ``dest``; returns the file."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        f"{LLAMA_CPP_PYTHON}=={LLAMA_CPP_PYTHON_VERSION}",
    ]
    log.info("fetching llama.cpp's converter: %s", shlex.join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise MergebakeError(
            f"could not download the {LLAMA_CPP_PYTHON}=={LLAMA_CPP_PYTHON_VERSION} sdist "
            f"(the source of llama.cpp's converter) with pip:\n{proc.stderr[-2000:]}\n"
            "Give a local copy with --sdist (mergebake gguf-tools --sdist FILE)"
        )
    found = sorted(dest.glob("*.tar.gz"))
    if len(found) != 1:
        raise MergebakeError(f"pip download left {found} in {dest}; expected one sdist")
    return found[0]


_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "gguf-py/pyproject.toml")


def _extract(sdist: Path, dest: Path) -> str:
    """Extract the converter's files from ``sdist`` into ``dest``; return gguf-py's version."""
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            if not m.name.startswith(prefix):
                continue
            rel = m.name[len(prefix) :]
            if m.isfile() and any(rel == p or rel.startswith(p) for p in _MEMBERS):
                m = m.replace(name=rel)
                members.append(m)
        if not any(m.name == "convert_hf_to_gguf.py" for m in members):
            raise MergebakeError(
                f"{sdist}: no {prefix}convert_hf_to_gguf.py; not a {LLAMA_CPP_PYTHON} "
                f"{LLAMA_CPP_PYTHON_VERSION} sdist"
            )
        tar.extractall(dest, members=members, filter="data")
    import tomllib

    pyproject = tomllib.loads((dest / "gguf-py" / "pyproject.toml").read_text())
    return str(pyproject["project"]["version"])


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def converter(
    tools: str | os.PathLike = DEFAULT_TOOLS,
    *,
    sdist: str | os.PathLike | None = None,
    fetch: bool = True,
) -> Converter:
    """llama.cpp's converter for the pinned version, extracted into ``tools`` once.

    Reuses ``<tools>/llama.cpp-<version>/`` when its ``tools.json`` is complete; otherwise
    takes the sdist from ``sdist`` (a local ``llama_cpp_python-<version>.tar.gz``) or, when
    ``fetch``, downloads it with pip (one PyPI request, ~77 MB; pip's cache serves
    repeats), checks its sha256 against :data:`SDIST_SHA256`, and extracts
    ``convert_hf_to_gguf.py``, ``conversion/`` and ``gguf-py/`` atomically under a file
    lock (parallel jobs wait for one extraction). Also checks that the installed
    ``llama-cpp-python`` (:func:`llama_cpp_version`) and ``gguf`` packages are the versions
    the converter comes with.

    Raises :class:`MergebakeError` on a version mismatch, a wrong checksum, a failed
    download, or a missing cache with ``fetch=False``.
    """
    version = llama_cpp_version()
    folder = tools_folder(tools)
    with _locked(Path(tools)):
        info_path = folder / "tools.json"
        if not info_path.is_file():
            if sdist is None and not fetch:
                raise MergebakeError(
                    f"{folder}: llama.cpp's converter is not there; run "
                    f"`mergebake gguf-tools --tools {tools}` (downloads the "
                    f"{LLAMA_CPP_PYTHON} {version} sdist from PyPI) or pass --sdist FILE"
                )
            with tempfile.TemporaryDirectory(dir=Path(tools)) as tmp:
                src = Path(sdist) if sdist is not None else _download_sdist(Path(tmp) / "dl")
                if not src.is_file():
                    raise MergebakeError(f"--sdist {src}: no such file")
                digest = sha256_file(src)
                if digest != SDIST_SHA256:
                    raise MergebakeError(
                        f"{src}: sha256 {digest} is not the one of {LLAMA_CPP_PYTHON} "
                        f"{LLAMA_CPP_PYTHON_VERSION} on PyPI ({SDIST_SHA256}); refusing it"
                    )
                stage = Path(tmp) / "x"
                gguf_py = _extract(src, stage)
                write_json(
                    stage / "tools.json",
                    {
                        "package": LLAMA_CPP_PYTHON,
                        "version": version,
                        "sdist": src.name,
                        "sdist_sha256": digest,
                        "gguf_py_version": gguf_py,
                        "files": "convert_hf_to_gguf.py, conversion/, gguf-py/ of vendor/llama.cpp",
                    },
                )
                if folder.exists():
                    shutil.rmtree(folder)
                os.replace(stage, folder)
        info = json.loads(info_path.read_text())
    if info.get("version") != version:
        raise MergebakeError(
            f"{info_path}: converter from {LLAMA_CPP_PYTHON} {info.get('version')}, but "
            f"{version} is installed; delete {folder} and run mergebake gguf-tools again"
        )
    try:
        gguf_installed = metadata.version("gguf")
    except metadata.PackageNotFoundError:
        gguf_installed = None
    if gguf_installed != info["gguf_py_version"]:
        raise MergebakeError(
            f"the installed gguf package is {gguf_installed}, llama.cpp's converter of "
            f"{LLAMA_CPP_PYTHON} {version} comes with gguf {info['gguf_py_version']}; "
            f"pip install -c constraints.txt gguf=={info['gguf_py_version']}"
        )
    return Converter(
        root=folder,
        version=version,
        sdist=info["sdist"],
        sdist_sha256=info["sdist_sha256"],
        gguf_py_version=info["gguf_py_version"],
    )


# --------------------------------------------------------------------------- support


_REGISTRY_PROBE = r"""
import json, sys
root = sys.argv[1]
sys.path.insert(0, root)
sys.path.insert(1, root + "/gguf-py")
import logging
logging.disable(logging.CRITICAL)
from conversion import ModelType, get_model_architecture, get_model_class
out = []
for hparams in json.load(sys.stdin):
    try:
        arch = get_model_architecture(hparams, ModelType.TEXT)
    except Exception as e:
        out.append({"arch": None, "reason": f"no architecture: {e}"})
        continue
    try:
        cls = get_model_class(arch)
    except NotImplementedError:
        reason = f"architecture {arch!r} is not in the converter's registry"
        out.append({"arch": arch, "reason": reason})
        continue
    out.append({"arch": arch, "reason": None, "class": cls.__name__,
                "gguf_arch": cls.model_arch.name.lower()})
print(json.dumps(out))
"""


def _registry(hparams_list: Sequence[Mapping[str, Any]], conv: Converter) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-c", _REGISTRY_PROBE, str(conv.root)],
        input=json.dumps([dict(h) for h in hparams_list]),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise MergebakeError(
            f"could not query llama.cpp's converter registry in {conv.root}:\n{proc.stderr[-2000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _load_config(config_json: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(config_json, Mapping):
        return dict(config_json)
    path = Path(config_json)
    if path.is_dir():
        path = path / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MergebakeError(f"{path}: no config.json to export") from None


def gguf_support(
    config_json: str | os.PathLike | Mapping[str, Any],
    *,
    tools: str | os.PathLike = DEFAULT_TOOLS,
    sdist: str | os.PathLike | None = None,
) -> str | None:
    """Why llama.cpp cannot convert this model, or ``None`` when it can.

    ``config_json`` is a ``config.json`` path, its folder, or its parsed dict (only
    ``architectures`` and ``text_config.architectures`` matter). The answer is the pinned
    converter's own: its ``get_model_architecture`` picks the architecture name and its
    registry (``conversion.get_model_class``, the ``TEXT_MODEL_MAP`` every ``@ModelBase.
    register`` class is listed in) must know it. Runs in a subprocess with the converter
    from :func:`converter` (fetched into ``tools`` if absent); ~5 s, most of it importing
    torch. Use :func:`gguf_support_many` to ask about many configs at once.
    """
    return gguf_support_many([config_json], tools=tools, sdist=sdist)[0]


def gguf_support_many(
    configs: Sequence[str | os.PathLike | Mapping[str, Any]],
    *,
    tools: str | os.PathLike = DEFAULT_TOOLS,
    sdist: str | os.PathLike | None = None,
) -> list[str | None]:
    """:func:`gguf_support` for each of ``configs``, in one converter subprocess."""
    hparams = [_load_config(c) for c in configs]
    if not hparams:
        return []
    answers = _registry(hparams, converter(tools, sdist=sdist))
    return [a["reason"] for a in answers]


# --------------------------------------------------------------------------- reading


def _reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct errors on bad files
        raise GGUFCheckError(path, [f"not a readable GGUF file: {e}"]) from e


_INT_TYPES = {"UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64"}
_FLOAT_TYPES = {"FLOAT32", "FLOAT64"}


def _field(reader, key: str) -> tuple[list[str], Any] | None:
    f = reader.fields.get(key)
    if f is None:
        return None
    return [t.name for t in f.types], f.contents()


# --------------------------------------------------------------------------- metadata


def _text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    # The converter moves text_config to the root (TextModel.__init__); do the same.
    cfg = dict(config)
    if isinstance(cfg.get("text_config"), Mapping):
        cfg = {**cfg, **cfg["text_config"]}
    return cfg


def _rope_theta(cfg: Mapping[str, Any], layer_type: str) -> float | None:
    params = cfg.get("rope_parameters") or {}
    if isinstance(params.get(layer_type), Mapping) and "rope_theta" in params[layer_type]:
        return params[layer_type]["rope_theta"]
    if layer_type == "sliding_attention" and "rope_local_base_freq" in cfg:
        return cfg["rope_local_base_freq"]
    if layer_type == "full_attention":
        return cfg.get("rope_theta", params.get("rope_theta"))
    return None


def _expected_fields(cfg: Mapping[str, Any], arch: str) -> list[tuple[str, str, Any]]:
    """``(gguf key, config key, value)`` of the typed fields that carry a config value."""
    table = [
        (f"{arch}.block_count", "num_hidden_layers"),
        (f"{arch}.context_length", "max_position_embeddings"),
        (f"{arch}.embedding_length", "hidden_size"),
        (f"{arch}.feed_forward_length", "intermediate_size"),
        (f"{arch}.attention.head_count", "num_attention_heads"),
        (f"{arch}.attention.head_count_kv", "num_key_value_heads"),
        (f"{arch}.attention.key_length", "head_dim"),
        (f"{arch}.attention.value_length", "head_dim"),
        (f"{arch}.attention.layer_norm_rms_epsilon", "rms_norm_eps"),
        (f"{arch}.attention.sliding_window", "sliding_window"),
        (f"{arch}.final_logit_softcapping", "final_logit_softcapping"),
        (f"{arch}.attn_logit_softcapping", "attn_logit_softcapping"),
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
    ]
    out = [(k, c, cfg[c]) for k, c in table if cfg.get(c) is not None]
    for key, layer_type, name in (
        (f"{arch}.rope.freq_base", "full_attention", "rope_theta"),
        (f"{arch}.rope.freq_base_swa", "sliding_attention", "rope_local_base_freq"),
    ):
        theta = _rope_theta(cfg, layer_type)
        if theta is not None:
            out.append((key, name, theta))
    return out


def _kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    return None


def _swa_layers(reader, arch: str, n_layers: int) -> tuple[list[bool] | None, list[str]]:
    """The sliding-window flag of each layer as llama.cpp will run it, and problems."""
    problems: list[str] = []
    key = f"{arch}.attention.sliding_window_pattern"
    got = _field(reader, key)
    if got is not None:
        types, value = got
        if types[0] == "ARRAY":
            if types[1:] != ["BOOL"]:
                problems.append(
                    f"{key}: array of {'/'.join(types[1:])}, llama.cpp reads the per-layer "
                    "sliding-window pattern as BOOL (a bool must stay a bool)"
                )
                return None, problems
            if len(value) != n_layers:
                problems.append(f"{key}: {len(value)} entries for {n_layers} layers")
                return None, problems
            return [bool(v) for v in value], problems
        if types[0] in _INT_TYPES:
            return _pattern(int(value), n_layers), problems
        problems.append(f"{key}: {types[0]}, expected a BOOL array or an integer")
        return None, problems
    window = _field(reader, f"{arch}.attention.sliding_window")
    if window is None or not window[1]:
        return [False] * n_layers, problems
    if arch in SWA_DEFAULT_PATTERN:
        return _pattern(SWA_DEFAULT_PATTERN[arch], n_layers), problems
    return None, problems


def _pattern(n: int, n_layers: int) -> list[bool]:
    # llama_hparams::set_swa_pattern (dense_first = false)
    return [n == 0 or (i % n) < (n - 1) for i in range(n_layers)]


def metadata_problems(gguf_path: str | os.PathLike, config: Mapping[str, Any]) -> list[str]:
    """What the GGUF's typed metadata gets wrong about ``config`` (a ``config.json`` dict).

    For each field of :func:`_expected_fields` present in the GGUF: the GGUF value type
    must be of the config value's kind (bool -> ``BOOL``; int -> an integer type; float
    -> ``FLOAT32``/``FLOAT64``) and the
    value equal (floats to float32 precision, relative 1e-6). Then the per-layer
    sliding-window flags llama.cpp will use (:func:`_swa_layers`) must equal the config's
    ``layer_types`` (``"sliding_attention"`` -> sliding). ``tokenizer.ggml.add_bos_token``
    and ``add_eos_token`` must be ``BOOL``. Returns one line per problem; empty when all
    agree.
    """
    path = Path(gguf_path)
    reader = _reader(path)
    cfg = _text_config(config)
    problems: list[str] = []
    arch_field = _field(reader, "general.architecture")
    if arch_field is None:
        return ["general.architecture: missing"]
    arch = str(arch_field[1])
    for key, cfg_key, want in _expected_fields(cfg, arch):
        got = _field(reader, key)
        if got is None:
            continue
        types, value = got
        kind = _kind(want)
        gtype = types[0]
        ok_type = (
            (kind == "bool" and gtype == "BOOL")
            or (kind == "int" and gtype in _INT_TYPES)
            or (kind == "float" and gtype in _FLOAT_TYPES)
        )
        if not ok_type:
            problems.append(
                f"{key}: stored as {gtype}, but config.json {cfg_key} is a {kind} "
                f"({want!r}); the type must be kept"
            )
            continue
        if kind == "bool":
            equal = bool(value) == want
        else:
            equal = abs(float(value) - float(want)) <= 1e-6 * max(1.0, abs(float(want)))
        if not equal:
            problems.append(f"{key}: {value!r}, but config.json {cfg_key} is {want!r}")
    for key in ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"):
        got = _field(reader, key)
        if got is not None and got[0][0] != "BOOL":
            problems.append(f"{key}: stored as {got[0][0]}, expected BOOL")
    n_layers = cfg.get("num_hidden_layers")
    layer_types = cfg.get("layer_types")
    if isinstance(n_layers, int) and isinstance(layer_types, list):
        swa, swa_problems = _swa_layers(reader, arch, n_layers)
        problems += swa_problems
        if swa is not None:
            want = [t == "sliding_attention" for t in layer_types]
            wrong = [i for i, (a, b) in enumerate(zip(swa, want, strict=False)) if a != b]
            if wrong:
                where = ", ".join(
                    f"layer {i}: config {layer_types[i]}, llama.cpp "
                    f"{'sliding' if swa[i] else 'full'}"
                    for i in wrong
                )
                problems.append(
                    f"{arch}.attention.sliding_window_pattern: llama.cpp would run the "
                    f"layers' attention differently from config.json layer_types ({where})"
                )
    return problems


# --------------------------------------------------------------------------- tensors


def _dequantized(tensor):
    import numpy as np
    from gguf.quants import dequantize

    data = dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape(-1)


def tensor_problems(
    gguf_path: str | os.PathLike, reference: str | os.PathLike | None = None
) -> list[str]:
    """What is wrong with the GGUF's tensors; empty when nothing is.

    Every tensor, dequantised with the ``gguf`` package (``gguf.quants.dequantize``), must
    be finite. With ``reference`` (the converter's float32 GGUF of the same cell), the
    tensor names and shapes must match it and each tensor's relative RMS error
    ``||x - ref|| / ||ref||`` stay within :data:`TENSOR_RTOL` of its GGML type, so a
    corrupted tensor is named even where the logits barely move.
    """
    import numpy as np

    path = Path(gguf_path)
    reader = _reader(path)
    problems: list[str] = []
    refs = {}
    if reference is not None:
        ref_reader = _reader(Path(reference))
        refs = {t.name: t for t in ref_reader.tensors}
        names = {t.name for t in reader.tensors}
        for name in sorted(set(refs) - names):
            problems.append(f"tensor {name}: missing (the converter writes it)")
        for name in sorted(names - set(refs)):
            problems.append(f"tensor {name}: not written by the converter")
    for t in reader.tensors:
        x = _dequantized(t)
        qtype = t.tensor_type.name
        bad = int(np.size(x) - np.isfinite(x).sum())
        if bad:
            problems.append(f"tensor {t.name} ({qtype}): {bad} of {x.size} values NaN/Inf")
            continue
        ref = refs.get(t.name)
        if ref is None:
            continue
        if list(ref.shape) != list(t.shape):
            problems.append(f"tensor {t.name}: shape {list(t.shape)}, converter {list(ref.shape)}")
            continue
        r = _dequantized(ref)
        denom = float(np.linalg.norm(r)) or 1.0
        err = float(np.linalg.norm(x - r)) / denom
        limit = TENSOR_RTOL.get(qtype, _DEFAULT_TENSOR_RTOL)
        if err > limit:
            problems.append(
                f"tensor {t.name} ({qtype}): relative RMS error {err:.3g} against the "
                f"converter's f32 output (limit {limit:g} for {qtype})"
            )
    return problems


# --------------------------------------------------------------------------- logits


def prompt_ids(cell_dir: str | os.PathLike, prompts: Sequence[str] = DEFAULT_PROMPTS):
    """Token ids of ``prompts`` by the cell's own tokenizer (``AutoTokenizer``, special
    tokens added as the tokenizer does, e.g. ``<bos>``): a list of lists of ints."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cell_dir)
    return [list(tok(p).input_ids) for p in prompts]


def reference_logits(cell_dir: str | os.PathLike, ids: Sequence[Sequence[int]]):
    """Next-token logits of the cell by ``AutoModelForCausalLM`` in float32 (eager
    attention) after each prompt: a float32 numpy array ``[n_prompts, vocab]``."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        cell_dir, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    rows = []
    with torch.no_grad():
        for p in ids:
            out = model(input_ids=torch.tensor([list(p)], dtype=torch.long)).logits
            rows.append(out[0, -1].float().numpy())
    return np.stack(rows).astype(np.float32)


def llama_logits(gguf_path: str | os.PathLike, ids: Sequence[Sequence[int]], *, threads: int):
    """Next-token logits by llama.cpp (``llama_cpp.Llama``, ``logits_all``) after each
    prompt, the ids fed as they are: a float32 numpy array ``[n_prompts, n_vocab]``."""
    import llama_cpp
    import numpy as np

    n_ctx = max(len(p) for p in ids) + 1
    llm = llama_cpp.Llama(
        model_path=str(gguf_path),
        n_ctx=max(n_ctx, 32),
        n_batch=max(n_ctx, 32),
        logits_all=True,
        n_threads=threads,
        n_threads_batch=threads,
        n_gpu_layers=0,
        verbose=False,
    )
    try:
        rows = []
        for p in ids:
            llm.reset()
            llm.eval(list(p))
            rows.append(np.array(llm.scores[len(p) - 1], dtype=np.float32))
        return np.stack(rows)
    finally:
        llm.close()


def logit_problems(
    gguf_type: str, ref, got, *, min_top1: int = QUANT_MIN_TOP1
) -> tuple[list[str], dict[str, Any]]:
    """Compare llama.cpp's logits ``got`` ``[n, V_gguf]`` with transformers' ``ref``
    ``[n, V_hf]`` over the GGUF's vocabulary (the converter may drop the checkpoint's
    padding rows past the tokenizer, so ``V_gguf <= V_hf``), by the rule of
    :data:`LOGIT_TOLERANCE` / :data:`QUANT_MIN_TOP1` for ``gguf_type``. Returns
    ``(problems, summary)``; the summary has per-prompt top-1s and differences."""
    import numpy as np

    problems: list[str] = []
    v = got.shape[1]
    if v > ref.shape[1]:
        return [f"llama.cpp has {v} vocabulary entries, the checkpoint {ref.shape[1]}"], {}
    ref = ref[:, :v]
    top_ref = ref.argmax(axis=1)
    top_got = got.argmax(axis=1)
    diff = np.abs(ref - got).max(axis=1)
    scale = np.abs(ref).max(axis=1)
    same = int((top_ref == top_got).sum())
    n = len(ref)
    summary: dict[str, Any] = {
        "prompts": n,
        "top1_reference": top_ref.tolist(),
        "top1_gguf": top_got.tolist(),
        "top1_agree": same,
        "max_abs_diff": [round(float(d), 6) for d in diff],
        "max_abs_reference": [round(float(s), 6) for s in scale],
    }
    if gguf_type in LOGIT_TOLERANCE:
        rtol, atol = LOGIT_TOLERANCE[gguf_type]
        tol = rtol * scale + atol
        summary["tolerance"] = [round(float(t), 6) for t in tol]
        for i in range(n):
            if top_ref[i] != top_got[i]:
                problems.append(
                    f"prompt {i}: llama.cpp's top-1 token {int(top_got[i])}, transformers' "
                    f"{int(top_ref[i])} (a {gguf_type} GGUF must agree on every prompt)"
                )
            if diff[i] > tol[i]:
                problems.append(
                    f"prompt {i}: max |logit difference| {diff[i]:.4g} > tolerance "
                    f"{tol[i]:.4g} ({rtol:g} x {scale[i]:.4g} + {atol:g}) for {gguf_type}"
                )
    else:
        need = min(min_top1, n)
        summary["top1_required"] = need
        if same < need:
            problems.append(
                f"llama.cpp's top-1 token agrees with transformers' on {same} of {n} "
                f"prompts; a {gguf_type} GGUF needs {need} "
                f"(reference {top_ref.tolist()}, GGUF {top_got.tolist()})"
            )
    return problems, summary


# --------------------------------------------------------------------------- verify


def _default_threads() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0))))


def verify_gguf(
    gguf_path: str | os.PathLike,
    cell_dir: str | os.PathLike,
    gguf_type: str,
    *,
    reference: str | os.PathLike | None = None,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    threads: int | None = None,
) -> dict[str, Any]:
    """Check a GGUF of ``cell_dir`` with llama.cpp; return the check's summary.

    Runs :func:`metadata_problems` against the cell's ``config.json``,
    :func:`tensor_problems` (against ``reference``, the converter's f32 GGUF, when given),
    and the logit comparison of :func:`logit_problems` on ``prompts`` (llama.cpp on
    ``threads`` CPU threads). The summary (JSON-able) has ``metadata``, ``tensors``
    (problem lists, empty) and ``logits``. Raises :class:`GGUFCheckError` listing every
    problem found; the file is left where it is (:func:`export_gguf` removes it).
    """
    if gguf_type not in GGUF_TYPES:
        raise MergebakeError(f"type={gguf_type!r}: choose one of {list(GGUF_TYPES)}")
    path = Path(gguf_path)
    cell = Path(cell_dir)
    config = _load_config(cell)
    problems = metadata_problems(path, config)
    problems += tensor_problems(path, reference)
    summary: dict[str, Any] = {"type": gguf_type, "prompts": list(prompts)}
    if not any(p.startswith("tensor ") and "NaN" in p for p in problems):
        ids = prompt_ids(cell, prompts)
        ref = reference_logits(cell, ids)
        try:
            got = llama_logits(path, ids, threads=threads or _default_threads())
        except Exception as e:  # llama-cpp-python raises ValueError on a file it rejects
            problems.append(f"llama.cpp could not load or run the file: {e}")
        else:
            logit_issues, summary["logits"] = logit_problems(gguf_type, ref, got)
            summary["prompt_ids"] = ids
            problems += logit_issues
    if problems:
        raise GGUFCheckError(path, problems)
    summary["metadata"] = []
    summary["tensors"] = []
    return summary


# --------------------------------------------------------------------------- export


def _run(cmd: list[str], what: str) -> None:
    log.info("%s: %s", what, shlex.join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise MergebakeError(
            f"{what} failed (exit {proc.returncode}): {shlex.join(cmd)}\n{proc.stderr[-3000:]}"
        )


def quantize(src: str | os.PathLike, out: str | os.PathLike, gguf_type: str, *, threads: int):
    """Quantise the GGUF ``src`` to ``gguf_type`` (a key of :data:`QUANT_TYPES`) into
    ``out`` with llama.cpp's ``llama_model_quantize`` (default parameters apart from
    ``ftype`` and ``nthread``). Raises :class:`MergebakeError` when llama.cpp fails."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[gguf_type])
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(out), ctypes.byref(params))
    if rc != 0:
        raise MergebakeError(f"llama_model_quantize({src} -> {gguf_type}) returned {rc}")


@dataclass
class ExportResult:
    """What :func:`export_gguf` made: the file, its sidecar and the check's summary."""

    path: Path
    sidecar: Path
    sha256: str
    bytes: int
    check: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def sidecar_path(out: str | os.PathLike) -> Path:
    """The provenance sidecar of a GGUF: ``<out>.json``."""
    return Path(f"{out}.json")


def export_gguf(
    cell_dir: str | os.PathLike,
    out: str | os.PathLike,
    gguf_type: str,
    *,
    tools: str | os.PathLike = DEFAULT_TOOLS,
    sdist: str | os.PathLike | None = None,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    threads: int | None = None,
) -> ExportResult:
    """Export the cell in ``cell_dir`` (a Hugging Face checkpoint folder) to the GGUF ``out``.

    ``gguf_type`` is one of :data:`GGUF_TYPES`. llama.cpp's converter (:func:`converter`)
    first writes an f32 GGUF into a temporary folder beside ``out`` (4 bytes per parameter
    of disk, freed at the end); ``f32`` is that file, ``f16``/``bf16``/``q8_0`` are a
    second converter run with ``--outtype``, and the :data:`QUANT_TYPES` come from
    llama.cpp's quantiser (:func:`quantize`) applied to the f32 file. The result is checked
    by :func:`verify_gguf` (tensors against the f32 file), then its sidecar
    ``<out>.json`` (converter version, sdist sha256, commands, check summary, sha256 of
    the GGUF and of the cell's files) is written and the GGUF renamed into place. On any
    failure nothing is left at ``out`` (an old file there is removed) and the error says
    what differed (:class:`GGUFCheckError`) or which tool failed (:class:`MergebakeError`).
    """
    if gguf_type not in GGUF_TYPES:
        raise MergebakeError(f"type={gguf_type!r}: choose one of {list(GGUF_TYPES)}")
    t0 = time.perf_counter()
    cell = Path(cell_dir).resolve()
    out = Path(out)
    if not (cell / "config.json").is_file():
        raise MergebakeError(f"{cell}: no config.json; not a checkpoint folder to export")
    conv = converter(tools, sdist=sdist)
    threads = threads or _default_threads()
    out.parent.mkdir(parents=True, exist_ok=True)
    sidecar = sidecar_path(out)
    for stale in (out, sidecar):
        stale.unlink(missing_ok=True)
    work = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    commands: list[list[str] | str] = []
    try:
        ref = work / "reference.f32.gguf"
        cmd = conv.command(cell, ref, "f32")
        _run(cmd, "llama.cpp convert_hf_to_gguf.py (f32)")
        commands.append(cmd)
        made = work / f"out.{gguf_type}.gguf"
        if gguf_type == "f32":
            shutil.copyfile(ref, made)
        elif gguf_type in CONVERTER_TYPES:
            cmd = conv.command(cell, made, gguf_type)
            _run(cmd, f"llama.cpp convert_hf_to_gguf.py ({gguf_type})")
            commands.append(cmd)
        else:
            quantize(ref, made, gguf_type, threads=threads)
            commands.append(
                f"llama_cpp.llama_model_quantize({ref.name} -> {made.name}, "
                f"ftype={QUANT_TYPES[gguf_type]}, nthread={threads})"
            )
        try:
            check = verify_gguf(
                made, cell, gguf_type, reference=ref, prompts=prompts, threads=threads
            )
        except GGUFCheckError as e:
            raise GGUFCheckError(out, e.problems) from None
        digest = sha256_file(made)
        size = made.stat().st_size
        write_json(
            sidecar,
            {
                "step": "export-gguf",
                "type": gguf_type,
                "file": out.name,
                "sha256": digest,
                "bytes": size,
                "inputs": {"cell": describe_input(cell)},
                "converter": conv.record(),
                "quantiser": (
                    {"function": "llama_cpp.llama_model_quantize", "ftype": QUANT_TYPES[gguf_type]}
                    if gguf_type in QUANT_TYPES
                    else None
                ),
                "commands": [c if isinstance(c, str) else _portable(c) for c in commands],
                "check": check,
                "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
                "packages": {
                    **package_versions(),
                    LLAMA_CPP_PYTHON: conv.version,
                    "gguf": conv.gguf_py_version,
                },
            },
        )
        os.replace(made, out)
    except BaseException:
        out.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ExportResult(
        path=out,
        sidecar=sidecar,
        sha256=digest,
        bytes=size,
        check=check,
        seconds=time.perf_counter() - t0,
    )


def _portable(cmd: list[str]) -> str:
    # The interpreter path and the temporary folder vary; record the command readably.
    return shlex.join(["python", *cmd[1:]])


# --------------------------------------------------------------------------- CLI


def cli_export(a) -> None:
    """``mergebake export``: :func:`export_gguf` for each ``--type``; prints one JSON line
    per file (path, type, sha256, bytes, seconds, top-1 agreement)."""
    for gguf_type in a.type:
        out = Path(str(a.out).replace("{type}", gguf_type))
        res = export_gguf(
            a.cell,
            out,
            gguf_type,
            tools=a.tools,
            sdist=a.sdist,
            threads=a.threads,
        )
        print(
            json.dumps(
                {
                    "out": str(res.path),
                    "type": gguf_type,
                    "sha256": res.sha256,
                    "bytes": res.bytes,
                    "seconds": round(res.seconds, 3),
                    "top1_agree": res.check.get("logits", {}).get("top1_agree"),
                }
            )
        )


def add_export_arguments(sp) -> None:
    sp.add_argument("--cell", type=Path, required=True, help="checkpoint folder to export")
    sp.add_argument(
        "--out",
        required=True,
        help="GGUF file to write; '{type}' is replaced by the type (needed with several --type)",
    )
    sp.add_argument(
        "--type",
        action="append",
        required=True,
        choices=GGUF_TYPES,
        help="GGUF type (repeatable): the converter's f32/f16/bf16/q8_0, or a llama.cpp "
        "quantisation",
    )
    sp.add_argument(
        "--tools", type=Path, default=DEFAULT_TOOLS, help="cache folder of llama.cpp's converter"
    )
    sp.add_argument("--sdist", type=Path, help=f"local {LLAMA_CPP_PYTHON} sdist (no download)")
    sp.add_argument("--threads", type=int, help="CPU threads for llama.cpp (default: up to 4)")


def cli_gguf_tools(a) -> None:
    """``mergebake gguf-tools``: fetch and extract llama.cpp's converter; print its record."""
    conv = converter(a.tools, sdist=a.sdist)
    print(json.dumps({"root": str(conv.root), **conv.record()}))


def add_gguf_tools_arguments(sp) -> None:
    sp.add_argument(
        "--tools", type=Path, default=DEFAULT_TOOLS, help="cache folder of llama.cpp's converter"
    )
    sp.add_argument("--sdist", type=Path, help=f"local {LLAMA_CPP_PYTHON} sdist (no download)")
