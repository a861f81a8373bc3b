"""Helpers to run the Snakemake workflow from tests: in a scratch working directory, with
the repository's Snakefile, and read the exact set of jobs a dry run schedules."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Every workflow run in the tests carries this fake token, so a test can grep all that a
# run wrote for it (it must appear nowhere). It is not a real token.
FAKE_TOKEN = "hf_mergebakeFAKEtestTOKENxxxxxxxxxxxxxx"


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e.setdefault("HF_HUB_OFFLINE", "1")
    e["HF_TOKEN"] = FAKE_TOKEN
    e.setdefault("TOKENIZERS_PARALLELISM", "false")
    return e


CACHE_ENV = "MERGEBAKE_CACHE"  # mergebake.evalcache.ENV_DIR


def eval_cache(workdir: Path) -> Path:
    """The eval cache of the runs in ``workdir``: a folder beside it, its own."""
    return workdir.parent / f"{workdir.name}.eval-cache"


def snakemake(
    workdir: Path,
    *args: str,
    config: Path | None = None,
    check: bool = True,
    timeout: float = 3600,
    environ: dict[str, str] | None = None,
    snakefile: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run snakemake on the repository's Snakefile (or ``snakefile``) in ``workdir``; return
    the completed run.

    ``environ`` replaces the environment (default: :func:`env`). Evals use the cache
    :func:`eval_cache` of ``workdir``, so no two working directories share one and nothing
    touches the user's, unless ``environ`` names another ``MERGEBAKE_CACHE`` than the
    session's scratch one (``tests/conftest.py``)."""
    e = dict(environ) if environ is not None else env()
    if e.get(CACHE_ENV) in (None, os.environ.get(CACHE_ENV)):
        e[CACHE_ENV] = str(eval_cache(workdir))
    cmd = [
        str(BIN / "snakemake"),
        "-s",
        str(snakefile or ROOT / "Snakefile"),
        "-d",
        str(workdir),
        "--configfile",
        str(config or workdir / "config.yaml"),
        *args,
    ]
    p = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed ({p.returncode}):\n"
            f"{p.stdout[-6000:]}\n{p.stderr[-6000:]}"
        )
    return p


_JOB = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):\n(?:    .*\n)*?    output: (.*)$", re.M)


def planned_jobs(workdir: Path, config: Path | None = None) -> set[tuple[str, str]]:
    """The jobs a dry run schedules, as ``{(rule, first output)}``; ``all`` is left out."""
    p = snakemake(workdir, "-n", "--cores", "1", config=config)
    out = p.stdout + p.stderr
    jobs = {(m.group(1), m.group(2).split(", ")[0]) for m in _JOB.finditer(out)}
    if "Nothing to be done" not in out and not jobs:
        raise AssertionError(f"could not read the dry run's jobs:\n{out[-3000:]}")
    return jobs


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def demo_config() -> dict:
    return yaml.safe_load((ROOT / "config.yaml").read_text())
