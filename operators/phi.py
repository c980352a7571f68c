"""Patient identifiers (PHI) kept out of everything MoME prints, logs or writes, the DICOM SEG and SR excepted.

Product rule: patient names and IDs are never printed, logged or reported (UIDs are fine). Libraries do not follow it:
highdicom's warning about a person name without ``^`` quotes the name, pydicom's validation warnings and logs quote
values, and a technologist may type the patient's name into a SeriesDescription that the report and the rejection
reasons show. So every input header is *registered* as it is read (:func:`register_dataset` by
``operators.study_loader.scan_studies``, :func:`register_nifti_header` by ``mome-seg``'s NIfTI reader), and
:func:`redact` replaces the registered values in any text with ``[redacted]``:

- person names (every element of VR PN: patient, other and birth names, physicians, operators) and the patient's
  address: the whole value, the value with ``^`` as spaces, and each component of at least :data:`MIN_LENGTH`
  characters, so ``Doe^John`` also hides ``John Doe`` and a lone ``Doe``;
- identifiers and dates (:data:`IDENTIFIER_KEYWORDS`): the whole value (a birth date also as ``YYYY-MM-DD``);
- NIfTI free text (:data:`NIFTI_TEXT_FIELDS`): the whole value.

Values are matched case-insensitively as whole tokens (not inside a longer word, nor, for a number, inside a UID).
Private tags and the per-frame functional groups of Enhanced MR are not read. Values shorter than :data:`MIN_LENGTH`
characters are not registered. Registered values are remembered for the life of the process.

:func:`install` (called by ``python -m app``, ``mome-seg`` and ``app.app.run_app``) routes every Python log record
(message, traceback, stack) and every Python warning through :func:`redact`; the operators of the Deploy graph
re-raise errors with redacted messages (:func:`redacts_errors`), since Holoscan's C++ logger prints the message of an
exception raised in an operator. Text that holds no registered value is left exactly as it was.

Outputs: report.json's per-series sections (descriptions, rejection reasons) and the QC captions are redacted; the
NIfTI outputs of ``mome-seg`` get a new header (geometry only). The DICOM SEG and SR keep the patient and study
modules that highdicom copies from the source, as DICOM requires.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from pydicom.charset import decode_bytes
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

__all__ = [
    "IDENTIFIER_KEYWORDS",
    "MIN_LENGTH",
    "NIFTI_TEXT_FIELDS",
    "REDACTED",
    "Redactor",
    "install",
    "redact",
    "redact_values",
    "redacted_errors",
    "redacts_errors",
    "register_dataset",
    "register_nifti_header",
]

REDACTED = "[redacted]"
MIN_LENGTH = 3  # shorter values and name components are not registered (they would hide ordinary words)
PERSON_NAME_VR = "PN"
NAME_LIKE_KEYWORDS = frozenset({"PatientAddress"})  # free text split into components like a person name
IDENTIFIER_KEYWORDS = frozenset(
    {
        "PatientID",
        "IssuerOfPatientID",
        "OtherPatientIDs",
        "AccessionNumber",
        "MedicalRecordLocator",
        "AdmissionID",
        "ServiceEpisodeID",
        "PatientBirthDate",
        "PatientBirthTime",
        "PatientTelephoneNumbers",
        "PatientTelecomInformation",
    }
)
UNREAD_SEQUENCES = frozenset({"PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"})  # geometry
NIFTI_TEXT_FIELDS = ("descrip", "aux_file", "intent_name", "db_name")
_COMPONENT_SEPARATORS = re.compile(r"[\^=\s,]+")
_NUMBER = re.compile(r"[\d.]+")
_ENCODED_VRS = frozenset({"PN", "LO", "LT", "SH", "ST", "UC", "UT"})  # decoded with the SpecificCharacterSet
_DELIMITERS = {ord(c) for c in "^=\\"}
_DATE = re.compile(r"(\d{4})(\d{2})(\d{2})")
_WORD = r"[^\W_]"  # a letter or digit: a registered value never matches inside a longer word


class Redactor:
    """The registered values and one regular expression that finds any of them (thread-safe)."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._values)

    def add(self, values: Iterable[str]) -> None:
        """Registers ``values`` (stripped; those shorter than :data:`MIN_LENGTH` are ignored)."""
        new = {value.strip() for value in values} - self._values
        new = {value for value in new if len(value) >= MIN_LENGTH}
        if new:
            with self._lock:
                self._values |= new
                self._pattern = None

    def redact(self, text: str) -> str:
        """``text`` with every registered value replaced by :data:`REDACTED`."""
        if not self._values:
            return text
        pattern = self._pattern or self._compile()
        return pattern.sub(REDACTED, text)

    def _compile(self) -> re.Pattern[str]:
        with self._lock:
            alternatives = "|".join(_alternative(value) for value in sorted(self._values, key=len, reverse=True))
            self._pattern = re.compile(f"(?<!{_WORD})(?:{alternatives})(?!{_WORD})", re.IGNORECASE)
            return self._pattern


def _alternative(value: str) -> str:
    """``value`` as a regular expression; a number never matches a UID's component (no ``.<digit>`` touches it)."""
    escaped = re.escape(value)
    return f"(?<!{_WORD}\\.){escaped}(?!\\.{_WORD})" if _NUMBER.fullmatch(value) else escaped


_REDACTOR = Redactor()


def redact(text: str) -> str:
    """``text`` with every registered patient identifier replaced by ``[redacted]``."""
    return _REDACTOR.redact(text)


