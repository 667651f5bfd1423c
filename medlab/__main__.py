"""``python -m medlab``: the same command line as ``medlab`` (see ``python -m medlab --help``)."""

import sys

from medlab.cli import main

if __name__ == "__main__":
    sys.exit(main())
