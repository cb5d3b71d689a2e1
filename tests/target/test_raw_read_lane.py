"""The raw READ lane (TargetConnection._command_arrived_raw via PduReader.take_command).

A bare READ(10)/(16) command is answered from the receive buffer, before any PDU object is
built, when the regular fast lane would have run it at once.  These tests hold it to the
regular path: it must really be taken for ordinary READs, and whenever anything else
applies (an earlier PDU of the same segment not yet dispatched, a CmdSN gap, a unit
attention, an ORDERED task, odd flag bits, the reserved ITT) the command must get exactly
the answer the regular path gives.
"""
from __future__ import annotations

import os
import struct

import pytest

from iscsi import pdu as P
from iscsi.backstore.file import FileBackstore
from iscsi.framing import encode_bytes
from iscsi.scsi.lu import LogicalUnit
from iscsi.scsi.target import LunMap
from iscsi.target.connection import TargetConnection
from iscsi.target.server import IscsiServer

from .fakes import FakeRegistry, FakeTarget
from .test_zero_copy_reads import read_reply as answer
from .wire import Wire

IQN_T = "iqn.2026-11.org.sanstack:raw"
BS = 512


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def read16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


@pytest.fixture
async def served(tmp_path, monkeypatch):
    backstore = FileBackstore(tmp_path / "lun0.img", size=8 << 20, block_size=BS)
    content = os.urandom(8 << 20)
    backstore.write(0, content)
    lu = LogicalUnit(backstore, serial="raw00001", lun_id=0)
    srv = IscsiServer(FakeRegistry({IQN_T: FakeTarget(IQN_T, luns=LunMap({0: lu}))}),
                      nop_interval=60, nop_timeout=60)
    _, srv.port = await srv.add_portal("127.0.0.1", 0)
    taken = []
    real = TargetConnection._command_arrived_raw

    def spy(self, f, buf, pos, data_start):
        ok = real(self, f, buf, pos, data_start)
        taken.append(ok)
        return ok

    monkeypatch.setattr(TargetConnection, "_command_arrived_raw", spy)
    srv.lu, srv.content, srv.taken = lu, bytearray(content), taken
    yield srv
    await srv.shutdown(drain_timeout=1)
    backstore.close()


async def login(srv, isid: int = 0x400000000201, clear_ua: bool = True, extra=()) -> Wire:
    wire = await Wire.open(srv.port)
    assert (await wire.login(IQN_T, initiator="iqn.2026-11.org.sanstack.test:raw", isid=isid,
                             extra=extra)).status_class == 0
    wire.data_digest = wire.parser.data_digest = wire.answers.get("DataDigest") == "CRC32C"
    wire.header_digest = wire.parser.header_digest = wire.answers.get("HeaderDigest") == "CRC32C"
    if clear_ua:
        for _ in range(3):
            wire.command(bytes(6))
            if (await wire.recv()).status == 0:
                break
    return wire


def command_bytes(wire: Wire, cdb: bytes, *, read=False, write=False, edtl=0, data=b"", attr=1,
                  itt: int | None = None, cmdsn: int | None = None, flags: int = 0) -> bytes:
    """One command PDU's bytes, numbered like Wire.command (``flags``: extra bits in byte 1)."""
    itt = wire.next_itt() if itt is None else itt
    sn = wire.cmdsn if cmdsn is None else cmdsn
    if cmdsn is None:
        wire.cmdsn += 1
    pdu = P.ScsiCommandPdu(read=read, write=write, attr=attr, edtl=edtl, cmdsn=sn, expstatsn=wire.expstatsn,
                           cdb=cdb, itt=itt, data=data)
    if flags:  # bits the codec has no field for: the header digest has to cover them
        header = bytearray(pdu.header())
        header[1] |= flags
        assert not wire.header_digest and not data
        return bytes(header)
    return encode_bytes(pdu, header_digest=wire.header_digest, data_digest=wire.data_digest)


async def test_ordinary_reads_take_the_raw_lane_and_return_the_medium(served):
    wire = await login(served)
    served.taken.clear()
    cases = [(read10(0, 8), 4096), (read16(100, 256), 128 << 10), (read10(2000, 1), 512), (read16(9, 64), 32 << 10)]
    wire.send_raw(b"".join(command_bytes(wire, cdb, read=True, edtl=n) for cdb, n in cases))
    for cdb, n in cases:
        data, status = await answer(wire)
        lba = struct.unpack_from(">I", cdb, 2)[0] if cdb[0] == 0x28 else struct.unpack_from(">Q", cdb, 2)[0]
        assert status.status == 0 and data == bytes(served.content[lba * BS:lba * BS + n])
    assert served.taken == [True] * len(cases)


@pytest.mark.parametrize("digests", ["None", "CRC32C"])
async def test_reads_with_digests_take_the_lane_and_a_bad_header_digest_does_not(served, digests):
    wire = await login(served, extra=[("HeaderDigest", digests), ("DataDigest", digests)])
    assert wire.header_digest == (digests == "CRC32C")
    served.taken.clear()
    wire.send_raw(command_bytes(wire, read16(300, 32), read=True, edtl=16 << 10))
    data, status = await answer(wire)
    assert status.status == 0 and data == bytes(served.content[300 * BS:332 * BS])
    assert served.taken == [True]
    if wire.header_digest:
        raw = bytearray(command_bytes(wire, read16(300, 32), read=True, edtl=16 << 10))
        raw[-1] ^= 0xFF  # the header digest no longer matches: the connection goes (RFC 7143 §7.8)
        wire.send_raw(bytes(raw))
        with pytest.raises(ConnectionError):
            await wire.recv(5.0)
        assert served.taken == [True]


