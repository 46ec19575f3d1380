"""``python -m kvant``: the ``kvant`` command (kvant.cli)."""

import sys

from .cli import main

sys.exit(main())
