"""`python -m finetune ...`: the same command as `finetune ...` (the console script in pyproject.toml)."""

import sys

from .cli import main

sys.exit(main(prog="python -m finetune"))
