"""`python -m psyface.transfer` runs the transfer stages (see `stage.py`)."""

import sys

from psyface.transfer.stage import main

if __name__ == "__main__":
    sys.exit(main())
