"""Whole-volume inference, NIfTI outputs, lesion table and metastatic-burden report."""
