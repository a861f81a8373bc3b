"""Where a base or an adapter comes from: the Hub, a local folder, or the demo generator.

The config gives each base and adapter as a one-key mapping (``{hub: {...}}``, ``{path:
...}`` or ``{demo: {...}}``; ``schemas/config.schema.yaml``). :func:`source_from_config`
turns that mapping into one of the frozen classes below, so the rest of the package asks
``source.kind`` or ``isinstance(source, HubSource)`` instead of looking for keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import ConfigError


@dataclass(frozen=True)
class HubSource:
    """A Hub repo at a revision (commit sha, tag or branch), optionally one subfolder."""

    kind: ClassVar[str] = "hub"
    repo: str
    revision: str
    subfolder: str | None = None

    @property
    def expected_base(self) -> str:
        """What an adapter's ``base_model_name_or_path`` should name for this base."""
        return self.repo

    def to_config(self) -> dict[str, Any]:
        """The config mapping this source was read from (``{"hub": {...}}``)."""
        hub: dict[str, Any] = {"repo": self.repo, "revision": self.revision}
        if self.subfolder is not None:
            hub["subfolder"] = self.subfolder
        return {"hub": hub}


@dataclass(frozen=True)
class PathSource:
    """A local checkpoint or PEFT adapter folder, used in place."""

    kind: ClassVar[str] = "path"
    path: str

    @property
    def expected_base(self) -> str:
        return self.path

    def to_config(self) -> dict[str, Any]:
        return {"path": self.path}


@dataclass(frozen=True)
class DemoSource:
    """A checkpoint or adapter the demo generator builds (:mod:`mergebake.demo`).

    ``params`` holds the generator's settings as sorted ``(name, value)`` pairs (bases:
    ``arch``, ``layers``, ``seed``; adapters: ``skill``, ``seed``)."""

    kind: ClassVar[str] = "demo"
    params: tuple[tuple[str, Any], ...]

    @property
    def spec(self) -> dict[str, Any]:
        """The generator settings as a mapping."""
        return dict(self.params)

    @property
    def expected_base(self) -> None:
        return None

    def to_config(self) -> dict[str, Any]:
        return {"demo": self.spec}


Source = HubSource | PathSource | DemoSource
KINDS = ("hub", "path", "demo")


#: Keys of an adapter's config entry besides its source (the checkpoint axis).
ADAPTER_KEYS = ("checkpoints", "select")


def source_from_config(
    src: Mapping[str, Any], key: str = "source", checkpoint: int | None = None
) -> Source:
    """The typed source of a config mapping ``{hub|path|demo: ...}`` found at ``key``.

    An adapter's ``checkpoints``/``select`` keys are not part of the source. With
    ``checkpoint``, the ``{checkpoint}`` placeholder of a Hub ``subfolder`` or local
    ``path`` is filled with it (a demo source is the training run's, unchanged).

    Raises :class:`mergebake.config.ConfigError` naming ``key`` when the mapping does not
    have exactly one of ``hub``, ``path``, ``demo`` (the schema already refuses that).
    """
    kinds = [k for k in src if k in KINDS] if isinstance(src, Mapping) else []
    extra = [k for k in src if k not in KINDS and k not in ADAPTER_KEYS] if kinds else []
    if len(kinds) != 1 or extra:
        raise ConfigError(f"key {key!r}: expected exactly one of {', '.join(KINDS)}")
    kind = kinds[0]
    value = src[kind]

    def fill(text: str) -> str:
        return text if checkpoint is None else text.replace("{checkpoint}", str(checkpoint))

    if kind == "hub":
        sub = value.get("subfolder")
        return HubSource(value["repo"], value["revision"], fill(sub) if sub else sub)
    if kind == "path":
        return PathSource(fill(str(value)))
    return DemoSource(tuple(sorted(value.items())))
