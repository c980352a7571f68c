"""Fallback (issue 32): a contrast whose chosen series fails its checks falls back to the next series of that
contrast, and the report says why the first was skipped; a MoME+ reference whose registration fails is replaced."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from dicom_factory import make_series
from pydicom.uid import generate_uid

from operators.modality_router import load_rules
from operators.mome_inference import segment_study
from operators.study import route_study
from scripts.registration import RegistrationFailed

SHAPE = (40, 40, 20)


def _series(description: str, number: int, study: str, spacing: float = 2.0, **extra) -> list:
    volume = np.random.default_rng(number).integers(0, 1000, SHAPE).astype(np.float32)
    return make_series(volume, np.diag([2.0, 2.0, spacing, 1.0]), number, description, study, extra=extra)


class _Single:
    """Rejects the registration of the series it is told to, segments the others (nothing found)."""

    def __init__(self, failing: set[str]) -> None:
        self.failing, self.seen = failing, []

    def describe(self) -> dict:
        return {"name": "fake"}

    def segment(self, array, affine, name, modality, progress):
        self.seen.append(name)
        if any(uid in name for uid in self.failing):
            raise RegistrationFailed(f"{name}: registration to the MNI152 template failed its quality checks")
        return SimpleNamespace(labels=np.zeros(array.shape, np.uint8), seconds={})


FLAIR = {"RepetitionTime": 9000, "EchoTime": 110, "InversionTime": 2500}


def test_a_series_failing_its_registration_falls_back_to_the_next_of_its_contrast():
    study = generate_uid()
    preferred = _series("AX T2 FLAIR", 5, study, spacing=2.0, **FLAIR)  # finer slices: preferred
    backup = _series("AX T2 FLAIR", 9, study, spacing=4.0, **FLAIR)
    first, second = preferred[0].SeriesInstanceUID, backup[0].SeriesInstanceUID
    work = route_study(study, {first: preferred, second: backup}, load_rules())
    assert [t.header.series_uid for t in work.tasks] == [first]
    segmenter = _Single({first})
    segment_study(work, segmenter)
    assert [t.header.series_uid for t in work.tasks] == [second] and work.tasks[0].segmentation is not None
    assert "registration" in work.entries[first]["rejected"] and work.entries[first]["fallback_series"] == second
    decision = next(d for d in work.decisions if d["series_uid"] == second)
    assert decision["selected"] and decision["fallback_for"] == first and "not_selected" not in decision


def test_when_every_series_of_a_contrast_fails_each_says_why():
    study = generate_uid()
    preferred = _series("AX T2 FLAIR", 5, study, **FLAIR)
    broken = _series("AX T2 FLAIR", 9, study, **FLAIR)
    del broken[3]  # irregular spacing
    first, second = preferred[0].SeriesInstanceUID, broken[0].SeriesInstanceUID
    work = route_study(study, {first: preferred, second: broken}, load_rules())
    segment_study(work, _Single({first}))
    assert work.segmented_series == 0 and work.tasks[0].segmentation is None
    assert work.entries[first]["fallback_series"] == second
    assert (
        "irregular slice spacing" in work.entries[second]["rejected"] and "fallback_series" not in work.entries[second]
    )


class _Plus:
    """MoME+ stand-in whose reference registration fails when the reference is T1ce."""

    modalities = ["t1", "t1ce", "t2", "flair"]

    def __init__(self) -> None:
        self.references = []

    def describe(self) -> dict:
        return {"name": "fake+"}

    def segment_channels(self, channels, reference, progress):
        self.references.append(reference)
        if reference == "t1ce":
            raise RegistrationFailed(f"{channels[reference].name}: registration failed its quality checks")
        aligned = SimpleNamespace(to_dict=lambda: {"method": "frame of reference", "warnings": []})
        return SimpleNamespace(
            labels=np.zeros(channels[reference].array.shape, np.uint8), seconds={}, excluded={},
            coregistration={m: aligned for m in channels if m != reference}, reference=reference,
        )  # fmt: skip


def test_a_mome_plus_reference_that_fails_its_registration_is_left_out_and_the_group_reruns():
    study = generate_uid()
    t1ce = _series("AX T1 POST GAD", 8, study, spacing=1.0, ContrastBolusAgent="Gd", RepetitionTime=550, EchoTime=12)
    t2 = _series("AX T2 TSE", 4, study, RepetitionTime=4500, EchoTime=95)
    flair = _series("AX T2 FLAIR", 5, study, **FLAIR)
    series = {s[0].SeriesInstanceUID: s for s in (t1ce, t2, flair)}
    work = route_study(study, series, load_rules())
    plus = _Plus()
    segment_study(work, None, plus_segmenter=plus, mode="plus")
    assert plus.references[0] == "t1ce" and len(plus.references) == 2 and plus.references[1] != "t1ce"
    uid = t1ce[0].SeriesInstanceUID
    assert "registration failed" in work.entries[uid]["rejected"] and "fallback_series" not in work.entries[uid]
    done = [t for t in work.tasks if t.segmentation is not None]
    assert len(done) == 1 and done[0].modality == plus.references[1]
    assert {t.modality for t in done[0].plus_sources} == {"t2", "flair"} - {done[0].modality}
