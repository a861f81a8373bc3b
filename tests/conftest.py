"""Shared fixtures: one finished run of the demo grid for every workflow-level test."""

from __future__ import annotations

from pathlib import Path

import pytest
from _workflow import demo_config, snakemake, write_config


@pytest.fixture(scope="session", autouse=True)
def _scratch_eval_cache(tmp_path_factory):
    """No test reads or writes the user's eval cache (``~/.cache/mergebake``): evals in
    this process and in the processes it starts use a scratch one; each Snakemake run of
    ``_workflow.snakemake`` gets its working directory's own (``_workflow.eval_cache``)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MERGEBAKE_CACHE", str(tmp_path_factory.getbasetemp() / "eval-cache"))
        mp.delenv("MERGEBAKE_NO_CACHE", raising=False)
        yield


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    """A finished run of the default config (the offline demo grid) in a scratch folder."""
    wd = tmp_path_factory.mktemp("demo")
    write_config(wd / "config.yaml", demo_config())
    snakemake(wd, "--cores", "2")
    return wd
