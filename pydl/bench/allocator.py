"""A steady host allocator for CPU measurements.

torch's CPU tensors come from plain malloc. glibc hands blocks back to the OS when the top of
its heap is free (``M_TRIM_THRESHOLD``) and serves large blocks with fresh mmaps, so a call that
allocates a few MB may or may not page-fault all of it in again, depending on what the process
allocated before — which neither the op nor its baseline controls. On the 2-core dev VM that
is 40–140 page faults per LayerNorm fwd+bwd call at 1576×192 (each several µs under a
hypervisor), and the pydl/torch ratio of one cell moved between 0.85 and 1.20 from process to
process. With the allocator steady — freed memory kept for reuse, as torch's CUDA caching
allocator always does on the GPU — the same cell reads 1.08–1.15 in every process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1   # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_MMAP_MAX_BLOCK = 32 << 20  # glibc's largest accepted mmap threshold on 64-bit
_NEVER_TRIM = 1 << 30


def make_steady() -> str:
    """Keep freed host memory for reuse (glibc's mallopt: blocks up to 32 MiB from the heap, the
    heap never trimmed). Returns what was done, for the report; a no-op off glibc."""
    if not sys.platform.startswith("linux"):
        return f"default (no glibc on {sys.platform})"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "default (no mallopt in this libc)"
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX_BLOCK) == 1 and mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) == 1
    return ("steady (glibc mallopt: blocks <= 32 MiB from the heap, never trimmed)" if ok
            else "default (mallopt refused)")
