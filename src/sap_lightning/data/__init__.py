"""Datasets, the synthetic cohort, preprocessing cache, splits, samplers and DataModules."""
