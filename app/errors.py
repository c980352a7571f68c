"""The errors of the public Python API (``app.api``), besides those of the operators and the bundle it passes on.

Every failure the API raises is one of these kinds; :mod:`app.cli.exit_codes` maps each kind to an exit code:

* a usage error: :class:`UsageError`, a missing model or rules file (``FileNotFoundError``), an output folder that
  cannot take results (:class:`operators.output_folder.UnusableOutputFolder`), a bad ``MOME_MAX_*`` setting
  (:class:`operators.limits.LimitSettingError`);
* a rejected input: :class:`InputRejected`, :class:`operators.study.NothingToSegment`, an input over a limit
  (:class:`operators.limits.LimitExceeded`), a volume or registration that fails its checks
  (``scripts.registration.VolumeRejected``) — each a ``ValueError`` whose message names the file or series and why.
"""

from __future__ import annotations

__all__ = ["InputRejected", "UsageError"]


class UsageError(Exception):
    """The call itself is wrong (an unknown option, a mode the bundle has no model for); nothing was read."""


class InputRejected(ValueError):
    """The input cannot be segmented or evaluated; the message names the file and the reason."""
