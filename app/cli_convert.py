"""``python -m app.cli_convert`` = ``mome-convert``."""

import sys

from app.cli import convert_main

sys.exit(convert_main())
