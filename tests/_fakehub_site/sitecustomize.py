"""Tests only: route huggingface_hub to the fake Hub in every Python process.

The workflow tests put this folder on PYTHONPATH and set MERGEBAKE_FAKE_HUB to the fake's
state folder, so the `mergebake` jobs Snakemake starts talk to the fake (tests/_fakehub.py),
never to the Hub. Without MERGEBAKE_FAKE_HUB this does nothing.
"""

import os
import sys

if os.environ.get("MERGEBAKE_FAKE_HUB"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from _fakehub import install_from_env

    install_from_env()
