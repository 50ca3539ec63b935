"""``python -m titok_fast``: the ``titok-fast`` command."""

import sys

from .cli import main

sys.exit(main())
