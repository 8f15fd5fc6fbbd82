"""``python -m lungdx``: the command line, as the ``lungdx`` script (and what ``torchrun -m lungdx`` starts)."""

import sys

from lungdx.cli import main

if __name__ == "__main__":
    sys.exit(main())
