"""Raw datasets in the nnU-Net v2 layout: format (``layout``), checks (``validate``), import."""
