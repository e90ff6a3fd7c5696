"""The allocator setting of a training process (glibc's mmap threshold).

glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, after
which activation-sized blocks stay on the heap and a run's peak memory piles up (a
MIntRec-sized A-MESS run: 3.0 GB instead of 2.0 GB, BENCHMARKS.md). Fixing the threshold
keeps it down (`train.mmap_threshold_kb`).
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_MMAP_THRESHOLD = -3
"""mallopt parameter number of M_MMAP_THRESHOLD in glibc's malloc.h."""


def set_mmap_threshold(kb: int | None) -> bool:
    """Fix glibc's mmap threshold at `kb` KiB (`TrainConfig.mmap_threshold_kb`); True if set.
    A no-op off glibc, for None, or when MALLOC_MMAP_THRESHOLD_ is in the environment."""
    if kb is None or os.environ.get("MALLOC_MMAP_THRESHOLD_") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(kb) * 1024))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
