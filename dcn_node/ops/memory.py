"""Process memory: the heap's free pages go back to the operating system.

glibc's malloc serves requests below its mmap threshold (raised dynamically up to 32 MB)
from the heap. An analysis interleaves long-lived arrays of a few MB to 32 MB (the masks of
a 300-slice series on the work grid, the headers kept per slice) with short-lived batches
of the same sizes, and the heap's free space between them is rarely given back: RSS
climbs well above what is live (``bench/memory.py``: 1,108 MB at 300 slices). ``trim``
(``malloc_trim(0)``, which also releases free pages in the middle of the heap) at the
boundaries of the big stages brings the peak under 1 GB at no measurable cost; a fixed
1 MiB mmap threshold (``mallopt``) did as well on memory (837 MB) but made the analysis
45 % slower on the CPU (every network activation mapped and faulted in afresh), so it is
not used. Elsewhere than glibc (musl, macOS) ``trim`` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        function: Callable[[int], int] = ctypes.CDLL(
            ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return function


def trim() -> None:
    """Give the heap's free pages back to the operating system (a few ms)."""
    malloc_trim = _malloc_trim()
    if malloc_trim is not None:
        malloc_trim(0)
