"""``mome-worker``: MoME as an AI node of a PACS (Orthanc) — stable studies in, DICOM-SEG / SR / QC image back."""
