"""Malformed traffic to a live target (RFC 7143): every case gets the RFC's answer, memory stays
bounded and the witness sessions (raw + libiscsi, logged in before) keep working.

One daemon serves the whole module, so each case also runs after all the ones before it.
Answers checked:
- a PDU the target cannot parse or must refuse: Reject (§11.17) carrying the rejected header,
  and/or the connection dropped (§7.1: the byte stream cannot be trusted any more);
- a bad header digest: the connection is dropped (§7.8: lengths cannot be trusted);
- a bad data digest: Reject reason 0x02 with the PDU's header, the connection lives (§7.8);
- a non-immediate command outside [ExpCmdSN, MaxCmdSN]: silently ignored (§4.2.2.1);
- bad login text: Login Response with status class 2 (§11.13.5), then the connection closes.
"""
from __future__ import annotations

import socket
import struct
import time

import pytest

from iscsi import keys as K
from iscsi import pdu as P
from iscsi.digest import digest_bytes
from iscsi.framing import encode_bytes

from .conftest import BLOCK, rss_bytes
from .raw import Closed, RawSession, read10, write10, write16


def session(daemon, **login_kw) -> RawSession:
    s = RawSession(daemon.portals[0].host, daemon.portals[0].port)
    resp = s.login(daemon.iqn, **login_kw)
    assert resp.status_class == 0, resp
    return s


def rejected_or_dropped(s: RawSession, header: bytes | None = None, reasons=(0x04, 0x05, 0x09),
                        check_header: bool = True) -> str:
    """'reject' or 'drop'; a Reject must carry one of ``reasons`` and the rejected header."""
    try:
        pdu = s.recv(timeout=3.0)
    except Closed:
        return "drop"
    assert isinstance(pdu, P.Reject), f"expected Reject, got {pdu}"
    assert pdu.reason in reasons, f"Reject reason {pdu.reason:#x}"
    if header is not None and check_header:
        assert bytes(pdu.data)[:P.BHS_LEN] == header[:P.BHS_LEN], (
            "RFC 7143 §11.17: the Reject's data segment is the header of the rejected PDU")
    return "reject"


def still_works(s: RawSession) -> None:
    payload = bytes(range(256)) * 4
    assert s.write(2048, payload) == 0
    status, data = s.read(2048, len(payload))
    assert status == 0 and data == payload


# -- framing ----------------------------------------------------------------------------------

def test_truncated_bhs_waits_then_closes_cleanly(daemon, baseline):
    s = session(daemon)
    hdr = P.NopOut(itt=s.next_itt(), cmdsn=s.cmdsn, immediate=True).header()
    s.send_raw(hdr[:20])
    with pytest.raises(TimeoutError):
        s.recv(timeout=1.0)  # half a header: nothing to answer yet
    s.send_raw(hdr[20:])  # the rest arrives late: now it is a whole PDU
    pdu = s.recv()
    assert isinstance(pdu, P.NopIn)
    s.send_raw(hdr[:30])
    s.sock.shutdown(socket.SHUT_WR)  # and the peer goes away mid-header
    assert s.closed_by_target(), "target kept a half-closed connection with a partial BHS"
    s.close()


UNKNOWN_OPCODES = [0x07, 0x0F, 0x1C, 0x1F, 0x3E, 0x21]  # 0x21: a target opcode (SCSI Response)


def _unknown_opcode(daemon, opcode: int, check_header: bool) -> None:
    s = session(daemon)
    hdr = bytearray(P.NopOut(itt=s.next_itt(), cmdsn=s.cmdsn, immediate=True).header())
    hdr[0] = 0x40 | opcode
    s.send_raw(bytes(hdr))
    # §11.17.1: reason 0x05 Command not supported (0x04 protocol error also seen in the field).
    outcome = rejected_or_dropped(s, bytes(hdr), reasons=(0x04, 0x05), check_header=check_header)
    assert outcome == "reject", "no Reject for an unknown opcode"
    s.close()