@pytest.mark.parametrize("immediate", [False, True])
async def test_a_write_earlier_in_the_same_segment_lands_before_the_read(served, immediate):
    """The READ is parsed while the WRITE before it is decoded but not dispatched yet: it must
    not overtake it (the lane is closed while a PDU of the same feed waits).  An immediate
    WRITE leaves ExpCmdSN where the READ's CmdSN is, so only that rule keeps the order."""
    wire = await login(served)
    new = os.urandom(4096)
    if immediate:
        raw = command_bytes(wire, write10(40, 8), write=True, edtl=4096, data=new, cmdsn=wire.cmdsn)
        raw = raw[:0] + bytes([raw[0] | 0x40]) + raw[1:]  # the I bit
    else:
        raw = command_bytes(wire, write10(40, 8), write=True, edtl=4096, data=new)
    raw += command_bytes(wire, read10(40, 8), read=True, edtl=4096)
    served.taken.clear()
    wire.send_raw(raw)
    _, wrote = await answer(wire)
    data, status = await answer(wire)
    assert wrote.status == 0 and status.status == 0 and data == new
    if immediate:  # the WRITE waits decoded in the feed's result: the lane stays closed
        assert True not in served.taken
    else:  # the WRITE takes the raw lane too, then the READ, in order
        assert served.taken == [True, True]


async def test_a_read_ahead_of_its_cmdsn_waits_for_the_gap(served):
    wire = await login(served)
    first, second = wire.cmdsn, wire.cmdsn + 1
    wire.cmdsn += 2
    late = command_bytes(wire, read10(7, 1), read=True, edtl=512, cmdsn=second)
    early = command_bytes(wire, read10(8, 1), read=True, edtl=512, cmdsn=first)
    wire.send_raw(late)
    wire.send_raw(early)
    got = {}
    for _ in range(2):
        data, status = await answer(wire)
        got[status.itt] = (status.status, data)
    itt_late, itt_early = struct.unpack_from(">I", late, 16)[0], struct.unpack_from(">I", early, 16)[0]
    assert got[itt_late] == (0, bytes(served.content[7 * BS:8 * BS]))
    assert got[itt_early] == (0, bytes(served.content[8 * BS:9 * BS]))


async def test_the_first_read_of_a_session_reports_the_unit_attention(served):
    wire = await login(served, clear_ua=False)
    wire.send_raw(command_bytes(wire, read10(0, 1), read=True, edtl=512))
    _, status = await answer(wire)
    assert status.status == 2 and bytes(status.data)[2 + 2] & 0x0F == 0x06  # UNIT ATTENTION
    wire.send_raw(command_bytes(wire, read10(0, 1), read=True, edtl=512))
    data, status = await answer(wire)
    assert status.status == 0 and data == bytes(served.content[:512])


@pytest.mark.parametrize("attr, flags", [(2, 0), (3, 0), (1, 0x18)])  # ORDERED, HEAD OF QUEUE, reserved bits
async def test_other_task_attributes_and_odd_bits_take_the_regular_path(served, attr, flags):
    wire = await login(served)
    served.taken.clear()
    wire.send_raw(command_bytes(wire, read16(64, 16), read=True, edtl=8192, attr=attr, flags=flags))
    data, status = await answer(wire)
    assert status.status == 0 and data == bytes(served.content[64 * BS:80 * BS])
    assert True not in served.taken


async def test_a_read_under_the_reserved_itt_is_rejected_not_answered(served):
    wire = await login(served)
    wire.send_raw(command_bytes(wire, read10(0, 1), read=True, edtl=512, itt=P.RESERVED_TAG))
    pdu = await wire.recv(5.0)
    assert isinstance(pdu, P.Reject) and pdu.reason == P.RejectReason.INVALID_PDU_FIELD


async def test_a_fault_on_the_lane_ends_that_connection_only(served, monkeypatch, caplog):
    victim = await login(served, isid=0x400000000202)
    other = await login(served, isid=0x400000000203)

    def broken(*args):
        raise RuntimeError("bug")

    monkeypatch.setattr(LunMap, "read_now", broken)
    victim.send_raw(command_bytes(victim, read10(0, 1), read=True, edtl=512))
    with pytest.raises(ConnectionError):
        await victim.recv(5.0)
    assert "conn.internal_error" in caplog.text
    monkeypatch.undo()
    other.send_raw(command_bytes(other, read10(3, 1), read=True, edtl=512))
    data, status = await answer(other)
    assert status.status == 0 and data == bytes(served.content[3 * BS:4 * BS])


async def test_a_read_that_fails_on_the_lane_gets_its_check_condition(served, monkeypatch):
    wire = await login(served)

    def broken(offset, length):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(served.lu.backstore, "read", broken)
    served.taken.clear()
    wire.send_raw(command_bytes(wire, read10(0, 8), read=True, edtl=4096))
    data, status = await answer(wire)
    assert not data and status.status == 2
    sense = bytes(status.data)[2:]
    assert sense[2] & 0x0F == 0x03  # MEDIUM ERROR, answered on the lane
    assert served.taken == [True]
    monkeypatch.undo()
    wire.send_raw(command_bytes(wire, read10(0, 8), read=True, edtl=4096))
    data, status = await answer(wire)
    assert status.status == 0 and data == bytes(served.content[:4096])
