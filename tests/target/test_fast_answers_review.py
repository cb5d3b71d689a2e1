"""Review of the target's fast answers (03fb637, b558b5b).

``TargetConnection._respond`` now answers a GOOD READ of exactly EDTL in one Data-In and a
GOOD WRITE that moved what was announced with a bare SCSI Response before the general
path; ``StatSequence.acknowledge`` and ``CommandWindow.maxcmdsn`` inline their serial
arithmetic; the fast lane tests congestion inline.  These tests hold the bytes on the wire
to an encoder written here from RFC 7143 §11.4 / §11.7 / §12.1 (independent of the target's
packers), for the answers the fast paths take and their neighbours that must not take them.
Every case below was also checked to give the same bytes at decb195 (before the change).
"""
from __future__ import annotations

import asyncio

import struct

import crcmod.predefined
import pytest
from hypothesis import given
from hypothesis import strategies as st

from iscsi import pdu as P
from iscsi.backstore.ram import RamBackstore
from iscsi.framing import PduReader, encode_bytes
from iscsi.scsi.lu import LogicalUnit
from iscsi.scsi.types import ScsiCommand, ScsiResult
from iscsi.scsi.zerocopy import ReadFence
from iscsi.session import StatSequence, sn_le
from iscsi.target import connection as C

from .fakes import StubTransport, logged_in_connection
from .test_zero_copy_reads import (
    BLOCKS,
    SIZE,
    acknowledge,
    read10,
    read_in_pdus,
    until,
    write10,
    zc,  # noqa: F401  (a fixture)
)

PATTERN = bytes(range(256)) * 2  # LBA 0 of the LU: one 512-byte block
_crc = crcmod.predefined.mkCrcFun("crc-32c")  # the reference CRC32C, not the target's


class Recorder(StubTransport):
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def writelines(self, parts) -> None:
        self.writes.append(b"".join(bytes(p) for p in parts))


def connect(hd: bool = False, dd: bool = False, segment: int = 8192):
    keys = (("HeaderDigest", "CRC32C" if hd else "None"), ("DataDigest", "CRC32C" if dd else "None"),
            ("MaxRecvDataSegmentLength", str(segment)))
    transport = Recorder()
    lu = LogicalUnit(RamBackstore(1 << 20), serial="fastans1", lun_id=0)
    lu.backstore.write(0, PATTERN)
    conn = logged_in_connection(lu, transport, keys=keys)
    assert (conn.header_digest, conn.data_digest) == (hd, dd)
    transport.writes.clear()
    return conn, transport


def send_command(conn, cdb: bytes, cmdsn: int, itt: int, **kw) -> None:
    conn.data_received(encode_bytes(
        P.ScsiCommandPdu(lun=P.encode_lun(0), cmdsn=cmdsn, expstatsn=conn.stat.expstatsn, itt=itt, cdb=cdb,
                         final=True, attr=1, **kw),
        header_digest=conn.header_digest, data_digest=conn.data_digest))


async def scsi(conn, cdb: bytes, edtl: int) -> ScsiResult:
    """What the SCSI layer itself answers (the data and sense the transport must carry)."""
    res = conn.session.luns.start(ScsiCommand(cdb, 0, conn.session.nexus, b"", edtl))
    return res if res.__class__ is ScsiResult else await res


# -- RFC 7143 encoder (by hand) ------------------------------------------------------------------
def rfc_pdu(op: int, flags: int, status: int, lun: bytes, itt: int, tag: int, sns: tuple[int, int, int],
            f36: int, f40: int, resid: int, data: bytes, hd: bool, dd: bool) -> bytes:
    """One PDU: 48-byte BHS (§11.4.1/§11.7.1 layout, TotalAHSLength 0), header digest, data
    segment padded to 4 bytes (§11.1), data digest over data + padding (§12.1, LSB first)."""
    statsn, expcmdsn, maxcmdsn = sns
    bhs = struct.pack(">4BI8s8I", op, flags, 0, status, len(data), lun, itt, tag, statsn, expcmdsn,
                      maxcmdsn, f36, f40, resid)
    out = bhs + (struct.pack("<I", _crc(bhs)) if hd else b"")
    if data:
        padded = data + bytes(-len(data) & 3)
        out += padded + (struct.pack("<I", _crc(padded)) if dd else b"")
    return out


