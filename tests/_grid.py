"""Large grids for planning tests: demo-shaped bases, many methods (all rendered by the
linear recipe), so a config of any size validates without a single file on disk."""

from __future__ import annotations

from _workflow import demo_config


def big_config(sizes: int, variants: int, methods: int, base_path: str | None = None) -> dict:
    """A config of ``sizes × variants × methods`` cells (one group ``eng-nob``).

    Bases are demo bases, or all the local checkpoint ``base_path`` when given."""
    cfg = demo_config()
    size_names = [f"{i + 1}b" for i in range(sizes)]
    variant_names = [f"v{i:02d}" for i in range(variants)]
    cfg["bases"], cfg["adapters"] = {}, {}
    for i, s in enumerate(size_names):
        for j, v in enumerate(variant_names):
            base = f"{s}-{v}"
            seed = 1000 * i + j
            cfg["bases"][base] = (
                {"path": base_path}
                if base_path
                else {"demo": {"arch": "text", "layers": 1, "seed": seed}}
            )
            cfg["adapters"][base] = {
                "eng": {"demo": {"skill": "eng", "seed": 2 * seed}},
                "nob": {"demo": {"skill": "nob", "seed": 2 * seed + 1}},
            }
    method_names = [f"m{k:03d}" for k in range(methods)]
    cfg["methods"] = {
        m: {"recipe": "linear", "parameters": {"weight": {"eng": 0.5, "nob": 0.5}}}
        for m in method_names
    }
    cfg["grid"] = [
        {
            "sizes": size_names,
            "variants": variant_names,
            "groups": ["eng-nob"],
            "methods": method_names,
        }
    ]
    return cfg
