"""The errors of the public Python API (``app.api``), besides those of the operators and the bundle it passes on.

Every failure the API raises is one of these kinds; :mod:`app.cli.exit_codes` maps each kind to an exit code:

* a usage error: :class:`UsageError`, a missing model (``FileNotFoundError``), a missing or malformed rules file
  (:class:`operators.modality_router.RulesFileError`), an output folder that cannot take results
  (:class:`operators.output_folder.UnusableOutputFolder`), a bad ``MOME_MAX_*`` setting
  (:class:`operators.limits.LimitSettingError`);
* a rejected input: :class:`InputRejected`, :class:`operators.study.NothingToSegment`, an input over a limit
  (:class:`operators.limits.LimitExceeded`), a folder or zip that cannot be read safely
  (:class:`operators.study_loader.ArchiveRejected`), a series that cannot be made a volume
  (:class:`operators.dicom_series.SeriesRejected`), a volume or registration that fails its checks
  (``scripts.registration.VolumeRejected``). Their messages name the file or series and why.
"""

from __future__ import annotations

__all__ = ["InputRejected", "UsageError"]


class UsageError(Exception):
    """The call itself is wrong (an unknown option, a mode the bundle has no model for); nothing was read."""


class InputRejected(ValueError):
    """The input cannot be segmented or evaluated; the message names the file and the reason."""
