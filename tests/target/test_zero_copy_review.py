"""Review of multi-PDU zero-copy READs and the connection's backlog (commit d05ffcd and after).

Edge cases of the Data-In layout (odd MaxRecvDataSegmentLength, MaxBurstLength not a
multiple of it, digests, underflow), and the life of held ranges while their data still
sits in the backlog: the LU's image closed under it, the connection dropped, the
connection closed after a Logout (lingering), and the backlog under uvloop.
"""
from __future__ import annotations

import asyncio
import os

import pytest

from iscsi import pdu as P
from iscsi.backstore.file import FileBackstore
from iscsi.scsi.lu import LogicalUnit
from iscsi.scsi.target import LunMap
from iscsi.target.server import IscsiServer

from .fakes import FakeRegistry, FakeTarget
from .test_zero_copy_reads import (  # noqa: F401  (zc is a fixture)
    BS, IQN_T, acknowledge, filled_session, layout, logout_behind_backlog,
    read10, read_in_pdus, read_reply, session, stop_reading, until, write10, zc,
)

MIB_BLOCKS = (1 << 20) // BS  # one 1 MiB READ, as the backlog helpers issue them


def _expected_layout(n: int, segment: int, burst: int) -> list[tuple[int, int, int, bool, bool]]:
    """(DataSN, offset, length, F, S) RFC 7143 §11.7 / §13.14 ask for, computed independently:
    PDUs of at most ``segment`` bytes that never cross a multiple of ``burst``."""
    rows, offset, sn = [], 0, 0
    while offset < n:
        size = min(segment, burst - offset % burst, n - offset)
        end = offset + size
        rows.append((sn, offset, size, end == n or end % burst == 0, end == n))
        offset, sn = end, sn + 1
    return rows


async def test_odd_segment_and_burst_lengths_with_header_digest_are_sent_in_place(zc):
    """MaxRecvDataSegmentLength 32767 (pads every PDU) and MaxBurstLength 65535 (not a
    multiple of it): the pieces sent from the file, their padding and header digests."""
    n = 512 * BS
    expected, c, pdus = await read_in_pdus(zc, 0x400000000401, 512, [("MaxRecvDataSegmentLength", "32767"),
                                                                     ("MaxBurstLength", "65535"),
                                                                     ("HeaderDigest", "CRC32C")])
    assert c.header_digest and not c.data_digest
    assert b"".join(bytes(p.data) for p in pdus) == expected
    assert layout(pdus) == _expected_layout(n, 32767, 65535)
    assert pdus[-1].status == 0 and not pdus[-1].underflow and not pdus[-1].overflow
    assert len(zc.lu.fence.holds) == 1  # it went out from the file, held as one READ
    acknowledge(c)
    await until(lambda: not zc.lu.fence.holds)


async def test_odd_segment_lengths_with_data_digest_are_copied_and_summed_per_pdu(zc):
    n = 512 * BS
    # a wrong digest would be a DataDigestFailure, not a DataIn
    expected, c, pdus = await read_in_pdus(zc, 0x400000000402, 512, [("MaxRecvDataSegmentLength", "32767"),
                                                                     ("MaxBurstLength", "65535"),
                                                                     ("HeaderDigest", "CRC32C"),
                                                                     ("DataDigest", "CRC32C")])
    assert c.header_digest and c.data_digest
    assert b"".join(bytes(p.data) for p in pdus) == expected
    assert layout(pdus) == _expected_layout(n, 32767, 65535)
    assert not zc.lu.fence.holds


async def test_underflow_of_a_multi_pdu_read_sent_in_place(zc):
    """EDTL larger than the CDB's transfer: the data goes from the file, the status PDU
    carries U and the residual (§11.4.5.1), the other PDUs carry neither."""
    n = 256 * BS
    expected, c, pdus = await read_in_pdus(zc, 0x400000000403, 256, [("MaxRecvDataSegmentLength", "32768"),
                                                                     ("MaxBurstLength", "65536")], edtl=2 * n)
    assert b"".join(bytes(p.data) for p in pdus) == expected
    assert layout(pdus) == _expected_layout(n, 32768, 65536)
    last = pdus[-1]
    assert last.underflow and not last.overflow and last.residual == n
    assert not any(p.underflow or p.residual for p in pdus[:-1])
    assert len(zc.lu.fence.holds) == 1
    acknowledge(c)
    await until(lambda: not zc.lu.fence.holds)


