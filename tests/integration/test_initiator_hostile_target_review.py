"""Review of the software initiator against a hostile or buggy target.

A scripted target on 127.0.0.1 (the unit tests' FakeTarget: shared PDU codec and login
negotiation, loopback TCP) logs in normally and then misbehaves on purpose: Data-In at the
wrong Buffer Offset or with a residual that does not match what was sent, contradictory
residual bits, R2Ts that ask for the same bytes again, text that is not text, pings that
echo more than the target can take, a window that never opens, login text that is too big
or repeated, CHAP challenges that are not hex.  What is checked: no hang without a bound,
no traceback instead of an error, no wrong data handed to the caller, no unbounded growth,
no secret printed.  Earlier sweeps (test_initiator_recovery_review.py,
test_initiator_ux_review.py, tests/unit/test_initiator_*.py) are not repeated here.

Most tests run the session with ``reconnect=False``: a protocol violation then ends the
command at once with the connection's error, instead of after MAX_COMMAND_RETRIES
reconnects (what ERL 0 does, RFC 7143 §7.1; tested in test_initiator_engine).
"""
from __future__ import annotations

import asyncio
import logging
import os
import struct

import pytest

from iscsi import pdu as P
from iscsi.initiator import scsi
from iscsi.initiator.device import BlockDevice
from iscsi.initiator.errors import ConnectionLost, IscsiError
from iscsi.initiator.session import Session
from tests.unit.test_initiator_engine import FakeConn, FakeTarget, default_handler, open_session

R = P.RESERVED_TAG
KiB = 1024


@pytest.fixture
async def fake():
    targets: list[FakeTarget] = []

    async def make(handler=None, **kw) -> FakeTarget:
        t = await FakeTarget(handler, **kw).start()
        targets.append(t)
        return t

    yield make
    for t in targets:
        await t.stop()


def read_cmd(pdu: P.Pdu, op: int = 0x88) -> bool:
    return isinstance(pdu, P.ScsiCommandPdu) and pdu.cdb[0] == op


def data_in(conn: FakeConn, cmd: P.ScsiCommandPdu, pieces: list[tuple[int, bytes]], *, status: bool = True,
            underflow: int = 0, overflow: int = 0, flags_both: bool = False) -> None:
    """Data-In PDUs at the given (Buffer Offset, data), DataSN 0, 1, ...; status in the last."""
    for sn, (off, data) in enumerate(pieces):
        last = sn == len(pieces) - 1
        pdu = P.DataIn(itt=cmd.itt, datasn=sn, offset=off, data=data, final=last,
                       has_status=last and status, statsn=conn.statsn)
        if last and status:
            pdu.statsn = conn.next_statsn()
            if underflow or flags_both:
                pdu.underflow, pdu.residual = True, underflow
            if overflow or flags_both:
                pdu.overflow, pdu.residual = True, overflow or underflow
        conn.send(pdu)


async def no_reconnect(t: FakeTarget, **opts) -> Session:
    return await open_session(t, reconnect=False, **opts)


# --------------------------------------------------------------------------- Data-In placement
async def test_short_read_with_good_status_and_no_residual_is_not_handed_over_as_whole(fake):
    """The target sends 4 KiB of an 8 KiB READ and says GOOD with no U bit.  The bytes never
    sent would reach the caller as zeros (or as what its buffer held before).  RFC 7143
    §11.4.5.2: the residual is EDTL minus what was sent; the task says what arrived, and a
    block read that is short fails instead of returning a hole."""
    async def short(conn, pdu):
        if read_cmd(pdu):
            data_in(conn, pdu, [(0, b"A" * 4096)])
            return True
        return False

    t = await fake(short)
    s = await no_reconnect(t)
    try:
        task = await s.execute(0, scsi.read16(0, 16), read_len=8192)
        assert task.status == 0
        assert task.underflow and task.residual == 4096 and bytes(task.data) == b"A" * 4096
        with pytest.raises(IscsiError, match="4096 of 8192 bytes"):
            await BlockDevice(s, 0).read(0, 16)
    finally:
        await s.close()


