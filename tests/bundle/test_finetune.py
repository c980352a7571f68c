"""Fine-tuning on labelled native volumes (``scripts.finetune``, MONAI Label's train task): cases in network space."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch


def test_a_native_case_is_prepared_as_inference_prepares_it_and_fine_tuning_changes_the_weights(tmp_path, tiny_bundle):
    from scripts.finetune import FineTuning, fine_tune
    from scripts.pipeline import MoMESegmenter
    from scripts.synthetic import generate_dataset

    datalist = generate_dataset(
        tmp_path / "data", 1, seed=7, spacing=4.0, modalities=["flair"], lesion_weights={"glioma": 1.0}, native=True
    )
    (entry,) = json.loads(datalist.read_text())["training"]
    image, label = (nib.load(tmp_path / "data" / entry[key]) for key in ("image", "label"))
    array, labels = np.asarray(image.dataobj, np.float32), np.asarray(label.dataobj)
    segmenter = MoMESegmenter(tiny_bundle, device="cpu")
    case = segmenter.training_case(array, image.affine, labels, "flair", "case")
    assert case["image"].shape == case["label"].shape and case["image"].shape[0] == 1
    assert case["modality"] == "flair" and case["registration"]["warnings"] == []
    # the label follows the image into MoME space: the same lesion volume (4 mm voxels) as on the native grid
    native_ml = labels.astype(bool).sum() * abs(np.linalg.det(image.affine[:3, :3])) / 1000
    assert float(case["label"].sum()) * 64 / 1000 == pytest.approx(native_ml, rel=0.3)
    weights, history = fine_tune(segmenter, [case], tmp_path / "out", FineTuning(epochs=1, iterations_per_epoch=2))
    tuned, served = torch.load(weights, weights_only=True), segmenter.network.state_dict()
    assert len(history) == 1 and tuned.keys() == served.keys()
    assert any(not torch.equal(tuned[name], served[name]) for name in served)  # the copy trained, the served one not
    with pytest.raises(ValueError, match="label shape"):
        segmenter.training_case(array, image.affine, labels[:-1], "flair", "case")


def test_expert_disagreement_is_zero_for_identical_experts_and_positive_otherwise(tmp_path, tiny_bundle):
    from scripts.pipeline import MoMESegmenter
    from scripts.synthetic import generate_dataset

    datalist = generate_dataset(
        tmp_path / "data", 1, seed=7, spacing=4.0, modalities=["flair"], lesion_weights={"glioma": 1.0}, native=True
    )
    (entry,) = json.loads(datalist.read_text())["training"]
    image = nib.load(tmp_path / "data" / entry["image"])
    array = np.asarray(image.dataobj, np.float32)
    segmenter = MoMESegmenter(tiny_bundle, device="cpu")
    differing = segmenter.expert_disagreement(array, image.affine, "flair", "case")
    assert 0 < differing["score"] <= 1 and set(differing["expert_lesion_ml"]) == set(segmenter.modalities)
    first = segmenter.network.experts[0].state_dict()
    for expert in segmenter.network.experts[1:]:
        expert.load_state_dict(first)
    same = segmenter.expert_disagreement(array, image.affine, "flair", "case")
    assert same["score"] == 0 and len(set(same["expert_lesion_ml"].values())) == 1