@pytest.mark.parametrize("opcode", UNKNOWN_OPCODES)
def test_unknown_opcode_is_rejected(daemon, baseline, opcode):
    _unknown_opcode(daemon, opcode, check_header=False)


@pytest.mark.parametrize("opcode", [0x07, 0x21])
def test_reject_of_unknown_opcode_carries_its_header(daemon, baseline, opcode):
    _unknown_opcode(daemon, opcode, check_header=True)


def test_data_segment_length_lies_longer(daemon, baseline):
    """DataSegmentLength 4000 but 100 bytes sent: the target waits for the rest (it cannot
    know), answers nothing, and frees everything when the peer goes."""
    s = session(daemon)
    nop = bytearray(P.NopOut(itt=s.next_itt(), cmdsn=s.cmdsn, immediate=True, data=b"x" * 4000).header())
    s.send_raw(bytes(nop) + b"x" * 100)
    with pytest.raises(TimeoutError):
        s.recv(timeout=1.0)
    s.close()


@pytest.mark.parametrize("length", [262144 + 4, 1 << 20, 0xFFFFFF])
def test_data_segment_over_negotiated_max(daemon, baseline, length):
    """§13.12: more than our MaxRecvDataSegmentLength (262144) is a protocol error, refused on the
    header alone -- the target must not wait for (or buffer) 16 MiB."""
    s = session(daemon)
    hdr = bytearray(P.NopOut(itt=s.next_itt(), cmdsn=s.cmdsn, immediate=True).header())
    struct.pack_into(">I", hdr, 4, length)
    t0 = time.monotonic()
    s.send_raw(bytes(hdr) + b"\0" * 4096)
    assert rejected_or_dropped(s, reasons=(0x04,)) in ("reject", "drop")
    assert s.closed_by_target(3.0), "connection kept after an oversized data segment"
    assert time.monotonic() - t0 < 3.0
    s.close()


def test_oversized_ahs_in_command(daemon, baseline):
    """TotalAHSLength 1020 bytes of garbage AHS on a SCSI command: Reject / drop, no crash."""
    s = session(daemon)
    cmd = bytearray(P.ScsiCommandPdu(read=True, edtl=512, cmdsn=s.cmdsn, itt=s.next_itt(), cdb=read10(0, 1)).header())
    cmd[4] = 255
    s.send_raw(bytes(cmd) + bytes([0xEE]) * 1020)
    assert rejected_or_dropped(s, reasons=(0x04, 0x09)) in ("reject", "drop")
    s.close()


def test_garbage_stream_after_login(daemon, baseline):
    """64 KiB of random bytes: refused (Reject then drop) within a few seconds, memory flat."""
    import random

    s = session(daemon)
    rng = random.Random(7)
    try:
        s.send_raw(rng.randbytes(1 << 16))
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert s.closed_by_target(5.0)
    s.close()


# -- digests ----------------------------------------------------------------------------------

def test_wrong_header_digest_drops_the_connection(daemon, baseline):
    s = session(daemon, extra=[("HeaderDigest", "CRC32C")])
    assert s.header_digest, "target did not accept HeaderDigest=CRC32C"
    hdr = P.NopOut(itt=s.next_itt(), cmdsn=s.cmdsn, immediate=True).header()
    bad = bytearray(digest_bytes(hdr))
    bad[0] ^= 0xFF
    s.send_raw(hdr + bytes(bad))
    # §7.8: a header digest error means the lengths cannot be trusted: drop the connection.
    assert s.closed_by_target(5.0), "connection survived a header digest error"
    s.close()


