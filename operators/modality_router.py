"""Modality router core: which MR series is T1, T1ce, T2, FLAIR, DWI or unsupported, and which one to segment.

Pure functions on pydicom datasets (no Holoscan), so they are testable alone; the Deploy operator wraps them.

* :class:`SeriesHeader` collects what the rules look at from a series' first instance: descriptions, ImageType,
  TR/TE/TI (top level or, for Enhanced MR, the shared functional groups), contrast agent, diffusion b-value (standard
  tag or the Siemens, GE and Philips private tags), acquisition type, instance count and voxel volume.
* :func:`classify` applies the ordered rules of an editable JSON file (``modality_rules.json``, schema in its
  ``description``); every decision names the rule and the reason.
* :func:`choose` picks one series per modality when several qualify, deterministically: ORIGINAL before DERIVED,
  3D before 2D acquisitions, the smallest voxel volume, the most instances, the lowest SeriesNumber, then the
  SeriesInstanceUID. ``all_series=True`` keeps every qualifying series.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence, Tuple

__all__ = [
    "DEFAULT_RULES",
    "MODALITIES",
    "RoutingDecision",
    "RulesFileError",
    "SeriesHeader",
    "choose",
    "classify",
    "load_rules",
    "matches",
]

MODALITIES = ("t1", "t1ce", "t2", "flair", "dwi")
DEFAULT_RULES = Path(__file__).with_name("modality_rules.json")
ACTIONS = (*MODALITIES, "reject")
CONDITIONS = {
    "text",
    "text_not",
    "modality_not",
    "image_type_any",
    "contrast_agent",
    "b_value_min",
    "tr_min",
    "tr_max",
    "te_min",
    "te_max",
    "ti_min",
    "ti_max",
}

_SEPARATORS = re.compile(r"[_\-.]+")
# Private diffusion b-value tags: Siemens CSA-less (0019,100C), GE (0043,1039) first value, Philips (2001,1003).
_PRIVATE_B_VALUES = ((0x0019, 0x100C), (0x0043, 0x1039), (0x2001, 0x1003))


class RulesFileError(ValueError):
    """A modality rules file that cannot be used (a usage error: the run reads nothing); names the file and rule."""


def _number(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _shared(ds: Any, sequence: str, keyword: str) -> Any:
    """``keyword`` inside ``SharedFunctionalGroupsSequence[0].<sequence>[0]`` (Enhanced MR), else None."""
    try:
        return getattr(getattr(ds.SharedFunctionalGroupsSequence[0], sequence)[0], keyword, None)
    except (AttributeError, IndexError):
        return None


def _b_value(ds: Any) -> float | None:
    value = _number(getattr(ds, "DiffusionBValue", None))
    if value is None:
        value = _number(_shared(ds, "MRDiffusionSequence", "DiffusionBValue"))
    for tag in _PRIVATE_B_VALUES:
        if value is not None:
            break
        if tag in ds:
            raw = ds[tag].value
            value = _number(raw.decode(errors="ignore").split("\\")[0] if isinstance(raw, bytes) else raw)
            if value is not None and value >= 1e5:  # GE encodes b-values offset by 10^9
                value = value % 1e5
    return value


def _voxel_volume(ds: Any) -> float | None:
    spacing = getattr(ds, "PixelSpacing", None) or _shared(ds, "PixelMeasuresSequence", "PixelSpacing")
    thickness = _number(getattr(ds, "SpacingBetweenSlices", None) or getattr(ds, "SliceThickness", None))
    if thickness is None:
        thickness = _number(_shared(ds, "PixelMeasuresSequence", "SliceThickness"))
    if not spacing or thickness is None:
        return None
    return float(spacing[0]) * float(spacing[1]) * thickness


@dataclass(frozen=True)
class SeriesHeader:
    """The header facts the router uses, from one instance of a series."""

    series_uid: str
    series_number: int | None
    description: str
    protocol: str
    sequence_name: str
    modality: str
    image_type: Tuple[str, ...]
    contrast_agent: bool
    b_value: float | None
    tr: float | None
    te: float | None
    ti: float | None
    acquisition_type: str
    n_instances: int
    voxel_volume: float | None

    @classmethod
    def from_dataset(cls, ds: Any, n_instances: int | None = None) -> SeriesHeader:
        """Reads a pydicom ``Dataset`` (pixel data not needed); ``n_instances`` defaults to NumberOfFrames or 1."""
        tr = _number(getattr(ds, "RepetitionTime", None))
        te = _number(getattr(ds, "EchoTime", None))
        if tr is None:
            tr = _number(_shared(ds, "MRTimingAndRelatedParametersSequence", "RepetitionTime"))
        if te is None:
            te = _number(_shared(ds, "MREchoSequence", "EffectiveEchoTime"))
        frames = int(_number(getattr(ds, "NumberOfFrames", None)) or 1)
        series_number = _number(getattr(ds, "SeriesNumber", None))
        return cls(
            series_uid=str(getattr(ds, "SeriesInstanceUID", "")),
            series_number=int(series_number) if series_number is not None else None,
            description=str(getattr(ds, "SeriesDescription", "") or ""),
            protocol=str(getattr(ds, "ProtocolName", "") or ""),
            sequence_name=str(getattr(ds, "SequenceName", "") or getattr(ds, "PulseSequenceName", "") or ""),
            modality=str(getattr(ds, "Modality", "") or ""),
            image_type=tuple(str(v).upper() for v in (getattr(ds, "ImageType", None) or [])),
            contrast_agent=bool(str(getattr(ds, "ContrastBolusAgent", "") or "").strip()),
            b_value=_b_value(ds),
            tr=tr,
            te=te,
            ti=_number(getattr(ds, "InversionTime", None)),
            acquisition_type=str(getattr(ds, "MRAcquisitionType", "") or ""),
            n_instances=int(n_instances if n_instances is not None else frames),
            voxel_volume=_voxel_volume(ds),
        )

    @property
    def text(self) -> str:
        """Lower-case ``description | protocol | sequence`` with ``_ - .`` as spaces (so ``\\b`` splits them)."""
        joined = " | ".join(t for t in (self.description, self.protocol, self.sequence_name) if t)
        return _SEPARATORS.sub(" ", joined.lower())

    @property
    def derived(self) -> bool:
        return bool(self.image_type) and self.image_type[0] == "DERIVED"


@dataclass(frozen=True)
class RoutingDecision:
    """What the router decided for one series, and why."""

    series_uid: str
    series_number: int | None
    description: str
    modality: str | None  # None: not segmented
    rule: str
    reason: str

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def load_rules(path: str | Path | None = None) -> List[Dict[str, Any]]:
    """Reads and checks a rules file (default: the shipped ``modality_rules.json``); compiles its regexes.

    Raises:
        RulesFileError: naming the file and the rule, for an unreadable file, unknown actions or conditions and
            invalid regexes.
    """
    path = Path(path) if path else DEFAULT_RULES
    try:
        rules = json.loads(path.read_text())["rules"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise RulesFileError(f"{path}: not a modality rules file ({error}).") from error
    checked = []
    for index, rule in enumerate(rules):
        name = rule.get("name", f"#{index}")
        if rule.get("action") not in ACTIONS:
            raise RulesFileError(f"{path}: rule {name!r}: action must be one of {', '.join(ACTIONS)}.")
        unknown = set(rule) - CONDITIONS - {"name", "action", "reason"}
        if unknown:
            raise RulesFileError(f"{path}: rule {name!r}: unknown condition(s) {sorted(unknown)}.")
        compiled = dict(rule, name=name)
        try:
            texts = rule.get("text", [])
            compiled["text"] = [re.compile(t) for t in ([texts] if isinstance(texts, str) else texts)]
            compiled["text_not"] = re.compile(rule["text_not"]) if rule.get("text_not") else None
        except re.error as error:
            raise RulesFileError(f"{path}: rule {name!r}: invalid regex ({error}).") from error
        checked.append(compiled)
    return checked


def _within(value: float | None, low: float | None, high: float | None, missing: float | None = None) -> bool:
    value = missing if value is None else value
    if value is None:
        return low is None and high is None
    return (low is None or value >= low) and (high is None or value <= high)


def matches(rule: Dict[str, Any], header: SeriesHeader) -> bool:
    """Whether every condition of a compiled rule holds for ``header``."""
    text = header.text
    if "modality_not" in rule and header.modality.upper() in rule["modality_not"]:
        return False
    if any(not pattern.search(text) for pattern in rule["text"]):
        return False
    if rule["text_not"] is not None and rule["text_not"].search(text):
        return False
    if "image_type_any" in rule and not set(rule["image_type_any"]) & set(header.image_type):
        return False
    if "contrast_agent" in rule and header.contrast_agent != bool(rule["contrast_agent"]):
        return False
    if "b_value_min" in rule and (header.b_value is None or header.b_value < rule["b_value_min"]):
        return False
    checks = (
        (header.tr, "tr_min", "tr_max", None),
        (header.te, "te_min", "te_max", None),
        (header.ti, "ti_min", "ti_max", 0.0),  # no InversionTime: no inversion pulse
    )
    return all(_within(v, rule.get(lo), rule.get(hi), missing) for v, lo, hi, missing in checks)


def classify(header: SeriesHeader, rules: Sequence[Dict[str, Any]]) -> RoutingDecision:
    """Applies the first matching rule; a series no rule matches is unsupported."""
    for rule in rules:
        if matches(rule, header):
            modality = None if rule["action"] == "reject" else rule["action"]
            reason = rule.get("reason") or f"series text matches the {rule['action']} rule"
            return RoutingDecision(
                header.series_uid, header.series_number, header.description, modality, rule["name"], reason
            )
    reason = "no rule matched (unsupported contrast)"
    return RoutingDecision(header.series_uid, header.series_number, header.description, None, "none", reason)


def _preference(header: SeriesHeader) -> Tuple:
    return (
        header.derived,
        header.acquisition_type.upper() != "3D",
        header.voxel_volume if header.voxel_volume is not None else float("inf"),
        -header.n_instances,
        header.series_number if header.series_number is not None else 1 << 30,
        header.series_uid,
    )


def choose(
    routed: Iterable[Tuple[SeriesHeader, RoutingDecision]],
    modalities: Sequence[str] = MODALITIES,
    all_series: bool = False,
) -> Dict[str, List[SeriesHeader]]:
    """The series to segment per modality (only ``modalities``): the preferred one, or all with ``all_series``."""
    chosen: Dict[str, List[SeriesHeader]] = {}
    for header, decision in routed:
        if decision.modality in modalities:
            chosen.setdefault(decision.modality, []).append(header)
    for headers in chosen.values():
        headers.sort(key=_preference)
        if not all_series:
            del headers[1:]
    return chosen
