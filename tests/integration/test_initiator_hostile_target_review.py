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
from tests.unit.test_initiator_engine import FakeConn, FakeTarget, fake, open_session, started_targets

R = P.RESERVED_TAG
KiB = 1024




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



# --------------------------------------------------------------------------- R2T
#: No immediate or unsolicited data: every byte of a WRITE goes out because of an R2T.
SOLICITED_ONLY = {"InitialR2T": "Yes", "ImmediateData": "No"}


def data_out_bytes(conn: FakeConn) -> int:
    return sum(len(p.data) for p in conn.received if isinstance(p, P.DataOut))


async def test_r2ts_asking_for_the_same_bytes_again_and_again_are_refused(fake):
    """A target that sends R2T after R2T for the whole 64 KiB write (R2TSN 0, 1, ... as if
    each were new).  At ErrorRecoveryLevel 0 nothing is asked for twice (RFC 7143 §11.8:
    R2Ts split the transfer; recovery R2Ts need ERL > 0).  The initiator sent 64 KiB for
    every 48-byte R2T, without bound (a target that does not read makes that memory); now
    R2Ts asking for more than the write holds drop the connection."""
    size = 64 * KiB

    async def greedy(conn, pdu):
        if read_cmd(pdu, 0x8A):
            for sn in range(20):
                conn.send(P.R2T(itt=pdu.itt, ttt=0x500 + sn, r2tsn=sn, offset=0, length=size,
                                statsn=conn.statsn))
            return True
        return isinstance(pdu, P.DataOut)

    t = await fake(greedy, login_local=SOLICITED_ONLY)
    s = await no_reconnect(t, keys=SOLICITED_ONLY)
    try:
        with pytest.raises(ConnectionLost, match="R2T"):
            await asyncio.wait_for(s.execute(0, scsi.write16(0, size // 512), data=os.urandom(size)), 5)
        await asyncio.sleep(0.1)
        assert data_out_bytes(t.conns[-1]) <= size
    finally:
        await s.close()


@pytest.mark.parametrize("r2tsns", [(1,), (0, 0), (0, 2)], ids=["starts-at-1", "duplicate", "gap"])
async def test_r2tsn_out_of_order_is_a_protocol_error(fake, r2tsns):
    """R2TSN counts a task's R2Ts from 0 (RFC 7143 §11.8.2); at ERL 0 a repeated or skipped
    one cannot be recovered: the connection drops (the command is retried elsewhere/later)."""
    size = 16 * KiB

    async def numbered(conn, pdu):
        if read_cmd(pdu, 0x8A):
            n = len(r2tsns)
            for i, sn in enumerate(r2tsns):
                conn.send(P.R2T(itt=pdu.itt, ttt=0x600 + i, r2tsn=sn, offset=i * size // n,
                                length=size // n, statsn=conn.statsn))
            return True
        return isinstance(pdu, P.DataOut)

    t = await fake(numbered, login_local=SOLICITED_ONLY)
    s = await no_reconnect(t, keys=SOLICITED_ONLY)
    try:
        with pytest.raises(ConnectionLost, match="R2TSN"):
            await asyncio.wait_for(s.execute(0, scsi.write16(0, size // 512), data=bytes(size)), 5)
    finally:
        await s.close()


@pytest.mark.parametrize("case", ["read", "beyond", "zero"])
async def test_r2t_for_a_read_or_outside_the_write_is_refused(fake, case):
    """Checked fine: an R2T for a READ, past the WRITE's end, or for 0 bytes (RFC 7143 §11.8.4:
    DesiredDataTransferLength MUST NOT be 0) drops the connection with the reason."""
    async def bad(conn, pdu):
        if isinstance(pdu, P.ScsiCommandPdu) and pdu.cdb[0] in (0x88, 0x8A):
            offset, length = {"read": (0, 512), "beyond": (4096, 8192), "zero": (0, 0)}[case]
            conn.send(P.R2T(itt=pdu.itt, ttt=0x700, r2tsn=0, offset=offset, length=length, statsn=conn.statsn))
            return True
        return False

    t = await fake(bad, login_local=SOLICITED_ONLY)
    s = await no_reconnect(t, keys=SOLICITED_ONLY)
    try:
        cdb, kw = ((scsi.read16(0, 1), {"read_len": 512}) if case == "read"
                   else (scsi.write16(0, 16), {"data": bytes(8192)}))
        with pytest.raises(ConnectionLost, match="R2T"):
            await asyncio.wait_for(s.execute(0, cdb, **kw), 5)
    finally:
        await s.close()


# --------------------------------------------------------------------------- text / discovery
def text_answer(data: bytes, *, cont: bool = False):
    """Handler: every Text Request is answered with ``data`` (C bit ``cont``)."""
    async def answer(conn, pdu):
        if isinstance(pdu, P.TextRequest):
            conn.send(P.TextResponse(itt=pdu.itt, ttt=0x900 if cont else R, final=not cont, cont=cont,
                                     statsn=conn.next_statsn(), data=data))
            return True
        return False
    return answer


def run_cli(*args: str):
    """The CLI in this thread (its own event loop); a Python exception is a bug here."""
    from click.testing import CliRunner

    from iscsi.initiator import cli as CLI
    r = CliRunner().invoke(CLI.main, ["-i", "iqn.2026-11.org.sanstack:hostile-review", *args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError(f"traceback instead of an error line: {r.exception!r}\n{r.output}")
    return r


@pytest.mark.parametrize("data,cont,why", [
    (b"SendTargets answer without an equals sign\x00", False, "without '='"),
    (b"TargetName=\xff\xfe\x00", False, "UTF-8"),
    (b"TargetAddress=" + b"x" * 8000 + b"\x00", True, "longer than"),
], ids=["no-equals", "not-utf8", "endless-continuation"])
async def test_sendtargets_answer_that_is_not_text_is_an_iscsi_error_not_a_traceback(fake, data, cont, why):
    """RFC 7143 §6.1 text rules broken in a SendTargets answer (Appendix C): the discovery
    fails with a typed IscsiError naming the fault; it was iscsi.keys.ProtocolError, which
    no caller expects, and the CLI printed a traceback."""
    from iscsi.initiator.client import discover
    t = await fake(text_answer(data, cont=cont))
    with pytest.raises(IscsiError, match=why):
        await asyncio.wait_for(discover("127.0.0.1", t.port, initiator_name="iqn.2026-11.org.sanstack:x"), 10)
    r = await asyncio.to_thread(run_cli, "discover", f"127.0.0.1:{t.port}")
    assert r.exit_code == 1 and "error:" in r.output and why in r.output, r.output


async def test_sendtargets_with_malformed_target_addresses(fake):
    """Checked: a SendTargets answer with TargetAddress values that are no portal (no host,
    a port out of range, brackets left open, a portal group tag that is not a number or above
    65535) lists the target with the good addresses only, and no traceback comes out."""
    from iscsi.initiator.client import discover
    text = (b"TargetName=iqn.2026-11.org.sanstack:t1\x00"
            b"TargetAddress=:3260,1\x00TargetAddress=10.0.0.1:99999,1\x00TargetAddress=[::1:3260,1\x00"
            b"TargetAddress=10.0.0.2:3260,abc\x00TargetAddress=10.0.0.3:3260,70000\x00"
            b"TargetAddress=10.0.0.4:3261,2\x00"
            b"TargetName=iqn.2026-11.org.sanstack:t2\x00TargetAddress=\x00")
    t = await fake(text_answer(text))
    found = await asyncio.wait_for(discover("127.0.0.1", t.port, initiator_name="iqn.2026-11.org.sanstack:x"), 10)
    by_name = {d.name: d.portals for d in found}
    assert by_name["iqn.2026-11.org.sanstack:t1"] == (("10.0.0.4", 3261, 2),)
    # No usable address: the portal of the discovery session is implied (Appendix C).
    assert by_name["iqn.2026-11.org.sanstack:t2"] == (("127.0.0.1", t.port, 1),)


# --------------------------------------------------------------------------- login
class LoginHookTarget(FakeTarget):
    """FakeTarget whose Login Responses pass through ``mangle(request, response)`` first;
    ``login`` replaces the per-connection login responder (CHAP users, say)."""

    def __init__(self, mangle=None, *, login=None, **kw) -> None:
        super().__init__(**kw)
        self.mangle = mangle
        self.make_login = login

    async def _serve(self, reader, writer) -> None:
        conn = FakeConn(self, reader, writer)
        if self.make_login is not None:
            conn.login = self.make_login()
        respond = conn.login.respond
        if self.mangle is not None:
            conn.login.respond = lambda req: self.mangle(req, respond(req))
        self.conns.append(conn)
        await conn.run()


hooked = started_targets(LoginHookTarget)


def add_text(extra: bytes, *, stage: int | None = None):
    """mangle: append ``extra`` to the text of every Login Response (of CSG ``stage``)."""
    def mangle(req, resp):
        if stage is None or resp.csg == stage:
            resp.data = bytes(resp.data) + extra
        return resp
    return mangle


async def test_unknown_keys_in_login_responses_do_not_break_the_login(hooked):
    """Checked fine: a vendor key (security stage) and a key nobody knows (operational stage)
    are answered NotUnderstood or ignored (RFC 7143 §6.2); the login completes, I/O works.
    (The same key again in a later response is a redeclaration: the login fails, as §6.2
    wants — seen while writing this test.)"""
    vendor, unknown = add_text(b"X-com.example.Foo=bar\x00", stage=0), add_text(b"NoSuchKey=1\x00", stage=1)
    t = await hooked(lambda req, resp: unknown(req, vendor(req, resp)))
    s = await open_session(t)
    try:
        await BlockDevice(s, 0).test_unit_ready()
    finally:
        await s.close()


@pytest.mark.parametrize("extra,why", [
    (b"MaxBurstLength=65536\x00MaxBurstLength=131072\x00", "MaxBurstLength"),
    (b"TargetAlias=" + b"a" * 300 + b"\x00", "longer than 255"),
    (b"TargetAlias=" + b"a" * 200 + b"\x00" + b"X-Pad=" + b"b" * 250 + b"\x00" * 300, None),
], ids=["key-twice", "huge-alias", "padding"])
async def test_odd_login_text_fails_cleanly_or_passes(hooked, extra, why):
    """A key offered twice in one stage (RFC 7143 §6.2: a protocol error) and a value above
    255 bytes (§6.1) end the login with a LoginError naming the key or the rule; long
    legal text and runs of NULs pass.  Never a traceback, never a hang."""
    from iscsi.initiator.errors import LoginError
    t = await hooked(add_text(extra, stage=1))
    if why is None:
        s = await asyncio.wait_for(open_session(t), 10)
        await s.close()
        return
    with pytest.raises(LoginError, match=why):
        await asyncio.wait_for(open_session(t), 10)


USER, USER_SECRET = "alice", "alice-secret-12345"
TGT_USER, TGT_SECRET = "tgt", "target-secret-6789"


def chap_target(**kw):
    from iscsi.auth import ChapCredentials
    from tests.unit.test_initiator_login import FakeTargetLogin
    mutual = ChapCredentials(TGT_USER, kw.pop("target_secret", TGT_SECRET))
    return lambda: FakeTargetLogin(users={USER: USER_SECRET}, mutual=mutual, **kw)


def replace_key(key: str, value: str):
    def mangle(req, resp):
        from iscsi import keys as K
        pairs = K.parse_text(resp.data) if resp.data else []
        if any(k == key for k, _ in pairs):
            resp.data = b"".join(f"{k}={value if k == key else v}".encode() + b"\x00" for k, v in pairs)
        return resp
    return mangle


@pytest.mark.parametrize("case", ["chap_i-not-a-number", "chap_i-too-big", "chap_c-not-hex", "chap_c-too-long",
                                  "chap_c-empty", "mutual-wrong-secret"])
async def test_chap_faults_fail_the_login_with_a_clear_message_and_no_secret(hooked, case, caplog):
    """CHAP (RFC 7143 §12.1.3, RFC 1994) with a challenge that is not one, or a target whose
    answer to our mutual challenge is wrong: the login fails with an authentication
    LoginError saying why, and neither secret appears in the error or the log."""
    from iscsi.auth import ChapCredentials
    from iscsi.initiator.errors import LoginError
    from iscsi.initiator.login import LoginConfig
    from iscsi.initiator.session import SessionOptions
    from tests.unit.test_initiator_login import INI, TGT
    mangle, why = {
        "chap_i-not-a-number": (replace_key("CHAP_I", "zz"), "CHAP"),
        "chap_i-too-big": (replace_key("CHAP_I", "256"), "CHAP_I"),
        "chap_c-not-hex": (replace_key("CHAP_C", "0xZZZZ"), "CHAP"),
        "chap_c-too-long": (replace_key("CHAP_C", "0x" + "ab" * 1025), "CHAP"),
        "chap_c-empty": (replace_key("CHAP_C", "0x"), "CHAP"),
        "mutual-wrong-secret": (None, "target"),
    }[case]
    t = await hooked(mangle, login=chap_target(target_secret="not-the-target-secret"
                                               if case == "mutual-wrong-secret" else TGT_SECRET))
    cfg = LoginConfig(INI, TGT, chap=ChapCredentials(USER, USER_SECRET),
                      mutual_chap=ChapCredentials(TGT_USER, TGT_SECRET))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(LoginError, match=why) as err:
        await asyncio.wait_for(Session.open("127.0.0.1", t.port, cfg, SessionOptions(noop_interval=0)), 10)
    assert err.value.status_class == 2
    text = str(err.value) + repr(err.value) + caplog.text
    for secret in (USER_SECRET, TGT_SECRET, USER_SECRET.encode().hex(), TGT_SECRET.encode().hex()):
        assert secret not in text


# --------------------------------------------------------------------------- full feature phase
async def wait_for(pred, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def close_window(t: FakeTarget, s: Session) -> FakeConn:
    """Leave the session's command window closed (MaxCmdSN = ExpCmdSN - 1, §4.2.2.1): the
    target (window 1) lets one command in and then stops moving MaxCmdSN.  An initiator
    never shrinks a window it knows (MaxCmdSN only grows), so the slot is used up first."""
    conn = t.conns[-1]
    t.fixed_maxcmdsn = conn.expcmdsn
    await asyncio.wait_for(BlockDevice(s, 0).test_unit_ready(), 5)
    assert s.window == ((t.fixed_maxcmdsn + 1) & 0xFFFFFFFF, t.fixed_maxcmdsn)
    return conn


async def test_ping_data_echoed_within_the_targets_max_recv_data_segment_length(fake):
    """A NOP-In ping (TTT set, RFC 7143 §11.19) carrying 16 KiB to an initiator that may
    receive 256 KiB, from a target that declared MaxRecvDataSegmentLength 4096: the
    NOP-Out answer echoed all 16 KiB, a PDU the target said it cannot take (§13.12)."""
    t = await fake(login_local={"MaxRecvDataSegmentLength": "4096"})
    s = await open_session(t)
    try:
        conn = t.conns[-1]
        conn.send(P.NopIn(ttt=0x1234, itt=R, statsn=conn.statsn, data=os.urandom(16 * KiB)))
        await wait_for(lambda: any(isinstance(p, P.NopOut) and p.ttt == 0x1234 for p in conn.received))
        answer = next(p for p in conn.received if isinstance(p, P.NopOut) and p.ttt == 0x1234)
        assert answer.itt == R and answer.immediate and len(answer.data) <= 4096
        await BlockDevice(s, 0).test_unit_ready()
    finally:
        await s.close()


async def test_negotiation_request_waits_for_the_command_window(fake):
    """Async Message event 4 (RFC 7143 §11.9.1) while the command window is closed
    (MaxCmdSN = ExpCmdSN - 1).  The Text Request it starts is non-immediate, so it may not
    be sent beyond MaxCmdSN (§4.2.2.1): a target drops such a PDU, and every later command
    then waits behind the missing CmdSN.  It went out at once; a burst of event 4 sent one
    Text Request each.  Now one exchange at a time, sent once the window opens."""
    t = await fake(window=1)
    s = await open_session(t)
    try:
        conn = await close_window(t, s)
        for _ in range(5):
            conn.send(P.AsyncMessage(event=P.AsyncEvent.NEGOTIATION_REQUEST, statsn=conn.next_statsn()))
        await asyncio.sleep(0.3)
        assert not any(isinstance(p, P.TextRequest) for p in conn.received)
        assert t.window_violations == 0
        t.fixed_maxcmdsn = None
        conn.send(P.NopIn(itt=R, ttt=R, statsn=conn.statsn))      # carries the open window
        await wait_for(lambda: any(isinstance(p, P.TextRequest) for p in conn.received))
        await asyncio.wait_for(BlockDevice(s, 0).test_unit_ready(), 5)
        await asyncio.sleep(0.1)
        assert sum(isinstance(p, P.TextRequest) for p in conn.received) == 1
        assert t.window_violations == 0
    finally:
        await s.close()


async def test_a_window_that_never_opens_times_commands_out_cleanly(fake):
    """Checked fine: MaxCmdSN stays at ExpCmdSN - 1 (§4.2.2.1: window closed).  A command
    with a timeout fails CommandTimeout in time and leaves the queue; nothing was sent
    beyond MaxCmdSN; once the window opens the session carries on."""
    from iscsi.initiator.errors import CommandTimeout
    t = await fake(window=1)
    s = await open_session(t)
    try:
        conn = await close_window(t, s)
        sent = len(conn.received)
        with pytest.raises(CommandTimeout):
            await asyncio.wait_for(s.execute(0, scsi.test_unit_ready(), timeout=0.3), 5)
        assert s.queued == 0 and t.window_violations == 0
        assert not any(isinstance(p, P.ScsiCommandPdu) for p in conn.received[sent:])
        t.fixed_maxcmdsn = None
        conn.send(P.NopIn(itt=R, ttt=R, statsn=conn.statsn))
        await asyncio.wait_for(BlockDevice(s, 0).test_unit_ready(), 5)
    finally:
        await s.close()


async def test_reject_without_the_rejected_header_drops_the_connection(fake):
    """A Reject must carry the complete header of the PDU it rejects (RFC 7143 §11.17).
    One with an empty data segment, in answer to a command, named no task: the command
    waited for ever (no timeout by default) while the target answered every ping."""
    async def reject(conn, pdu):
        if read_cmd(pdu, 0x00):
            conn.send(P.Reject(reason=P.RejectReason.PROTOCOL_ERROR, statsn=conn.next_statsn(), data=b""))
            return True
        return False

    t = await fake(reject)
    s = await no_reconnect(t)
    try:
        with pytest.raises(ConnectionLost, match="Reject"):
            await asyncio.wait_for(s.execute(0, scsi.test_unit_ready()), 5)
    finally:
        await s.close()


async def test_odd_but_harmless_target_pdus_leave_the_session_working(fake):
    """Checked fine: a SCSI Response and a Data-In for an ITT we never used, a StatSN jump
    of 1000, a SenseLength longer than the data segment, Async Messages with unknown event
    codes, vendor-specific data and a SCSI event whose sense is garbage: none raises, the
    session stays up, the commands around them complete."""
    from iscsi.initiator.errors import IllegalRequest
    sense = bytes([0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0])

    async def odd(conn, pdu):
        if read_cmd(pdu, 0x00):
            conn.send(P.ScsiResponse(itt=0xDEAD, status=0, statsn=conn.next_statsn()))
            conn.send(P.DataIn(itt=0xBEEF, final=True, has_status=True, statsn=conn.next_statsn(), data=b"x" * 64))
            conn.statsn += 1000
            conn.send(P.AsyncMessage(event=0, statsn=conn.next_statsn(), data=b"\x00\x40" + os.urandom(7)))
            conn.send(P.AsyncMessage(event=5, param1=7, statsn=conn.next_statsn()))
            conn.send(P.AsyncMessage(event=42, statsn=conn.next_statsn(), data=b"junk"))
            conn.send(P.AsyncMessage(event=255, vcode=9, statsn=conn.next_statsn(), data=os.urandom(100)))
            conn.status(pdu)
            return True
        if read_cmd(pdu, 0x12):
            # SenseLength 200, 18 bytes of sense present.
            conn.send(P.ScsiResponse(itt=pdu.itt, status=2, statsn=conn.next_statsn(),
                                     data=struct.pack(">H", 200) + sense))
            return True
        return False

    t = await fake(odd)
    s = await open_session(t)
    try:
        await asyncio.wait_for(BlockDevice(s, 0).test_unit_ready(), 5)
        with pytest.raises(IllegalRequest):
            await asyncio.wait_for(BlockDevice(s, 0).inquiry(), 5)
        await asyncio.sleep(0.05)
        assert s.is_up and s.in_flight == 0
        assert s._expstatsn == t.conns[-1].statsn
    finally:
        await s.close()


@pytest.mark.parametrize("key", ["DataPDUInOrder", "DataSequenceInOrder"])
async def test_out_of_order_data_cannot_be_negotiated(fake, key):
    """The in-order Buffer Offset check above needs DataPDUInOrder and DataSequenceInOrder
    Yes (RFC 7143 §13.18/§13.19, OR results: Yes unless both sides say No).  A caller asking
    for No is refused before connecting (ConfigError), and a login that still ends with No
    (a LoginConfig built by hand) fails with a LoginError saying why, instead of a session
    that would drop the connection on the first out-of-order Data-In."""
    from iscsi.initiator.client import validate_keys
    from iscsi.initiator.errors import ConfigError, LoginError
    with pytest.raises(ConfigError, match=key):
        validate_keys({key: "No"})
    t = await fake(login_local={key: "No"})
    with pytest.raises(LoginError, match=key):
        await asyncio.wait_for(open_session(t, keys={key: "No"}), 10)


# --------------------------------------------------------------------------- what reaches the terminal
ESCAPES = "\x1b]0;owned\x07\x1b[2J"


async def test_discovered_target_names_with_control_characters_are_not_listed(fake):
    """A TargetName is an iSCSI name (RFC 7143 §4.2.7: printable, no spaces).  One carrying
    terminal escape sequences was listed as is and printed by 'discover' (retitling or
    clearing the admin's terminal, faking output lines) and saved as a node record.  It is
    left out now; the well-formed target beside it is listed."""
    from iscsi.initiator.client import discover
    text = (f"TargetName=iqn.2026-11.org.example:evil{ESCAPES}\x00TargetAddress=10.0.0.9:3260,1\x00"
            f"TargetName=iqn.2026-11.org.example:good\x00TargetAddress=10.0.0.8:3260,1\x00").encode()
    t = await fake(text_answer(text))
    found = await asyncio.wait_for(discover("127.0.0.1", t.port, initiator_name="iqn.2026-11.org.sanstack:x"), 10)
    assert [d.name for d in found] == ["iqn.2026-11.org.example:good"]
    r = await asyncio.to_thread(run_cli, "discover", f"127.0.0.1:{t.port}")
    assert r.exit_code == 0 and "\x1b" not in r.output and "example:good" in r.output, r.output


async def test_a_redirect_address_with_control_characters_is_not_printed_raw(hooked):
    """Login redirect (RFC 7143 §11.13.5) to a TargetAddress that is no address and carries
    escape sequences: the LoginError shows it escaped, not raw."""
    from iscsi.initiator.errors import LoginError
    from tests.unit.test_initiator_login import FakeTargetLogin
    t = await hooked(login=lambda: FakeTargetLogin(redirect=f"evil{ESCAPES}:3260,1"))
    with pytest.raises(LoginError) as err:
        await asyncio.wait_for(open_session(t), 10)
    assert "\x1b" not in str(err.value) and "\x07" not in str(err.value)
    assert "not a usable address" in str(err.value)


def inquiry_with(vendor: bytes, product: bytes):
    """Handler: standard INQUIRY answered with these VENDOR/PRODUCT IDENTIFICATION bytes."""
    async def answer(conn, pdu):
        if read_cmd(pdu, 0x12) and not pdu.cdb[1] & 1:
            data = bytes([0, 0, 6, 2, 31, 0, 0, 2]) + vendor.ljust(8)[:8] + product.ljust(16)[:16] + b"0001"
            data_in(conn, pdu, [(0, data[:pdu.edtl])], underflow=max(0, pdu.edtl - len(data)))
            return True
        return False
    return answer


async def test_inquiry_strings_with_control_characters_are_printed_escaped(fake):
    """SPC-4 §4.3.1: INQUIRY's ASCII fields hold printable characters (20h-7Eh).  A target
    putting ESC/BEL sequences there had them printed raw by 'inquiry' and 'ls'."""
    t = await fake(inquiry_with(b"EV\x1b[2J\x07", b"PROD\x1b]0;x\x07"))
    url = f"iscsi://127.0.0.1:{t.port}/iqn.2026-11.org.sanstack:unit-target/0"
    for args in (("inquiry", url), ("ls", url)):
        r = await asyncio.to_thread(run_cli, *args)
        assert "EV" in r.output and "PROD" in r.output, r.output
        assert "\x1b" not in r.output and "\x07" not in r.output, r.output


# --------------------------------------------------------------------------- short parameter data
@pytest.mark.parametrize("name", sorted(n for n in dir(scsi) if n.startswith("parse_")))
@pytest.mark.parametrize("n", [0, 1, 3, 4, 7, 9, 13])
def test_parsers_refuse_short_data_with_value_error(name, n):
    """What a target returns is cut to what it sent (the residual above), so parameter data
    can be shorter than its format: each parser returns what it can or raises ValueError
    (the CLI's one-line error), never struct.error or IndexError (a traceback)."""
    try:
        getattr(scsi, name)(b"\x01" * n)
    except ValueError:
        pass


async def test_short_read_capacity_is_an_error_line_not_a_traceback(fake):
    """READ CAPACITY (16) not supported, READ CAPACITY (10) answered GOOD with 4 of its 8
    bytes (and the residual saying so): 'readcap' printed a struct.error traceback."""
    async def short_rc10(conn, pdu):
        if read_cmd(pdu, 0x12) and not pdu.cdb[1] & 1:
            # readcap opens the LU as a device first: a standard INQUIRY of a disk (SPC-4 §6.6.2).
            inquiry = bytes([0x00, 0x00, 0x06, 0x02, 31]) + bytes(3) + b"FAKE    " + b"DISK".ljust(16) + b"0001"
            data_in(conn, pdu, [(0, inquiry)])
            return True
        if read_cmd(pdu, 0x25):
            data_in(conn, pdu, [(0, b"\x00\x00\x10\x00")], underflow=4)
            return True
        return False

    t = await fake(short_rc10)
    url = f"iscsi://127.0.0.1:{t.port}/iqn.2026-11.org.sanstack:unit-target/0"
    r = await asyncio.to_thread(run_cli, "readcap", url)
    assert r.exit_code == 1 and "error:" in r.output and "READ CAPACITY (10)" in r.output, r.output


@pytest.mark.parametrize("chunk", [1000, 4096, 20000])
async def test_a_misplaced_payload_received_in_place_never_lands_in_the_buffer(chunk):
    """The in-place receive of a large Data-In (connection.py) asks the session where the
    payload goes before a byte of it arrives: a Buffer Offset other than the next one is
    refused there, so the caller's buffer is not overwritten at the wrong place even for a
    moment (socket-less, fed in chunks so the payload is received in place)."""
    from iscsi import framing
    from iscsi.initiator.session import Task
    from tests.unit.test_initiator_fastpath import STATSN0, feed, logged_in
    size = 32 * KiB
    s, conn, _wire = logged_in()
    buf = bytearray(b"\xee" * (3 * size))
    done: list[Task] = []
    task = Task(0, scsi.read16(0, 3 * size // 512), 3 * size, None, buf, 1, done.append)
    s.submit(task)
    await asyncio.sleep(0)
    win = {"statsn": STATSN0, "expcmdsn": 8, "maxcmdsn": 70}
    stream = (framing.encode_bytes(P.DataIn(itt=task.itt, datasn=0, offset=0, data=b"D" * size, **win))
              + framing.encode_bytes(P.DataIn(itt=task.itt, datasn=1, offset=size // 2, data=b"E" * size, **win)))
    with pytest.raises(AssertionError):
        feed(conn, stream, [chunk])       # feed stops at the closed connection
    assert conn.closed and "Buffer Offset" in str(conn.close_reason)
    assert bytes(buf[:size]) == b"D" * size and bytes(buf[size:]) == b"\xee" * (2 * size)
    assert done and isinstance(done[0].exc, ConnectionLost)


@pytest.mark.parametrize("announce", [False, True], ids=["reject-only", "async-then-reject"])
async def test_a_command_rejected_waiting_for_logout_is_sent_again_after_the_relogin(fake, announce):
    """RFC 7143 §11.9.1 event 1: after asking for a logout the target "MAY reject any new
    I/O requests ... with the reason code 'Waiting for Logout'" (§11.17.1, 0x0c).  Such a
    command was not carried out: it failed the caller with ProtocolViolation.  Now it waits
    for the logout and the new login (started by the Reject itself when the Async Message
    did not come first) and is sent again."""
    rejected: list[int] = []

    async def waiting_for_logout(conn, pdu):
        if read_cmd(pdu) and not rejected:
            rejected.append(pdu.itt)
            if announce:
                conn.send(P.AsyncMessage(event=P.AsyncEvent.LOGOUT_REQUEST, param3=5, statsn=conn.next_statsn()))
            conn.send(P.Reject(reason=P.RejectReason.WAITING_FOR_LOGOUT, statsn=conn.next_statsn(),
                               data=pdu.header()[:48]))
            return True
        return False

    t = await fake(waiting_for_logout)
    t.disk[0:4096] = b"w" * 4096
    s = await open_session(t)
    try:
        assert await asyncio.wait_for(BlockDevice(s, 0).read(0, 8), 10) == b"w" * 4096
        assert rejected and s.reconnects == 1
        assert any(isinstance(p, P.LogoutRequest) for p in t.conns[0].received)
    finally:
        await s.close()


@pytest.mark.parametrize("delta", [0x80000005, 0xFFFFF000], ids=["half-range-ahead", "far-behind"])
async def test_an_invalid_window_in_the_final_login_response_does_not_stall_the_session(fake, delta):
    """The final Login Response carries MaxCmdSN < ExpCmdSN - 1 in serial arithmetic (RFC
    7143 §4.2.2.1: such a pair is to be ignored).  It was taken as the session's window:
    'MaxCmdSN' 2**31 + 5 ahead reads as closed, and no later valid MaxCmdSN ever counts as
    newer, so every command waited for ever.  Now the session starts with a window of one
    command and the target's next answer sets it right."""
    # The fake target answers logins with MaxCmdSN = CmdSN + window - 1, and later PDUs with
    # fixed_maxcmdsn (a valid window: the session's CmdSNs start at 1).
    t = await fake(window=(delta + 1) & 0xFFFFFFFF)
    t.fixed_maxcmdsn = 1000
    s = await open_session(t)
    try:
        for _ in range(3):
            await asyncio.wait_for(s.execute(0, scsi.test_unit_ready(), timeout=2), 5)
        assert s.window[1] == 1000 and t.window_violations == 0
    finally:
        await s.close()


async def test_close_during_a_requested_logout_or_renegotiation_leaves_no_task_pending(fake):
    """The target asks for a logout (a read still in flight, so the session drains) and for
    a negotiation it never answers; the caller closes the session meanwhile.  close() ends
    the session's helper tasks before it returns (as it does for keepalive and recovery):
    the drain loop of the requested logout was left running."""
    async def hold_reads(conn, pdu):
        return read_cmd(pdu) or isinstance(pdu, P.TextRequest)

    t = await fake(hold_reads)
    s = await open_session(t)
    conn = t.conns[-1]
    read = asyncio.ensure_future(s.execute(0, scsi.read16(0, 1), read_len=512))
    await wait_for(lambda: any(read_cmd(p) for p in conn.received))
    conn.send(P.AsyncMessage(event=P.AsyncEvent.NEGOTIATION_REQUEST, statsn=conn.next_statsn()))
    conn.send(P.AsyncMessage(event=P.AsyncEvent.LOGOUT_REQUEST, param3=5, statsn=conn.next_statsn()))
    await asyncio.sleep(0.1)
    await s.close()
    with pytest.raises(IscsiError):
        await read
    pending = [x for x in asyncio.all_tasks() if x is not asyncio.current_task() and not x.done()
               and "Session" in repr(x.get_coro())]
    assert pending == []


async def test_an_r2t_above_max_burst_length_is_served(fake):
    """Checked fine (lenient on purpose): one R2T for all 64 KiB of a write while
    MaxBurstLength is 16 KiB (RFC 7143 §11.8.4: MUST NOT exceed it).  Sending what the target
    asked for harms nothing; the Data-Out PDUs still respect its MaxRecvDataSegmentLength."""
    keys = {**SOLICITED_ONLY, "MaxBurstLength": "16384", "FirstBurstLength": "16384"}
    t = await fake(login_local={**keys, "MaxRecvDataSegmentLength": "8192"})
    s = await open_session(t, keys=keys)
    try:
        data = os.urandom(64 * KiB)
        await asyncio.wait_for(BlockDevice(s, 0).write(8, data), 5)
        assert bytes(t.disk[8 * 512:8 * 512 + len(data)]) == data
        outs = [p for p in t.conns[-1].received if isinstance(p, P.DataOut)]
        assert outs and max(len(p.data) for p in outs) <= 8192
    finally:
        await s.close()


async def test_an_announced_drop_with_an_absurd_time2wait_is_bounded(fake, monkeypatch):
    """Async Message "connection drop" (RFC 7143 §11.9.1 event 2) with Parameter2 = 65535 s
    Time2Wait: the session waited 18 hours before its first reconnect (commands failed at the
    replacement timeout meanwhile).  Time2Wait is bounded by DefaultTime2Wait's range,
    3600 s (§13.15) — here shrunk so the test can see the bound hold."""
    from iscsi.initiator import session as S
    monkeypatch.setattr(S, "MAX_TIME2WAIT", 0.2)
    t = await fake()
    s = await open_session(t)
    try:
        conn = t.conns[-1]
        conn.send(P.AsyncMessage(event=P.AsyncEvent.CONNECTION_DROP, param2=65535, param3=0,
                                 statsn=conn.next_statsn()))
        await asyncio.sleep(0.05)
        conn.drop()
        await asyncio.wait_for(BlockDevice(s, 0).test_unit_ready(), 5)
        assert s.reconnects == 1
    finally:
        await s.close()
