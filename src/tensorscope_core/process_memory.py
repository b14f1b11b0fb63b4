"""Freed tensor memory goes back to the system at once, so a run's resident memory follows its tensors.

The plan adds up tensors; the kernel counts resident pages, and kills on them. glibc's malloc (which
PyTorch's CPU allocator calls) serves a request under its mmap threshold from heaps it keeps, and raises
the threshold, up to 32 MiB on 64-bit systems, each time a larger mapped block is freed. A freed heap
block is returned to the system only when the top of its heap is free. A run that allocates and frees
tensors of a few MiB (every forward's activations, every metric's working copies) then keeps many of
their pages resident after they are freed, in holes between live blocks: resident memory above what
the plan declared, though no tensor holds it.

``trim`` gives the heaps' free pages back (``malloc_trim``); a run calls it after each metric finalizes.
``return_freed_memory`` fixes the threshold at 128 KiB for the process (a larger block is a mapping of
its own, unmapped when it is freed): the memory audit sets it, so that it measures what each metric
holds. A run does not: every allocation above the threshold is then a fresh mapping that is
page-faulted in, and on the 135M shape's ``--metrics all`` run that took 1.53x the time for 13% less
peak resident memory (bench/README.md). A user who wants resident memory held to the plan at that
price sets glibc's own tunable, ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=131072``. Both do nothing
where the C library is not glibc (macOS, musl, Windows).
"""

from __future__ import annotations

import ctypes
import functools
import platform
import sys
from typing import Any

#: glibc's mallopt parameter for the mmap threshold (malloc.h)
_M_MMAP_THRESHOLD = -3
#: blocks at least this large are mapped on their own and unmapped when freed
MMAP_THRESHOLD_BYTES = 128 * 1024


@functools.cache
def _glibc() -> Any | None:
    """The process's glibc, or None on another C library or system."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at ``MMAP_THRESHOLD_BYTES`` for this process (idempotent). True where
    it was set (glibc), False where the C library has no such setting."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def trim() -> None:
    """Give the heaps' free pages back to the system (glibc's ``malloc_trim``); nothing elsewhere."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
