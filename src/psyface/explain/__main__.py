"""`python -m psyface.explain` runs the DVC stage (see `stage.py`)."""

import sys

from psyface.explain.stage import main

if __name__ == "__main__":
    sys.exit(main())