def test_wrong_data_digest_on_immediate_data(daemon, baseline):
    """§7.8/§11.17.1: Reject reason 0x02 with the command's header; the command is not executed
    and its CmdSN is not consumed, so the initiator can send it again."""
    s = session(daemon, extra=[("DataDigest", "CRC32C")])
    assert s.data_digest
    payload = b"\x5a" * 1024
    cmd = P.ScsiCommandPdu(write=True, edtl=len(payload), cmdsn=s.cmdsn, expstatsn=s.expstatsn,
                           itt=s.next_itt(), cdb=write10(4096, 2), data=payload)
    raw = bytearray(encode_bytes(cmd, data_digest=True))
    raw[-1] ^= 0x01
    s.send_raw(bytes(raw))
    rej = s.recv()
    assert isinstance(rej, P.Reject) and rej.reason == P.RejectReason.DATA_DIGEST_ERROR, rej
    assert bytes(rej.data)[:P.BHS_LEN] == cmd.header()[:P.BHS_LEN]
    # Same CmdSN again, intact: executed.
    itt = s.command(write10(4096, 2), write=True, edtl=len(payload), data=payload)
    status, _ = s.wait_status(itt)
    assert status.status == 0
    st, data = s.read(4096, len(payload))
    assert st == 0 and data == payload
    s.close()


def test_wrong_data_digest_on_data_out(daemon, baseline):
    s = session(daemon, extra=[("DataDigest", "CRC32C"), ("ImmediateData", "No"), ("InitialR2T", "Yes")])
    payload = b"\xc3" * 2048
    itt = s.command(write10(5000, 4), write=True, edtl=len(payload))
    r2t = s.recv()
    assert isinstance(r2t, P.R2T), r2t
    dout = P.DataOut(itt=itt, ttt=r2t.ttt, datasn=0, offset=0, final=True, expstatsn=s.expstatsn, data=payload)
    raw = bytearray(encode_bytes(dout, data_digest=True))
    raw[-2] ^= 0x10
    s.send_raw(bytes(raw))
    rej = s.recv()
    assert isinstance(rej, P.Reject) and rej.reason == P.RejectReason.DATA_DIGEST_ERROR, rej
    # ERL 0: the task ends with CHECK CONDITION (or the connection goes); never GOOD.
    try:
        resp = s.recv()
    except Closed:
        return
    assert isinstance(resp, P.ScsiResponse) and resp.itt == itt and resp.status == 0x02, resp
    st, data = s.read(5000, len(payload))
    assert st == 0 and data != payload, "data with a bad digest was written"
    s.close()


# -- sequence numbers and tasks -----------------------------------------------------------------

@pytest.mark.parametrize("offset", [-1, -1000, 1000, 1 << 31])
def test_cmdsn_outside_window_is_ignored(daemon, baseline, offset):
    s = session(daemon)
    bad = (s.expcmdsn + offset) & 0xFFFFFFFF
    itt = s.command(read10(0, 1), read=True, edtl=BLOCK, cmdsn=bad)
    # §4.2.2.1: silently ignored -- the ping behind it comes back, the command never does.
    s.ping()
    with pytest.raises(TimeoutError):
        while True:
            pdu = s.recv(timeout=1.0)
            assert getattr(pdu, "itt", None) != itt, f"command outside the window answered: {pdu}"
    still_works(s)
    s.close()


def test_data_out_for_unknown_task(daemon, baseline):
    s = session(daemon)
    hdr_pdu = P.DataOut(itt=0x7777, ttt=0x1234, datasn=0, offset=0, final=True, expstatsn=s.expstatsn,
                        data=b"\0" * 512)
    s.send(hdr_pdu)
    assert rejected_or_dropped(s, hdr_pdu.header(), reasons=(0x04, 0x09)) == "reject"
    still_works(s)
    s.close()


