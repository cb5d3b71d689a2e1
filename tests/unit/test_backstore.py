"""Backstores: sparse image file and RAM."""
from __future__ import annotations

import os

import pytest

from iscsi.backstore.file import FileBackstore, parse_size
from iscsi.backstore.ram import RamBackstore

GiB = 1 << 30


def test_new_image_is_sparse(tmp_path):
    path = tmp_path / "disk.img"
    with FileBackstore(path, size=GiB) as b:
        assert b.size == GiB
        assert os.path.getsize(path) == GiB
        # ftruncate, never preallocated: a fresh 1 GiB image occupies (almost) nothing
        assert os.stat(path).st_blocks * 512 < 64 * 1024
        b.write(512 * 1000, b"x" * 512)
        b.write(GiB - 512, b"y" * 512)
        assert b.allocated_bytes() < 1 << 20


def test_read_write_round_trip_and_reopen(tmp_path):
    path = tmp_path / "disk.img"
    b = FileBackstore(path, size=1 << 20, block_size=4096)
    b.write(8192, memoryview(b"abcd" * 1024))
    assert b.read(8192, 4096) == b"abcd" * 1024
    assert b.read(0, 4096) == bytes(4096)
    b.close()
    b2 = FileBackstore(path, block_size=4096)  # size=None: the file's own size
    assert b2.size == 1 << 20
    assert b2.read(8192, 4) == b"abcd"
    b2.close()


def test_unmap_punches_holes(tmp_path):
    with FileBackstore(tmp_path / "d.img", size=16 << 20) as b:
        b.write(0, os.urandom(4 << 20))
        before = b.allocated_bytes()
        assert before >= 4 << 20
        b.unmap(1 << 20, 2 << 20)
        assert b.allocated_bytes() <= before - (2 << 20)
        assert b.read(1 << 20, 2 << 20) == bytes(2 << 20)
        assert b.read(0, 16) != bytes(16)


def test_unaligned_unmap_zeroes_partial_blocks(tmp_path):
    with FileBackstore(tmp_path / "d.img", size=1 << 20) as b:
        b.write(0, b"\xff" * 16384)
        b.unmap(512, 512)  # inside one 4 KiB filesystem block
        data = b.read(0, 2048)
        assert data[:512] == b"\xff" * 512
        assert data[512:1024] == bytes(512)
        assert data[1024:] == b"\xff" * 1024


def test_is_mapped_runs(tmp_path):
    with FileBackstore(tmp_path / "d.img", size=1 << 20) as b:
        assert b.is_mapped(0) == (False, 1 << 20)
        b.write(65536, b"z" * 4096)
        assert b.is_mapped(0) == (False, 65536)
        mapped, n = b.is_mapped(65536)
        assert mapped and n >= 4096 and n % 512 == 0
        assert b.is_mapped(65536 + n)[0] is False
        assert b.is_mapped(1 << 20) == (False, 0)


def test_write_zeroes_reads_zero(tmp_path):
    with FileBackstore(tmp_path / "d.img", size=1 << 20) as b:
        b.write(0, b"\x01" * 8192)
        b.write_zeroes(0, 8192)
        assert b.read(0, 8192) == bytes(8192)


def test_fua_and_flush_reach_fdatasync(tmp_path, monkeypatch):
    calls = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd))[1])
    with FileBackstore(tmp_path / "d.img", size=1 << 20) as b:
        b.write(0, b"a" * 512)
        assert calls == []
        b.write(0, b"a" * 512, fua=True)
        assert len(calls) == 1
        b.flush()
        assert len(calls) == 2


def test_resize_grows_sparse_and_refuses_to_shrink_on_open(tmp_path):
    path = tmp_path / "d.img"
    with FileBackstore(path, size=1 << 20) as b:
        b.resize(2 << 20)
        assert b.size == 2 << 20 == os.path.getsize(path)
        with pytest.raises(ValueError):
            b.resize(1000)  # not a multiple of the block size
    with pytest.raises(ValueError):
        FileBackstore(path, size=1 << 20)  # existing image is bigger: never truncate data
    with FileBackstore(path, size=4 << 20) as b:  # smaller existing image grows
        assert b.size == 4 << 20


def test_validation(tmp_path):
    with pytest.raises(ValueError):
        FileBackstore(tmp_path / "a.img", size=1 << 20, block_size=1024)
    with pytest.raises(ValueError):
        FileBackstore(tmp_path / "b.img", size=1000)
    with pytest.raises(FileNotFoundError):
        FileBackstore(tmp_path / "c.img", size=1 << 20, create=False)
    with pytest.raises(ValueError):
        FileBackstore(tmp_path / "d.img")  # no size for a new image