def data_in_with_status(itt, sns, flags, resid, data, hd, dd) -> bytes:
    # §11.7: F and S set, status GOOD, TTT 0xffffffff, DataSN 0, Buffer Offset 0; LUN echoed.
    return rfc_pdu(0x25, 0x81 | flags, 0, bytes(8), itt, 0xFFFFFFFF, sns, 0, 0, resid, data, hd, dd)


def scsi_response(itt, sns, status, flags, resid, sense, hd, dd) -> bytes:
    # §11.4: F set, Response 0, reserved LUN, SNACK Tag 0, ExpDataSN 0, Bidi residual 0.
    segment = struct.pack(">H", len(sense)) + sense if sense else b""  # §11.4.7.2 SenseLength
    return rfc_pdu(0x21, 0x80 | flags, status, bytes(8), itt, 0, sns, 0, 0, resid, segment, hd, dd)


O, U = 0x04, 0x02  # residual overflow / underflow bits, in both §11.4.1 and §11.7.1
INQ37 = bytes([0x12, 0, 0, 0, 37, 0])  # INQUIRY of 37 bytes: a data segment that needs padding
BEYOND = read10(10 ** 6, 1)  # past the 1 MiB LU: CHECK CONDITION, LBA OUT OF RANGE
# name: (cdb, PDU keywords, MaxRecvDataSegmentLength, expected: (kind, status, flags, resid, data))
# kind "in": one Data-In with status whose data is ``data`` (None: what the SCSI layer returns);
# kind "rsp": a SCSI Response whose sense is what the SCSI layer returns (status != 0).
CASES = {
    "read_exact": (read10(0, 1), {"read": True, "edtl": 512}, 8192, ("in", 0, 0, 0, PATTERN)),
    "read_exact_at_segment_limit": (read10(0, 1), {"read": True, "edtl": 512}, 512, ("in", 0, 0, 0, PATTERN)),
    "read_exact_over_segment_limit": (read10(0, 2), {"read": True, "edtl": 1024}, 512,
                                      ("in2", 0, 0, 0, PATTERN + bytes(512))),
    "read_edtl_larger_underflow": (read10(0, 1), {"read": True, "edtl": 4096}, 8192, ("in", 0, U, 3584, PATTERN)),
    "read_edtl_smaller_overflow_padded": (read10(0, 1), {"read": True, "edtl": 301}, 8192,
                                          ("in", 0, O, 211, PATTERN[:301])),
    "read_edtl_zero": (read10(0, 1), {"read": True, "edtl": 0}, 8192, ("rsp", 0, O, 512, b"")),
    "inquiry_exact_padded": (INQ37, {"read": True, "edtl": 37}, 8192, ("in", 0, 0, 0, None)),
    "read_check_condition": (BEYOND, {"read": True, "edtl": 512}, 8192, ("rsp", 2, U, 512, None)),
    "bidirectional_read": (read10(0, 1), {"read": True, "write": True, "edtl": 512}, 8192, ("in", 0, 0, 0, PATTERN)),
    "read_immediate": (read10(0, 1), {"read": True, "edtl": 512, "immediate": True}, 8192, ("in", 0, 0, 0, PATTERN)),
    "neither_r_nor_w_overflow": (bytes([0x12, 0, 0, 0, 36, 0]), {"edtl": 0}, 8192, ("rsp", 0, O, 36, b"")),
    "write_immediate_exact": (write10(0, 1), {"write": True, "edtl": 512, "data": b"\x5a" * 512}, 8192,
                              ("rsp", 0, 0, 0, b"")),
    "write_immediate_as_immediate_cmd": (write10(0, 1), {"write": True, "edtl": 512, "data": b"\x5a" * 512,
                                                         "immediate": True}, 8192, ("rsp", 0, 0, 0, b"")),
    "write_edtl_larger_underflow": (write10(0, 1), {"write": True, "edtl": 1024, "data": b"\x5a" * 1024}, 8192,
                                    ("rsp", 0, U, 512, b"")),
    "write_edtl_smaller_overflow": (write10(0, 1), {"write": True, "edtl": 256, "data": b"\x5a" * 256}, 8192,
                                    ("rsp", 0, O, 256, b"")),
    "write_edtl_zero_overflow": (write10(0, 1), {"write": True, "edtl": 0}, 8192, ("rsp", 0, O, 512, b"")),
    "write_after_r2t": (write10(0, 1), {"write": True, "edtl": 512}, 8192, ("rsp", 0, 0, 0, b"")),
}


