"""A command its caller stops waiting for must not touch the caller's buffer afterwards.

``Session.execute`` receives large Data-In payloads straight into the caller's buffer.  When
the caller's await is cancelled (or its timeout's ABORT TASK fails) the buffer is the
caller's again at once, so the rest of a payload already arriving in place, and anything
the target still sends for that command, must go elsewhere — and the target is asked to
abort the command, so a cancelled WRITE does not land later.  Driven socket-less with the
fast-path harness: every byte boundary is the test's choice.
"""
from __future__ import annotations

import asyncio
import os

import pytest

from iscsi import framing
from iscsi import pdu as P
from iscsi.initiator import scsi
from iscsi.initiator import session as session_mod
from iscsi.initiator.errors import CommandTimeout

from .test_initiator_fastpath import STATSN0, feed, logged_in

SIZE = 131072


def _data_in(itt: int, data: bytes, statsn: int, cmd: int, *, digests: bool) -> bytes:
    return framing.encode_bytes(P.DataIn(itt=itt, data=data, final=True, has_status=True, statsn=statsn,
                                         expcmdsn=cmd, maxcmdsn=cmd + 63),
                                header_digest=digests, data_digest=digests)


def _sent(wire, digests: bool) -> list[P.Pdu]:
    return wire.pdus(header_digest=digests)


@pytest.mark.parametrize("digests", [False, True])
async def test_a_cancelled_read_stops_writing_the_callers_buffer_mid_payload(digests):
    s, conn, wire = logged_in(header_digest=digests, data_digest=digests)
    buf = bytearray(SIZE)
    reader = asyncio.ensure_future(s.execute(0, scsi.read16(0, SIZE // 512), read_len=SIZE, buf=buf))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    cmd = [p for p in _sent(wire, digests) if isinstance(p, P.ScsiCommandPdu)]
    assert len(cmd) == 1
    itt = cmd[0].itt
    payload = os.urandom(SIZE)
    stream = _data_in(itt, payload, STATSN0, 8, digests=digests)
    head = 48 + (4 if digests else 0) + 1000
    feed(conn, stream[:head], [head])              # header + the first 1000 bytes: in place from here
    assert bytes(buf[:1000]) == payload[:1000]

    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    feed(conn, stream[head:], [30000])            # the rest of the payload, digest included
    assert not conn.closed, conn.close_reason     # the data digest still checks out over the copy
    assert bytes(buf[1000:]) == bytes(SIZE - 1000), "nothing written after the caller had it back"

    # The target is asked to abort what it may still be running.
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    tmfs = [p for p in _sent(wire, digests) if isinstance(p, P.TaskMgmtRequest)]
    assert [(t.function, t.rtt, t.refcmdsn) for t in tmfs] == [(P.TmfFunction.ABORT_TASK, itt, cmd[0].cmdsn)]

    # The stream stays in step: the next command on the session completes with its own data.
    nxt = asyncio.ensure_future(s.execute(0, scsi.read16(8, 8), read_len=4096))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    itt2 = [p for p in _sent(wire, digests) if isinstance(p, P.ScsiCommandPdu)][-1].itt
    small = os.urandom(4096)
    tmf_resp = framing.encode_bytes(P.TaskMgmtResponse(itt=tmfs[0].itt, response=P.TmfResponse.COMPLETE,
                                                       statsn=STATSN0 + 1, expcmdsn=9, maxcmdsn=72),
                                    header_digest=digests, data_digest=digests)
    feed(conn, tmf_resp + _data_in(itt2, small, STATSN0 + 2, 9, digests=digests), [4096])
    task = await asyncio.wait_for(nxt, 2)
    assert bytes(task.data) == small and task.status == 0
    await s.close(logout=False)


async def test_a_cancelled_command_not_yet_sent_leaves_the_queue_without_an_abort():
    s, conn, wire = logged_in(window=1)
    first = asyncio.ensure_future(s.execute(0, scsi.read16(0, 8), read_len=4096))
    second = asyncio.ensure_future(s.execute(0, scsi.read16(8, 8), read_len=4096))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert s.in_flight == 1 and len(s._waiting) == 1, "the window holds the second command back"
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    assert not s._waiting
    await asyncio.sleep(0)
    assert not [p for p in wire.pdus() if isinstance(p, P.TaskMgmtRequest)]
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await s.close(logout=False)
    assert not s._aborters, "close() ends the background aborts"


async def test_a_timed_out_read_whose_abort_fails_is_let_go(monkeypatch):
    monkeypatch.setattr(session_mod, "MGMT_TIMEOUT", 0.05)
    s, conn, wire = logged_in()
    buf = bytearray(SIZE)
    reader = asyncio.ensure_future(s.execute(0, scsi.read16(0, SIZE // 512), read_len=SIZE, buf=buf,
                                             timeout=0.05))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    itt = [p for p in wire.pdus() if isinstance(p, P.ScsiCommandPdu)][0].itt
    payload = os.urandom(SIZE)
    stream = _data_in(itt, payload, STATSN0, 8, digests=False)
    feed(conn, stream[:48 + 500], [548])
    with pytest.raises(CommandTimeout, match="no status"):
        await asyncio.wait_for(reader, 5)
    feed(conn, stream[548:], [65536])
    assert not conn.closed, conn.close_reason
    assert bytes(buf[500:]) == bytes(SIZE - 500)
    assert s.in_flight == 0
    await s.close(logout=False)
