"""The long-running processes cap glibc's malloc arenas, unless the environment decides."""

from __future__ import annotations

import ctypes.util
import platform

import pytest

from edgeexit.runtime.malloc import limit_malloc_arenas

GLIBC = platform.libc_ver()[0] == "glibc" and ctypes.util.find_library("c") is not None


@pytest.mark.skipif(not GLIBC, reason="mallopt(M_ARENA_MAX) exists only in glibc")
def test_the_cap_applies_on_glibc(monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert limit_malloc_arenas() is True


def test_the_environment_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert limit_malloc_arenas() is False
