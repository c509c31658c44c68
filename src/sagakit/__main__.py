"""``python -m sagakit``: the ``sagakit`` command, for environments without its script."""

import sys

from sagakit.cli import main

sys.exit(main())
