"""Zero-copy READs: Data-In sent with ``sendfile`` straight from the image's page cache.

``sendfile`` hands the socket *references* to page-cache pages, not a copy.  The bytes
the initiator finally receives are whatever those pages hold when the kernel (or, over
loopback, the receiving process) copies them out — possibly long after the READ
completed.  A WRITE that changed the range in between would change the READ's data
after the fact: a torn sector for the initiator, and for a clustered filesystem a
heartbeat or lock record that never existed.

So a zero-copy READ *holds* its byte range (:class:`ReadFence`) from the moment it
executes until the initiator has certainly read every byte: its ExpStatSN has passed
the READ's StatSN (the status follows the data in the same TCP stream, RFC 7143
§4.2.2.2), or it echoed a NOP-In sent after the READ.  Until then every command that
would modify the range waits; writes to other ranges go on.  A waiting writer asks the
holder's connection for that acknowledgement (a NOP-In ping, which the initiator must
answer, §11.19) and, if none comes within :data:`ACK_TIMEOUT`, drops that connection: a
peer that stops reading cannot stall writers for longer than that.  (Bytes already queued
at such a peer stay readable after the reset; it had not read the READ's status either.)

Only the sole I_T nexus of an LU takes holds (``LogicalUnit.sole_user``): its own next
PDU acknowledges them, so no session ever waits for another session's initiator.

Writers that suspend midway (a FUA write waiting for its flush, COMPARE AND WRITE
waiting for the LU's lock, a large write in steps) are counted in
:attr:`ReadFence.writers`; while any runs, READs of that LU are copied as before, so a
hold never starts under a write that has passed its gate but not yet written.
"""
from __future__ import annotations

import asyncio
import errno
import os
import struct
import time
from typing import Protocol

from .cdb import RW6, RW10, RW12, RW16, be16, be64

# Below this a pread copy costs less than the extra syscalls of the zero-copy path.
MIN_BYTES = 64 * 1024
# How long a writer waits for the holder's initiator to acknowledge before dropping it.
ACK_TIMEOUT = 5.0
# A waiting writer re-solicits (and re-checks) at least this often.
_RECHECK = 0.5

# Operation codes that modify the medium, and where their LBA and length are (SBC-4),
# read with the CDB layouts of cdb.py.
def _span_6(cdb: bytes) -> tuple[int, int]:
    w = RW6.unpack_from(cdb)[0]
    return (w >> 8) & 0x1FFFFF, (w & 0xFF) or 256


def _span_10(cdb: bytes) -> tuple[int, int]:
    _flags, lba, _group, n = RW10.unpack_from(cdb)
    return lba, n


def _span_12(cdb: bytes) -> tuple[int, int]:
    _flags, lba, n = RW12.unpack_from(cdb)
    return lba, n


def _span_16(cdb: bytes) -> tuple[int, int]:
    _flags, lba, n, _group = RW16.unpack_from(cdb)
    return lba, n


def _span_atomic_16(cdb: bytes) -> tuple[int, int]:
    return be64(cdb, 2), be16(cdb, 12)


def _span_caw(cdb: bytes) -> tuple[int, int]:
    return be64(cdb, 2), cdb[13]


_WHOLE = None
WRITE_SPANS = {
    0x0A: _span_6,  # WRITE(6)
    0x2A: _span_10,  # WRITE(10)
    0x2E: _span_10,  # WRITE AND VERIFY(10)
    0x41: _span_10,  # WRITE SAME(10): 0 blocks = to the end of the LU
    0x42: _WHOLE,  # UNMAP: descriptors in the Data-Out
    0x48: _WHOLE,  # SANITIZE
    0x89: _span_caw,  # COMPARE AND WRITE
    0x8A: _span_16,  # WRITE(16)
    0x8B: _span_16,  # ORWRITE(16)
    0x8E: _span_16,  # WRITE AND VERIFY(16)
    0x93: _span_16,  # WRITE SAME(16)
    0x9C: _span_atomic_16,  # WRITE ATOMIC(16)
    0xAA: _span_12,  # WRITE(12)
    0xAE: _span_12,  # WRITE AND VERIFY(12)
}
WRITE_OPCODES = frozenset(WRITE_SPANS)
# READ(6)/(10)/(12)/(16): where their LBA and length are (SBC-4 §5.15-5.18).
READ_SPANS = {0x08: _span_6, 0x28: _span_10, 0xA8: _span_12, 0x88: _span_16}


def write_span(cdb: bytes, block_size: int, size: int) -> tuple[int, int]:
    """The byte range [start, end) a medium-modifying CDB may touch (the whole LU if unsure)."""
    span = WRITE_SPANS.get(cdb[0])
    if span is None:
        return 0, size
    try:
        lba, n = span(cdb)
    except (struct.error, IndexError):  # a CDB too short for its opcode: the LU will refuse it
        return 0, size
    if not n:
        if cdb[0] in (0x41, 0x93):
            return lba * block_size, size  # WRITE SAME: to the end of the LU
        n = 1
    return lba * block_size, (lba + n) * block_size


