"""Synthetic single-frame MR DICOM series for tests (the demo study's writer, ``app.demo_study``)."""

from app.demo_study import series_datasets as make_series

__all__ = ["make_series"]
