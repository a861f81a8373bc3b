"""The README's config reference agrees with schemas/config.schema.yaml: every key the
schema defines is documented, every documented key exists, and every default matches."""

from __future__ import annotations

import re

import yaml
from _workflow import ROOT

SCHEMA = yaml.safe_load((ROOT / "schemas" / "config.schema.yaml").read_text())
NO_DEFAULT = object()


def _resolve(node: dict) -> dict:
    ref = node.get("$ref", "")
    if ref.startswith("#/$defs/"):
        return {
            **SCHEMA["$defs"][ref.split("/")[-1]],
            **{k: v for k, v in node.items() if k != "$ref"},
        }
    return node


def schema_keys(node: dict | None = None, prefix: str = "") -> dict[str, object]:
    """Documented keys of the schema -> default (NO_DEFAULT where it has none).

    A mapping with fixed ``properties`` is walked into; a mapping of user-chosen names
    (``additionalProperties`` with a schema) appears as ``<name>`` and is walked into when
    its values have fixed properties of their own (``methods.<method>.recipe``); a list of
    mappings without a default (``grid``) is walked into as ``grid[].<key>``."""
    node = _resolve(node if node is not None else SCHEMA)
    out: dict[str, object] = {}
    for name, sub in (node.get("properties") or {}).items():
        sub = _resolve(sub)
        key = f"{prefix}{name}"
        inner = (
            _resolve(sub.get("additionalProperties") or {})
            if isinstance(sub.get("additionalProperties"), dict)
            else {}
        )
        items = _resolve(sub.get("items") or {}) if sub.get("type") == "array" else {}
        if sub.get("type") == "object" and sub.get("properties") and prefix.count("<") == 0:
            out.update(schema_keys(sub, f"{key}."))
        elif items.get("properties") and not prefix and "default" not in sub:
            out.update(schema_keys(items, f"{key}[]."))  # grid blocks: grid[].<key>
        elif sub.get("type") == "object" and inner.get("properties") and "propertyNames" in sub:
            out.update(schema_keys(inner, f"{key}.<>."))
        else:
            out[key] = sub.get("default", NO_DEFAULT)
    return out


def readme_rows() -> dict[str, str]:
    """README config-reference keys -> their default cell (one cell per key)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Config reference") :]
    section = section[: section.index("\n### ")]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        keys = re.findall(r"`([^`]+)`", cells[0])
        defaults = re.findall(r"`([^`]*)`", cells[1])
        for i, key in enumerate(keys):
            key = re.sub(r"<[^>]+>", "<>", key)
            rows[key] = defaults[i] if len(keys) == len(defaults) else cells[1]
    return rows


def _undocumented_ok(key: str) -> bool:
    # bases/adapters/groups rows document their whole value in one row
    return key.split(".")[0] in {"bases", "adapters", "groups"}


def test_every_schema_key_is_documented_with_its_default():
    rows = readme_rows()
    documented = {re.sub(r"\.<>$", "", k) for k in rows}
    problems = []
    for key, default in schema_keys().items():
        if key not in rows and key not in documented and not _undocumented_ok(key):
            problems.append(f"{key}: not in the README's config reference")
            continue
        cell = rows.get(key)
        if cell is None or default is NO_DEFAULT:
            continue
        if yaml.safe_load(cell) != default:
            problems.append(f"{key}: README says {cell!r}, schema default {default!r}")
    assert not problems, "\n".join(problems)


def test_every_documented_key_is_in_the_schema():
    keys = schema_keys()
    prefixes = {k.split(".")[0] for k in keys}
    unknown = [
        k
        for k in readme_rows()
        if k not in keys and not (_undocumented_ok(k) and k.split(".")[0] in prefixes)
    ]
    assert not unknown
