"""The preprocessing cache: normalised volumes stored uncompressed for memory-mapped patch reads.

Layout of a cache folder::

    CACHE/cache.json                  dataset, task, channels, labels, parameters, case list
    CACHE/cases/<case_id>/image.npy   float32 (C, X, Y, Z), each channel clipped to its
                                      whole-volume 1st-99th percentile and rescaled to [0, 1]
    CACHE/cases/<case_id>/label.npy   uint8 (X, Y, Z), when the dataset is labelled
    CACHE/cases/<case_id>/body.npy    uint8 (X, Y, Z) body mask (negative patches come from it)
    CACHE/cases/<case_id>/class_locations.npz   per class, up to N voxel indices (seeded)
    CACHE/cases/<case_id>/meta.json   spacing, affine, percentiles, body bbox, lesions, sources

Each case folder is written under a temporary name and renamed (``io.atomic_dir``), so a crash
never leaves a half case that reads as valid; ``cache.json`` is removed while a run changes the
cache and written last, so ``open_cache`` refuses a cache whose last run did not finish.
Re-running skips cases whose sources (size, mtime) and parameters are unchanged.

Inference on raw NIfTI must prepare images exactly as training saw them: it calls
``prepare_image``, the same function the cache uses.

Modules: ``normalize`` (shared with inference), ``build`` (writer), ``reader``, ``splits``.
"""

from __future__ import annotations

from sap_lightning.cache.build import (
    PreprocessParams,
    PreprocessReport,
    build_case,
    preprocess_dataset,
    sample_class_locations,
    source_signatures,
)
from sap_lightning.cache.normalize import (
    compute_body_mask,
    normalize_channels,
    otsu_threshold,
    prepare_image,
    resample_volume,
    resampled_grid,
)
from sap_lightning.cache.reader import (
    BODY_FILE,
    CACHE_FORMAT_VERSION,
    CACHE_JSON,
    CASES_DIR,
    IMAGE_FILE,
    LABEL_FILE,
    LOCATIONS_FILE,
    META_JSON,
    CachedCase,
    PreprocessedCache,
    open_cache,
)

__all__ = [
    "BODY_FILE",
    "CACHE_FORMAT_VERSION",
    "CACHE_JSON",
    "CASES_DIR",
    "IMAGE_FILE",
    "LABEL_FILE",
    "LOCATIONS_FILE",
    "META_JSON",
    "CachedCase",
    "PreprocessParams",
    "PreprocessReport",
    "PreprocessedCache",
    "build_case",
    "compute_body_mask",
    "normalize_channels",
    "open_cache",
    "otsu_threshold",
    "prepare_image",
    "preprocess_dataset",
    "resample_volume",
    "resampled_grid",
    "sample_class_locations",
    "source_signatures",
]