@pytest.mark.parametrize("hd,dd", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["plain", "hdigest", "ddigest", "both"])
@pytest.mark.parametrize("name", list(CASES))
async def test_answer_bytes_are_those_rfc_7143_asks_for(name, hd, dd):
    """StatSN and ExpCmdSN both wrap at 2^32 on this very answer."""
    cdb, kw, segment, (kind, status, flags, resid, data) = CASES[name]
    conn, transport = connect(hd, dd, segment)
    conn.stat.statsn = conn.stat.expstatsn = 0xFFFFFFFF
    conn.session.window.expcmdsn = 0xFFFFFFFF
    send_command(conn, cdb, 0xFFFFFFFF, 0x77, **kw)
    conn._flush()
    if name == "write_after_r2t":
        (r2t,) = PduReader(allowed=P.TARGET_OPCODES, header_digest=hd, data_digest=dd).feed(b"".join(transport.writes))
        assert isinstance(r2t, P.R2T) and (r2t.offset, r2t.length) == (0, 512)
        transport.writes.clear()
        conn.data_received(encode_bytes(P.DataOut(itt=0x77, ttt=r2t.ttt, datasn=0, offset=0, final=True,
                                                  expstatsn=0, data=b"\x33" * 512), header_digest=hd, data_digest=dd))
        conn._flush()
    immediate = kw.get("immediate", False)
    # ExpCmdSN: an immediate command does not take a CmdSN (§3.2.2.1); MaxCmdSN: the whole
    # 128-deep window is open again once the answer is out (§4.2.2.1).
    expcmdsn = 0xFFFFFFFF if immediate else 0
    sns = (0xFFFFFFFF, expcmdsn, (expcmdsn + 127) & 0xFFFFFFFF)
    if kind == "in":
        if data is None:
            data = bytes((await scsi(conn, cdb, kw["edtl"])).data)
            assert len(data) == 37
        expected = data_in_with_status(0x77, sns, flags, resid, data, hd, dd)
    elif kind == "in2":  # §11.7.1: a first Data-In of the sequence, neither F nor S (StatSN repeated)
        expected = (rfc_pdu(0x25, 0, 0, bytes(8), 0x77, 0xFFFFFFFF, sns, 0, 0, 0, data[:512], hd, dd)
                    + rfc_pdu(0x25, 0x81, 0, bytes(8), 0x77, 0xFFFFFFFF, sns, 1, 512, 0, data[512:], hd, dd))
    else:
        sense = (await scsi(conn, cdb, kw["edtl"])).sense if status else b""
        assert bool(sense) == bool(status)
        expected = scsi_response(0x77, sns, status, flags, resid, sense, hd, dd)
    assert b"".join(transport.writes) == expected
    assert conn.stat.statsn == 0 and conn.session.window.in_flight == 0 and not conn.tasks


