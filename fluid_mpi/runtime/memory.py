"""glibc allocator settings for the ranks (and the bench's in-process references, so both run alike).

torch allocates every intermediate tensor of a forward with ``malloc`` (no caching on CPU). With glibc's
default, adaptive thresholds a worker rank handed each batch's buffers back to the kernel and faulted
them in again: measured here (HA, batch 64, 313 batches) 446,519 minor page faults and 1.36 s of system
time on rank 1 against 46,537 faults and 0.30 s once both thresholds were fixed; the in-process
reference faulted 0 times per batch either way."""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
# Blocks up to 16 MB come from the heap (a batch-64 forward's largest tensor is 2.4 MB; batch 256, 9.4 MB),
# and the heap keeps up to 64 MB of free top instead of trimming it after every batch: a bounded
# amount of memory kept per rank, against a page fault per 4 KB of every batch.
MMAP_THRESHOLD_BYTES = 16 << 20
TRIM_THRESHOLD_BYTES = 64 << 20


def tune_allocator() -> bool:
    """Fix glibc's mmap and trim thresholds; True when applied (False on another C library)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap_ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    return bool(mmap_ok) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
