"""``python -m hagan.cli``: the command line, as torchrun launches it."""

import sys

from .commands import main

sys.exit(main())
