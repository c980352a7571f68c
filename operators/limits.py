"""Limits on what one input may cost, checked before the work is done: archive extraction and pixel decoding.

A zip is checked on its central directory (member count, total declared size, compression ratio) before anything is
extracted, and a series on its headers (matrix, slices, voxels) before any pixel data is read or decoded, so a small
input that declares a huge expansion is refused without the memory or disk it asks for. Every limit is a field of
:class:`InputLimits`; its environment variable is ``MOME_`` + the field name in capitals (``max_matrix`` ->
``MOME_MAX_MATRIX``). An input over a limit raises :class:`LimitExceeded` (a ``ValueError``: the application exits 3,
"input rejected"), whose message names the input, the limit, its variable, the value found and the limit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from operators.dicom_series import SeriesRejected

__all__ = [
    "ENV_PREFIX",
    "InputLimits",
    "LimitExceeded",
    "LimitSettingError",
    "SeriesLimitExceeded",
    "check_series",
    "env_var",
]

ENV_PREFIX = "MOME_"
GIB = 1 << 30
DEFAULT_ONE = ("NumberOfFrames", "SamplesPerPixel")  # header values that may be absent (then 1); Rows, Columns not


def _limit(default: int | float, what: str) -> Any:
    """A limit field: its default and what it counts (for messages)."""
    return field(default=default, metadata={"what": what})


class LimitSettingError(ValueError):
    """A limit set to something other than a positive number (names the variable or field and the value)."""


@dataclass(frozen=True)
class InputLimits:
    """The most one input may hold; each default is overridden by ``MOME_<FIELD NAME IN CAPITALS>``.

    Attributes:
        max_archive_members: entries (files and folders) in a zip; a real study has a few thousand instances.
        max_archive_bytes: total uncompressed size of a zip's members, also the disk its extraction may use.
        max_archive_ratio: total uncompressed size / the zip's size on disk. Real DICOM zips measure 2-7, synthetic
            series with a zero background 150-750 (deflate); a deflate stream of zeros reaches about 1030, other
            methods far more, and overlapping members any ratio.
        max_matrix: Rows and Columns of an image; clinical MR matrices rarely exceed 1024.
        max_slices: slices (single-frame instances, or frames of a multi-frame instance) in one series.
        max_series_voxels: Rows x Columns x slices summed over a series (2**27 = 512**3; about 0.5 GiB as float32).
    """

    max_archive_members: int = _limit(50_000, "the number of archive members")
    max_archive_bytes: int = _limit(2 * GIB, "the total uncompressed size (bytes)")
    max_archive_ratio: float = _limit(1000.0, "the compression ratio (uncompressed / archive size)")
    max_matrix: int = _limit(2048, "the matrix (largest of Rows and Columns)")
    max_slices: int = _limit(4096, "the number of slices (instances or frames)")
    max_series_voxels: int = _limit(2**27, "the number of voxels (Rows x Columns x slices)")

    def __post_init__(self) -> None:
        for limit in fields(self):
            value = getattr(self, limit.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not _positive(value):
                raise LimitSettingError(f"InputLimits.{limit.name} = {value!r}: expected a positive number.")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> InputLimits:
        """The defaults, overridden by the ``MOME_MAX_*`` variables set in ``environ`` (default ``os.environ``).

        Raises:
            LimitSettingError: a variable that is not a positive number (an integer, except the ratio).
        """
        environ = os.environ if environ is None else environ
        values = {}
        for limit in fields(cls):
            text = environ.get(env_var(limit.name))
            if text is not None and text.strip():
                values[limit.name] = _parse(limit.name, text, type(limit.default))
        return cls(**values)

    def check(self, limit: str, found: int | float, subject: str, error: type[LimitExceeded] | None = None) -> None:
        """Raises ``error`` (default :class:`LimitExceeded`) when ``found`` is over ``limit`` (a field name)."""
        allowed = getattr(self, limit)
        if found > allowed:
            raise (error or LimitExceeded)(subject, limit, found, allowed)


def env_var(limit: str) -> str:
    """The environment variable of a limit (an :class:`InputLimits` field name)."""
    return ENV_PREFIX + limit.upper()


def _positive(value: int | float) -> bool:
    return math.isfinite(value) and value > 0


def _parse(limit: str, text: str, kind: type) -> int | float:
    try:
        value = kind(text.strip())
    except ValueError:
        value = None
    if value is None or not _positive(value):
        expected = "a positive integer" if kind is int else "a positive number"
        raise LimitSettingError(f"{env_var(limit)}={text!r}: expected {expected} ({_what(limit)}).")
    return value


def _what(limit: str) -> str:
    return next(f.metadata["what"] for f in fields(InputLimits) if f.name == limit)


def _number(value: int | float) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


class LimitExceeded(ValueError):
    """An input over one of the :class:`InputLimits`; the message names the input, the limit, its variable, the
    value found and the limit."""

    def __init__(self, subject: str, limit: str, found: int | float, allowed: int | float) -> None:
        self.subject, self.limit, self.found, self.allowed = subject, limit, found, allowed
        super().__init__(
            f"{subject}: {_what(limit)} is {_number(found)}, over the limit of {_number(allowed)} "
            f"({limit}; set {env_var(limit)} to change it)."
        )

    def __reduce__(self) -> tuple[type, tuple[str, str, int | float, int | float]]:
        return type(self), (self.subject, self.limit, self.found, self.allowed)  # picklable despite its signature


class SeriesLimitExceeded(LimitExceeded, SeriesRejected):
    """A series over a limit: recorded as rejected like any series that cannot become a volume."""


def check_series(instances: Sequence[Any], name: str, limits: InputLimits) -> None:
    """Checks a series' declared size on its headers, before any pixel data is read or decoded.

    Raises:
        SeriesRejected: an instance without a positive Rows/Columns or NumberOfFrames, or with several samples per
            pixel (only monochrome images are segmented).
        SeriesLimitExceeded: the matrix, the slice count or the voxel count is over its limit.
    """
    slices = voxels = 0
    for ds in instances:
        rows, columns, frames = (_declared(ds, keyword, name) for keyword in ("Rows", "Columns", "NumberOfFrames"))
        if _declared(ds, "SamplesPerPixel", name) != 1:
            uid = getattr(ds, "SOPInstanceUID", "?")
            raise SeriesRejected(f"{name}: instance {uid} has several samples per pixel (not a monochrome image).")
        limits.check("max_matrix", max(rows, columns), name, SeriesLimitExceeded)
        slices += frames
        voxels += rows * columns * frames
    limits.check("max_slices", slices, name, SeriesLimitExceeded)
    limits.check("max_series_voxels", voxels, name, SeriesLimitExceeded)


def check_volume(shape: Sequence[int], name: str, limits: InputLimits) -> None:
    """Checks a volume's declared shape (a NIfTI header's) before its data are read: the two largest axes against
    ``max_matrix``, the smallest against ``max_slices``, all voxels (every axis) against ``max_series_voxels``.

    Raises:
        LimitExceeded: one of them is over its limit.
    """
    spatial = sorted(int(n) for n in list(shape)[:3])
    if len(spatial) == 3:
        limits.check("max_matrix", spatial[-1], name)
        limits.check("max_slices", spatial[0], name)
    limits.check("max_series_voxels", math.prod(int(n) for n in shape), name)


def _declared(ds: Any, keyword: str, name: str) -> int:
    """A positive integer header value; rejects the series when it is missing (Rows, Columns) or not positive."""
    value = getattr(ds, keyword, None)
    if value in (None, "") and keyword in DEFAULT_ONE:
        return 1
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number <= 0:
        uid = getattr(ds, "SOPInstanceUID", "?")
        raise SeriesRejected(f"{name}: instance {uid} has no positive {keyword} ({value!r}).")
    return number
