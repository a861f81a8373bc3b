"""Why mergebake keys its own eval cache: Snakemake's between-workflow cache has no early
cutoff.

Snakemake 9.27 (``snakemake/caching/hash.py``, ``ProvenanceHashMap``) keys a ``cache:``
rule's outputs by a provenance hash: the rule's shell command (unformatted), its params,
the checksums of its inputs that no other job produces, its software environment, and, for
each input another job produces, that job's own provenance hash, recursively. The content
of a produced input is never read. So when an upstream job reruns (its own input edited)
and writes byte-identical output, the downstream key still changes, and the downstream job
is recomputed, not fetched. That is the case of a merge rerun by a recipe comment edit: its
weights are the same bytes, its evals would run again. (Its ``local.py`` would serve our
outputs otherwise: named multi-file outputs are allowed, a directory is stored whole and
fetched as a folder of per-entry symlinks; but ``cache:`` also refuses rules with a
``benchmark:``, which the eval rules have, and replaces each stored output by a symlink
into the shared cache.)

The tiny workflow below shows it: ``producer`` drops comment lines from ``src.txt``;
``consumer`` (cached, ``--cache consumer``) copies the result into a folder and counts
its runs.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from _workflow import BIN, env

pytestmark = pytest.mark.workflow

SNAKEFILE = """
rule consumer:
    input:
        "prod.txt",
    output:
        directory("cons"),
    cache: True
    shell:
        "mkdir {output} && cp {input} {output}/a.txt && echo ran >> consumer-runs.txt"


rule producer:
    input:
        "src.txt",
    output:
        "prod.txt",
    shell:
        "grep -v '^#' {input} > {output}"
"""


def _run(wd: Path, cache: Path) -> str:
    e = env()
    e["SNAKEMAKE_OUTPUT_CACHE"] = str(cache)
    p = subprocess.run(
        [str(BIN / "snakemake"), "--cores", "1", "--cache", "consumer", "cons"],
        cwd=wd,
        env=e,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout + p.stderr


def _runs(wd: Path) -> int:
    return len((wd / "consumer-runs.txt").read_text().splitlines())


def test_snakemake_cache_recomputes_after_a_byte_identical_upstream_rerun(tmp_path):
    wd, cache = tmp_path / "wd", tmp_path / "cache"
    wd.mkdir()
    cache.mkdir()
    (wd / "Snakefile").write_text(SNAKEFILE)
    (wd / "src.txt").write_text("# a comment\npayload\n")

    _run(wd, cache)
    assert _runs(wd) == 1
    stored = [p.name for p in cache.iterdir()]
    assert len(stored) == 1 and len(stored[0]) == 64  # <provenance hash>: a folder output
    assert (wd / "cons").is_symlink()  # the output itself now lives in the cache
    assert os.path.realpath(wd / "cons") == str(cache / stored[0])

    # Control: with nothing upstream changed, a deleted output is fetched, not recomputed:
    # a folder of symlinks to the entry's files.
    (wd / "cons").unlink()
    log = _run(wd, cache)
    assert _runs(wd) == 1
    assert "from cache" in log and "to cache" not in log
    assert (wd / "cons").is_dir() and not (wd / "cons").is_symlink()
    assert (wd / "cons/a.txt").is_symlink() and (wd / "cons/a.txt").read_text() == "payload\n"

    # Edit only the comment: producer reruns and writes the same bytes ...
    before = (wd / "prod.txt").read_bytes()
    (wd / "src.txt").write_text("# an edited comment\npayload\n")
    log = _run(wd, cache)
    assert (wd / "prod.txt").read_bytes() == before
    # ... yet the consumer gets a new key and is recomputed, not fetched.
    assert _runs(wd) == 2
    assert len(list(cache.iterdir())) == 2
    assert "Moving output file cons to cache" in log
