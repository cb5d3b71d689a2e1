"""The small interface every backstore implements (DESIGN.md: read, write, flush, unmap, lba status, size)."""
from __future__ import annotations

from typing import Protocol


class DeferredWriteError(OSError):
    """A write that was already acknowledged failed when it reached the file (a gathered run);
    the next operation raises it, and the LU reports it as a deferred error (SPC-4 §4.5.4)."""

    deferred = True


class Backstore(Protocol):
    """Where the blocks of one logical unit live.

    Offsets and lengths are in bytes and always multiples of ``block_size``.
    ``read``/``write`` are synchronous (pread/pwrite on a page-cached file cost
    microseconds, less than a thread hop); ``flush`` may block for milliseconds,
    so callers run it in a worker thread.
    """

    block_size: int
    read_only: bool

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def read_into(self, offset: int, dest: memoryview) -> None:
        """Read ``len(dest)`` bytes at ``offset`` into ``dest`` (large reads, filled piece by piece)."""
        ...

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None: ...

    def flush(self) -> None: ...

    def unmap(self, offset: int, length: int) -> None: ...

    def is_mapped(self, offset: int) -> tuple[bool, int]:
        """Return (mapped, length in bytes of the run of same state starting at ``offset``)."""
        ...

    def resize(self, new_size: int) -> None: ...

    def close(self) -> None: ...
