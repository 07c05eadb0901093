"""Give memory back to the OS after a long answer (glibc's malloc keeps it otherwise).

Issue 17: one 8 MB answer left the gateway ~60 MB bigger for good. Two glibc habits:

* after one large ``free``, malloc raises its mmap threshold (up to 32 MB), so later large
  buffers (a long answer's joined text, SQLite's copy of it in the store's thread) come
  from a heap; a thread's heap gives its top back only past a trim threshold that rose
  with it, and ``malloc_trim`` never trims a thread arena's top. :func:`fix_mmap_threshold`
  pins the threshold at ``BIG``: every buffer of 1 MB or more is its own mapping, returned
  to the kernel by its ``free``;
* freed small blocks inside the main heap stay resident: after a stream of at least
  ``BIG`` bytes leaves the journal, :class:`Trimmer` runs ``malloc_trim(0)`` (which walks
  the heaps, a few milliseconds for a big one) in a thread, at most once per
  ``MIN_INTERVAL_S``.

Both are no-ops where glibc's functions do not exist (macOS, musl).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import time
from typing import Any

BIG = 1 << 20  # a dropped stream this large asks for a trim
MIN_INTERVAL_S = 5.0


class Trimmer:
    """``trimmer.soon()``: trim once, shortly, unless a trim ran less than
    ``MIN_INTERVAL_S`` ago (then the next one waits for the interval)."""

    def __init__(self) -> None:
        self._trim: Any = _malloc_trim()
        self._last = 0.0
        self._pending = False
        self.trims = 0  # for tests

    @property
    def available(self) -> bool:
        return self._trim is not None

    def soon(self) -> None:
        if self._trim is None or self._pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._pending = True
        delay = max(0.0, self._last + MIN_INTERVAL_S - time.monotonic())
        loop.call_later(delay, self._start, loop)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        future = loop.run_in_executor(None, self._trim, 0)
        future.add_done_callback(self._done)

    def _done(self, _future: object) -> None:
        self._pending = False
        self._last = time.monotonic()
        self.trims += 1


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def fix_mmap_threshold(threshold: int = BIG) -> bool:
    """Pin glibc's mmap threshold (once per process, at start-up); False if not glibc."""
    mallopt = _libc("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))


def _malloc_trim() -> Any:
    trim = _libc("malloc_trim")
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
    return trim


def _libc(function: str) -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return getattr(ctypes.CDLL(name), function)
    except (OSError, AttributeError):
        return None
