"""``python -m balancedbio ...`` is the ``balancedbio`` command."""

import sys

from balancedbio.cli import main

if __name__ == "__main__":
    sys.exit(main())
