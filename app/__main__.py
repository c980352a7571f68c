"""``python -m app -i IN -o OUT [-m MODEL]``: run the MoME Deploy application (see ``app/app.py``).

The work runs in a supervised child process (``app.supervisor``): SIGTERM / SIGINT stop it at once, with exit code
143 / 130 and nothing partial left behind.
"""

import sys

from app.supervisor import is_supervised, supervise

if __name__ == "__main__":
    if is_supervised():
        from app.app import main

        sys.exit(main())
    sys.exit(supervise([sys.executable, "-m", "app", *sys.argv[1:]], "python -m app"))
