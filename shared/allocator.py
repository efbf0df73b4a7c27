"""Keep freed memory in the process: per-token arrays of a real vocabulary cost page faults.

A real vocabulary makes every generated token allocate and free several arrays of 0.6-1.2 MB
(an expert's logits and probabilities, a full-vocabulary distribution as it is decoded, mixed
and sampled). glibc's malloc returns memory above its trim threshold to the kernel at each
free, and serves blocks above its mmap threshold with fresh mappings; its dynamic thresholds
(128 KiB to start) do not settle for two or more such blocks alive at once, so each token pays
for hundreds of page faults again -- measured here: 2-11 ms a step for two 1.2 MB arrays, 0.2 ms
with the thresholds below. Fixing the thresholds keeps up to ``trim_threshold_b`` of freed
memory at the top of the heap for the next token. A no-op off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

#: mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(*, mmap_threshold_b: int = 16 << 20,
                      trim_threshold_b: int = 64 << 20) -> bool:
    """Fix glibc's mmap and trim thresholds (see the module docstring); True when set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold_b)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold_b))
    if not ok:
        log.debug("mallopt refused the thresholds; freed memory goes back as before")
    return ok
