"""Device choice for bake, merge and eval: ``auto``, ``cpu`` or ``cuda[:N]``.

``auto`` uses CUDA when it is available *and usable* (a tiny allocation and matmul
succeed; inside containers ``torch.cuda.is_available()`` can be true while the first
kernel fails with "device busy or unavailable"), and otherwise falls back to the CPU with
a warning. ``cuda`` fails fast with a clear error when CUDA cannot be used.
"""

from __future__ import annotations

import functools
import logging
import warnings

from . import MergebakeError

log = logging.getLogger(__name__)
CHOICES = ("auto", "cpu", "cuda")


@functools.cache
def cuda_problem(index: int = 0) -> str | None:
    """Why CUDA device ``index`` cannot be used, or None when a small matmul runs on it."""
    try:
        import torch

        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False"
        if index >= torch.cuda.device_count():
            return f"no CUDA device {index} (found {torch.cuda.device_count()})"
        x = torch.ones(8, 8, device=f"cuda:{index}")
        (x @ x).sum().item()
    except Exception as e:  # RuntimeError: CUDA error: ... busy or unavailable, driver too old
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else e}"
    return None


def resolve_device(requested: str = "auto") -> str:
    """Return the torch device string to use for ``requested`` (``auto``/``cpu``/``cuda[:N]``).

    ``auto`` → ``cuda`` when usable, else ``cpu`` with a :class:`RuntimeWarning` saying why.
    Raises :class:`MergebakeError` for ``cuda[:N]`` when that device is not usable, and for
    any other value.
    """
    requested = (requested or "auto").strip().lower()
    if requested == "cpu":
        return "cpu"
    if requested == "auto":
        problem = cuda_problem(0)
        if problem is None:
            return "cuda"
        if "is_available() is False" not in problem:
            msg = f"CUDA is present but not usable ({problem}); falling back to CPU"
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            log.warning(msg)
        return "cpu"
    if requested == "cuda" or requested.startswith("cuda:"):
        index = int(requested.split(":", 1)[1]) if ":" in requested else 0
        problem = cuda_problem(index)
        if problem:
            raise MergebakeError(
                f"device {requested!r} requested but CUDA is not usable "
                f"({problem}); use device: auto or cpu"
            )
        return requested
    raise MergebakeError(f"device {requested!r}: expected one of auto, cpu, cuda or cuda:N")