def test_duplicate_itt_in_flight(daemon, baseline):
    """A second command with the ITT of one still waiting for data: Reject 0x07 (task in progress)."""
    s = session(daemon, extra=[("ImmediateData", "No"), ("InitialR2T", "Yes")])
    itt = s.command(write10(6000, 1), write=True, edtl=BLOCK)
    r2t = s.recv()
    assert isinstance(r2t, P.R2T)
    s.command(read10(0, 1), read=True, edtl=BLOCK, itt=itt)
    rej = s.recv()
    assert isinstance(rej, P.Reject) and rej.reason in (0x04, 0x07), rej
    s.send(P.DataOut(itt=itt, ttt=r2t.ttt, datasn=0, offset=0, final=True, expstatsn=s.expstatsn,
                     data=b"\1" * BLOCK))
    resp = s.recv()
    assert isinstance(resp, P.ScsiResponse) and resp.status == 0
    s.close()


def test_snack_at_erl0_rejected(daemon, baseline):
    s = session(daemon)
    snack = P.SnackRequest(type=0, itt=s.next_itt(), expstatsn=s.expstatsn)
    s.send(snack)
    assert rejected_or_dropped(s, snack.header(), reasons=(0x04, 0x05)) == "reject"
    still_works(s)
    s.close()


def test_login_pdu_in_full_feature_phase(daemon, baseline):
    s = session(daemon)
    s.send(P.LoginRequest(transit=True, csg=1, nsg=3, isid=1, itt=s.next_itt(), data=b""))
    assert rejected_or_dropped(s, reasons=(0x04,)) in ("reject", "drop")
    assert s.closed_by_target(3.0)
    s.close()


# -- login ------------------------------------------------------------------------------------

BAD_LOGIN_TEXTS = {
    "not-utf8": b"InitiatorName=\xff\xfe\0TargetName=x\0",
    "no-equals": b"InitiatorName\0",
    "long-key": b"K" * 64 + b"=1\0",
    "long-value": b"InitiatorName=" + b"a" * 256 + b"\0",
    "bad-key-chars": b"Initiator Name=x\0",
    "number-garbage": b"InitiatorName=iqn.x\0TargetName=%s\0MaxRecvDataSegmentLength=12ab\0",
    "number-huge": b"InitiatorName=iqn.x\0TargetName=%s\0MaxRecvDataSegmentLength=99999999999999999999999\0",
    "repeated-key": b"InitiatorName=iqn.x\0TargetName=%s\0MaxBurstLength=512\0MaxBurstLength=1024\0",
    "no-initiator": b"TargetName=%s\0",
    "unknown-target": b"InitiatorName=iqn.x\0TargetName=iqn.2026-11.org.example:nope\0",
    "bad-session-type": b"InitiatorName=iqn.x\0SessionType=Weird\0",
}


@pytest.mark.parametrize("case", sorted(BAD_LOGIN_TEXTS))
def test_garbage_login_keys(daemon, baseline, case):
    text = BAD_LOGIN_TEXTS[case].replace(b"%s", daemon.iqn.encode())
    s = RawSession(daemon.portals[0].host, daemon.portals[0].port)
    s.send(P.LoginRequest(transit=True, csg=1, nsg=3, isid=0x400000000077, itt=1, data=text))
    resp = s.recv()
    assert isinstance(resp, P.LoginResponse), resp
    assert resp.status_class == 2, f"{case}: status {resp.status_class:#x}/{resp.status_detail:#x}"
    assert s.closed_by_target(3.0), "connection kept after a failed login (§6.7)"
    s.close()


