"""Synthetic data generator: determinism, dataset layout, label/intensity consistency per lesion type."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from scripts import synthetic
from scripts.synthetic import LESION_CONTRASTS, MODALITIES, generate_dataset, generate_subject, render, template_grid

SPACING = 2.5  # 64 x 78 x 64: fast, and lesions stay several voxels wide


def _subject(seed: int, lesion: str | None = None):
    rng = np.random.default_rng([seed, 0])
    return generate_subject(rng, SPACING, {lesion: 1.0} if lesion else None), rng


def test_template_grid_is_mome_space():
    shape, affine = template_grid(1.0)
    assert shape == (160, 196, 160)
    np.testing.assert_allclose(affine[:3, 3], [-78.0, -114.0, -72.0])  # template origin + crop offset [20, 20, 0]
    shape2, affine2 = template_grid(2.0)
    assert shape2 == (80, 98, 80)
    # The 2 mm grid covers the same box: its first voxel centre sits half a 1 mm voxel further in.
    np.testing.assert_allclose(affine2[:3, 3], [-77.5, -113.5, -71.5])
    np.testing.assert_allclose(np.diag(affine2)[:3], [2.0, 2.0, 2.0])


def test_generation_is_deterministic_per_seed_and_subject():
    a, rng_a = _subject(3)
    b, rng_b = _subject(3)
    c, _ = _subject(4)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(render(a, "flair", rng_a), render(b, "flair", rng_b))
    assert not np.array_equal(a.tissues, c.tissues)


def test_subject_does_not_depend_on_dataset_size(tmp_path):
    generate_dataset(tmp_path / "one", 1, seed=5, spacing=4.0, modalities=["t2"], all_contrasts=True)
    generate_dataset(tmp_path / "two", 2, seed=5, spacing=4.0, modalities=["t2"], all_contrasts=True)
    name = "imagesTr/syn_s5_0000_t2_0000.nii.gz"
    first = np.asarray(nib.load(tmp_path / "one" / name).dataobj)
    np.testing.assert_array_equal(first, np.asarray(nib.load(tmp_path / "two" / name).dataobj))


@pytest.mark.parametrize(
    ("lesion", "modality", "brighter"),
    [
        ("glioma", "t1ce", True),  # enhancing tumour (measured on the enhancing compartment)
        ("glioma", "flair", True),  # oedema
        ("stroke_acute", "dwi", True),  # restricted diffusion
        ("stroke_chronic", "t1", False),  # cavitation, CSF-like
        ("wmh", "flair", True),
        ("wmh", "t1", False),
    ],
)
def test_lesion_contrast_depends_on_type_and_modality(lesion, modality, brighter):
    subject, rng = _subject(11, lesion)
    assert subject.lesion_type == lesion and subject.label.sum() > 20
    image = render(subject, modality, rng)
    white_matter = (subject.tissues[2] > 0.9) & (subject.label == 0)
    region = subject.label > 0
    if (lesion, modality) == ("glioma", "t1ce"):
        region = (subject.compartments["enhancing"] > 0.5) & (subject.compartments["necrosis"] < 0.5)
    ratio = image[region].mean() / image[white_matter].mean()
    assert (ratio > 1.1) if brighter else (ratio < 0.95), f"{lesion}/{modality}: lesion/WM ratio {ratio:.2f}"


def test_dataset_layout_labels_and_json(tmp_path):
    path = generate_dataset(tmp_path, 2, seed=2, spacing=SPACING, all_contrasts=True)
    dataset = json.loads(path.read_text())
    assert dataset["numTraining"] == 2 * len(MODALITIES) == len(dataset["training"])
    assert dataset["labels"] == {"background": 0, "lesion": 1} and dataset["modalities"] == list(MODALITIES)
    shape, affine = template_grid(SPACING)
    labels = {}
    for entry in dataset["training"]:
        assert entry["image"] == f"imagesTr/{entry['subject']}_{entry['modality']}_0000.nii.gz"
        assert entry["label"] == f"labelsTr/{entry['case']}.nii.gz" and entry["case"].endswith(entry["modality"])
        image, label = nib.load(tmp_path / entry["image"]), nib.load(tmp_path / entry["label"])
        assert image.shape == label.shape == shape and image.get_data_dtype() == np.int16
        assert label.get_data_dtype() == np.uint8
        np.testing.assert_allclose(image.affine, affine)
        pixels, mask = np.asarray(image.dataobj), np.asarray(label.dataobj)
        assert set(np.unique(mask)) <= {0, 1} and mask.any()
        assert (pixels[mask > 0] > 0).mean() > 0.99  # lesions lie inside the (brain-masked) image
        assert pixels.min() >= 0 and (pixels == 0).mean() > 0.3  # zero background: brain-masked MoME space
        expected_ml = mask.sum() * abs(np.linalg.det(affine[:3, :3])) / 1000
        assert entry["lesion_ml"] == pytest.approx(expected_ml, abs=1e-3)
        labels.setdefault(entry["subject"], []).append(mask)
    for masks in labels.values():  # one label per subject, shared by its five contrasts
        assert all(np.array_equal(masks[0], m) for m in masks[1:])


def test_default_contrasts_follow_the_source_datasets(tmp_path):
    path = generate_dataset(tmp_path, 12, seed=9, spacing=8.0)
    dataset = json.loads(path.read_text())
    by_subject = {}
    for entry in dataset["training"]:
        by_subject.setdefault((entry["subject"], entry["lesion_type"]), []).append(entry["modality"])
    assert len(by_subject) == 12  # every lesion type is imaged in at least one contrast
    for (_, lesion_type), contrasts in by_subject.items():
        assert contrasts == list(LESION_CONTRASTS[lesion_type])
    assert {t for _, t in by_subject} >= {"glioma", "stroke_acute", "wmh"}
    assert dataset["generator"]["contrasts"]["stroke_acute"] == ["dwi"]


def test_native_space_cases_record_their_transform(tmp_path):
    path = generate_dataset(tmp_path, 1, seed=7, spacing=4.0, modalities=["flair"], native=True, all_contrasts=True)
    entry = json.loads(path.read_text())["training"][0]
    image = nib.load(tmp_path / entry["image"])
    label = np.asarray(nib.load(tmp_path / entry["label"]).dataobj)
    transform = np.array(entry["native_to_template"])
    assert transform.shape == (4, 4) and not np.allclose(transform, np.eye(4))
    assert not np.allclose(image.affine[:3, :3], np.diag(np.diag(image.affine)[:3]))  # oblique grid
    assert label.any()
    # The lesion volume survives the resampling roughly (thick slices, nearest-like label).
    subject = generate_subject(np.random.default_rng([7, 0]), 4.0)
    native_ml = label.sum() * abs(np.linalg.det(image.affine[:3, :3])) / 1000
    template_ml = subject.label.sum() * 64 / 1000 / abs(np.linalg.det(transform[:3, :3]))
    assert native_ml == pytest.approx(template_ml, rel=0.35)


def test_native_space_cases_keep_the_brats_regions(tmp_path):
    """Each region's fraction is resampled and the largest wins: the sub-regions keep their values (not 0/1)."""
    path = generate_dataset(
        tmp_path, 1, seed=7, spacing=4.0, modalities=["t1ce"], lesion_weights={"glioma": 1.0}, native=True,
        label_scheme="brats",
    )  # fmt: skip
    entry = json.loads(path.read_text())["training"][0]
    label = np.asarray(nib.load(tmp_path / entry["label"]).dataobj)
    assert set(np.unique(label)) == {0, 1, 2, 3}
    assert entry["lesion_ml"] == pytest.approx(
        (label > 0).sum() * abs(np.linalg.det(nib.load(tmp_path / entry["label"]).affine[:3, :3])) / 1000, rel=0.01
    )


def test_command_line(tmp_path, capsys):
    common = ["--cases", "1", "--seed", "0", "--spacing", "4", "--quiet"]
    assert synthetic.main(["--out", str(tmp_path / "all"), *common, "--all-contrasts"]) == 0
    assert "wrote 5 cases of 1 subjects" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        synthetic.main(["--out", str(tmp_path), "--cases", "0", "--seed", "0"])
    assert stop.value.code == 2
    with pytest.raises(SystemExit) as stop:
        synthetic.main(["--out", str(tmp_path), "--cases", "1", "--seed", "0", "--lesion-types", "tumour=1"])
    assert stop.value.code == 2
