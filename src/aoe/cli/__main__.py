"""``python -m aoe.cli``: run the ``aoe`` command."""

import sys

from aoe.cli import main

sys.exit(main())