def test_oversized_login_text_by_continuation(daemon, baseline):
    """C-bit continuations past 64 KiB: refused (out of resources / initiator error), not stored."""
    s = RawSession(daemon.portals[0].host, daemon.portals[0].port)
    chunk = b"X-org.example.pad=" + b"p" * 200 + b"\0"
    chunk = chunk * (8000 // len(chunk))
    answer = None
    for i in range(12):  # 12 x ~8 KiB > 64 KiB
        s.send(P.LoginRequest(transit=False, cont=True, csg=1, nsg=3, isid=0x400000000078, itt=1, data=chunk))
        try:
            resp = s.recv()
        except Closed:
            break
        if resp.status_class != 0:
            answer = resp
            break
    assert answer is not None and answer.status_class in (2, 3), answer
    s.close()


def test_login_data_over_8192_before_negotiation(daemon, baseline):
    s = RawSession(daemon.portals[0].host, daemon.portals[0].port)
    text = K.encode_text([("InitiatorName", "iqn.x"), ("TargetName", daemon.iqn)]) + b"X-pad=" + b"p" * 9000 + b"\0"
    try:
        s.send(P.LoginRequest(transit=True, csg=1, nsg=3, isid=0x400000000079, itt=1, data=text))
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        resp = s.recv()
        assert isinstance(resp, P.LoginResponse) and resp.status_class == 2
    except Closed:
        pass  # dropping the connection is the other correct answer
    assert s.closed_by_target(3.0)
    s.close()


def test_non_login_pdu_before_login(daemon, baseline):
    s = RawSession(daemon.portals[0].host, daemon.portals[0].port)
    s.send(P.ScsiCommandPdu(read=True, edtl=512, cdb=read10(0, 1), itt=1))
    assert s.closed_by_target(3.0), "§6.1: a non-login PDU before Full Feature Phase ends the connection"
    s.close()


# -- resources --------------------------------------------------------------------------------

#: A write whose CDB asks for this much data, never sent.  The Block Limits VPD page says
#: MAXIMUM TRANSFER LENGTH is 65536 blocks (32 MiB); a request above it must be refused,
#: not buffered.
HUGE_WRITE_BYTES = 256 << 20


def test_write_with_huge_transfer_length_is_refused_without_buffering(daemon, witness):
    before = rss_bytes(daemon.proc.pid)
    s = session(daemon)
    peak = before
    itts = []
    for i in range(4):
        itts.append(s.command(write16(i * (HUGE_WRITE_BYTES // BLOCK), HUGE_WRITE_BYTES // BLOCK), write=True,
                              edtl=HUGE_WRITE_BYTES))
    answers = {}
    deadline = time.monotonic() + 10
    while len(answers) < len(itts) and time.monotonic() < deadline:
        peak = max(peak, rss_bytes(daemon.proc.pid))
        try:
            pdu = s.recv(timeout=1.0)
        except TimeoutError:
            continue
        if isinstance(pdu, (P.ScsiResponse, P.R2T)) and pdu.itt in itts:
            answers[pdu.itt] = pdu
    peak = max(peak, rss_bytes(daemon.proc.pid))
    s.close()
    assert daemon.alive()
    witness.check()
    assert peak - before < 64 << 20, f"target RSS grew by {(peak - before) >> 20} MiB for 4 refused writes"
    assert all(isinstance(a, P.ScsiResponse) and a.status == 0x02 for a in answers.values()) and \
        len(answers) == len(itts), f"expected CHECK CONDITION without R2T, got {answers}"


# -- task management, text, logout ------------------------------------------------------------

def test_abort_task_for_unknown_task(daemon, baseline):
    """§11.6.1: ABORT TASK of a task the target does not have: response 1 (task does not exist)."""
    s = session(daemon)
    s.send(P.TaskMgmtRequest(function=P.TmfFunction.ABORT_TASK, rtt=0x5555, itt=s.next_itt(), cmdsn=s.cmdsn,
                             expstatsn=s.expstatsn, immediate=True))
    resp = s.recv()
    assert isinstance(resp, P.TaskMgmtResponse) and resp.response == P.TmfResponse.TASK_DOES_NOT_EXIST, resp
    still_works(s)
    s.close()


@pytest.mark.parametrize("function", [0, 3, 8, 15, 0x7F])
def test_unsupported_or_unknown_tmf_function(daemon, baseline, function):
    s = session(daemon)
    s.send(P.TaskMgmtRequest(function=function, itt=s.next_itt(), cmdsn=s.cmdsn, expstatsn=s.expstatsn,
                             immediate=True))
    resp = s.recv()
    # §11.6.1: 4 (task reassignment not supported), 5 (function not supported) or 255 (rejected).
    assert isinstance(resp, P.TaskMgmtResponse) and resp.response in (4, 5, 255), resp
    still_works(s)
    s.close()


@pytest.mark.parametrize("text", [b"\xff\xfe=\x00", b"novalue\x00", b"K" * 70 + b"=1\x00"])
def test_garbage_text_request_in_full_feature_phase(daemon, baseline, text):
    s = session(daemon)
    req = P.TextRequest(itt=s.next_itt(), cmdsn=s.cmdsn, expstatsn=s.expstatsn, immediate=True, data=text)
    s.send(req)
    assert rejected_or_dropped(s, req.header(), reasons=(0x04, 0x09)) in ("reject", "drop")
    s.close()


def test_logout_for_recovery_at_erl0(daemon, baseline):
    """§11.15.1: reason 2 (remove the connection for recovery) at ERL 0: response 2."""
    s = session(daemon)
    s.send(P.LogoutRequest(reason=2, itt=s.next_itt(), cmdsn=s.cmdsn, expstatsn=s.expstatsn, immediate=True))
    resp = s.recv()
    assert isinstance(resp, P.LogoutResponse) and resp.response == 2, resp
    s.close()


# -- other sessions -----------------------------------------------------------------------------

def test_login_with_another_initiators_tsih_is_refused(daemon, baseline, witness):
    """§6.3.5 / §11.13.5: a TSIH names a session of *this* initiator port; another initiator's
    TSIH is 0x020A (session does not exist) and the session it names is left alone."""
    victim_tsih = witness.raw.tsih
    assert victim_tsih
    s = RawSession(daemon.portals[0].host, daemon.portals[0].port)
    keys = K.encode_text([("InitiatorName", "iqn.2026-11.org.sanstack.hardening:intruder"),
                          ("TargetName", daemon.iqn), ("SessionType", "Normal")])
    s.send(P.LoginRequest(transit=True, csg=1, nsg=3, isid=0x400000000999, tsih=victim_tsih, itt=1, data=keys))
    resp = s.recv()
    assert isinstance(resp, P.LoginResponse) and (resp.status_class, resp.status_detail) == (2, 0x0A), resp
    s.close()
    witness.check()


@pytest.mark.parametrize("fault", ["datasn", "offset", "overrun", "early-final"])
def test_broken_data_out_sequence_fails_only_that_task(daemon, baseline, fault):
    """§11.7: Data-Out with a wrong DataSN, a gap in offsets, more than the R2T asked for, or F
    before the burst is complete: the task ends with CHECK CONDITION (ERL 0) or the connection
    drops; never GOOD, and the session (if kept) works on."""
    s = session(daemon, extra=[("ImmediateData", "No"), ("InitialR2T", "Yes")])
    itt = s.command(write10(7000, 4), write=True, edtl=2048)
    r2t = s.recv()
    assert isinstance(r2t, P.R2T)
    datasn, offset, data, final = 0, 0, b"\x11" * 2048, True
    if fault == "datasn":
        datasn = 5
    elif fault == "offset":
        offset, data = 512, b"\x11" * 1536
    elif fault == "overrun":
        data = b"\x11" * 2560
    else:
        data = b"\x11" * 1024
    s.send(P.DataOut(itt=itt, ttt=r2t.ttt, datasn=datasn, offset=offset, final=final, expstatsn=s.expstatsn,
                     data=data))
    try:
        resp = s.recv()
    except Closed:
        return
    if isinstance(resp, P.Reject):
        resp = s.recv()
    assert isinstance(resp, P.ScsiResponse) and resp.itt == itt and resp.status == 0x02, resp
    still_works(s)
    s.close()
