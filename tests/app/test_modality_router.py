"""Modality router core: rules on series text and acquisition parameters, real vendor headers, series choice."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import nibabel
import pydicom
import pytest
from pydicom.dataset import Dataset

from operators.modality_router import SeriesHeader, choose, classify, load_rules, matches

RULES = load_rules()
MODALITY_TEXT_RULES = ("dwi", "flair", "t1ce", "t1ce-compact", "t1", "t2")
NIBABEL_DICOM = Path(nibabel.__file__).parent / "nicom" / "tests" / "data"

# (SeriesDescription, expected modality or None = rejected/unsupported), from common vendor protocol names.
CORPUS = [
    ("T1 MPRAGE", "t1"), ("t1_mprage_sag_p2_iso", "t1"), ("Ax T1 SE", "t1"), ("T1W_3D_TFE", "t1"),
    ("sag 3d fspgr bravo", "t1"), ("T1 FLAIR AX", "t1"), ("T1 pre", "t1"), ("t1_fl3d_tra", "t1"),
    ("T1 POST GAD", "t1ce"), ("AX T1 +C", "t1ce"), ("3D T1 BRAVO POST", "t1ce"), ("T1C", "t1ce"), ("t1ce", "t1ce"),
    ("MPRAGE_GD", "t1ce"), ("t1 vibe fs post", "t1ce"), ("T1W_SE+C", "t1ce"), ("Ax T1 contrast", "t1ce"),
    ("T2 FLAIR", "flair"), ("AX FLAIR", "flair"), ("t2_tirm_tra_dark-fluid", "flair"), ("3D FLAIR SPACE", "flair"),
    ("AX FLAIR POST", "flair"), ("T2-FLAIR_3D", "flair"),
    ("T2W_TSE", "t2"), ("Ax T2 FSE", "t2"), ("t2_tse_tra", "t2"), ("T2 SPACE", "t2"), ("COR T2", "t2"),
    ("DWI b1000", "dwi"), ("ep2d_diff_3scan_trace", "dwi"), ("Ax DWI", "dwi"), ("DIFFUSION TRACEW", "dwi"),
    ("ADC", None), ("Apparent Diffusion Coefficient (mm2/s)", None), ("Localizer", None), ("AAHead_Scout", None),
    ("SWI", None), ("T2* GRE", None), ("DTI 64 dir", None), ("fMRI resting state", None), ("TOF 3D multi-slab", None),
    ("<MIP Range>", None), ("PD TSE", None), ("3-plane loc", None), ("Perfusion DSC", None),
]  # fmt: skip


def header(description: str = "", **attributes) -> SeriesHeader:
    ds = Dataset()
    ds.Modality = attributes.pop("Modality", "MR")
    ds.SeriesDescription = description
    ds.SeriesInstanceUID = attributes.pop("SeriesInstanceUID", "1.2.3")
    ds.ImageType = attributes.pop("ImageType", ["ORIGINAL", "PRIMARY", "M"])
    for key, value in attributes.items():
        setattr(ds, key, value)
    return SeriesHeader.from_dataset(ds, n_instances=30)


@pytest.mark.parametrize(("description", "expected"), CORPUS)
def test_series_text_rules(description, expected):
    decision = classify(header(description), RULES)
    assert decision.modality == expected, (description, decision)
    assert decision.rule and decision.reason


def test_modality_regexes_are_mutually_exclusive():
    """No series text is claimed by two modality rules (T1 must not match 'T1 POST GAD', T2 not 'T2 FLAIR', ...)."""
    text_rules = [r for r in RULES if r["name"] in MODALITY_TEXT_RULES]
    assert len(text_rules) == len(MODALITY_TEXT_RULES)
    for description, expected in CORPUS:
        hits = {r["action"] for r in text_rules if matches(r, header(description))}
        assert len(hits) <= 1, (description, hits)
        if expected is not None:
            assert hits == {expected}, (description, hits)


@pytest.mark.parametrize(
    ("attributes", "expected", "rule"),
    [
        ({"RepetitionTime": 9000, "EchoTime": 120, "InversionTime": 2500}, "flair", "flair-parameters"),
        ({"RepetitionTime": 500, "EchoTime": 10}, "t1", "t1-parameters"),
        ({"RepetitionTime": 2300, "EchoTime": 3, "InversionTime": 900}, "t1", "t1-parameters"),  # MPRAGE
        ({"RepetitionTime": 500, "EchoTime": 10, "ContrastBolusAgent": "Gadovist"}, "t1ce", "t1ce-parameters"),
        ({"RepetitionTime": 4000, "EchoTime": 100}, "t2", "t2-parameters"),
        ({"DiffusionBValue": 1000}, "dwi", "dwi-b-value"),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW"]}, "dwi", "dwi-image-type"),
        ({"RepetitionTime": 3000, "EchoTime": 15}, None, "none"),  # proton density
        ({"Modality": "CT"}, None, "not-mr"),
        ({"ImageType": ["DERIVED", "SECONDARY", "ADC"]}, None, "derived-map"),
    ],
)
def test_acquisition_parameter_fallbacks(attributes, expected, rule):
    decision = classify(header("", **attributes), RULES)
    assert (decision.modality, decision.rule) == (expected, rule)


def test_contrast_agent_tag_makes_a_plain_t1_a_t1ce_but_not_a_pre_contrast_one():
    assert classify(header("T1 SE", ContrastBolusAgent="GAD"), RULES).modality == "t1ce"
    assert classify(header("T1 SE pre", ContrastBolusAgent="GAD"), RULES).modality == "t1"
    assert classify(header("T1 SE"), RULES).modality == "t1"


def test_private_b_values():
    ge = Dataset()
    ge.add_new((0x0043, 0x1039), "IS", [1000001000, 8, 0, 0])  # b = 1000, offset by 10^9
    assert SeriesHeader.from_dataset(ge).b_value == 1000
    siemens = Dataset()
    siemens.add_new((0x0019, 0x100C), "IS", 800)
    assert SeriesHeader.from_dataset(siemens).b_value == 800


def _nibabel_dicom(name: str) -> Dataset:
    raw = (NIBABEL_DICOM / name).read_bytes()
    return pydicom.dcmread(io.BytesIO(gzip.decompress(raw) if name.endswith(".gz") else raw), stop_before_pixels=True)


@pytest.mark.parametrize(
    ("name", "expected", "rule"),
    [
        ("0.dcm", None, "mosaic"),  # Siemens DTI mosaic
        ("siemens_dwi_1000.dcm.gz", None, "mosaic"),
        ("csa_slice_norm.dcm", None, "mosaic"),  # resting-state EPI
        ("decimal_rescale.dcm", None, "derived-map-text"),  # quantitative T1 map
        ("slicethickness_empty_string.dcm", None, "derived-map-text"),  # TOF MIP, DERIVED
        ("philips_mprage.dcm.gz", "t1", "t1"),  # Enhanced MR, 176 frames
    ],
)
def test_real_vendor_headers(name, expected, rule):
    parsed = SeriesHeader.from_dataset(_nibabel_dicom(name))
    decision = classify(parsed, RULES)
    assert (decision.modality, decision.rule) == (expected, rule), decision
    if name == "philips_mprage.dcm.gz":
        assert parsed.n_instances == 176 and parsed.acquisition_type == "3D"


def test_choice_among_series_of_one_modality_is_deterministic():
    def t1(uid, number, n, thickness, kind="3D", image_type=("ORIGINAL", "PRIMARY")):
        ds = Dataset()
        ds.Modality, ds.SeriesDescription, ds.SeriesInstanceUID, ds.SeriesNumber = "MR", "T1 MPRAGE", uid, number
        ds.ImageType, ds.MRAcquisitionType = list(image_type), kind
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], thickness
        return SeriesHeader.from_dataset(ds, n_instances=n)

    candidates = [
        t1("1.1", 3, 24, 5.0, "2D"),
        t1("1.2", 5, 176, 1.0),
        t1("1.3", 4, 176, 1.0, image_type=("DERIVED", "SECONDARY")),
        t1("1.4", 2, 176, 1.0),
    ]
    routed = [(h, classify(h, RULES)) for h in candidates]
    assert [h.series_uid for h in choose(routed)["t1"]] == ["1.4"]  # original, 3D, finest, most slices, lowest number
    assert [h.series_uid for h in choose(list(reversed(routed)))["t1"]] == ["1.4"]
    assert [h.series_uid for h in choose(routed, all_series=True)["t1"]] == ["1.4", "1.2", "1.1", "1.3"]
    assert choose(routed, modalities=["flair"]) == {}


def test_rules_file_errors_name_the_file_and_rule(tmp_path):
    for rule, message in [
        ({"name": "x", "action": "ct"}, "action must be"),
        ({"name": "x", "action": "t1", "colour": "red"}, "unknown condition"),
        ({"name": "x", "action": "t1", "text": "("}, "invalid regex"),
    ]:
        path = tmp_path / "rules.json"
        path.write_text(json.dumps({"rules": [rule]}))
        with pytest.raises(ValueError, match=rf"rules.json: rule 'x': {message}"):
            load_rules(path)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a modality rules file"):
        load_rules(tmp_path / "bad.json")
