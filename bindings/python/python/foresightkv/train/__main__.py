"""``python -m foresightkv.train ARGS`` = ``foresightkv train ARGS``."""

import sys

from .cli import run

sys.exit(run(["train", *sys.argv[1:]]))
