"""``python -m deftune``: the same command as ``deftune`` (so ``torchrun -m deftune`` works too)."""

import sys

from deftune.cli import main

sys.exit(main())
