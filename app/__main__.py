"""``python -m app -i IN -o OUT [-m MODEL]``: run the MoME Deploy application (:mod:`app.cli.application`).

The work runs in a supervised child process (:mod:`app.cli.supervisor`): SIGTERM / SIGINT stop it at once, with exit
code 143 / 130 and nothing partial left behind.
"""

import sys

from app.cli.supervisor import is_supervised, supervise

if __name__ == "__main__":
    if is_supervised():
        from app.cli.application import main

        sys.exit(main())
    sys.exit(supervise([sys.executable, "-m", "app", *sys.argv[1:]], "python -m app"))
