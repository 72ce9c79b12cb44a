"""``python -m veil.cli``: the same as the ``veil`` command."""

import sys

from veil.cli import main

sys.exit(main())