def test_read_only_image(tmp_path):
    path = tmp_path / "ro.img"
    FileBackstore(path, size=1 << 20).close()
    with FileBackstore(path, read_only=True) as b:
        assert b.read_only
        with pytest.raises(OSError):
            b.write(0, b"x" * 512)


def test_parse_size():
    assert parse_size("1G") == GiB
    assert parse_size("512M") == 512 << 20
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError):
        parse_size("0")


def test_ram_backstore_mapping_and_unmap():
    b = RamBackstore(64 * 512, 512)
    assert b.is_mapped(0) == (False, 64 * 512)
    b.write(512 * 4, b"q" * 1024)
    assert b.is_mapped(0) == (False, 4 * 512)
    assert b.is_mapped(4 * 512) == (True, 2 * 512)
    b.unmap(4 * 512 + 100, 1024)  # block 4 partly: stays mapped, zeroed from byte 100
    assert b.read(4 * 512, 100) == b"q" * 100
    assert b.read(4 * 512 + 100, 1024) == bytes(1024)
    assert b.is_mapped(4 * 512) == (True, 512)
    assert b.is_mapped(5 * 512)[0] is False
    b.flush()
    assert b.flushes == 1
    b.resize(128 * 512)
    assert b.size == 128 * 512 and b.is_mapped(64 * 512)[0] is False


@pytest.mark.parametrize("kind", ["file", "ram"])
def test_read_into_fills_the_buffer_like_read(tmp_path, kind):
    b = FileBackstore(tmp_path / "r.img", size=1 << 20) if kind == "file" else RamBackstore(1 << 20)
    payload = os.urandom(300 * 512)
    b.write(4096, payload)
    dest = bytearray(b"\xff" * (400 * 512))
    b.read_into(4096 - 512, memoryview(dest))
    assert bytes(dest) == b.read(4096 - 512, 400 * 512)
    assert dest[512:512 + len(payload)] == payload and dest[:512] == bytes(512)


def test_file_read_into_past_a_shrunk_file_reads_zeroes(tmp_path):
    """If the image was cut short behind our back, the missing tail reads as zeroes (as read())."""
    b = FileBackstore(tmp_path / "s.img", size=1 << 20)
    b.write(0, b"\1" * 8192)
    os.truncate(tmp_path / "s.img", 4096)
    dest = bytearray(b"\xff" * 8192)
    b.read_into(0, memoryview(dest))
    assert bytes(dest) == b"\1" * 4096 + bytes(4096)


# -- write gathering (iscsi/backstore/gather.py) -------------------------------------------------

from iscsi.backstore import gather as G  # noqa: E402


def _on_disk(path, offset, length):
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


@pytest.fixture
def syscalls(monkeypatch):
    """Count pwritev/pwrite calls (and let the tests make pwritev fail)."""
    calls = {"pwritev": 0, "pwrite": 0, "fail": None}
    real_pwritev, real_pwrite = os.pwritev, os.pwrite

    def pwritev(fd, buffers, offset):
        calls["pwritev"] += 1
        if calls["fail"] is not None:
            raise calls["fail"]
        return real_pwritev(fd, buffers, offset)

    def pwrite(fd, data, offset):
        calls["pwrite"] += 1
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.setattr(os, "pwrite", pwrite)
    yield calls
    G.pending_runs.clear()


def test_contiguous_writes_become_one_pwritev_when_drained(tmp_path, syscalls):
    path = tmp_path / "g.img"
    b = FileBackstore(path, size=1 << 20, gather_writes=True)
    chunks = [os.urandom(4096) for _ in range(8)]
    for i, c in enumerate(chunks):
        b.write(65536 + i * 4096, c)
    assert syscalls == {"pwritev": 0, "pwrite": 0, "fail": None}
    assert _on_disk(path, 65536, 4096) == bytes(4096)     # still gathered
    G.drain_all()                                         # what the transport does before answering
    assert syscalls["pwritev"] == 1 and syscalls["pwrite"] == 0
    assert _on_disk(path, 65536, 8 * 4096) == b"".join(chunks)
    assert not G.pending_runs


