"""Exit codes of every command (``mome-seg``, ``mome-eval``, ``mome-convert``, ``python -m app``, the MAP), defined
once. Free of heavy imports, so that the supervisor (:mod:`app.cli.supervisor`) can use them; which error maps to
which code is :mod:`app.cli.exit_codes`.

===  ==========================================================================================================
0    done
1    internal error (a traceback was logged)
2    usage error: bad option, missing model, missing or malformed rules file, unusable output folder, bad
     ``MOME_MAX_*`` setting
3    input rejected: the reason is printed and nothing is written
130  stopped by SIGINT, 143 stopped by SIGTERM (:mod:`app.cli.supervisor`; nothing partial is left behind)
===  ==========================================================================================================

The bundle ships alone, so its own command (``python -m scripts.convert_upstream``, run by ``mome-convert``) numbers
0-3 the same way in its own constants; ``tests/test_vocabularies.py`` checks that they agree.
"""

from __future__ import annotations

import signal
from enum import IntEnum

__all__ = ["ExitCode"]


class ExitCode(IntEnum):
    """What a command's exit status means."""

    OK = 0
    INTERNAL = 1
    USAGE = 2
    REJECTED = 3
    SIGINT = 128 + signal.SIGINT
    SIGTERM = 128 + signal.SIGTERM
