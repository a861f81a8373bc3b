"""Shared fixtures: one finished run of the demo grid for every workflow-level test."""

from __future__ import annotations

from pathlib import Path

import pytest
from _workflow import demo_config, snakemake, write_config


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    """A finished run of the default config (the offline demo grid) in a scratch folder."""
    wd = tmp_path_factory.mktemp("demo")
    write_config(wd / "config.yaml", demo_config())
    snakemake(wd, "--cores", "2")
    return wd
