"""``python -m moefy``: the ``moefy`` command."""

import sys

from moefy.cli import main

if __name__ == "__main__":
    sys.exit(main())