async def test_image_closed_while_its_data_waits_in_the_backlog(zc):
    """The LU goes away (its image closed) while a held READ's data sits in the backlog:
    the connection is dropped, nothing of the lost data is claimed GOOD, and the holds,
    the writer callback and the duplicate socket are let go."""
    fds = len(os.listdir("/proc/self/fd"))
    a, conn, content = await filled_session(zc, 0x400000000404)
    stop_reading(a)
    itts = [a.command(read10(i * MIB_BLOCKS, MIB_BLOCKS), read=True, edtl=1 << 20) for i in range(4)]
    await until(lambda: conn._backlog)
    zc.lu.backstore.close()
    a.w.transport.resume_reading()
    good: dict[int, bytes] = {}
    try:
        for _ in range(4):
            data, status = await read_reply(a, timeout=3)
            if status.status == 0:
                good[status.itt] = data
    except (ConnectionError, OSError, asyncio.TimeoutError):
        pass
    assert len(good) < 4, "every READ was answered although the image was closed"
    for i, itt in enumerate(itts):
        if itt in good:
            assert good[itt] == content[i << 20:(i + 1) << 20]
    await until(lambda: conn not in zc.connections)
    assert not zc.lu.fence.holds and not conn._backlog_watched and not conn._backlog
    a.w.close()
    await until(lambda: len(os.listdir("/proc/self/fd")) <= fds)


async def test_dropping_a_connection_with_a_backlog_stops_it(zc):
    """An administrative drop (abort) while the backlog waits: no writer callback stays
    registered on the loop, the holds go, the target keeps serving others."""
    a, conn, _ = await filled_session(zc, 0x400000000405)
    stop_reading(a)
    for i in range(8):
        a.command(read10(i * MIB_BLOCKS, MIB_BLOCKS), read=True, edtl=1 << 20)
    await until(lambda: conn._backlog_watched)
    fd = conn._sock.fileno()
    assert await zc.drop_sessions(initiator=None) == 1
    await until(lambda: conn not in zc.connections)
    assert not conn._backlog_watched and not zc.lu.fence.holds
    selector = getattr(asyncio.get_running_loop(), "_selector", None)
    if selector is not None:  # the default loop: the duplicate's writer is gone
        assert fd not in selector.get_map()
    a.w.close()
    b = await session(zc, 0x400000000406)
    b.command(read10(0, 8), read=True, edtl=8 * BS)
    data, status = await read_reply(b)
    assert status.status == 0 and len(data) == 8 * BS


async def test_a_lingering_backlog_keeps_its_data_when_a_writer_times_out(zc):
    zc.lu.fence.ack_timeout = 0.5
    a, conn, content = await logout_behind_backlog(zc, 0x400000000407)
    await until(lambda: conn._close_when_sent is not None)  # logged out, lingering on its backlog
    b = await session(zc, 0x400000000408)
    lba = 3 * MIB_BLOCKS + 1024  # inside the last READ, still in A's backlog
    new = b"\xee" * 64 * BS
    b.command(write10(lba, 64), write=True, edtl=len(new), data=new)
    resp = await b.recv(timeout=5)  # the writer gives up waiting for A after ack_timeout
    assert isinstance(resp, P.ScsiResponse) and resp.status == 0
    a.w.transport.resume_reading()
    good: dict[int, bytes] = {}
    try:
        for _ in range(4):
            data, status = await read_reply(a, timeout=3)
            if isinstance(status, P.DataIn) and status.status == 0:
                good[status.itt] = data
    except (ConnectionError, OSError, asyncio.TimeoutError):
        pass
    for itt, data in good.items():
        i = itt - (a.itt - 4)  # the four READs took the ITTs before the Logout's
        assert 0 <= i < 4
        assert data == content[i << 20:(i + 1) << 20], f"READ {i} answered GOOD with bytes written after it"


