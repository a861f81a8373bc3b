"""The workflow's domain model, with no Snakemake import.

- :mod:`.sources`: where a base or adapter comes from (Hub, local path, demo), as classes;
- :mod:`.layout`: the output path layout, one table of templates the rules use;
- :mod:`.tasks`: which files of an lm-eval task folder each task reads;
- :mod:`.plan`: :class:`Plan`, the grid as the workflow builds it (cells, baselines,
  inputs, report rows, card specs, pins, payloads, job sizing, the disk estimate).

``rules/common.smk`` builds one :class:`Plan` and wires its answers to the rules; the
commands each job runs are built in :mod:`mergebake.commands`.
"""

from ..config import BASE_ROW
from .layout import LAYOUT, REPORT_OUTPUTS, path, payload_path
from .plan import Plan, dumps, local_files, write_payload
from .sources import DemoSource, HubSource, PathSource, Source, source_from_config

__all__ = [
    "BASE_ROW",
    "LAYOUT",
    "REPORT_OUTPUTS",
    "DemoSource",
    "HubSource",
    "PathSource",
    "Plan",
    "Source",
    "dumps",
    "local_files",
    "path",
    "payload_path",
    "source_from_config",
    "write_payload",
]
