"""``python -m mergebake``: the same as the ``mergebake`` command."""

import sys

from .cli import main

sys.exit(main())