def _answers(transport) -> list[tuple[int, int, int, int]]:
    pdus = PduReader(allowed=P.TARGET_OPCODES).feed(b"".join(transport.writes))
    transport.writes.clear()
    assert all(isinstance(p, P.DataIn) and p.has_status and p.status == 0 for p in pdus)
    return [(p.itt, p.statsn, p.expcmdsn, p.maxcmdsn) for p in pdus]


async def test_maxcmdsn_counts_in_flight_and_held_commands_and_wraps():
    """Out-of-order READs answered by the fast answer from their Task.  MaxCmdSN as before
    the change: ExpCmdSN + depth - 1 - in_flight - held, where a held command counts in
    both; never below ExpCmdSN - 1 (a closed window, §4.2.2.1)."""
    conn, transport = connect()
    window = conn.session.window
    window.depth, window.expcmdsn = 4, 0xFFFFFFFE
    conn.stat.statsn = conn.stat.expstatsn = 10
    window.in_flight += 2  # two commands suspended elsewhere (e.g. waiting on a flush)
    send_command(conn, read10(0, 1), 0, 0x1, read=True, edtl=512)           # held: two CmdSNs missing
    send_command(conn, read10(0, 1), 0xFFFFFFFE, 0x2, read=True, edtl=512)  # runs; 0 still held
    conn._flush()
    # 2 elsewhere + the held one (in flight and held: counted twice) = 4: closed, ExpCmdSN - 1
    assert _answers(transport) == [(0x2, 10, 0xFFFFFFFF, 0xFFFFFFFE)]
    send_command(conn, read10(0, 1), 0xFFFFFFFF, 0x3, read=True, edtl=512)  # releases CmdSN 0 too
    conn._flush()
    assert _answers(transport) == [(0x3, 11, 1, 1), (0x1, 12, 1, 2)]
    window.in_flight -= 2
    send_command(conn, read10(0, 1), 1, 0x4, read=True, edtl=512)  # the fast lane, window open
    conn._flush()
    assert _answers(transport) == [(0x4, 13, 2, 5)]


@pytest.mark.parametrize("expstatsn,statsn,offered,accepted", [
    (0xFFFFFFFE, 1, 0xFFFFFFFF, True),   # across the wrap
    (0xFFFFFFFE, 1, 0, True),
    (0xFFFFFFFE, 1, 1, True),            # = StatSN: everything acknowledged
    (0xFFFFFFFE, 1, 2, False),           # beyond StatSN: not sent yet
    (0xFFFFFFFE, 1, 0xFFFFFFFD, False),  # behind ExpStatSN
    (5, 0x80000004, 0x80000004, True),   # the widest window serial arithmetic can order
    (5, 0x80000004, 0x80000005, False),
    (5, 10, 0x80000005, False),          # half the number space away: undefined, never taken
])
def test_acknowledge_takes_exactly_expstatsn_to_statsn(expstatsn, statsn, offered, accepted):
    seq = StatSequence()
    seq.statsn, seq.expstatsn = statsn, expstatsn
    seq.acknowledge(offered)
    assert seq.expstatsn == (offered if accepted else expstatsn)


@given(st.integers(0, 2 ** 32 - 1), st.integers(0, 2 ** 31 - 1), st.integers(0, 2 ** 32 - 1),
       st.integers(-3, 3), st.sampled_from(["any", "near_exp", "near_stat", "half"]))
def test_acknowledge_agrees_with_rfc_1982_order(exp, unacked, anything, delta, where):
    """Any reachable state (StatSN at most 2^31 - 1 ahead of ExpStatSN) against sn_le."""
    statsn = (exp + unacked) & 0xFFFFFFFF
    offered = {"any": anything, "near_exp": exp + delta, "near_stat": statsn + delta,
               "half": exp + 2 ** 31 + delta}[where] & 0xFFFFFFFF
    seq = StatSequence()
    seq.statsn, seq.expstatsn = statsn, exp
    seq.acknowledge(offered)
    ok = sn_le(exp, offered) and sn_le(offered, statsn)
    assert seq.expstatsn == (offered if ok else exp)


