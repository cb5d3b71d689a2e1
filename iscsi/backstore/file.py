"""Sparse image file backstore (DESIGN.md: pread/pwrite, fdatasync, fallocate(PUNCH_HOLE), SEEK_DATA/SEEK_HOLE).

The image is created with ftruncate and never preallocated, so a fresh 1 GiB LUN
costs a few kilobytes of disk.  Freed ranges are punched back out of the file.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os

from ..log import event
from .base import DeferredWriteError
from .gather import WriteGather

# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

SUPPORTED_BLOCK_SIZES = (512, 4096)

# Zero-filling falls back to writing this much per pwrite: big enough to amortise the
# syscall, small enough not to matter as a permanent allocation.
ZERO_CHUNK = 1 << 20
_ZEROES = bytes(ZERO_CHUNK)

log = logging.getLogger(__name__)


def _load_fallocate():
    """glibc's fallocate(2) wrapper; Python's os module only exposes posix_fallocate (no mode flags)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()


def parse_size(text: str) -> int:
    """Parse ``1G``, ``512M``, ``4096`` ... (binary multiples) into bytes."""
    text = text.strip()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    mult = 1
    if text and text[-1].upper() in units:
        mult = units[text[-1].upper()]
        text = text[:-1]
    elif text[-1:] in ("B", "b"):
        text = text[:-1]
    value = int(text) * mult
    if value <= 0:
        raise ValueError("size must be positive")
    return value


def _file_size(fd: int) -> int | None:
    try:
        return os.fstat(fd).st_size
    except OSError:
        return None


def _truncate(fd: int, size: int, path: str) -> None:
    """ftruncate, with a size past off_t (2^63 - 1) reported like one past the filesystem's limit."""
    try:
        os.ftruncate(fd, size)
    except OverflowError:
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG), path) from None


