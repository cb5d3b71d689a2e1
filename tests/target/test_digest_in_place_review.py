"""Review of zero-copy READs on DataDigest=CRC32C connections (66d493d and after).

The data digest of a held READ is summed over a read-only mapping of the image
(FileBackstore.in_place, FileExtent.checksum) when the READ is queued; the bytes go out
later with sendfile, or as a copy (sendpath.py).  These tests check that the digest and the
bytes still agree wherever the bytes end up coming from, and what the mapping costs.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct

import pytest

from iscsi import pdu as P
from iscsi.backstore.file import FileBackstore
from iscsi.digest import crc32c
from iscsi.framing import DataDigestFailure
from iscsi.scsi.zerocopy import ReadFence

from .test_zero_copy_reads import (  # noqa: F401  (zc is a fixture)
    BS, acknowledge, read10, session, stop_reading, until, write10, zc,
)

MIB = 1 << 20
MIB_BLOCKS = MIB // BS
DIGESTS = [("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")]
# PDUs that need padding, sequences that are not a multiple of them (RFC 7143 §11.7.1, §13.14)
ODD = [("MaxRecvDataSegmentLength", "32767"), ("MaxBurstLength", "65535")]


async def digest_session(zc, isid: int, keys=()) -> tuple:
    """A session with both digests (and ``keys``), and its connection on the target."""
    before = set(zc.connections)
    wire = await session(zc, isid, extra=[*DIGESTS, *keys])
    assert wire.data_digest and wire.header_digest
    (conn,) = [c for c in zc.connections if c not in before]
    return wire, conn


async def replies(wire, count: int, timeout: float = 3.0) -> dict[int, tuple[str, bytes]]:
    """Per ITT: ("good", data) / ("digest", data): a Data-In whose data digest did not
    match / ("status", data): another status.  Stops early when the target hangs up."""
    got: dict[int, tuple[str, bytes]] = {}
    data: dict[int, bytes] = {}
    bad: set[int] = set()
    try:
        while len(got) < count:
            item = await wire.recv(timeout)
            if isinstance(item, DataDigestFailure):
                pdu = item.pdu
                bad.add(pdu.itt)
            else:
                pdu = item
            if isinstance(pdu, P.NopIn):
                if pdu.ttt != P.RESERVED_TAG:
                    acknowledge(wire, pdu.ttt)
                continue
            if isinstance(pdu, P.DataIn):
                data[pdu.itt] = data.get(pdu.itt, b"") + bytes(pdu.data)
                if not pdu.has_status:
                    continue
                kind = "digest" if pdu.itt in bad else ("good" if pdu.status == 0 else "status")
            elif pdu.itt in bad:
                kind = "digest"
            else:
                kind = "good" if getattr(pdu, "status", None) == 0 else "status"
            got[pdu.itt] = (kind, data.get(pdu.itt, b""))
    except (ConnectionError, OSError, TimeoutError):
        pass
    return got


async def clear_ua(wire) -> None:
    """TEST UNIT READY until GOOD (a capacity change is reported first, SBC-4 §4.6)."""
    for _ in range(4):
        wire.command(bytes(6))
        if (await replies(wire, 1)).popitem()[1][0] == "good":
            return
    raise AssertionError("unit attention never cleared")


async def filled(zc, isid: int, keys=()) -> tuple:
    """A digest session whose target-side socket takes 64 KiB at a time, and 16 MiB of content."""
    content = os.urandom(16 * MIB)
    zc.lu.backstore.write(0, content)
    wire, conn = await digest_session(zc, isid, keys)
    conn._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    return wire, conn, content


# -- bugs ------------------------------------------------------------------------------------

@pytest.mark.xfail(strict=True, reason="LogicalUnit.resize shrinks the image under held READs: "
                   "their queued pages go out as zero fill after a digest summed over the old bytes")
async def test_shrinking_the_lu_under_queued_digest_reads(zc):
    """The admin shrinks an LU (reload with a smaller size) while READs of its tail wait in
    a connection's backlog.  The digest was summed over the data when the READ was queued;
    sendfile then finds the file shorter and sendpath fills the rest with zeroes.  The hold
    promised the range unchanged until the initiator has it: it must get the data or lose
    the connection, never a Data-In that fails its digest (or zeroes claimed GOOD)."""
    a, conn, content = await filled(zc, 0x4000000005A0)
    stop_reading(a)
    itts = [a.command(read10(i * MIB_BLOCKS, MIB_BLOCKS), read=True, edtl=MIB) for i in range(4)]
    await until(lambda: conn._backlog and len(zc.lu.fence.holds) == 4)
    zc.lu.resize(MIB)  # READs 1..3 now lie past the end of the image
    a.w.transport.resume_reading()
    got = await replies(a, 4)
    for i, itt in enumerate(itts):
        kind, data = got.get(itt, ("lost", b""))
        assert kind in ("good", "lost"), f"READ {i}: {kind}"
        if kind == "good":
            assert data == content[i * MIB:(i + 1) * MIB]


@pytest.mark.xfail(strict=True, reason="in_place races FileBackstore.close() from the daemon's worker "
                   "thread: it slices a released memoryview (ValueError), which no caller catches")
def test_close_from_another_thread_during_in_place(tmp_path, monkeypatch):
    """Daemon._close_unit closes a removed LU with asyncio.to_thread while its sessions may
    still have a READ executing on the loop.  in_place releases the GIL in lseek; the close
    (unmap, close the fd) running right then is modelled by doing it inside that lseek.
    The connection only handles OSError from checksum() (connection.py _append_pdu)."""
    b = FileBackstore(tmp_path / "gone.img", size=4 * MIB)
    b.write(0, os.urandom(128 << 10))
    fence = ReadFence()
    extent = fence.hold(b, 0, 128 << 10)
    extent.checksum(crc32c)  # mapped
    real_lseek = os.lseek
    fd = b.fileno

    def lseek_while_closed(f, pos, how):
        r = real_lseek(f, pos, how)
        if f == fd and how == os.SEEK_END and b.fileno >= 0:
            b.close()  # the worker thread's close ran while this syscall had the GIL released
        return r

    monkeypatch.setattr(os, "lseek", lseek_while_closed)
    try:
        extent.checksum(crc32c)
    except OSError:
        pass  # what _append_pdu handles: that connection is dropped


@pytest.mark.xfail(strict=True, reason="_append_pdu keeps summing (and re-reading) every remaining piece "
                   "of a multi-PDU READ after the image failed: one warning and one failed read per PDU")
async def test_a_failing_image_is_read_once_per_read_not_once_per_pdu(zc, monkeypatch, caplog):
    """An image that fails (EIO: on a sick disk each failed read can take seconds of
    retries) while a multi-PDU digest READ is queued: the connection is dropped at the first
    piece, yet all the others are still summed, each retrying the image and logging."""
    caplog.set_level(logging.WARNING, logger="iscsi.target.connection")
    a, _ = await digest_session(zc, 0x4000000005A1, [("MaxRecvDataSegmentLength", "8192")])
    calls = []

    def sick(offset, length):
        calls.append(offset)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(zc.lu.backstore, "in_place", sick)
    a.command(read10(0, 256), read=True, edtl=256 * BS)  # 16 Data-In PDUs of 8 KiB
    assert await a.closed(timeout=3)
    await until(lambda: not zc.lu.fence.holds)
    warnings = [r for r in caplog.records if "conn.zero_copy_send_failed" in r.getMessage()]
    assert len(warnings) == 1 and len(calls) == 1, (len(warnings), len(calls))


def _page_tables_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmPTE:"))


@pytest.mark.xfail(strict=True, reason="in_place maps the whole image and keeps it mapped: every 2 MiB of it "
                   "ever summed costs the daemon a page-table page (2 GiB per TiB read) until the LU closes")
def test_page_tables_of_the_mapping_do_not_grow_with_what_was_read(tmp_path):
    """Page tables are the daemon's own unswappable kernel memory, not reclaimable page
    cache (docs/performance.md counts only RssFile): a long-lived LU read end to end over
    digest connections should not leave them growing with the image's size."""
    size, step, piece = 1 << 30, 2 * MIB, 4096
    b = FileBackstore(tmp_path / "big.img", size=size)
    blob = os.urandom(piece)
    for off in range(0, size, step):
        b.write(off, blob)  # small page-cache folios: the mapping needs PTEs for them
    fence = ReadFence()

    def sum_pieces(start: int, end: int) -> None:
        for off in range(start, end, step):
            extent = fence.hold(b, off, piece)
            assert extent.checksum(crc32c) == crc32c(blob)
            extent.release()

    base = _page_tables_kib()
    sum_pieces(0, size // 4)
    quarter = _page_tables_kib() - base
    sum_pieces(size // 4, size)
    whole = _page_tables_kib() - base
    b.close()
    assert whole <= quarter + 64, (quarter, whole)  # KiB: bounded, not proportional to what was read


# -- checked and found right ------------------------------------------------------------------

async def test_digest_reads_waiting_in_the_backlog_keep_their_digests(zc):
    """Both digests, odd PDU sizes, the socket full: the pieces wait in the backlog as
    extents (partly sent ones split again) and their digests, summed when queued, match."""
    a, conn, content = await filled(zc, 0x4000000005B0, ODD)
    stop_reading(a)
    itts = [a.command(read10(i * 2 * MIB_BLOCKS + 7, MIB_BLOCKS), read=True, edtl=MIB) for i in range(8)]
    await until(lambda: conn._paused)
    assert any(p.__class__.__name__ == "FileExtent" for p in conn._backlog)  # not copied
    a.w.transport.resume_reading()
    got = await replies(a, 8)
    for i, itt in enumerate(itts):
        start = (i * 2 * MIB_BLOCKS + 7) * BS
        assert got[itt] == ("good", content[start:start + MIB]), i
    acknowledge(a)
    await until(lambda: not zc.lu.fence.holds and not conn._backlog)


async def test_digest_read_copied_behind_buffered_transport_output(zc):
    """Small READs (copied) fill the socket and leave bytes in the transport; a held READ
    queued behind them is copied onto the transport (sendpath.write_out), after its digest
    was summed over the mapping: the copy and the digest agree."""
    a, conn, content = await filled(zc, 0x4000000005B1, [("MaxRecvDataSegmentLength", "8191")])
    stop_reading(a)
    small = [a.command(read10(i * 64, 64), read=True, edtl=64 * BS) for i in range(12)]
    await until(lambda: conn.transport.get_write_buffer_size() > 0)
    held = conn.transport.get_write_buffer_size()
    big = a.command(read10(4097, 1024), read=True, edtl=1024 * BS)
    await until(lambda: len(zc.lu.fence.holds) == 1)
    await asyncio.sleep(0.05)
    assert not conn._backlog and conn.transport.get_write_buffer_size() > held  # copied in
    a.w.transport.resume_reading()
    got = await replies(a, 13)
    for i, itt in enumerate(small):
        assert got[itt] == ("good", content[i * 64 * BS:(i + 1) * 64 * BS]), i
    assert got[big] == ("good", content[4097 * BS:(4097 + 1024) * BS])
    acknowledge(a)
    await until(lambda: not zc.lu.fence.holds)


async def test_digest_read_of_the_last_blocks_after_the_lu_grew(zc):
    """The image is mapped, the LU grows (the mapping is dropped or made again), and a
    multi-PDU READ ending at the LU's new last block is summed piece by piece."""
    lu, b = zc.lu, zc.lu.backstore
    a, _ = await digest_session(zc, 0x4000000005B2, ODD)
    a.command(read10(lu.num_blocks - 300, 300), read=True, edtl=300 * BS)
    assert (await replies(a, 1)).popitem()[1] == ("good", b.read(16 * MIB - 300 * BS, 300 * BS))
    assert len(lu.fence.holds) == 1  # sent from the file
    lu.resize(20 * MIB)
    await clear_ua(a)
    tail = os.urandom(300 * BS)
    b.write(20 * MIB - len(tail), tail)
    a.command(read10(lu.num_blocks - 300, 300), read=True, edtl=len(tail))
    assert (await replies(a, 1)).popitem()[1] == ("good", tail)
    assert len(lu.fence.holds) == 1  # from the file too (the TURs acknowledged the first)
    acknowledge(a)
    await until(lambda: not lu.fence.holds)


async def test_digest_read_across_the_end_of_an_image_cut_mid_pdu(zc):
    """Someone cuts the image at an odd byte inside a multi-PDU READ's range before it is
    first mapped: pieces before the cut are summed over the (short) mapping, the piece
    across it and those after over a zero-filled copy (in_place drops the mapping there),
    and sendfile + sendpath's zero-filling copy send exactly those bytes."""
    content = os.urandom(1024 * BS)
    zc.lu.backstore.write(0, content)
    a, _ = await digest_session(zc, 0x4000000005B3, ODD)
    cut = 3 * 32767 + 1001  # inside the fourth Data-In PDU, not page or block aligned
    os.truncate(zc.lu.backstore.path, cut)
    a.command(read10(0, 1024), read=True, edtl=1024 * BS)
    assert (await replies(a, 1)).popitem()[1] == ("good", content[:cut] + bytes(1024 * BS - cut))
    acknowledge(a)
    await until(lambda: not zc.lu.fence.holds)


def unmap_cdb(lba: int, blocks: int) -> tuple[bytes, bytes]:
    """UNMAP (SBC-4 §5.30): the CDB and its one-descriptor parameter list."""
    params = struct.pack(">HH4x", 22, 16) + struct.pack(">QI4x", lba, blocks)
    return struct.pack(">BB4xBHB", 0x42, 0, 0, len(params), 0), params


async def test_same_session_write_and_unmap_wait_for_a_held_digest_read(zc):
    """The READ's initiator has not read it; its own WRITE and UNMAP of the range arrive
    behind it.  Both wait (the pages under the queued digest must not change), the
    initiator gets the old bytes with a matching digest, then both complete."""
    old = os.urandom(512 * BS)
    zc.lu.backstore.write(0, old)
    a, _ = await digest_session(zc, 0x4000000005B4, ODD)
    stop_reading(a)
    r = a.command(read10(0, 512), read=True, edtl=len(old))
    await until(lambda: zc.lu.fence.holds)
    new = b"\x5a" * 64 * BS
    w = a.command(write10(100, 64), write=True, edtl=len(new), data=new)
    cdb, params = unmap_cdb(300, 100)
    u = a.command(cdb, write=True, edtl=len(params), data=params)
    await until(lambda: zc.lu.fence.writers == 2)
    await asyncio.sleep(0.1)
    assert zc.lu.backstore.read(0, len(old)) == old  # neither has touched the held range
    a.w.transport.resume_reading()
    got = await replies(a, 3)
    assert got[r] == ("good", old)
    assert got[w][0] == "good" and got[u][0] == "good"
    expected = bytearray(old)
    expected[100 * BS:164 * BS] = new
    expected[300 * BS:400 * BS] = bytes(100 * BS)
    assert zc.lu.backstore.read(0, len(old)) == expected


def test_mappings_and_descriptors_of_many_images_go_with_close(tmp_path):
    """A mapped image costs at most one mapping and one descriptor (mmap keeps a dup of the
    fd); closing gives both back, also when a view was still exported at the close (the
    mapping then goes with the view)."""
    def mapped() -> int:
        with open("/proc/self/maps") as f:
            return sum(str(tmp_path) in line for line in f)

    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        stores = [FileBackstore(tmp_path / f"m{i}.img", size=MIB) for i in range(40)]
        for b in stores:
            with b.in_place(4096, 8192):
                pass
        assert mapped() <= 40 and len(os.listdir("/proc/self/fd")) <= fds + 80
        for b in stores:
            b.close()
        assert mapped() == 0 and len(os.listdir("/proc/self/fd")) == fds
    b = FileBackstore(tmp_path / "x.img", size=MIB)
    view = b.in_place(0, 4096)
    b.close()  # BufferError inside is swallowed; the mapping stays for the view
    assert mapped() == 1 and bytes(view) == bytes(4096)
    view.release()
    assert mapped() == 0 and len(os.listdir("/proc/self/fd")) == fds
