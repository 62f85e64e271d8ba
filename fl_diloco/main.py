"""`python -m fl_diloco.main train KEY=VALUE ...` is the same as `fl-diloco train ...`."""

import sys

from fl_diloco.cli import main

if __name__ == "__main__":
    sys.exit(main())
