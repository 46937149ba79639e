"""``python -m xvariants.interpret flow|trace key=value ...`` (see :mod:`xvariants.interpret.cli`)."""

import sys

from xvariants.interpret.cli import main

if __name__ == "__main__":
    sys.exit(main())
