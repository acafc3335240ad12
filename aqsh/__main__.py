"""``python -m aqsh``: the command line (aqsh.cli); the service it starts is aqsh.service."""

import sys

from aqsh.cli import main

if __name__ == "__main__":
    sys.exit(main())