def redact_values(value: Any) -> Any:
    """A copy of a JSON-like ``value`` (dicts, lists, strings, numbers) with :func:`redact` applied to its strings."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_values(item) for item in value]
    return value


def _name_variants(value: str) -> list[str]:
    """The whole name, with ``^`` as spaces, and its components (``Doe^John`` -> ``Doe John``, ``Doe``, ``John``)."""
    return [value, " ".join(_COMPONENT_SEPARATORS.split(value)).strip(), *_COMPONENT_SEPARATORS.split(value)]


def _identifier_variants(value: str, vr: str | None) -> list[str]:
    date = _DATE.fullmatch(value) if vr == "DA" else None
    return [value, "-".join(date.groups())] if date else [value]


def _text_values(ds: Dataset, tag: BaseTag, vr: str | None) -> list[str]:
    """The values of a text element; a raw element (as read from a file) is decoded from its bytes, not converted by
    pydicom, whose validation warnings and logs would quote the value before it is registered."""
    element = ds.get_item(tag)
    value = element.value
    if isinstance(element, RawDataElement) and isinstance(value, bytes):
        text = decode_bytes(value, _encodings(ds), _DELIMITERS) if vr in _ENCODED_VRS else value.decode("latin-1")
        parts: list[Any] = text.split("\\")
    else:
        parts = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    return [str(part).strip(" \x00") for part in parts if part is not None]


def _encodings(ds: Dataset) -> list[str]:
    """The Python codecs of ``ds``'s text (pydicom's resolved SpecificCharacterSet, inherited by sequence items)."""
    charset = getattr(ds, "_character_set", None) or "iso8859"
    return [charset] if isinstance(charset, str) else list(charset)


def _dataset_values(ds: Dataset) -> Iterator[str]:
    """The identifying values of ``ds`` and of its sequences' items (see the module docstring)."""
    for tag in ds.keys():
        if tag.is_private:
            continue
        element = ds.get_item(tag)
        vr = getattr(element, "VR", None) or _dictionary_vr(tag)
        keyword = keyword_for_tag(tag)
        if vr == "SQ" and keyword not in UNREAD_SEQUENCES:
            for item in ds[tag].value:
                yield from _dataset_values(item)
        elif vr == PERSON_NAME_VR or keyword in NAME_LIKE_KEYWORDS:
            for value in _text_values(ds, tag, vr):
                yield from _name_variants(value)
        elif keyword in IDENTIFIER_KEYWORDS:
            for value in _text_values(ds, tag, vr):
                yield from _identifier_variants(value, vr)


def _dictionary_vr(tag: BaseTag) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def register_dataset(ds: Dataset) -> None:
    """Remembers the patient identifiers of a DICOM header (call it before anything reads its values)."""
    _REDACTOR.add(_dataset_values(ds))


def register_nifti_header(header: Any) -> None:
    """Remembers the free-text fields of a NIfTI header (``descrip``, ``aux_file``, ...), whole."""
    keys = set(header.keys())
    values = [bytes(header[field]).decode("latin-1").strip(" \x00") for field in NIFTI_TEXT_FIELDS if field in keys]
    _REDACTOR.add(values)


class _RedactingRecordFactory:
    """Wraps the log record factory: a record's message, traceback and stack are redacted when it is created."""

    _formatter = logging.Formatter()

    def __init__(self, factory: Callable[..., logging.LogRecord]) -> None:
        self.factory = factory

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.factory(*args, **kwargs)
        if _REDACTOR:
            self._redact(record)
        return record

    def _redact(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format: the handler reports it when it emits the record
            return
        if (clean := redact(message)) != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[0] is not None:
            trace = self._formatter.formatException(record.exc_info)
            if (clean := redact(trace)) != trace:
                record.exc_text = clean
        if record.stack_info:
            record.stack_info = redact(record.stack_info)


class _RedactingShowwarning:
    """Wraps ``warnings.showwarning``: the warning's message is redacted before it is shown."""

    def __init__(self, show: Callable[..., None]) -> None:
        self.show = show

    def __call__(
        self, message: Any, category: type[Warning], filename: str, lineno: int, *args: Any, **kw: Any
    ) -> None:
        text = str(message)
        if (clean := redact(text)) != text:
            message = _rebuilt(message, clean, fallback=str)
        self.show(message, category, filename, lineno, *args, **kw)


def install() -> None:
    """Redacts every Python log record and warning of this process from now on (idempotent).

    Wraps the log record factory and ``warnings.showwarning`` (whatever they are: the SDK's logging configuration,
    ``logging.captureWarnings`` and pytest keep working); text without a registered value is unchanged.
    """
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, _RedactingRecordFactory):
        logging.setLogRecordFactory(_RedactingRecordFactory(factory))
    if not isinstance(warnings.showwarning, _RedactingShowwarning):
        warnings.showwarning = _RedactingShowwarning(warnings.showwarning)


def _rebuilt(original: Any, message: str, fallback: Callable[[str], Any] = RuntimeError) -> Any:
    """An exception (or warning) of ``original``'s type with ``message``, or ``fallback(message)``."""
    try:
        return type(original)(message)
    except Exception:  # noqa: BLE001 - a type that needs other arguments
        return fallback(message)


@contextmanager
def redacted_errors() -> Iterator[None]:
    """Re-raises an exception whose message holds a registered value as one with the redacted message (same type
    when it can be built from a message, else RuntimeError), chained to the original."""
    try:
        yield
    except Exception as error:
        text = str(error)
        if (clean := redact(text)) == text:
            raise
        raise _rebuilt(error, clean) from error


_Class = TypeVar("_Class", bound=type)


def redacts_errors(cls: _Class) -> _Class:
    """Class decorator for an operator: its ``compute`` runs in :func:`redacted_errors`."""
    compute = cls.compute

    @functools.wraps(compute)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        with redacted_errors():
            return compute(self, *args, **kwargs)

    cls.compute = guarded
    return cls