class HoldOwner(Protocol):
    """The connection a held READ's Data-In went out on."""

    def solicit_ack(self) -> None:
        """Make the initiator say how far it has read (a NOP-In ping)."""

    def ack_timed_out(self) -> None:
        """The initiator did not acknowledge in time: drop the connection."""

    def held_range_removed(self) -> None:
        """A held range is about to disappear (the LU shrinks): drop the connection."""


class FileExtent:
    """Data-In that is still in the image file, and the hold on its range.

    It stands in for the bytes in a :class:`~iscsi.scsi.types.ScsiResult` and is only
    produced for a transport that asked for it (``ScsiCommand.zero_copy``).  ``source``
    is the backstore (its ``fileno`` is -1 once the LU was removed and the image
    closed).  The range [offset, offset + length) stays unchanged until :meth:`release`.
    """

    __slots__ = ("source", "offset", "length", "fence", "owner")

    def __init__(self, source, offset: int, length: int, fence: "ReadFence") -> None:
        self.source = source
        self.offset = offset
        self.length = length
        self.fence = fence
        self.owner: HoldOwner | None = None

    def __len__(self) -> int:
        return self.length

    @property
    def released(self) -> bool:
        """No longer held (or a piece of a held extent, which is never held itself)."""
        return self not in self.fence.holds

    def read(self, skip: int = 0) -> bytes:
        """The bytes themselves from ``skip`` on (a copy, for when they cannot be sent in place)."""
        fd = self.source.fileno
        if fd < 0:
            raise OSError("the image was closed before a READ's data was sent")
        want = self.length - skip
        data = os.pread(fd, want, self.offset + skip)
        if len(data) < want:
            # The image ends before the LU does: cut short behind the daemon's back (the LU
            # never reads past its size).  Its lost blocks must not go out as zeroes under the
            # GOOD status already queued: fail the send (the connection drops), and copy this
            # LU's READs from now on, so the retry gets the backstore's MEDIUM ERROR.
            self.fence.sendfile_ok = False
            raise OSError(errno.EIO, "image file is shorter than the logical unit (truncated behind "
                          "the daemon's back?)", getattr(self.source, "path", None))
        return data

    def release(self) -> None:
        """The initiator has the bytes (or never will): writers may change the range again.
        Releasing twice does nothing; a waiting writer is woken (it checks the holds again)."""
        fence = self.fence
        fence.holds.discard(self)
        if fence._changed is not None:
            fence._wake()


class ReadFence:
    """The held ranges of one logical unit and the writers that wait for them."""

    __slots__ = ("holds", "writers", "_changed", "ack_timeout", "sendfile_ok")

    def __init__(self, ack_timeout: float = ACK_TIMEOUT) -> None:
        self.holds: set[FileExtent] = set()
        self.writers = 0  # medium-modifying commands past the gate and not yet finished
        self.sendfile_ok = True  # False once the image's filesystem refused sendfile
        self._changed: asyncio.Future | None = None
        self.ack_timeout = ack_timeout

    def hold(self, source, offset: int, length: int) -> FileExtent:
        """Hold [offset, offset + length) of ``source`` for a READ sent from the file."""
        extent = FileExtent(source, offset, length, self)
        self.holds.add(extent)
        return extent

    def _wake(self) -> None:
        """A hold was released: the writers waiting in :meth:`clear` look again."""
        changed, self._changed = self._changed, None
        if changed is not None and not changed.done():
            changed.set_result(None)

    def overlapping(self, start: int, end: int) -> list[FileExtent]:
        """The holds a write of [start, end) has to wait for."""
        return [h for h in self.holds if h.offset < end and start < h.offset + h.length]

    def drop_holders(self, start: int, end: int) -> None:
        """[start, end) is about to disappear (the LU shrinks): the connections holding any of
        it are dropped at once and their holds released; nobody may send that range any more."""
        for h in self.overlapping(start, end):
            if h.owner is not None:
                h.owner.held_range_removed()
            h.release()

    async def clear(self, start: int, end: int) -> None:
        """Return once nothing holds any byte of [start, end); the caller then writes at once."""
        deadline = time.monotonic() + self.ack_timeout
        while True:
            blocking = self.overlapping(start, end)
            if not blocking:
                return
            left = deadline - time.monotonic()
            for h in blocking:
                if h.owner is None:
                    continue
                if left <= 0:
                    h.owner.ack_timed_out()
                else:
                    h.owner.solicit_ack()
            if left <= 0:
                for h in blocking:  # its connection is dropped: nobody will acknowledge them
                    h.release()
                continue
            if self._changed is None:
                self._changed = asyncio.get_running_loop().create_future()
            await asyncio.wait((self._changed,), timeout=min(left, _RECHECK))
