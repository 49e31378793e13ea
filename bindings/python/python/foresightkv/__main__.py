"""``python -m foresightkv``: the Python command line (see ``foresightkv.cli``)."""

import sys

from .cli import main

sys.exit(main())