async def test_results_the_fast_answers_must_leave_to_the_general_path(monkeypatch):
    """GOOD with sense data gets no phase collapse (§11.7.4: S only with no sense) and the
    sense rides in the SCSI Response; a result with effects on other tasks (PREEMPT AND
    ABORT, SPC-4 §5.13.11.2.4) still has them carried out."""
    conn, transport = connect()
    conn.stat.statsn = conn.stat.expstatsn = 40
    exp = conn.session.window.expcmdsn
    aborted = []
    monkeypatch.setattr(conn.server, "abort_tasks_of_nexuses", lambda lu, pats: aborted.append((lu, pats)))
    sense = bytes([0x70, 0, 1, 0, 0, 0, 0, 10]) + bytes(10)  # 18 bytes: RECOVERED ERROR
    conn._respond(0x21, 0, True, False, 512, None, ScsiResult(data=PATTERN, sense=sense))
    conn._respond(0x22, 0, False, True, 512, 512, ScsiResult(sense=sense))
    conn._respond(0x23, 0, False, True, 512, 512, ScsiResult(extra={"abort_nexuses": ["nexus-b"]}))
    conn._flush()
    sns = lambda sn: (sn, exp, (exp + 127) & 0xFFFFFFFF)
    expected = (rfc_pdu(0x25, 0x80, 0, bytes(8), 0x21, 0xFFFFFFFF, sns(40), 0, 0, 0, PATTERN, False, False)
                + rfc_pdu(0x21, 0x80, 0, bytes(8), 0x21, 0, sns(40), 1, 0, 0,  # ExpDataSN 1
                          struct.pack(">H", 18) + sense, False, False)
                + scsi_response(0x22, sns(41), 0, 0, 0, sense, False, False)
                + scsi_response(0x23, sns(42), 0, 0, 0, b"", False, False))
    assert b"".join(transport.writes) == expected
    assert aborted == [(conn.session.luns.get(0), ["nexus-b"])]


async def test_a_closed_connection_sends_no_fast_answer_and_lets_go_of_the_hold():
    """A command completing after close() (e.g. behind a Logout) is answered by nobody; a READ
    that would have gone out from the file releases its range (no StatSN consumed)."""
    conn, transport = connect()
    statsn = conn.stat.statsn
    fence = ReadFence()
    extent = fence.hold(type("Src", (), {"fileno": -1})(), 0, 512)
    conn.close()
    conn._respond(0x9, 0, True, False, 512, None, ScsiResult(data=extent))
    conn._respond(0xA, 0, True, False, 512, None, ScsiResult(data=PATTERN))
    conn._respond(0xB, 0, False, True, 512, 512, ScsiResult())
    assert conn._out == [] and transport.writes == [] and conn.stat.statsn == statsn
    assert extent.released and not fence.holds and not conn._zc_unacked


@pytest.mark.parametrize("reserved,paused,answered", [
    (C.WRITE_HIGH_WATER, False, True),       # at the high-water mark: not yet congested
    (C.WRITE_HIGH_WATER + 1, False, False),  # over it: the READ waits (deferred)
    (0, True, False),                        # the transport paused writing
])
async def test_fast_lane_respects_congestion(reserved, paused, answered):
    conn, transport = connect()
    conn._reserved, conn._paused = reserved, paused
    exp = conn.session.window.expcmdsn
    send_command(conn, read10(0, 1), exp, 0x55, read=True, edtl=512)
    conn._flush()
    pdus = PduReader(allowed=P.TARGET_OPCODES).feed(b"".join(transport.writes))
    assert [p.itt for p in pdus] == ([0x55] if answered else [])
    assert len(conn._deferred) == (0 if answered else 1)
    assert conn.session.window.expcmdsn == (exp + 1) & 0xFFFFFFFF  # its CmdSN is taken either way
    if not answered:
        conn._reserved, conn._paused = 0, False
        conn._run_deferred()
        conn._flush()
        pdus = PduReader(allowed=P.TARGET_OPCODES).feed(b"".join(transport.writes))
        assert [(p.itt, bytes(p.data)) for p in pdus] == [(0x55, PATTERN)]


