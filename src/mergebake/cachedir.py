"""Where mergebake's caches live, and the switch that turns them off.

One root holds every cache: ``eval/`` (:mod:`mergebake.evalcache`, scores of
byte-identical weights) and ``layout/`` (:mod:`mergebake.layouts`, key layouts of a base).
It is ``$MERGEBAKE_CACHE``, else ``$XDG_CACHE_HOME/mergebake``, else
``~/.cache/mergebake``; ``MERGEBAKE_NO_CACHE`` set to anything but
``""``/``0``/``false``/``no``/``off`` turns both off. The workflow passes its ``cache:``
config through these two variables (:func:`mergebake.evalcache.environment`).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_DIR = "MERGEBAKE_CACHE"
ENV_OFF = "MERGEBAKE_NO_CACHE"
_FALSE = {"", "0", "false", "no", "off"}


def default_dir() -> Path:
    """``$MERGEBAKE_CACHE``, else ``$XDG_CACHE_HOME/mergebake``, else ``~/.cache/mergebake``."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return root / "mergebake"


def disabled_by_env() -> bool:
    """True when ``$MERGEBAKE_NO_CACHE`` is set to anything but ``""``/``0``/``false``/``no``."""
    return os.environ.get(ENV_OFF, "").strip().lower() not in _FALSE


__all__ = ["ENV_DIR", "ENV_OFF", "default_dir", "disabled_by_env"]
