"""Write gathering: back-to-back small writes that continue each other become one pwritev.

An initiator streaming sequential 4 KiB writes at queue depth 32 delivers a dozen of them in
one socket read.  Executed one by one, each costs a pwrite syscall (the filesystem takes the
inode lock and updates timestamps every time); gathered, the run costs one pwritev with the
same bytes.  This is the request merging a block layer's elevator does, applied to the image
file.

Rules that keep it invisible:

- A run is only ever *extended*: a write that does not start where the pending run ends
  drains the run first, so writes reach the file in the order they were executed.
- Every other operation of the backstore (read, unmap, flush, resize, ...) drains first, so
  the LU always reads what it wrote.
- The transport calls :func:`drain_all` before it sends any response, so no write is
  acknowledged (and no later command can be observed by the initiator) before its bytes are
  in the file: a SIGKILL after GOOD loses nothing that was acknowledged, as before.
- Buffers are kept by reference only when immutable (``bytes``); anything else is copied, so
  a caller may reuse its buffer as soon as ``write`` returns.
- A page-cache write fails at once only when the filesystem is out of space (a sparse image
  allocates as it is written) or over quota.  Gathering is off while the filesystem has less
  than LOW_SPACE free, so that failure stays with the command that caused it.  Should a
  gathered run fail anyway, the error is kept and raised by the file's next operation: the
  LU answers that command with a MEDIUM ERROR and the log says why, as a disk reports a
  deferred write-cache error (SPC-4 §4.5.4) instead of losing it silently.
"""
from __future__ import annotations

import logging
import os
import threading
import time

#: Buffers in one pwritev (the kernel's IOV_MAX is 1024) and bytes in one run: a run is
#: drained when either is reached, so gathering never holds much memory.
MAX_RUN_BUFFERS = 64
MAX_RUN_BYTES = 1 << 20
#: Writes larger than this are written at once: one syscall already carries plenty of data.
MAX_GATHERED_WRITE = 64 << 10

#: Gathering stops while the image's filesystem has less than this free (checked every
#: SPACE_CHECK_INTERVAL seconds): a write near a full disk must fail with its own command.
LOW_SPACE = 1 << 30
SPACE_CHECK_INTERVAL = 1.0

log = logging.getLogger("iscsi.backstore.gather")

# Backstores with a pending run.  The transport drains them all before it writes responses.
pending_runs: set["WriteGather"] = set()


def drain_all() -> None:
    """Write out every pending run (the transport calls this before sending responses)."""
    while pending_runs:
        try:
            gather = pending_runs.pop()
        except KeyError:  # emptied by another thread meanwhile
            return
        gather.drain()


def has_pending() -> bool:
    return bool(pending_runs)


class WriteGather:
    """The pending run of one image file: buffers that follow each other from ``start``."""

    __slots__ = ("fd", "path", "buffers", "start", "end", "error", "_lock", "_space_ok", "_space_checked")

    def __init__(self, fd: int, path: str = "") -> None:
        self.fd = fd
        self.path = path
        self.buffers: list[bytes | memoryview] = []
        self.start = self.end = 0
        self.error: OSError | None = None  # a failed run, raised by the file's next operation
        # Writes come from the event loop; flush/sanitize run in worker threads and drain too.
        self._lock = threading.Lock()
        self._space_ok = False
        self._space_checked = -SPACE_CHECK_INTERVAL

    def add(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """Queue ``data`` for ``offset``; False when it should be written directly instead."""
        n = len(data)
        if n > MAX_GATHERED_WRITE or not self._space_ok and not self._check_space():
            return False
        if type(data) is not bytes and not (type(data) is memoryview and type(data.obj) is bytes):
            data = bytes(data)  # the caller may reuse a mutable buffer once write() returns
        with self._lock:
            buffers = self.buffers
            if buffers:
                if offset == self.end and len(buffers) < MAX_RUN_BUFFERS and self.end - self.start + n <= MAX_RUN_BYTES:
                    buffers.append(data)
                    self.end += n
                    return True
                self._write_run()
            if time.monotonic() - self._space_checked >= SPACE_CHECK_INTERVAL and not self._check_space():
                return False
            self.buffers = [data]
            self.start, self.end = offset, offset + n
        pending_runs.add(self)
        return True

    def _check_space(self) -> bool:
        now = time.monotonic()
        if now - self._space_checked < SPACE_CHECK_INTERVAL:
            return self._space_ok
        self._space_checked = now
        try:
            st = os.fstatvfs(self.fd)
            self._space_ok = st.f_bavail * st.f_frsize >= LOW_SPACE
        except OSError:
            self._space_ok = False
        return self._space_ok

    def drain(self) -> None:
        """Write the pending run (if any) to the file."""
        if self.buffers:
            with self._lock:
                self._write_run()

    def take_error(self) -> OSError | None:
        """The error of a failed run, once (the caller raises it for its command)."""
        err, self.error = self.error, None
        return err

    def _write_run(self) -> None:
        """Write the pending run to the file; the caller holds the lock.

        The run stays in ``buffers`` until it is in the file: a flush drains from a worker
        thread, and whoever looks meanwhile from the event loop (a read, ``drain_all``
        before acknowledging) must see it pending and wait on the lock -- with the list
        emptied first, a READ issued after the writes' GOOD read the old blocks, and GOOD
        could go out before the bytes were in the file."""
        buffers = self.buffers
        if not buffers:
            return
        offset = self.start
        fd = self.fd
        pending = buffers
        left = self.end - offset
        try:
            while True:
                try:
                    written = os.pwritev(fd, pending, offset)
                except OSError as err:
                    log.error("gathered write of %d bytes at offset %d to %s failed: %s (reported to the "
                              "next command on this LU)", left, offset, self.path or f"fd {fd}", err)
                    self.error = err
                    return
                left -= written
                if left <= 0:
                    return
                # A short write (rare: a signal, a full disk) leaves the rest to write again.
                offset += written
                if pending is buffers:
                    pending = list(buffers)  # ``buffers`` stays as it is until the end
                while pending and written >= len(pending[0]):
                    written -= len(pending.pop(0))
                if written:
                    pending[0] = memoryview(pending[0])[written:]
        finally:
            self.buffers = []