def test_gathered_writes_keep_their_order_and_reads_see_them(tmp_path, syscalls):
    path = tmp_path / "o.img"
    b = FileBackstore(path, size=1 << 20, gather_writes=True)
    b.write(0, b"\1" * 4096)
    b.write(4096, b"\2" * 4096)
    b.write(0, b"\3" * 4096)          # not contiguous: the run so far is written first
    assert b.read(0, 8192) == b"\3" * 4096 + b"\2" * 4096   # a read drains
    assert _on_disk(path, 0, 8192) == b"\3" * 4096 + b"\2" * 4096
    b.write(8192, b"\4" * 512)
    b.unmap(8192, 512)                # every other operation drains first, too
    assert _on_disk(path, 8192, 512) == bytes(512)


def test_mutable_buffers_are_copied_and_big_or_fua_writes_go_direct(tmp_path, syscalls):
    path = tmp_path / "m.img"
    b = FileBackstore(path, size=4 << 20, gather_writes=True)
    buf = bytearray(b"\7" * 4096)
    b.write(0, memoryview(buf))
    buf[:] = b"\0" * 4096             # the caller reuses its buffer once write() returned
    b.write(1 << 20, os.urandom(G.MAX_GATHERED_WRITE + 512))
    assert syscalls["pwrite"] == 1    # the big one, after draining the small one
    assert _on_disk(path, 0, 4096) == b"\7" * 4096
    b.write(8192, b"\5" * 4096, fua=True)
    assert syscalls["pwrite"] == 2 and _on_disk(path, 8192, 4096) == b"\5" * 4096


def test_a_run_is_drained_at_its_size_caps(tmp_path, syscalls):
    b = FileBackstore(tmp_path / "c.img", size=4 << 20, gather_writes=True)
    for i in range(G.MAX_RUN_BUFFERS + 1):
        b.write(i * 512, b"\1" * 512)
    assert syscalls["pwritev"] == 1 and len(b._gather.buffers) == 1
    b.drain()
    assert b.read(0, (G.MAX_RUN_BUFFERS + 1) * 512) == b"\1" * ((G.MAX_RUN_BUFFERS + 1) * 512)


def test_a_failed_run_is_reported_by_the_next_operation(tmp_path, syscalls):
    import errno
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # type: ignore[method-assign]
    # On the logger itself and at its own level: other tests (the fuzz harness) silence "iscsi".
    G.log.addHandler(handler)
    old_level = G.log.level
    G.log.setLevel(logging.ERROR)
    try:
        b = FileBackstore(tmp_path / "f.img", size=1 << 20, gather_writes=True)
        b.write(0, b"\1" * 4096)
        syscalls["fail"] = OSError(errno.ENOSPC, "No space left on device")
        G.drain_all()                     # the transport's drain must not raise
    finally:
        G.log.removeHandler(handler)
        G.log.setLevel(old_level)
    assert any("gathered write of 4096 bytes" in r.getMessage() for r in records)
    syscalls["fail"] = None
    with pytest.raises(OSError) as exc:
        b.read(0, 512)                # the LU turns this into MEDIUM ERROR for that command
    assert exc.value.errno == errno.ENOSPC
    assert b.read(0, 512) == bytes(512)   # reported once, then the file works again


def test_no_gathering_while_the_filesystem_is_nearly_full(tmp_path, syscalls, monkeypatch):
    class Nearly:
        f_bavail, f_frsize = 10, 4096

    monkeypatch.setattr(os, "fstatvfs", lambda fd: Nearly)
    b = FileBackstore(tmp_path / "n.img", size=1 << 20, gather_writes=True)
    b.write(0, b"\1" * 4096)
    assert syscalls["pwrite"] == 1 and not G.pending_runs


def test_gathering_is_off_unless_asked(tmp_path, syscalls):
    b = FileBackstore(tmp_path / "d.img", size=1 << 20)
    b.write(0, b"\1" * 4096)
    assert syscalls["pwrite"] == 1 and not G.pending_runs


def test_close_hides_the_descriptor_before_closing_it(tmp_path, monkeypatch):
    """The daemon closes images in a worker thread while the loop may read fileno for a held
    READ: during and after os.close the number must already be gone (it may name another file)."""
    import iscsi.backstore.file as F

    bs = F.FileBackstore(str(tmp_path / "c.img"), size=1 << 20, create=True)
    seen = []
    real_close = os.close

    def watching_close(fd):
        seen.append((fd, bs.fileno))
        real_close(fd)

    monkeypatch.setattr(F.os, "close", watching_close)
    fd = bs.fileno
    bs.close()
    assert seen == [(fd, -1)] and bs.fileno == -1
    bs.close()  # twice is harmless
    assert len(seen) == 1
