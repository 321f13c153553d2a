"""Bound glibc's malloc arenas in the long-running processes (serve, agent).

glibc gives each thread that allocates concurrently its own arena (up to 8 per core) and rarely returns their
freed pages to the OS. A server with many gRPC threads decoding requests of very different sizes therefore grows
its RSS for hours without leaking anything: measured here, 10,000 fuzzed requests took `edgeexit serve` from 99 to
119 MB and 32,000 to 123 MB, still climbing; with two arenas it stayed at 93-101 MB. The benchmarks
(benchmarks/cloud.py, robustness.py) run serve and agents with the cap; set MALLOC_ARENA_MAX to choose otherwise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)
DEFAULT_ARENAS = 2


def limit_malloc_arenas(arenas: int = DEFAULT_ARENAS) -> bool:
    """Cap glibc's arenas unless the user set MALLOC_ARENA_MAX; True when the cap was applied.

    A no-op (False) on a C library without ``mallopt`` (musl, macOS) or when the environment already decides.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_ARENA_MAX, arenas) == 1
