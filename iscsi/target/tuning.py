"""Process tuning for the daemon, applied once at start.

glibc's malloc serves blocks above its (dynamic) mmap threshold with a fresh mmap and
gives freed memory back at once.  Every 128 KiB READ allocates its data with ``os.pread``
and keeps it until the coalesced writev, so with default settings each read pays for new
pages being faulted in and torn down again: measured, 128K sequential reads went from
1426 to 2095 MB/s with the two settings below (docs/performance.md).  Memory stays
bounded: the buffers are reused from the heap instead of being unmapped.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

from ..log import event

log = logging.getLogger("iscsi.target.tuning")

# mallopt(3) parameter numbers (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Above the largest single Data-In a LU produces by default (MAXIMUM TRANSFER LENGTH of
# 65536 blocks is 32 MiB, but initiators use ≤ 1 MiB); 4 MiB keeps I/O buffers on the heap.
MMAP_THRESHOLD = 4 * 1024 * 1024
# Keep up to 1 GiB of freed heap instead of returning it after each burst.
TRIM_THRESHOLD = 1024 * 1024 * 1024


def tune_malloc() -> bool:
    """Apply the malloc settings; False (and no change) where glibc's mallopt is missing."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    event(log, "tuning.malloc", logging.DEBUG, ok=ok, mmap_threshold=MMAP_THRESHOLD, trim_threshold=TRIM_THRESHOLD)
    return ok
