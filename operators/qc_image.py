"""QC image: axial, coronal and sagittal slices through the largest lesion with the segmentation overlaid.

Slices are taken after reorienting the volume to RAS (flips and axis swaps only, no resampling) and shown in the
radiological convention: axial and coronal with the patient's right on the image's left, anterior (axial) and
superior (coronal, sagittal) at the top, anterior on the left of the sagittal view. Voxel aspect ratios are kept.
Without a lesion the slices go through the volume centre.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw

from operators.bundle import lesion_components
from operators.phi import redact

__all__ = ["qc_caption", "qc_image", "save_qc_png"]

PANEL_MM = 220.0  # field of view of one panel at the output scale (pixels = mm * scale)
OVERLAY = np.array([255, 40, 40], dtype=np.float32)


def qc_caption(subject: str, lesions: dict, model: dict) -> str:
    """``"<subject>: V mL in N lesion(s) | <model> <version> | research use only"`` from a lesion summary."""
    return (
        f"{subject}: {lesions['lesion_volume_ml']} mL in {lesions['lesion_count']} lesion(s) | "
        f"{model.get('name')} {model.get('version')} | research use only"
    )


def _largest_lesion_centre(labels: np.ndarray) -> np.ndarray | None:
    components, count = lesion_components(labels > 0)
    if not count:
        return None
    largest = int(np.argmax(np.bincount(components.ravel())[1:])) + 1
    return np.round(np.argwhere(components == largest).mean(0)).astype(int)


def _panel(image: np.ndarray, labels: np.ndarray, spacing: tuple[float, float], scale: float) -> Image.Image:
    """(rows, cols) slice -> RGB with overlay, resized to physical aspect."""
    lo, hi = np.percentile(image, [1, 99.5]) if image.any() else (0.0, 1.0)
    grey = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)[..., None] * 255.0
    rgb = np.repeat(grey, 3, axis=-1)
    mask = labels > 0
    rgb[mask] = 0.55 * rgb[mask] + 0.45 * OVERLAY
    picture = Image.fromarray(rgb.astype(np.uint8))
    size = (max(1, round(image.shape[1] * spacing[1] * scale)), max(1, round(image.shape[0] * spacing[0] * scale)))
    return picture.resize(size, Image.BILINEAR)


def _axial_mosaic(ras_image: np.ndarray, zooms: np.ndarray, caption: str, scale: float, count: int = 12):
    """No lesion to centre on: ``count`` evenly spaced axial slices (radiological), 6 per row, inferior first."""
    depth = ras_image.shape[2]
    slices = np.linspace(depth * 0.15, depth * 0.85, num=min(count, depth)).round().astype(int)
    panels = [
        _panel(ras_image[:, :, k].T[::-1, ::-1], np.zeros(ras_image.shape[:2][::-1], bool), (zooms[1], zooms[0]),
               scale * 0.6)
        for k in slices
    ]  # fmt: skip
    columns = min(6, len(panels))
    rows = -(-len(panels) // columns)
    width, height = panels[0].width, panels[0].height
    canvas = Image.new("RGB", (columns * (width + 4), rows * (height + 4) + 28), "black")
    for index, panel in enumerate(panels):
        canvas.paste(panel, ((index % columns) * (width + 4), (index // columns) * (height + 4)))
    ImageDraw.Draw(canvas).text((4, canvas.height - 22), caption, fill=(255, 255, 255))
    return canvas


def qc_image(array: np.ndarray, labels: np.ndarray, affine: np.ndarray, caption: str = "", scale: float = 1.5):
    """A PIL image: three orthogonal panels through the largest lesion (or, with no lesion, an axial mosaic) and
    ``caption`` underneath."""
    ornt = nib.orientations.io_orientation(affine)
    ras_image = nib.orientations.apply_orientation(np.asarray(array, np.float32), ornt)
    ras_labels = nib.orientations.apply_orientation(np.asarray(labels), ornt)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)[ornt[:, 0].astype(int)]
    centre = _largest_lesion_centre(ras_labels)
    if centre is None:
        return _axial_mosaic(ras_image, zooms, caption + " | no lesion found", scale)
    i, j, k = centre
    x, y, z = zooms

    def view(volume: np.ndarray, which: str) -> np.ndarray:
        if which == "axial":  # rows: anterior -> posterior, cols: patient right -> left
            return volume[:, :, k].T[::-1, ::-1]
        if which == "coronal":  # rows: superior -> inferior, cols: right -> left
            return volume[:, j, :].T[::-1, ::-1]
        return volume[i, :, :].T[::-1, ::-1]  # sagittal: rows superior -> inferior, cols anterior -> posterior

    spacings = {"axial": (y, x), "coronal": (z, x), "sagittal": (z, y)}
    panels = [_panel(view(ras_image, w), view(ras_labels, w), spacings[w], scale) for w in spacings]
    height = max(p.height for p in panels) + 28
    canvas = Image.new("RGB", (sum(p.width for p in panels) + 4 * len(panels), height), "black")
    offset = 0
    for panel in panels:
        canvas.paste(panel, (offset, 0))
        offset += panel.width + 4
    ImageDraw.Draw(canvas).text((4, height - 22), caption, fill=(255, 255, 255))
    return canvas


def save_qc_png(array: np.ndarray, labels: np.ndarray, affine: np.ndarray, path: Path, caption: str = "") -> Path:
    """Writes :func:`qc_image` as a PNG (no text chunks; the caption redacted, see ``operators.phi``); returns the
    path."""
    qc_image(array, labels, affine, redact(caption)).save(path, format="PNG")
    return path
