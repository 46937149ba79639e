"""``python -m xvariants.interpret flow ckpt_path=... text="..." tau=0.1`` (see :mod:`xvariants.interpret.cli`)."""

import sys

from xvariants.interpret.cli import main

if __name__ == "__main__":
    sys.exit(main())