async def test_a_deferred_command_starts_when_the_congestion_ended_without_output():
    """The congestion that deferred a command can end with nothing left to write: the turn's
    first responses went out early (_response_queued), or a READ's reservation was dropped.
    The turn's flush must still start it; before, it started only when that flush wrote
    something, and an initiator waiting for exactly these answers sent nothing more: the
    session hung (test_concurrency_review's pipelined hosts, 1 run in 4 on a fast machine)."""
    conn, transport = connect()
    conn._reserved = C.WRITE_HIGH_WATER + 1
    exp = conn.session.window.expcmdsn
    send_command(conn, read10(0, 1), exp, 0x56, read=True, edtl=512)
    conn._flush()
    assert len(conn._deferred) == 1 and transport.writes == []
    conn._reserved = 0                      # congestion over, and nothing queued to write
    conn._flush()
    await asyncio.sleep(0)                  # the flush its answer scheduled
    pdus = PduReader(allowed=P.TARGET_OPCODES).feed(b"".join(transport.writes))
    assert [(p.itt, bytes(p.data)) for p in pdus] == [(0x56, PATTERN)]
    assert not conn._deferred


async def test_dropping_a_reservation_schedules_the_flush_that_starts_deferred_commands():
    conn, transport = connect()
    exp = conn.session.window.expcmdsn
    conn._reserved = C.WRITE_HIGH_WATER + 1
    send_command(conn, read10(0, 1), exp, 0x57, read=True, edtl=512)
    conn._flush()
    assert len(conn._deferred) == 1
    big = type("T", (), {"reserved": C.WRITE_HIGH_WATER + 1, "itt": 0x99, "transfer": None})()
    conn._reserved = big.reserved
    conn._forget(big)                       # e.g. an aborted READ: no output comes of it
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    pdus = PduReader(allowed=P.TARGET_OPCODES).feed(b"".join(transport.writes))
    assert [p.itt for p in pdus] == [0x57]


@pytest.mark.parametrize("edtl,keys,resid_bits,held", [
    (SIZE, [("HeaderDigest", "CRC32C")], (False, False), True),  # fast answer, from the file, digest
    (SIZE + 4096, [], (False, True), True),                       # underflow: still from the file
    (SIZE - 1, [("HeaderDigest", "CRC32C")], (True, False), False),  # overflow: a padded copy
], ids=["exact_hdigest", "underflow", "overflow_padded"])
async def test_one_pdu_zero_copy_reads_through_the_shared_helper(zc, edtl, keys, resid_bits, held):  # noqa: F811
    """A 128 KiB READ in one Data-In (MaxRecvDataSegmentLength 262144) with the image as
    its data: the fast answer and the general path both hand it to _data_in_with_status."""
    content, wire, pdus = await read_in_pdus(zc, 0x400000000701 + len(keys) + (edtl & 0xF), BLOCKS, keys,
                                             edtl=edtl)
    (pdu,) = pdus
    assert (pdu.has_status, pdu.final, pdu.status, pdu.datasn, pdu.offset) == (True, True, 0, 0, 0)
    assert (pdu.overflow, pdu.underflow, pdu.residual) == (*resid_bits, abs(edtl - SIZE))
    assert bytes(pdu.data) == content[:edtl]
    assert len(zc.lu.fence.holds) == (1 if held else 0)
    acknowledge(wire)
    await until(lambda: not zc.lu.fence.holds)
