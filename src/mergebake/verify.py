"""Verify a checkpoint against a reference before it counts as built.

mergekit can exit 0 with tensors silently missing; this is the step that catches it.
:func:`verify_checkpoint` collects every difference between a candidate and its
reference (normally the normalised base) and raises one :class:`VerificationError`
listing them all:

- tensor names missing or unexpected, shapes and dtypes that differ (from headers);
- ``config.json`` differences outside the allowed keys, compared with JSON types
  (``true`` and ``1`` differ, although Python says ``True == 1``);
- NaN/Inf in any floating tensor (streamed one tensor at a time);
- whether ``AutoModelForCausalLM`` loads it with no missing, unexpected or mismatched
  keys (on the meta device: no tensor data is read);
- tokenizer files present and ``AutoTokenizer.from_pretrained`` working.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from . import MergebakeError
from .checkpoint import TOKENIZER_FILES, read_config, tensor_index
from .safetensors_io import TensorInfo, scan_nonfinite

log = logging.getLogger(__name__)

ALWAYS_ALLOWED = frozenset({"transformers_version"})


class VerificationError(MergebakeError):
    """A checkpoint failed verification; ``problems`` lists every difference found."""

    def __init__(self, candidate: Path, reference: Path, problems: list[str]):
        self.candidate = candidate
        self.reference = reference
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"{candidate}: failed verification against {reference} "
            f"({len(problems)} problem(s)):\n{lines}"
        )


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _json_type(value: Any) -> str:
    if isinstance(value, bool):  # before int: bool is a subclass of int
        return "bool"
    for t, name in (
        (int, "int"),
        (float, "float"),
        (str, "string"),
        (list, "array"),
        (dict, "object"),
    ):
        if isinstance(value, t):
            return name
    return "null" if value is None else type(value).__name__


def _show(value: Any, limit: int = 120) -> str:
    text = json.dumps(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{text} ({_json_type(value)})"


def _allowed(path: str, allowed: frozenset[str]) -> bool:
    """``path`` (``a.b[0].c``) is allowed when it or an ancestor is listed."""
    if path.rsplit(".", 1)[-1] in ALWAYS_ALLOWED:
        return True
    parts = path.replace("[", ".[").split(".")
    return any(".".join(parts[:i]).replace(".[", "[") in allowed for i in range(1, len(parts) + 1))


def diff_json(
    candidate: Any, reference: Any, allowed: Iterable[str] = (), path: str = ""
) -> list[str]:
    """Differences between two JSON values, type-strict, one line per differing leaf.

    Lines read ``config.json <path>: <candidate> (<type>), reference <reference> (<type>)``;
    a key only on one side is ``missing`` or ``unexpected``.
    """
    allowed = frozenset(allowed)
    out: list[str] = []
    where = f"config.json {path or '<root>'}"
    if path and _allowed(path, allowed):
        return out
    if isinstance(candidate, dict) and isinstance(reference, dict):
        for key in sorted(set(candidate) | set(reference)):
            sub = f"{path}.{key}" if path else key
            if _allowed(sub, allowed):
                continue
            if key not in candidate:
                out.append(f"config.json {sub}: missing, reference {_show(reference[key])}")
            elif key not in reference:
                out.append(f"config.json {sub}: unexpected {_show(candidate[key])}")
            else:
                out += diff_json(candidate[key], reference[key], allowed, sub)
        return out
    if isinstance(candidate, list) and isinstance(reference, list):
        if len(candidate) != len(reference):
            return [f"{where}: {_show(candidate)}, reference {_show(reference)}"]
        for i, (c, r) in enumerate(zip(candidate, reference, strict=True)):
            out += diff_json(c, r, allowed, f"{path}[{i}]")
        return out
    if _json_type(candidate) != _json_type(reference) or candidate != reference:
        out.append(f"{where}: {_show(candidate)}, reference {_show(reference)}")
    return out


def compare_tensors(
    candidate: dict[str, TensorInfo], reference: dict[str, TensorInfo]
) -> list[str]:
    """Missing/unexpected tensor names, then shape and dtype differences, from headers."""
    out = [
        f"tensor {n}: missing (the reference has it)"
        for n in sorted(set(reference) - set(candidate))
    ]
    out += [
        f"tensor {n}: unexpected (not in the reference)"
        for n in sorted(set(candidate) - set(reference))
    ]
    for n in sorted(set(candidate) & set(reference)):
        c, r = candidate[n], reference[n]
        if c.shape != r.shape:
            out.append(f"tensor {n}: shape {list(c.shape)}, reference {list(r.shape)}")
        if c.dtype != r.dtype:
            out.append(f"tensor {n}: dtype {c.dtype}, reference {r.dtype}")
    return out


def nonfinite_problems(tensors: dict[str, TensorInfo]) -> list[str]:
    """One line per floating tensor holding NaN or Inf (see
    :func:`mergebake.safetensors_io.scan_nonfinite`: one tensor in memory at a time)."""
    return [
        f"tensor {name}: {bad} NaN/Inf value(s) of {numel}"
        for name, bad, numel in scan_nonfinite(tensors)
    ]


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_problems(folder: Path) -> list[str]:
    """Whether ``AutoModelForCausalLM`` loads ``folder`` with every key matched.

    Loads onto the meta device (config and safetensors headers only, no tensor data),
    so tied and non-persistent parameters and transformers' own key renamings are
    handled exactly as in a real load.
    """
    from transformers import AutoModelForCausalLM

    try:
        with _quiet_transformers():
            _, info = AutoModelForCausalLM.from_pretrained(
                folder,
                device_map="meta",
                output_loading_info=True,
                ignore_mismatched_sizes=True,
                trust_remote_code=False,
            )
    except Exception as e:  # any failure to load is a finding, not a crash
        return [f"load: AutoModelForCausalLM.from_pretrained failed: {_one_line(e)}"]
    out = [f"load: missing key {k}" for k in sorted(info.get("missing_keys", ()))]
    out += [f"load: unexpected key {k}" for k in sorted(info.get("unexpected_keys", ()))]
    for item in sorted(info.get("mismatched_keys", ()), key=str):
        key = item[0] if isinstance(item, tuple) else item
        out.append(f"load: shape mismatch {key}")
    out += [f"load: {m}" for m in info.get("error_msgs", ())]
    return out


def tokenizer_problems(candidate: Path, reference: Path) -> list[str]:
    """Tokenizer files the reference has must be there, and ``AutoTokenizer`` must load.

    A reference without tokenizer files (a bare weights checkpoint) asks for none: the
    step did not lose them."""
    from transformers import AutoTokenizer

    present = [n for n in TOKENIZER_FILES if (candidate / n).is_file()]
    out = [
        f"tokenizer: {n} missing (the reference has it)"
        for n in TOKENIZER_FILES
        if (reference / n).is_file() and n not in present
    ]
    if not present:
        return out
    try:
        with _quiet_transformers():
            tok = AutoTokenizer.from_pretrained(candidate, trust_remote_code=False)
            ref = AutoTokenizer.from_pretrained(reference, trust_remote_code=False)
    except Exception as e:
        return [*out, f"tokenizer: AutoTokenizer.from_pretrained failed: {_one_line(e)}"]
    if len(tok) != len(ref):
        out.append(f"tokenizer: {len(tok)} tokens, reference {len(ref)}")
    return out


def find_problems(
    candidate: str | os.PathLike,
    reference: str | os.PathLike,
    *,
    allowed_config_keys: Iterable[str] = (),
    load: bool = True,
    check_tokenizer: bool = True,
    scan_values: bool = True,
) -> list[str]:
    """Every difference between ``candidate`` and ``reference``, one line each; [] when none.

    ``allowed_config_keys`` are dotted config paths (``dtype``, ``text_config.dtype``) the
    candidate may change; ``transformers_version`` is always allowed. Without
    ``scan_values`` the tensors' values are not read for NaN/Inf (for a writer that
    checked each tensor while it had it in memory).
    """
    candidate, reference = Path(candidate), Path(reference)
    if not candidate.is_dir():
        return [f"{candidate}: does not exist"]
    ref_tensors = tensor_index(reference)  # a broken reference is the caller's error
    problems: list[str] = []
    try:
        cand_tensors = tensor_index(candidate)
    except MergebakeError as e:
        problems.append(f"weights: {e}")
        cand_tensors = None
    if cand_tensors is not None:
        problems += compare_tensors(cand_tensors, ref_tensors)
    try:
        problems += diff_json(read_config(candidate), read_config(reference), allowed_config_keys)
    except MergebakeError as e:
        problems.append(f"config: {e}")
    if cand_tensors is not None and scan_values:
        problems += nonfinite_problems(cand_tensors)
    if load and cand_tensors is not None:
        problems += load_problems(candidate)
    if check_tokenizer:
        problems += tokenizer_problems(candidate, reference)
    return problems


def verify_checkpoint(
    candidate: str | os.PathLike,
    reference: str | os.PathLike,
    *,
    allowed_config_keys: Iterable[str] = (),
    load: bool = True,
    check_tokenizer: bool = True,
    remove_on_failure: bool = False,
    scan_values: bool = True,
) -> None:
    """Raise :class:`VerificationError` listing every difference of ``candidate`` vs ``reference``.

    With ``remove_on_failure`` the candidate folder is deleted before raising, so a
    build system never mistakes it for a finished output. ``scan_values``: see
    :func:`find_problems`. Returns None when it passes.
    """
    candidate, reference = Path(candidate), Path(reference)
    problems = find_problems(
        candidate,
        reference,
        allowed_config_keys=allowed_config_keys,
        load=load,
        check_tokenizer=check_tokenizer,
        scan_values=scan_values,
    )
    if not problems:
        log.info("verify %s against %s: ok", candidate, reference)
        return
    err = VerificationError(candidate, reference, problems)
    if remove_on_failure and candidate.exists():
        log.error("%s; removing %s", err, candidate)
        shutil.rmtree(candidate)
    raise err


def verify_after_merge(
    merged: str | os.PathLike,
    base: str | os.PathLike,
    *,
    allowed_config_keys: Iterable[str] = (),
    remove_on_failure: bool = True,
) -> None:
    """Verify a mergekit output against its (normalised) base, removing it on failure.

    The design's contract for a merged cell: same tensors, shapes and dtypes as the base,
    the same config apart from ``allowed_config_keys`` (mergekit 0.1.5 on transformers 5
    rewrites ``config.json`` unchanged, so none are needed by default), loads, finite,
    tokenizer usable.
    """
    verify_checkpoint(
        merged, base, allowed_config_keys=allowed_config_keys, remove_on_failure=remove_on_failure
    )
