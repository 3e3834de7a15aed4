import sys

from aoe.cli import main

sys.exit(main())
