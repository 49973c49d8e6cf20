"""Runs that tie the stages together: one training run (``train``) and the whole study (``study``)."""
