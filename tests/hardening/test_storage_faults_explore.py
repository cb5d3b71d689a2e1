"""Storage faults under a running daemon: what initiators see, and what the admin sees.

The LU under test (LUN 0) has its image on a filesystem the test breaks: a small tmpfs that
fills up, or a loop-mounted ext4 that is shut down (FS_IOC_SHUTDOWN: every later read,
write, splice and fsync fails with EIO, as on a dead disk).  LUN 1 lives on the ordinary
test directory and must go on working throughout.  Every case checks the sense data
(SPC-4 §4.5) against the answer the code documents, and that the daemon logged it.

Root is needed for mount/losetup; without it (or without loop devices) a case skips with
the reason.  Every mount and loop device is undone by a finalizer, also on failure.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from iscsi import pdu as P
from tools.peers.sanstack import SanstackPeer

from .conftest import running_daemon
from .raw import Closed, RawSession, read10, write10

BLOCK = 512
INITIATOR = "iqn.2026-11.org.sanstack.hardening:storage-faults"
#: FS_IOC_SHUTDOWN (= EXT4_IOC_SHUTDOWN / XFS_IOC_GOINGDOWN), _IOR('X', 125, __u32).
FS_IOC_SHUTDOWN = 0x8004587D
FS_SHUTDOWN_NOLOGFLUSH = 2


# -- facilities ---------------------------------------------------------------------------------

def _run(*cmd: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("storage fault injection needs root (mount, losetup)")


def _umount(path: Path) -> None:
    if _run("umount", str(path)).returncode != 0:
        _run("umount", "-l", str(path))  # something still holds it: detach it anyway


@contextlib.contextmanager
def _mounted(mnt: Path, *mount_args: str, what: str):
    """``mount MOUNT_ARGS MNT`` for the block, unmounted after it (skips if mount refuses)."""
    r = _run("mount", *mount_args, str(mnt))
    if r.returncode != 0:
        pytest.skip(f"cannot mount {what}: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        _umount(mnt)


def mounted_tmpfs(mnt: Path, size: str):
    mnt.mkdir()
    return _mounted(mnt, "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", what="a tmpfs")


@contextlib.contextmanager
def mounted_ext4(backing: Path, mnt: Path, size: int = 64 << 20):
    """ext4 in the (sparse) file ``backing``, on a loop device, mounted at ``mnt``."""
    if shutil.which("mkfs.ext4") is None or shutil.which("losetup") is None:
        pytest.skip("mkfs.ext4 / losetup not installed (e2fsprogs, mount)")
    with open(backing, "wb") as f:
        f.truncate(size)
    # Inode tables and journal written now: later, only file data needs new blocks below.
    r = _run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(backing))
    if r.returncode != 0:
        pytest.skip(f"mkfs.ext4 failed: {r.stderr.strip()}")
    r = _run("losetup", "--find", "--show", str(backing))
    if r.returncode != 0:
        pytest.skip(f"no loop device: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        mnt.mkdir()
        with _mounted(mnt, "-t", "ext4", dev, what=f"ext4 on {dev}"):
            yield mnt
    finally:
        _run("losetup", "-d", dev)


@pytest.fixture
def tmpfs(tmp_path):
    """An 8 MiB tmpfs (thin images on it run out of space quickly)."""
    _need_root()
    with mounted_tmpfs(tmp_path / "tmpfs", "8M") as mnt:
        yield mnt


@pytest.fixture
def ext4(tmp_path):
    """A 64 MiB ext4 filesystem on a loop device (a file of the test directory)."""
    _need_root()
    with mounted_ext4(tmp_path / "ext4.fs", tmp_path / "ext4") as mnt:
        yield mnt


@pytest.fixture
def thin_ext4(tmp_path):
    """ext4 of 64 MiB on a loop device whose backing file lives on a 24 MiB tmpfs: a thin
    disk.  Page-cache writes succeed; write-back fails once the tmpfs is full, and Linux
    reports that to one fdatasync and then forgets it -- the next fdatasync succeeds."""
    _need_root()
    with mounted_tmpfs(tmp_path / "under", "24M") as under:
        with mounted_ext4(under / "disk", tmp_path / "thin") as mnt:
            yield mnt


def shutdown_fs(mnt: Path) -> None:
    """Force the filesystem down: from now on its files fail every I/O with EIO."""
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FS_IOC_SHUTDOWN, struct.pack("I", FS_SHUTDOWN_NOLOGFLUSH))
    except OSError as err:
        pytest.skip(f"FS_IOC_SHUTDOWN not supported here: {err}")
    finally:
        os.close(fd)


def daemon_with_image_at(workdir: Path, image: Path, size: int = 64 << 20):
    """The daemon with LUN 0 at ``image`` (on the faulty filesystem) and LUN 1 in ``workdir``."""
    def lun0_at_image(peer: SanstackPeer) -> None:
        peer.luns[0] = dataclasses.replace(peer.luns[0], path=image)

    return running_daemon(workdir, sizes=[size, 16 << 20], configure=lun0_at_image)


# -- a raw session addressing any LUN ----------------------------------------------------------

@dataclasses.dataclass
class Answer:
    status: int
    data: bytes = b""
    sense: bytes = b""

    @property
    def code(self) -> tuple[int, int, int] | None:
        """(sense key, ASC, ASCQ), fixed or descriptor format."""
        s = self.sense
        if not s:
            return None
        if s[0] & 0x7F in (0x72, 0x73):
            return s[1] & 0xF, s[2], s[3]
        return s[2] & 0xF, s[12], s[13]

    @property
    def deferred(self) -> bool:
        return bool(self.sense) and self.sense[0] & 0x7F in (0x71, 0x73)


class Session(RawSession):
    """RawSession with a LUN per command and the sense data of each answer."""

    def __init__(self, peer: SanstackPeer) -> None:
        super().__init__(peer.portals[0].host, peer.portals[0].port, timeout=15.0)
        assert self.login(peer.iqn, initiator=INITIATOR).status_class == 0
        self.lun = 0
        for lun in peer.lun_ids[1:]:
            self.do(lun, bytes(16))  # the first command of a nexus meets POWER ON OCCURRED

    def do(self, lun: int, cdb: bytes, data_out: bytes = b"", read: int = 0) -> Answer:
        itt = self.next_itt()
        self.pending_write = data_out
        first = data_out[:min(len(data_out), self.max_send, 65536)]
        self.send(P.ScsiCommandPdu(read=bool(read), write=bool(data_out), edtl=read or len(data_out),
                                   cmdsn=self.cmdsn, expstatsn=self.expstatsn, cdb=cdb.ljust(16, b"\0"),
                                   itt=itt, final=True, data=first, lun=P.encode_lun(lun)))
        self.cmdsn = (self.cmdsn + 1) & 0xFFFFFFFF
        pdu, data = self.wait_status(itt)
        sense = b""
        if isinstance(pdu, P.ScsiResponse) and len(pdu.data) >= 2:
            n = struct.unpack_from(">H", pdu.data)[0]
            sense = bytes(pdu.data[2:2 + n])
        return Answer(pdu.status, data, sense)

    def write(self, lun: int, lba: int, payload: bytes) -> Answer:
        return self.do(lun, write10(lba, len(payload) // BLOCK), payload)

    def read(self, lun: int, lba: int, nbytes: int) -> Answer:
        return self.do(lun, read10(lba, nbytes // BLOCK), read=nbytes)

    def sync(self, lun: int) -> Answer:
        return self.do(lun, bytes((0x35,)) + bytes(9))

    def unmap(self, lun: int, lba: int, blocks: int) -> Answer:
        params = struct.pack(">HH4xQI4x", 22, 16, lba, blocks)
        return self.do(lun, struct.pack(">BB4xBHB", 0x42, 0, 0, len(params), 0), params)


def fine(ans: Answer) -> None:
    assert ans.status == 0, f"status {ans.status:#x} sense {ans.code}"


def check_other_lun(s: Session, lba: int = 0) -> None:
    """LUN 1 (on a healthy filesystem) writes, reads back and flushes, and fast."""
    payload = os.urandom(64 << 10)
    t0 = time.monotonic()
    fine(s.write(1, lba, payload))
    r = s.read(1, lba, len(payload))
    fine(r)
    assert r.data == payload
    fine(s.sync(1))
    assert time.monotonic() - t0 < 2.0


MEDIUM_WRITE_ERROR = (0x3, 0x0C, 0x00)
UNRECOVERED_READ_ERROR = (0x3, 0x11, 0x00)
SPACE_ALLOCATION_FAILED = (0x7, 0x27, 0x07)




def error_lines(peer: SanstackPeer, name: str) -> list[str]:
    return [line for line in peer.log_text().splitlines() if f" {name} " in line]


# -- the cases ---------------------------------------------------------------------------------

def test_full_filesystem_is_space_allocation_failed_and_unmap_brings_it_back(tmp_path, tmpfs):
    """A thin image on a full filesystem: DATA PROTECT, SPACE ALLOCATION FAILED WRITE PROTECT
    (SBC-4 §4.7.3.7), as a current error of the WRITE that needed the space.  What is written
    reads back (large READs too, zero-copy stays on), overwriting allocated blocks works,
    UNMAP frees space and new writes work again; LUN 1 never notices; the log says which
    LU and image, once per second at most."""
    with daemon_with_image_at(tmp_path / "d", tmpfs / "lun0.img") as peer:
        s = Session(peer)
        chunk = os.urandom(256 << 10)
        per = len(chunk) // BLOCK
        full = None
        for i in range(64):  # 16 MiB at most into an 8 MiB filesystem
            ans = s.write(0, i * per, chunk)
            if ans.status != 0:
                full = (i, ans)
                break
        assert full is not None, "an 8 MiB tmpfs took 16 MiB"
        i, ans = full
        assert ans.status == 0x02 and ans.code == SPACE_ALLOCATION_FAILED and not ans.deferred
        for _ in range(5):  # a host that keeps trying: same answer, no log line each
            assert s.write(0, (i + 1) * per, chunk).code == SPACE_ALLOCATION_FAILED
        r = s.read(0, 0, len(chunk))  # 256 KiB: zero-copy
        fine(r)
        assert r.data == chunk
        fine(s.write(0, per, chunk[::-1]))  # blocks already allocated: no new space needed
        fine(s.sync(0))
        check_other_lun(s)
        fine(s.unmap(0, 0, 4 * per))
        fine(s.write(0, i * per, chunk))
        fine(s.sync(0))
        r = s.read(0, i * per, len(chunk))
        fine(r)
        assert r.data == chunk
        lines = error_lines(peer, "lu.io_error")
        assert lines and "errno=ENOSPC" in lines[0] and "sense=DATA_PROTECT/27/07" in lines[0]
        assert "lun=0" in lines[0] and str(tmpfs / "lun0.img") in lines[0]
        assert len(lines) <= 3, lines  # rate-limited: 6 failures within about a second
        listing = peer.admin("lun", "list")
        assert listing.returncode == 0 and "lun0.img" in listing.stdout
        assert peer.alive()


def test_dead_disk_answers_medium_errors(tmp_path, ext4):
    """The filesystem under the image dies (shut down: every I/O fails with EIO).  READ gets
    MEDIUM ERROR, UNRECOVERED READ ERROR; WRITE, UNMAP and SYNCHRONIZE CACHE get MEDIUM
    ERROR, WRITE ERROR (SBC-4 §4.18 / SPC-4 Annex D), every time; a large READ that
    would go zero-copy gets its MEDIUM ERROR too, on a connection that stays up; LUN 1 goes on."""
    with daemon_with_image_at(tmp_path / "d", ext4 / "lun0.img", size=32 << 20) as peer:
        s = Session(peer)
        big = os.urandom(256 << 10)
        fine(s.write(0, 0, big))
        fine(s.sync(0))
        shutdown_fs(ext4)
        assert s.read(0, 0, 4096).code == UNRECOVERED_READ_ERROR
        for _ in range(2):
            ans = s.read(0, 0, 128 << 10)
            assert ans.status == 0x02 and ans.code == UNRECOVERED_READ_ERROR
        assert s.write(0, 1024, os.urandom(4096)).code == MEDIUM_WRITE_ERROR
        assert s.write(0, 1024, os.urandom(128 << 10)).code == MEDIUM_WRITE_ERROR
        assert s.sync(0).code == MEDIUM_WRITE_ERROR
        assert s.sync(0).code == MEDIUM_WRITE_ERROR
        assert s.unmap(0, 0, 8).code == MEDIUM_WRITE_ERROR
        check_other_lun(s)
        assert s.ping(timeout=2.0) < 1.0
        lines = error_lines(peer, "lu.io_error")
        assert lines and "errno=EIO" in lines[0] and "sense=MEDIUM_ERROR/11/00" in lines[0]
        assert "zero_copy=off" in lines[0] and "lun=0" in lines[0]
        assert error_lines(peer, "backstore.write_back_failed")
        assert peer.alive()


def test_zero_copy_read_as_the_first_command_to_meet_a_dead_disk(tmp_path, ext4):
    """A large READ (zero-copy) is the first command to meet a failing disk: sendfile fails
    after the GOOD status is queued, so that connection drops; zero-copy is then off for the
    LU and the initiator's retry gets UNRECOVERED READ ERROR instead of the same drop."""
    with daemon_with_image_at(tmp_path / "d", ext4 / "lun0.img", size=32 << 20) as peer:
        s = Session(peer)
        fine(s.write(0, 0, os.urandom(256 << 10)))
        fine(s.sync(0))
        shutdown_fs(ext4)
        ans = read_retrying(peer, s, 128 << 10)
        assert ans.code == UNRECOVERED_READ_ERROR


