"""Zero-copy READs over loopback: sendfile'd Data-In, and writers held until the reader has it.

The point of the hold: with ``sendfile`` the socket carries references to page-cache
pages, so a WRITE executed after the READ but before the initiator read its socket would
change the READ's data in flight.  These tests leave the reading initiator's socket
unread on purpose and check that another session's WRITE to the same range waits.
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
from iscsi.scsi.lu import LogicalUnit
from iscsi.scsi.target import LunMap
from iscsi.scsi.zerocopy import FileExtent, ReadFence
from iscsi.target import sendpath
from iscsi.target.server import IscsiServer

from .fakes import FakeRegistry, FakeTarget
from .wire import Wire

IQN_T = "iqn.2026-11.org.sanstack:zc"
BS = 512
BLOCKS = 256  # 128 KiB: one Data-In PDU at MaxRecvDataSegmentLength=262144
SIZE = BLOCKS * BS


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


@pytest.fixture
async def zc(tmp_path):
    backstore = FileBackstore(tmp_path / "lun0.img", size=16 << 20, block_size=BS)
    lu = LogicalUnit(backstore, serial="zc000001", lun_id=0)
    reg = FakeRegistry({IQN_T: FakeTarget(IQN_T, luns=LunMap({0: lu}))})
    srv = IscsiServer(reg, nop_interval=60, nop_timeout=60)
    _, srv.port = await srv.add_portal("127.0.0.1", 0)
    srv.lu = lu
    yield srv
    await srv.shutdown(drain_timeout=1)
    backstore.close()


async def session(server, isid: int, extra=()) -> Wire:
    wire = await Wire.open(server.port)
    assert (await wire.login(IQN_T, initiator=f"iqn.2026-11.org.sanstack.test:zc{isid}", isid=isid,
                             extra=extra)).status_class == 0
    wire.data_digest = wire.parser.data_digest = wire.answers.get("DataDigest") == "CRC32C"
    wire.header_digest = wire.parser.header_digest = wire.answers.get("HeaderDigest") == "CRC32C"
    for _ in range(3):  # the power-on unit attention
        wire.command(bytes(6))
        if (await wire.recv()).status == 0:
            break
    return wire


async def read_reply(wire: Wire, timeout: float = 5.0) -> tuple[bytes, P.Pdu]:
    """Data-In bytes up to the status; target pings on the way are answered."""
    data = b""
    while True:
        pdu = await wire.recv(timeout)
        if isinstance(pdu, P.NopIn):
            continue
        if isinstance(pdu, P.DataIn):
            data += bytes(pdu.data)
            if pdu.has_status:
                return data, pdu
            continue
        return data, pdu


def stop_reading(wire: Wire) -> None:
    """Leave what the target sends in the kernel (the test's loop would read it at once)."""
    wire.w.transport.pause_reading()


def acknowledge(wire: Wire, ttt: int = P.RESERVED_TAG) -> None:
    """NOP-Out carrying our ExpStatSN (an answer to a ping when ``ttt`` is given)."""
    wire.send(P.NopOut(itt=P.RESERVED_TAG, ttt=ttt, cmdsn=wire.cmdsn, expstatsn=wire.expstatsn, immediate=True))


async def until(predicate, timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_large_read_is_sent_from_the_file_and_held_until_acknowledged(zc):
    old = os.urandom(SIZE)
    zc.lu.backstore.write(0, old)
    a = await session(zc, 0x400000000101)
    a.command(read10(0, BLOCKS), read=True, edtl=SIZE)
    data, status = await read_reply(a)
    assert data == old and status.status == 0
    assert len(zc.lu.fence.holds) == 1  # zero-copy was used, and is held: no ExpStatSN yet
    acknowledge(a)
    await until(lambda: not zc.lu.fence.holds)
    # small READs are copied as before
    a.command(read10(0, 8), read=True, edtl=8 * BS)
    data, _ = await read_reply(a)
    assert data == old[:8 * BS] and not zc.lu.fence.holds


async def test_a_second_session_shares_the_lu_from_its_login_not_its_first_command(zc):
    """Holds are for a sole user only; a host that has logged in but sent nothing yet makes
    the LU shared already.  Before, the first host's READs were still held, and the
    newcomer's first WRITE there waited for the first host to acknowledge them (5 s, then
    the first host dropped, with a single-threaded client driving both sessions)."""
    content = os.urandom(SIZE)
    zc.lu.backstore.write(0, content)
    a = await session(zc, 0x400000000111)
    b = await Wire.open(zc.port)
    assert (await b.login(IQN_T, initiator="iqn.2026-11.org.sanstack.test:zcb", isid=0x400000000112)).status_class == 0
    a.command(read10(0, BLOCKS), read=True, edtl=SIZE)
    data, status = await read_reply(a)
    assert data == content and status.status == 0
    assert not zc.lu.fence.holds, "READ held although another session can reach the LU"
    b.w.close()
    await until(lambda: zc.lu.sole_user is not None)  # alone again once b's session ends
    a.command(read10(0, BLOCKS), read=True, edtl=SIZE)
    data, _ = await read_reply(a)
    assert data == content and len(zc.lu.fence.holds) == 1


async def test_write_waits_until_the_reader_has_the_old_data(zc):
    old, new = os.urandom(SIZE), os.urandom(64 * BS)
    zc.lu.backstore.write(0, old)
    a = await session(zc, 0x400000000102)
    stop_reading(a)
    a.command(read10(0, BLOCKS), read=True, edtl=SIZE)
    await until(lambda: zc.lu.fence.holds)  # A used the LU alone: its READ is held
    b = await session(zc, 0x400000000103)
    # B writes into the middle of the range A has not read yet
    b.command(write10(32, 64), write=True, edtl=len(new), data=new)
    await asyncio.sleep(0.3)  # time enough for the write to land, were it not held
    a.w.transport.resume_reading()
    data, status = await read_reply(a)
    assert status.status == 0 and data == old, "the READ's data changed after it completed"
    with pytest.raises(asyncio.TimeoutError):
        await b.recv(timeout=0.1)  # still waiting for A's acknowledgement
    ping = await a.recv()  # B's wait asked A how far it has read
    assert isinstance(ping, P.NopIn) and ping.ttt != P.RESERVED_TAG
    acknowledge(a, ping.ttt)
    resp = await b.recv(timeout=3)
    assert isinstance(resp, P.ScsiResponse) and resp.status == 0
    assert zc.lu.backstore.read(32 * BS, len(new)) == new


async def test_writes_elsewhere_do_not_wait(zc):
    a = await session(zc, 0x400000000104)
    stop_reading(a)
    a.command(read10(0, BLOCKS), read=True, edtl=SIZE)
    await until(lambda: zc.lu.fence.holds)
    b = await session(zc, 0x400000000105)
    b.command(write10(BLOCKS, 8), write=True, edtl=8 * BS, data=b"\x77" * 8 * BS)
    resp = await b.recv(timeout=3)
    assert isinstance(resp, P.ScsiResponse) and resp.status == 0
    assert zc.lu.fence.holds  # A's range is still held


async def test_a_reader_that_never_acknowledges_is_dropped_and_the_write_goes_on(zc):
    zc.lu.fence.ack_timeout = 0.5
    a = await session(zc, 0x400000000106)
    stop_reading(a)
    a.command(read10(0, BLOCKS), read=True, edtl=SIZE)
    await until(lambda: zc.lu.fence.holds)
    b = await session(zc, 0x400000000107)
    b.command(write10(0, 8), write=True, edtl=8 * BS, data=b"\x11" * 8 * BS)
    resp = await b.recv(timeout=5)
    assert isinstance(resp, P.ScsiResponse) and resp.status == 0
    a.w.transport.resume_reading()
    assert await a.closed(timeout=3)
    assert not zc.lu.fence.holds


async def test_only_an_lu_used_by_one_session_is_read_in_place(zc):
    """A shared LU (a cluster's datastore, several paths) is copied: a hold there could make
    one host's write wait for another host's initiator."""
    a = await session(zc, 0x40000000010D)
    b = await session(zc, 0x40000000010E)
    a.command(read10(0, BLOCKS), read=True, edtl=SIZE)
    await read_reply(a)
    assert not zc.lu.fence.holds
    b.send(P.LogoutRequest(itt=b.next_itt(), cmdsn=b.cmdsn, expstatsn=b.expstatsn, reason=0, immediate=True))
    assert isinstance(await b.recv(), P.LogoutResponse)
    await until(lambda: zc.lu.sole_user is not None)
    a.command(read10(0, BLOCKS), read=True, edtl=SIZE)
    await read_reply(a)
    assert len(zc.lu.fence.holds) == 1  # alone again


async def test_ping_echo_releases_even_with_a_stale_expstatsn(zc):
    """The echo of our NOP-In proves the initiator read everything sent before it."""
    a = await session(zc, 0x40000000010F)
    stale = a.expstatsn
    a.command(read10(0, BLOCKS), read=True, edtl=SIZE)
    await read_reply(a)
    conn = next(iter(zc.connections))
    conn.solicit_ack()
    ping = await a.recv()
    assert isinstance(ping, P.NopIn) and ping.ttt != P.RESERVED_TAG
    a.expstatsn = stale
    acknowledge(a, ping.ttt)
    await until(lambda: not zc.lu.fence.holds)


async def test_connection_loss_releases_its_holds_and_descriptors(zc):
    fds = len(os.listdir("/proc/self/fd"))
    a = await session(zc, 0x400000000108)
    a.command(read10(0, BLOCKS), read=True, edtl=SIZE)
    await until(lambda: zc.lu.fence.holds)
    a.w.close()
    await until(lambda: not zc.lu.fence.holds)
    await until(lambda: not zc.connections)
    assert len(os.listdir("/proc/self/fd")) == fds  # the socket's duplicate is closed too


async def test_data_digest_connections_copy_the_data(zc):
    expected = os.urandom(SIZE)
    zc.lu.backstore.write(0, expected)
    a = await session(zc, 0x400000000109, extra=[("DataDigest", "CRC32C"), ("HeaderDigest", "CRC32C")])
    assert a.data_digest and a.header_digest
    a.command(read10(0, BLOCKS), read=True, edtl=SIZE)
    data, status = await read_reply(a)
    assert isinstance(status, P.DataIn) and status.status == 0  # a digest error is not a DataIn
    assert data == expected and not zc.lu.fence.holds


async def data_in_pdus(wire: Wire, timeout: float = 5.0) -> list[P.DataIn]:
    """Every Data-In PDU of one READ, up to the one with the status."""
    pdus = []
    while True:
        pdu = await wire.recv(timeout)
        if isinstance(pdu, P.NopIn):
            continue
        assert isinstance(pdu, P.DataIn), pdu
        pdus.append(pdu)
        if pdu.has_status:
            return pdus


async def read_in_pdus(zc, isid: int, blocks: int, keys, edtl: int | None = None
                      ) -> tuple[bytes, Wire, list[P.DataIn]]:
    """Fresh random content in LBAs 0..``blocks``, read back with one READ(10) in a session
    logged in with ``keys``: (the content, the session, the READ's Data-In PDUs)."""
    content = os.urandom(blocks * BS)
    zc.lu.backstore.write(0, content)
    c = await session(zc, isid, extra=keys)
    c.command(read10(0, blocks), read=True, edtl=len(content) if edtl is None else edtl)
    return content, c, await data_in_pdus(c)


def layout(pdus: list[P.DataIn]) -> list[tuple[int, int, int, bool, bool]]:
    """(DataSN, Buffer Offset, length, F, S) of each Data-In."""
    return [(p.datasn, p.offset, len(p.data), p.final, p.has_status) for p in pdus]


async def test_read_over_several_data_in_pdus_is_sent_from_the_file_and_held(zc):
    expected, c, pdus = await read_in_pdus(zc, 0x40000000010A, BLOCKS, [("MaxRecvDataSegmentLength", "32768"),
                                                                         ("MaxBurstLength", "65536")])
    assert b"".join(bytes(p.data) for p in pdus) == expected
    # 32 KiB PDUs in sequences of 64 KiB, the F bit closing each (RFC 7143 §11.7.1, §13.14)
    assert layout(pdus) == [(0, 0, 32768, False, False), (1, 32768, 32768, True, False),
                            (2, 65536, 32768, False, False), (3, 98304, 32768, True, True)]
    assert len(zc.lu.fence.holds) == 1  # one hold for the whole READ, until acknowledged
    acknowledge(c)
    await until(lambda: not zc.lu.fence.holds)


async def test_max_burst_length_below_the_segment_length_splits_the_answer(zc):
    expected, _, pdus = await read_in_pdus(zc, 0x40000000010C, BLOCKS, [("MaxBurstLength", "65536")])
    assert b"".join(bytes(p.data) for p in pdus) == expected
    assert layout(pdus) == [(0, 0, 65536, True, False), (1, 65536, 65536, True, True)]


async def test_copied_read_keeps_sequences_within_max_burst_length(zc):
    """Below the zero-copy size (copied): PDUs are cut at every burst boundary too."""
    expected, _, pdus = await read_in_pdus(zc, 0x40000000010D, 64, [("MaxRecvDataSegmentLength", "8192"),
                                                                    ("MaxBurstLength", "12288")])
    assert b"".join(bytes(p.data) for p in pdus) == expected
    assert layout(pdus) == [(0, 0, 8192, False, False), (1, 8192, 4096, True, False),
                            (2, 12288, 8192, False, False), (3, 20480, 4096, True, False),
                            (4, 24576, 8192, True, True)]
    assert not zc.lu.fence.holds


async def test_read_with_overflow_is_copied_and_cut(zc):
    expected = os.urandom(SIZE)
    zc.lu.backstore.write(0, expected)
    a = await session(zc, 0x40000000010B)
    a.command(read10(0, BLOCKS), read=True, edtl=SIZE - BS)  # initiator expects less than the CDB asks
    data, status = await read_reply(a)
    assert data == expected[:SIZE - BS] and status.overflow and status.residual == BS
    assert not zc.lu.fence.holds


async def test_pipelined_reads_and_overlapping_writes_of_one_session(zc):
    """The sole user keeps a READ of a region and a WRITE into it in flight together, forty
    times: each WRITE waits for the READ before it to be read (answering the target's
    pings as any initiator does), every READ holds whole 32 KiB writes, nothing deadlocks."""
    lu = zc.lu
    lu.backstore.write(0, bytes([1]) * SIZE)
    a = await session(zc, 0x400000000200)
    chunk = 64 * BS
    waited = 0
    for i in range(40):
        r = a.command(read10(0, BLOCKS), read=True, edtl=SIZE)
        w = a.command(write10((i % 4) * 64, 64), write=True, edtl=chunk, data=bytes([i + 2]) * chunk)
        data, done = b"", set()
        while len(done) < 2:
            pdu = await a.recv(timeout=10)
            if isinstance(pdu, P.NopIn):
                waited += 1
                acknowledge(a, pdu.ttt)
                continue
            if isinstance(pdu, P.DataIn):
                assert pdu.itt == r
                data += bytes(pdu.data)
                if not pdu.has_status:
                    continue
            assert pdu.status == 0 and pdu.itt in (r, w)
            done.add(pdu.itt)
        assert len(data) == SIZE
        for off in range(0, SIZE, chunk):
            piece = data[off:off + chunk]
            assert piece == bytes([piece[0]]) * chunk, "a READ mixed bytes of two writes"
    assert waited, "no WRITE ever had to wait: the test did not exercise the holds"
    acknowledge(a)
    await until(lambda: not lu.fence.holds and not lu.fence.writers)


# -- the send path itself ------------------------------------------------------------------

class Transport:
    def __init__(self, buffered: int = 0) -> None:
        self.buffered = buffered
        self.written: list = []

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def writelines(self, parts) -> None:
        self.written += [bytes(p) for p in parts]


class Source:
    def __init__(self, fd: int) -> None:
        self.fileno = fd


@pytest.fixture
def image(tmp_path):
    content = os.urandom(4 << 20)
    path = tmp_path / "img"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    yield Source(fd), content
    os.close(fd)


def drain(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    got = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return got
        if not chunk:
            return got
        got += chunk


def test_write_out_keeps_order_of_bytes_and_extents(image):
    src, content = image
    fence = ReadFence()
    left, right = socket.socketpair()
    left.setblocking(False)
    out = [b"head", fence.hold(src, 100, 5000), memoryview(b"middle"), fence.hold(src, 9000, 3), b"tail"]
    t = Transport()
    sendpath.write_out(left, out, t)
    assert t.written == []
    assert drain(right) == b"head" + content[100:5100] + b"middle" + content[9000:9003] + b"tail"


def test_write_out_behind_buffered_transport_output_copies_everything(image):
    src, content = image
    left, right = socket.socketpair()
    t = Transport(buffered=10)
    sendpath.write_out(left, [b"h", ReadFence().hold(src, 0, 4096), b"t"], t)
    assert drain(right) == b""  # nothing may overtake what the transport still holds
    assert b"".join(t.written) == b"h" + content[:4096] + b"t"


def test_write_out_into_a_full_socket_returns_the_rest_still_in_the_file(image):
    src, content = image
    left, right = socket.socketpair()
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    left.setblocking(False)
    fence = ReadFence()
    out = [b"A" * 48, fence.hold(src, 0, 1 << 20), b"B" * 48, fence.hold(src, 1 << 20, 1 << 20), b"C"]
    t = Transport()
    rest = sendpath.write_out(left, out, t)
    assert rest, "the socket took everything: the test did not fill it"
    assert t.written == [] and any(isinstance(p, FileExtent) for p in rest)  # nothing copied
    got = drain(right)
    for _ in range(1000):  # the connection does this each time the socket is writable
        if not rest:
            break
        rest = sendpath.send_parts(left, rest)
        got += drain(right)
    assert not rest
    assert got == b"A" * 48 + content[:1 << 20] + b"B" * 48 + content[1 << 20:2 << 20] + b"C"


def test_any_mix_of_headers_and_extents_into_a_small_socket_arrives_whole(image):
    """Lone headers, runs of bytes, extents (some up to the image's last byte), a socket
    that takes a few KiB at a time: every byte arrives once, in order."""
    import random

    src, content = image
    end = len(content)
    for seed in range(12):
        rnd = random.Random(seed)
        left, right = socket.socketpair()
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        left.setblocking(False)
        fence = ReadFence()
        parts, expected = [], b""
        for _ in range(rnd.randrange(1, 12)):
            if rnd.random() < 0.5:
                piece = os.urandom(rnd.randrange(1, 200) if rnd.random() < 0.7 else rnd.randrange(4000, 9000))
                parts.append(piece if rnd.random() < 0.5 else memoryview(piece))
                expected += piece
            else:
                offset = rnd.randrange(0, end)
                length = rnd.randrange(1, min(300_000, end - offset) + 1)
                parts.append(fence.hold(src, offset, length))
                expected += content[offset:offset + length]
        got, rest = b"", parts
        for _ in range(20_000):
            rest = sendpath.send_parts(left, rest)
            got += drain(right)
            if not rest:
                break
        got += drain(right)
        assert not rest and got == expected, f"seed {seed}"
        left.close()
        right.close()


def test_an_extent_past_the_end_of_the_image_is_not_sent_as_zeroes(image):
    """An image shorter than a READ's extent was cut short behind the daemon's back: the send
    fails (the connection drops, its GOOD status must not cover zeroes) and the LU's READs
    are copied from then on."""
    src, content = image
    left, right = socket.socketpair()
    left.setblocking(False)
    end = len(content)
    fence = ReadFence()
    with pytest.raises(OSError) as err:
        sendpath.write_out(left, [b"h", fence.hold(src, end - 100, 300), b"t"], Transport())
    assert err.value.errno == errno.EIO
    assert not fence.sendfile_ok
    assert not drain(right).endswith(bytes(200) + b"t")


def test_write_out_from_a_closed_image_fails(image):
    src, _ = image
    left, right = socket.socketpair()
    gone = Source(-1)
    with pytest.raises(OSError):
        sendpath.write_out(left, [b"h", ReadFence().hold(gone, 0, 4096)], Transport())
    assert isinstance(ReadFence().hold(src, 0, 1), FileExtent)


async def test_holds_per_connection_are_bounded_when_expstatsn_never_moves(zc):
    from iscsi.target.connection import ZERO_COPY_UNACKED_LIMIT

    expected = os.urandom(SIZE)
    zc.lu.backstore.write(0, expected)
    a = await session(zc, 0x40000000010C)
    stale = a.expstatsn
    for _ in range(ZERO_COPY_UNACKED_LIMIT + 5):
        a.expstatsn = stale  # an initiator that never acknowledges anything
        a.command(read10(0, BLOCKS), read=True, edtl=SIZE)
        data, status = await read_reply(a)
        assert data == expected and status.status == 0
    assert len(zc.lu.fence.holds) == ZERO_COPY_UNACKED_LIMIT  # the rest were copied
    acknowledge(a)
    await until(lambda: not zc.lu.fence.holds)


def test_send_of_more_parts_than_iov_max_into_a_full_socket():
    left, right = socket.socketpair()
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
    left.setblocking(False)
    parts = [bytes([i % 251]) * 97 for i in range(3000)]  # 291 000 bytes, 3 writev's worth of parts
    rest = sendpath._send(left, parts, 0)
    assert rest, "the socket took everything: the test did not fill it"
    got = drain(right)
    assert got + b"".join(bytes(p) for p in rest) == b"".join(parts)


def test_a_filesystem_that_refuses_sendfile_is_copied_from_then_on(image, monkeypatch, caplog):
    import errno
    import logging

    caplog.set_level(logging.WARNING, logger=sendpath.__name__)  # whatever an earlier test set
    src, content = image
    fence = ReadFence()

    def refuse(*args):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(sendpath.os, "sendfile", refuse)
    monkeypatch.setattr(sendpath, "_os_sendfile", refuse)  # send_parts' own binding
    left, right = socket.socketpair()
    left.setblocking(False)
    t = Transport()
    sendpath.write_out(left, [b"h", fence.hold(src, 0, 8192), b"t"], t)
    assert drain(right) + b"".join(t.written) == b"h" + content[:8192] + b"t"  # copied instead
    assert not fence.sendfile_ok and "zero_copy.sendfile_refused" in caplog.text


async def test_zero_copy_can_be_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv("SANSTACK_ZERO_COPY", "0")
    backstore = FileBackstore(tmp_path / "off.img", size=4 << 20, block_size=BS)
    lu = LogicalUnit(backstore, serial="zc000002", lun_id=0)
    srv = IscsiServer(FakeRegistry({IQN_T: FakeTarget(IQN_T, luns=LunMap({0: lu}))}), nop_interval=60, nop_timeout=60)
    _, srv.port = await srv.add_portal("127.0.0.1", 0)
    srv.lu = lu
    try:
        a = await session(srv, 0x400000000300)
        a.command(read10(0, BLOCKS), read=True, edtl=SIZE)
        data, status = await read_reply(a)
        assert status.status == 0 and data == bytes(SIZE) and not lu.fence.holds
    finally:
        await srv.shutdown(drain_timeout=1)
        backstore.close()


# -- a socket that fills up: the rest waits in the file (the connection's backlog) ----------

async def filled_session(zc, isid: int) -> tuple[Wire, object, bytes]:
    """A session whose target-side socket takes little at a time, and 16 MiB of content."""
    content = os.urandom(16 << 20)
    zc.lu.backstore.write(0, content)
    wire = await session(zc, isid)
    (conn,) = [c for c in zc.connections if c.session is not None]
    conn._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    return wire, conn, content


async def test_reads_the_socket_cannot_take_wait_in_the_file_not_in_memory(zc):
    a, conn, content = await filled_session(zc, 0x400000000120)
    stop_reading(a)
    for i in range(16):  # 16 MiB of READs: more than the socket and the high-water mark
        a.command(read10(i * 2048, 2048), read=True, edtl=1 << 20)
    await until(lambda: conn._paused)  # back-pressure: the backlog is over the high-water mark
    assert any(isinstance(p, FileExtent) for p in conn._backlog)  # still in the file: not copied
    assert conn.transport.get_write_buffer_size() == 0
    a.w.transport.resume_reading()
    for i in range(16):
        data, status = await read_reply(a)
        assert status.status == 0 and data == content[i << 20:(i + 1) << 20]
    await until(lambda: not conn._backlog and not conn._backlog_watched and not conn._paused)
    acknowledge(a)
    await until(lambda: not zc.lu.fence.holds)
    # the connection goes on normally afterwards
    a.command(read10(0, 8), read=True, edtl=8 * BS)
    data, _ = await read_reply(a)
    assert data == content[:8 * BS]


async def test_shrinking_the_lu_under_queued_reads_never_sends_zeroes_as_data(zc, caplog):
    """An admin shrinks the LU (``lun resize --force``) while READs of its tail still wait in
    the file (the connection's backlog).  Sent after the truncation they would arrive as
    zeroes under GOOD; the connection holding them is dropped instead, and what it did
    deliver before is the real data."""
    caplog.set_level(logging.WARNING, logger="iscsi.target.connection")
    a, conn, content = await filled_session(zc, 0x400000000125)
    stop_reading(a)
    for i in range(4):
        a.command(read10(i * 2048, 2048), read=True, edtl=1 << 20)
    await until(lambda: conn._backlog and len(zc.lu.fence.holds) == 4)
    zc.lu.resize(1 << 20)  # READs 1..3 lie past the new end
    assert "conn.zero_copy_range_removed" in caplog.text and not zc.lu.fence.holds
    a.w.transport.resume_reading()
    good = 0
    try:
        for i in range(4):
            data, status = await read_reply(a, timeout=2)
            assert status.status == 0 and data == content[i << 20:(i + 1) << 20], f"READ {i}"
            good += 1
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    assert good < 4  # the connection went before the data past the new end


async def logout_behind_backlog(zc, isid: int) -> tuple[Wire, object, bytes]:
    """Four 1 MiB READs the initiator does not read yet, then a Logout Request."""
    a, conn, content = await filled_session(zc, isid)
    stop_reading(a)
    for i in range(4):
        a.command(read10(i * 2048, 2048), read=True, edtl=1 << 20)
    await until(lambda: conn._backlog)
    a.send(P.LogoutRequest(itt=a.next_itt(), cmdsn=a.cmdsn, expstatsn=a.expstatsn, reason=0))
    return a, conn, content


async def test_logout_behind_a_backlog_is_answered_after_the_data(zc):
    a, conn, content = await logout_behind_backlog(zc, 0x400000000121)
    await asyncio.sleep(0.1)
    a.w.transport.resume_reading()
    for i in range(4):
        data, status = await read_reply(a)
        assert status.status == 0 and data == content[i << 20:(i + 1) << 20]
    assert isinstance(await a.recv(), P.LogoutResponse)
    assert await a.closed()
    await until(lambda: conn not in zc.connections and not zc.lu.fence.holds)


async def test_a_peer_that_never_reads_its_backlog_is_cut_off_after_logout(zc, monkeypatch):
    from iscsi.target import connection as C

    monkeypatch.setattr(C, "CLOSE_LINGER", 0.3)
    _, conn, _ = await logout_behind_backlog(zc, 0x400000000122)
    await until(lambda: conn not in zc.connections, timeout=3)
    assert not zc.lu.fence.holds and not conn._backlog_watched


async def test_reads_that_waited_for_their_cmdsn_turn_are_sent_from_the_file_too(zc):
    expected = os.urandom(2 * SIZE)
    zc.lu.backstore.write(0, expected)
    a = await session(zc, 0x400000000123)
    first = a.cmdsn
    a.command(read10(BLOCKS, BLOCKS), read=True, edtl=SIZE, cmdsn=first + 1)  # waits for CmdSN `first`
    a.command(read10(0, BLOCKS), read=True, edtl=SIZE, cmdsn=first)
    a.cmdsn = first + 2
    got = {}
    for _ in range(2):
        data, status = await read_reply(a)
        got[status.itt] = data
    assert sorted(got.values()) == sorted([expected[:SIZE], expected[SIZE:]])
    assert len(zc.lu.fence.holds) == 2  # both held: both went out from the file
    acknowledge(a)
    await until(lambda: not zc.lu.fence.holds)
