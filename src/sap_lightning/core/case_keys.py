"""One stable key per case (or item) id, for DDP de-duplication and per-item seeds.

Under DDP, validation cases are split over ranks and padded with duplicates; metric states must
be float tensors to be gathered, so a case id travels as two 24-bit halves of a 48-bit BLAKE2b
hash, each exact in float32 and float64. Two distinct ids collide with probability about
n^2 / 2^49 for n cases. The same hash seeds per-item random draws (``item_seed``), so they do
not depend on the process, the rank or Python's string-hash randomisation.
"""

from __future__ import annotations

import hashlib

HALF_BITS = 24
"""A float32 holds every integer below 2**24 exactly."""


def _digest(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(str(key).encode(), digest_size=6).digest(), "big")


def case_hash(case_id: str) -> tuple[int, int]:
    """The 48-bit hash of ``case_id`` as ``(high, low)`` 24-bit halves (float32-exact)."""
    value = _digest(case_id)
    return value >> HALF_BITS, value & ((1 << HALF_BITS) - 1)


def join_case_hash(high: float, low: float) -> int:
    """The 48-bit integer back from the two halves :func:`case_hash` returns."""
    return (int(high) << HALF_BITS) | int(low)


def item_seed(key: str) -> int:
    """A stable non-negative integer for seeding per-item draws (the same hash, 48 bits)."""
    return _digest(key)