class FileBackstore:
    """A logical unit's blocks in a (sparse) regular file.

    ``read``/``write`` are synchronous pread/pwrite (a page-cache hit costs less than a
    thread hop); ``flush`` calls fdatasync and may block, so the SCSI core runs it in a
    worker thread.  ``write(..., fua=True)`` is synchronous too and is meant for direct
    users of the backstore, not for the event loop.

    ``gather_writes=True`` (the daemon's LUs) merges back-to-back small writes into one
    pwritev (iscsi/backstore/gather.py); whoever answers the writes must call
    ``gather.drain_all()`` before acknowledging them.  Every other operation drains first.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        size: int | None = None,
        block_size: int = 512,
        read_only: bool = False,
        create: bool = True,
        gather_writes: bool = False,
    ) -> None:
        if block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"block size {block_size} not supported (use one of {SUPPORTED_BLOCK_SIZES})")
        self.path = os.fspath(path)
        self.block_size = block_size
        self.read_only = read_only
        flags = os.O_CLOEXEC | (os.O_RDONLY if read_only else os.O_RDWR)
        exists = os.path.exists(self.path)
        if not exists:
            if not create or read_only:
                raise FileNotFoundError(errno.ENOENT, "image file does not exist", self.path)
            if size is None:
                raise ValueError("a size is needed to create a new image file")
            flags |= os.O_CREAT | os.O_EXCL
        self._fd = os.open(self.path, flags, 0o600)
        try:
            current = os.fstat(self._fd).st_size
            if size is None:
                size = current
            if size <= 0 or size % block_size:
                raise ValueError(f"size {size} is not a positive multiple of the block size {block_size}")
            if current < size:
                if read_only:
                    raise ValueError(f"read-only image {self.path} is smaller ({current}) than requested ({size})")
                _truncate(self._fd, size, self.path)  # sparse: no blocks are allocated
            elif current > size:
                raise ValueError(f"refusing to shrink existing image {self.path} from {current} to {size} bytes")
        except BaseException:
            os.close(self._fd)
            if not exists:  # ours and still empty: an image that failed to be made is no image
                try:
                    os.unlink(self.path)
                except OSError:
                    pass
            raise
        self._size = size
        self._punch_ok = _fallocate is not None
        self._zero_range_ok = _fallocate is not None
        self._gather = WriteGather(self._fd, self.path) if gather_writes and not read_only else None
        # The first write-back failure (fdatasync, or a gathered write already acknowledged):
        # once set, every later flush fails with it (see ``flush``).
        self.write_error: OSError | None = None
        # A read that finds the file shorter than the LU (cut short behind the daemon's back)
        # fails with EIO when set, instead of reading the missing tail as zeroes.  The SCSI
        # logical unit sets it: acknowledged data that vanished must not read back as GOOD.
        self.short_file_fails = False

    # -- properties ---------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def fileno(self) -> int:
        return self._fd

    # Thin provisioning: unmapped ranges read back as zeroes (SBC-4 LBPRZ=1).
    unmap_reads_zero = True

    # -- I/O ------------------------------------------------------------------------

    def drain(self) -> None:
        """Write out gathered writes; raise the error of a gathered run that failed earlier.

        Every operation but a gathered write calls this first (read and read_into inline
        its test: they are the per-I/O path)."""
        gather = self._gather
        if gather is not None and (gather.buffers or gather.error is not None):
            gather.drain()
            # take_error hands the error to one caller only: the flush thread and the event
            # loop may both get here, and the one that finds it taken has nothing to report.
            err = gather.take_error() if gather.error is not None else None
            if err is not None:
                self._write_back_failed(err, "gathered write")
                raise DeferredWriteError(err.errno, err.strerror, self.path) from err

    def _write_back_failed(self, err: OSError, what: str) -> None:
        """Written data that was acknowledged (or handed to the page cache) did not reach the
        image: remember it for good (the first error only), and say so once."""
        if self.write_error is None:
            self.write_error = err
            event(log, "backstore.write_back_failed", logging.ERROR, image=self.path, during=what,
                  errno=errno.errorcode.get(err.errno or 0, err.errno), error=err.strerror,
                  consequence="every later SYNCHRONIZE CACHE of this LU fails until the image is opened again")

    def _short(self, offset: int, got: int) -> None:
        """A read ended at EOF before ``self._size``: the file was cut short underneath us."""
        if self.short_file_fails:
            event(log, "backstore.image_shorter", logging.ERROR, image=self.path, offset=offset + got,
                  file_size=_file_size(self._fd), lu_size=self._size)
            raise OSError(errno.EIO, "image file is shorter than the logical unit (truncated behind "
                          "the daemon's back?)", self.path)

    def read(self, offset: int, length: int) -> bytes:
        gather = self._gather
        if gather is not None and (gather.buffers or gather.error is not None):
            self.drain()
        data = os.pread(self._fd, length, offset)
        if len(data) < length:  # a short read only happens at EOF; the LU never reads past size
            self._short(offset, len(data))
            data += bytes(length - len(data))
        return data

    def read_into(self, offset: int, dest: memoryview) -> None:
        """Fill ``dest`` from ``offset`` (preadv: no intermediate bytes object)."""
        gather = self._gather
        if gather is not None and (gather.buffers or gather.error is not None):
            self.drain()
        fd = self._fd
        while dest:
            n = os.preadv(fd, [dest], offset)
            if n <= 0:  # at EOF (the LU never reads past size): the rest reads as zeroes
                self._short(offset, 0)
                dest[:] = bytes(len(dest))
                return
            dest = dest[n:]
            offset += n

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        gather = self._gather
        if gather is not None and gather.error is None and not fua and gather.add(offset, data):
            return
        self.drain()
        view = memoryview(data)
        fd = self._fd
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n
        if fua:
            self._sync()

    def flush(self) -> None:
        """Make every write so far stable (fdatasync), or raise.

        Once a write-back failed, every later flush raises that error again: Linux reports a
        write-back error to fdatasync once and then forgets it (the dirty pages are dropped
        or marked clean: "fsyncgate"), so the next fdatasync would succeed although the data
        never reached the disk, and the initiator's SYNCHRONIZE CACHE would get GOOD for it.
        """
        self.drain()
        self._sync()

    def _sync(self) -> None:
        err = self.write_error
        if err is not None:
            raise OSError(err.errno, f"an earlier write-back of the image failed ({err.strerror}): "
                          "written data may be lost", self.path)
        try:
            os.fdatasync(self._fd)
        except OSError as err:
            self._write_back_failed(err, "fdatasync")
            raise

    def _fallocate(self, mode: int, offset: int, length: int) -> bool:
        if _fallocate is None:
            return False
        if _fallocate(self._fd, mode, offset, length) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise OSError(err, os.strerror(err), self.path)

    def unmap(self, offset: int, length: int) -> None:
        """Deallocate: punch a hole (partial filesystem blocks are zeroed by the kernel)."""
        self.drain()
        if length <= 0:
            return
        if self._punch_ok and self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            return
        self._punch_ok = False
        self._write_zero_buffers(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make a range read as zeroes and stay allocated (FALLOC_FL_ZERO_RANGE, else zero buffers)."""
        self.drain()
        if length <= 0:
            return
        if self._zero_range_ok and self._fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length):
            return
        self._zero_range_ok = False
        self._write_zero_buffers(offset, length)

    def _write_zero_buffers(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(ZERO_CHUNK, end - offset)
            self.write(offset, memoryview(_ZEROES)[:n])
            offset += n

    def is_mapped(self, offset: int) -> tuple[bool, int]:
        """Mapping state at ``offset`` and the byte length of the run that shares it.

        Runs are whole blocks: a block that is partly allocated counts as mapped.
        """
        self.drain()
        bs = self.block_size
        size = self._size
        if offset >= size:
            return (False, 0)
        try:
            data = os.lseek(self._fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data at or after offset
                return (False, size - offset)
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no SEEK_DATA here: all mapped
                return (True, size - offset)
            raise
        if data > offset:
            # Hole from offset to data; the block holding ``data`` is (partly) mapped.
            hole_end = min(data - data % bs, size)
            if hole_end > offset:
                return (False, hole_end - offset)
        hole = os.lseek(self._fd, max(data, offset), os.SEEK_HOLE)
        hole = min(size, -(-hole // bs) * bs)  # round up: a partly mapped block is mapped
        return (True, max(hole - offset, bs))

    def prefetch(self, offset: int, length: int) -> None:
        """Hint the kernel to read ahead (SBC-4 PRE-FETCH)."""
        self.drain()
        try:
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)
        except (OSError, AttributeError):
            pass

    def resize(self, new_size: int) -> None:
        self.drain()
        if self.read_only:
            raise PermissionError("read-only backstore cannot be resized")
        if new_size <= 0 or new_size % self.block_size:
            raise ValueError(f"size {new_size} is not a positive multiple of the block size {self.block_size}")
        _truncate(self._fd, new_size, self.path)
        self._size = new_size

    def allocated_bytes(self) -> int:
        """Bytes the image really occupies on disk (st_blocks is in 512-byte units)."""
        self.drain()
        return os.fstat(self._fd).st_blocks * 512

    def free_bytes(self) -> int:
        """Bytes the filesystem under the image can still give an unprivileged writer."""
        st = os.fstatvfs(self._fd)
        return st.f_bavail * st.f_frsize

    def close(self) -> None:
        gather = self._gather
        if gather is not None and self._fd >= 0:
            gather.drain()  # an error here was already logged; nothing is left to tell
        fd = self._fd
        if fd >= 0:
            # -1 first: the daemon closes images from a worker thread while the event loop
            # may still look at fileno (a held zero-copy READ); it must never see a number
            # that is closed and may already name another file.
            self._fd = -1
            if gather is not None:
                # Nor may a write that resumes after the close (a command suspended on a
                # removed LUN) be gathered onto that number: it fails (EBADF) instead.
                self._gather = None
                gather.fd = -1
            os.close(fd)

    def __enter__(self) -> "FileBackstore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FileBackstore({self.path!r}, size={self._size}, block_size={self.block_size}, read_only={self.read_only})"
