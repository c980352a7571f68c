"""``python -m app -i IN -o OUT [-m MODEL]``: run the MoME Deploy application (see ``app/app.py``)."""

import sys

from app.app import main

if __name__ == "__main__":
    sys.exit(main())