async def test_short_read_with_a_residual_too_small_is_reported_from_what_arrived(fake):
    """U bit with residual 1024 while 4096 of the 8192 bytes came: Task.data must not
    include 3 KiB that never arrived."""
    async def short(conn, pdu):
        if read_cmd(pdu):
            data_in(conn, pdu, [(0, b"B" * 4096)], underflow=1024)
            return True
        return False

    t = await fake(short)
    s = await no_reconnect(t)
    try:
        task = await s.execute(0, scsi.read16(0, 16), read_len=8192)
        assert task.underflow and task.residual == 4096 and bytes(task.data) == b"B" * 4096
    finally:
        await s.close()


async def test_an_honest_underflow_of_a_block_read_fails_the_read(fake):
    """GOOD, U bit, residual 512: 7 of 8 blocks.  BlockDevice.read returned 4 KiB with the
    last block zero; SBC-4 READ transfers every block or ends in CHECK CONDITION."""
    async def seven(conn, pdu):
        if read_cmd(pdu):
            data_in(conn, pdu, [(0, b"C" * 3584)], underflow=512)
            return True
        return False

    t = await fake(seven)
    s = await no_reconnect(t)
    try:
        buf = bytearray(b"\xee" * 4096)
        with pytest.raises(IscsiError, match="3584 of 4096 bytes"):
            await BlockDevice(s, 0).read_into(0, buf)
    finally:
        await s.close()


@pytest.mark.parametrize("offsets", [(0, 1), (0, 4), (2, 0)], ids=["overlap", "gap", "reversed"])
@pytest.mark.parametrize("size", [2048, 32 * KiB], ids=["staged", "in-place"])
async def test_data_in_at_the_wrong_buffer_offset_is_a_protocol_error(fake, offsets, size):
    """DataSNs right, Buffer Offsets overlapping / leaving a gap / reversed, all inside the
    READ's length.  DataPDUInOrder and DataSequenceInOrder are Yes (RFC 7143 §13.18, §13.19:
    continuously increasing addresses, no gaps, no overlays): the data cannot be trusted, the
    connection drops.  Before, each completed GOOD with stale bytes left in the buffer."""
    total = 3 * size
    half = size // 2

    async def misplace(conn, pdu):
        if read_cmd(pdu):
            a, b = offsets
            data_in(conn, pdu, [(a * half, b"D" * size), (b * half, b"E" * size)])
            return True
        return False

    t = await fake(misplace)
    s = await no_reconnect(t)
    try:
        with pytest.raises(ConnectionLost, match="Buffer Offset"):
            await asyncio.wait_for(s.execute(0, scsi.read16(0, total // 512), read_len=total), 5)
    finally:
        await s.close()


async def test_both_residual_overflow_and_underflow_is_a_protocol_error(fake):
    """RFC 7143 §11.4.1 (and §11.7 for Data-In): bits O and U are mutually exclusive; both set
    is a protocol error.  It used to complete with overflow and underflow both True."""
    async def both(conn, pdu):
        if read_cmd(pdu):
            data_in(conn, pdu, [(0, b"F" * 4096)], underflow=100, flags_both=True)
            return True
        if read_cmd(pdu, 0x12):
            conn.send(P.ScsiResponse(itt=pdu.itt, status=0, statsn=conn.next_statsn(), underflow=True,
                                     overflow=True, residual=10))
            return True
        return False

    t = await fake(both)
    s = await no_reconnect(t)
    try:
        with pytest.raises(ConnectionLost, match="O and U"):
            await asyncio.wait_for(s.execute(0, scsi.read16(0, 8), read_len=4096), 5)
    finally:
        await s.close()
    s = await no_reconnect(t)
    try:
        with pytest.raises(ConnectionLost, match="O and U"):
            await asyncio.wait_for(s.execute(0, scsi.inquiry(None, 96), read_len=96), 5)
    finally:
        await s.close()


async def test_exact_data_with_an_overflow_residual_is_still_whole(fake):
    """GOOD, O bit (the target had more than we asked for), all bytes sent: nothing is cut."""
    async def over(conn, pdu):
        if read_cmd(pdu, 0x12):
            data_in(conn, pdu, [(0, b"G" * 96)], overflow=160)
            return True
        return False

    t = await fake(over)
    s = await no_reconnect(t)
    try:
        task = await s.execute(0, scsi.inquiry(None, 96), read_len=96)
        assert task.overflow and not task.underflow and task.residual == 160
        assert bytes(task.data) == b"G" * 96
    finally:
        await s.close()

