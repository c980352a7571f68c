"""``python -m app.cli_convert`` = ``mome-convert``."""

import sys

from app.cli import convert_main

if __name__ == "__main__":
    sys.exit(convert_main())