def test_failed_write_back_is_never_reported_good_afterwards(tmp_path, thin_ext4):
    """fsyncgate: write-back to the disk under the image fails (the thin disk below is full).
    Linux returns the error to one fdatasync and then forgets it, so a second SYNCHRONIZE
    CACHE got GOOD although the data never reached the disk.  Every later one must fail
    (SBC-4 §5.24: GOOD means the cached blocks are on the medium)."""
    with daemon_with_image_at(tmp_path / "d", thin_ext4 / "lun0.img", size=48 << 20) as peer:
        s = Session(peer)
        chunk = os.urandom(256 << 10)
        for i in range(120):  # 30 MiB into the page cache; the disk below takes ~24
            fine(s.write(0, i * len(chunk) // BLOCK, chunk))
        first = s.sync(0)
        assert first.status == 0x02 and first.code[0] in (0x3, 0x7), first.code
        for _ in range(3):
            again = s.sync(0)
            assert again.status == 0x02 and again.code == first.code, again.code
        r = s.read(0, 0, 4096)  # reads still answer (from the page cache or the disk)
        assert r.status in (0, 0x02)
        check_other_lun(s)
        line = error_lines(peer, "backstore.write_back_failed")
        assert len(line) == 1 and "during=fdatasync" in line[0] and "lun0.img" in line[0]
        listing = peer.admin("lun", "list").stdout
        assert "every SYNCHRONIZE CACHE fails until the image is opened again" in listing, listing
        assert peer.alive()


def test_image_truncated_underneath_is_a_medium_error_not_zeroes(tmp_path):
    """Someone truncates the image behind the daemon's back: the blocks past the new end are
    lost.  They read as MEDIUM ERROR, UNRECOVERED READ ERROR, not as zeroes with GOOD; the
    blocks before it still read; writing the range again makes it readable again."""
    with daemon_with_image_at(tmp_path / "d", tmp_path / "lun0.img", size=16 << 20) as peer:
        s = Session(peer)
        data = os.urandom(512 << 10)
        fine(s.write(0, 0, data[:256 << 10]))
        fine(s.write(0, 512, data[256 << 10:]))
        fine(s.sync(0))
        os.truncate(tmp_path / "lun0.img", 64 << 10)
        r = s.read(0, 0, 4096)
        fine(r)
        assert r.data == data[:4096]
        assert s.read(0, 256, 4096).code == UNRECOVERED_READ_ERROR
        ans = s.read(0, 0, 256 << 10)  # would be zero-copy: copied now, and fails as well
        assert ans.status == 0x02 and ans.code == UNRECOVERED_READ_ERROR
        fine(s.write(0, 0, data))
        r = s.read(0, 0, len(data))
        fine(r)
        assert r.data == data
        check_other_lun(s)
        assert error_lines(peer, "backstore.image_shorter") and error_lines(peer, "lu.io_error")
        listing = peer.admin("lun", "list").stdout
        assert "rw,io-errors" in listing and "UNRECOVERED" not in listing, listing
        assert "io-errors: " in listing and "EIO on opcode" in listing, listing


def test_zero_copy_read_of_a_truncated_image_is_not_good(tmp_path):
    """A large READ (zero-copy) as the first command to meet an image cut short: its GOOD
    status is queued before the send finds the file short, so the connection drops rather
    than deliver zeroes; the retry is copied and gets UNRECOVERED READ ERROR."""
    with daemon_with_image_at(tmp_path / "d", tmp_path / "lun0.img", size=16 << 20) as peer:
        s = Session(peer)
        fine(s.write(0, 0, os.urandom(256 << 10)))
        fine(s.sync(0))
        os.truncate(tmp_path / "lun0.img", 64 << 10)
        ans = read_retrying(peer, s, 256 << 10)
        assert ans.status == 0x02 and ans.code == UNRECOVERED_READ_ERROR, "READ of lost blocks was GOOD"


def read_retrying(peer, s: "Session", length: int) -> "Answer":
    """READ ``length`` bytes at LBA 0 of LUN 0 as an initiator does: a dropped connection is
    retried on a new one (at most three times); the answer that finally comes."""
    for _ in range(3):
        try:
            return s.read(0, 0, length)
        except Closed:
            s.close()
            s = Session(peer)
    raise Closed("every retry of the READ lost its connection")


# -- the same defects at the backstore, without root ------------------------------------------

def test_backstore_flush_keeps_failing_after_one_fdatasync_error(tmp_path, monkeypatch):
    """Linux reports a write-back error to one fdatasync only; the backstore must not."""
    from iscsi.backstore import file as F

    b = F.FileBackstore(tmp_path / "a.img", size=1 << 20)
    real = os.fdatasync
    calls = []

    def once(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)

    monkeypatch.setattr(F.os, "fdatasync", once)
    try:
        b.write(0, b"x" * 512)
        for _ in range(3):
            with pytest.raises(OSError) as e:
                b.flush()
            assert e.value.errno == errno.EIO
        with pytest.raises(OSError):
            b.write(0, b"y" * 512, fua=True)
        assert len(calls) == 1 and b.write_error is not None
    finally:
        b.close()


def test_backstore_flush_fails_after_a_lost_gathered_write(tmp_path, monkeypatch):
    from iscsi.backstore import file as F
    from iscsi.backstore import gather as G
    from iscsi.backstore.base import DeferredWriteError

    monkeypatch.setattr(G, "LOW_SPACE", 0)
    b = F.FileBackstore(tmp_path / "g.img", size=1 << 20, gather_writes=True)
    try:
        b.write(0, b"a" * 512)
        assert b._gather.buffers  # gathered, acknowledged
        monkeypatch.setattr(G.os, "pwritev", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "EIO")))
        G.drain_all()
        monkeypatch.undo()
        with pytest.raises(DeferredWriteError):
            b.read(0, 512)  # the deferred error, once
        with pytest.raises(OSError):
            b.flush()  # and never GOOD for a SYNCHRONIZE CACHE afterwards
    finally:
        b.close()
