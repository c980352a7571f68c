"""MoME in MONAI Label: the app (``label/main.py``) and its tasks, served to 3D Slicer and OHIF.

Runs in its own environment (``make label`` creates ``.venv-label``: MONAI Label 0.8.5 needs pydicom 2, the Deploy
application pydicom 3). The tasks reuse the bundle's native-space pipeline through :mod:`operators.bundle` and the
API's NIfTI reading and writing (:mod:`app.nifti_io`); nothing else in the repository imports this package.
"""
