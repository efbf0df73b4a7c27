"""The allocator thresholds the daemons set at start (page faults per token otherwise)."""

from __future__ import annotations

import sys

from moe2.shared.allocator import keep_freed_memory


def test_keep_freed_memory_sets_the_thresholds_on_glibc() -> None:
    ok = keep_freed_memory()
    if sys.platform.startswith("linux"):
        import platform

        assert ok == (platform.libc_ver()[0] == "glibc")
    else:
        assert not ok