def test_backlog_in_order_under_uvloop(tmp_path):
    """The daemon's loop: the writer callback on the duplicated descriptor, the rest of the
    output behind the backlog, back-pressure and its release, all under uvloop."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        backstore = FileBackstore(tmp_path / "uv.img", size=16 << 20, block_size=BS)
        lu = LogicalUnit(backstore, serial="zcuv0001", lun_id=0)
        srv = IscsiServer(FakeRegistry({IQN_T: FakeTarget(IQN_T, luns=LunMap({0: lu}))}),
                          nop_interval=60, nop_timeout=60)
        _, srv.port = await srv.add_portal("127.0.0.1", 0)
        srv.lu = lu
        try:
            a, conn, content = await filled_session(srv, 0x400000000409)
            stop_reading(a)
            itts = [a.command(read10(i * MIB_BLOCKS, MIB_BLOCKS), read=True, edtl=1 << 20)
                    for i in range(8)]
            await until(lambda: conn._paused)  # over the high-water mark: back-pressure
            a.send(P.NopOut(itt=a.next_itt(), ttt=P.RESERVED_TAG, cmdsn=a.cmdsn,
                            expstatsn=a.expstatsn, immediate=True, data=b"ping"))
            await asyncio.sleep(0.05)
            a.w.transport.resume_reading()
            for i, itt in enumerate(itts):
                data, status = await read_reply(a)
                assert status.itt == itt and status.status == 0
                assert data == content[i << 20:(i + 1) << 20]
            echo = await a.recv()  # answered after the data queued before it
            assert isinstance(echo, P.NopIn) and bytes(echo.data) == b"ping"
            await until(lambda: not conn._backlog and not conn._backlog_watched and not conn._paused)
            acknowledge(a)
            await until(lambda: not lu.fence.holds)
            a.w.close()
        finally:
            await srv.shutdown(drain_timeout=1)
            backstore.close()

    runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    try:
        runner.run(asyncio.wait_for(main(), 30))
    finally:
        runner.close()


async def test_a_slow_but_steady_reader_gets_its_logout_response(zc, monkeypatch):
    from iscsi.target import connection as C

    monkeypatch.setattr(C, "CLOSE_LINGER", 0.5)
    a, conn, _ = await logout_behind_backlog(zc, 0x40000000040A)
    await until(lambda: conn._close_when_sent is not None)
    a.w.transport.resume_reading()
    raw = bytearray()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 4.0
    while loop.time() < deadline:  # about 2.5 MiB/s: the backlog takes ~1.7 s, never idle 0.5 s
        try:
            chunk = await asyncio.wait_for(a.r.read(32768), 1.0)
        except (ConnectionError, OSError):
            break
        if not chunk:
            break
        raw += chunk
        await asyncio.sleep(0.012)
    pdus = a.parser.feed(bytes(raw))
    assert any(isinstance(p, P.LogoutResponse) for p in pdus), \
        f"cut off after {len(raw)} bytes while reading steadily"


async def test_a_closed_connection_whose_output_never_drains_is_cut_off(zc, monkeypatch):
    """close() (after a Logout, or an admin's session drop) lets queued output drain, but a
    peer that reads nothing more must not keep the connection, and what it holds, for as long
    as it keeps its socket open: CLOSE_LINGER later it is aborted, also when the unsent bytes
    sit in the transport's buffer rather than in the zero-copy backlog."""
    import iscsi.target.connection as connection_module

    monkeypatch.setattr(connection_module, "CLOSE_LINGER", 0.3)
    a, conn, _ = await filled_session(zc, 0x400000000409)
    assert not conn.backlogged
    monkeypatch.setattr(conn.transport, "close", lambda: None)  # a buffer that never drains
    conn.close()
    await until(lambda: conn not in zc.connections)
    a.w.close()
