"""mergebake: a declarative merge-and-bake build system for LLM checkpoints.

Each stage of the pipeline (demo, fetch, bake, normalise, merge, verify, eval,
report, upload) is a plain function in its own module and a ``mergebake <stage>``
subcommand; the Snakemake workflow in the repository root only wires them together.
"""

__version__ = "0.1.0"


class MergebakeError(Exception):
    """An error the user can fix: the message names the file or config key at fault."""
