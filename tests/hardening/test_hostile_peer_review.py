"""A hostile or buggy initiator on the wire, review of the gaps left by test_malformed.py: NOP-Out
echoes, Text requests in Full Feature Phase, Logout CIDs and unsolicited data on the fast lane.

Each case ends with the daemon alive, no internal error in its log, and the module's witness
sessions (raw + libiscsi, logged in before) doing verified I/O (``baseline``).
"""
from __future__ import annotations

import pytest

from iscsi import keys as K
from iscsi import pdu as P

from .conftest import BLOCK, running_daemon
from .raw import RawSession, expect_reject, logged_in, read10, still_works, write10

#: Where each case checks that its session still writes and reads.
WITNESS_LBA = 3000


def text_request(s: RawSession, data: bytes, *, itt: int | None = None, cont: bool = False,
                 final: bool = True, ttt: int = P.RESERVED_TAG) -> P.TextRequest:
    req = P.TextRequest(itt=s.next_itt() if itt is None else itt, cont=cont, final=final, cmdsn=s.cmdsn,
                        expstatsn=s.expstatsn, immediate=True, data=data, ttt=ttt)
    s.send(req)
    return req


# -- login ------------------------------------------------------------------------------------

def test_a_login_answer_longer_than_one_pdu_keeps_the_c_bit_until_its_last_piece(daemon, clean_log):
    """§11.13 (C bit) / §6.2: an answer split over several Login Responses has C=1 on every piece but
    the last; the initiator asks for the next with empty requests.  2000 unknown keys (sent with
    C-bit continuations) make a ~46 KiB answer of NotUnderstood.  Was: C=0 from the second
    piece on, so the initiator took a text cut mid-key as complete."""
    s = RawSession(daemon.portals[0].host, daemon.portals[0].port)
    isid = 0x400000000300
    text = K.encode_text([("InitiatorName", "iqn.2026-11.org.sanstack.hardening:chatty"),
                          ("TargetName", daemon.iqn)]) + b"".join(b"X-k%05d=1\0" % i for i in range(2000))
    pieces = [text[i:i + 8000] for i in range(0, len(text), 8000)]
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        s.send(P.LoginRequest(transit=last, cont=not last, csg=1, nsg=3, isid=isid, itt=1, data=piece))
        resp = s.recv()
        assert resp.status_class == 0, resp
    answer, flags = bytearray(resp.data), [resp.cont]
    for _ in range(16):
        if not resp.cont:
            break
        s.send(P.LoginRequest(transit=True, csg=1, nsg=3, isid=isid, itt=1, data=b""))
        resp = s.recv()
        assert resp.status_class == 0 and not resp.transit, resp
        answer += resp.data
        flags.append(resp.cont)
    assert len(flags) > 2 and all(flags[:-1]) and not flags[-1], f"C bits of the pieces: {flags}"
    answers = dict(K.parse_text(bytes(answer)))
    assert all(answers.get("X-k%05d" % i) == "NotUnderstood" for i in range(2000))
    s.send(P.LoginRequest(transit=True, csg=1, nsg=3, isid=isid, itt=1, data=b""))
    resp = s.recv()
    assert resp.status_class == 0 and resp.transit and resp.nsg == 3 and resp.tsih, resp
    s.close()


# -- NOP-Out ----------------------------------------------------------------------------------

def test_nop_echo_is_cut_to_the_initiators_max_recv_data_segment_length(daemon, clean_log):
    """§11.18.3: ping data is reflected, limited to the initiator's MaxRecvDataSegmentLength.
    Was: 4 KiB echoed to an initiator that declared 512."""
    s = logged_in(daemon, extra=[("MaxRecvDataSegmentLength", "512")])
    itt = s.next_itt()
    ping = bytes(range(256)) * 16
    s.send(P.NopOut(itt=itt, cmdsn=s.cmdsn, expstatsn=s.expstatsn, immediate=True, data=ping))
    pdu = s.recv()
    assert isinstance(pdu, P.NopIn) and pdu.itt == itt, pdu
    assert bytes(pdu.data) == ping[:512], f"echo of {len(pdu.data)} bytes to a 512-byte receiver"
    still_works(s, WITNESS_LBA)
    s.close()


# -- Text in Full Feature Phase ---------------------------------------------------------------

def test_text_request_with_a_key_twice_is_rejected_and_the_connection_lives(daemon, clean_log):
    """§6.2 a key negotiated twice, in a Text Request: Reject 0x04 with its header (§11.17).
    Was: an unhandled NegotiationError, a traceback and the connection closed without answer."""
    s = logged_in(daemon)
    req = text_request(s, b"MaxRecvDataSegmentLength=4096\0MaxRecvDataSegmentLength=8192\0")
    expect_reject(s, req.header(), P.RejectReason.PROTOCOL_ERROR)
    still_works(s, WITNESS_LBA)
    s.close()


def test_text_continuations_past_the_limit_are_rejected_and_the_connection_lives(daemon, clean_log):
    """C-bit continuations past TEXT_EXCHANGE_LIMIT (64 KiB): Reject, the text is dropped.
    Was: an unhandled ProtocolError, a traceback and the connection closed without answer."""
    s = logged_in(daemon)
    itt = s.next_itt()
    chunk = b"X-org.example.pad=" + b"p" * 8000 + b"\0"
    ttt = P.RESERVED_TAG
    for _ in range(16):
        # Each continuation copies the target's TTT (§11.10.4), as a real initiator does.
        req = text_request(s, chunk, itt=itt, cont=True, final=False, ttt=ttt)
        pdu = s.recv()
        if isinstance(pdu, P.Reject):
            assert pdu.reason == P.RejectReason.PROTOCOL_ERROR
            assert bytes(pdu.data)[:P.BHS_LEN] == req.header()[:P.BHS_LEN]
            break
        assert isinstance(pdu, P.TextResponse) and not pdu.final and pdu.ttt != P.RESERVED_TAG, pdu
        ttt = pdu.ttt
    else:
        pytest.fail("16 x 8 KiB of continued text accepted")
    # The refused sequence is gone: a fresh request is answered on its own.
    text_request(s, b"SendTargets=All\0")
    pdu = s.recv()
    assert isinstance(pdu, P.TextResponse) and pdu.final
    assert ("TargetName", daemon.iqn) in K.parse_text(bytes(pdu.data))
    still_works(s, WITNESS_LBA)
    s.close()


def test_text_request_with_both_c_and_f_is_rejected(daemon, clean_log):
    """§11.10.2: C=1 requires F=0.  Was: taken as a continuation, never answered."""
    s = logged_in(daemon)
    req = text_request(s, b"SendTargets=All\0", cont=True, final=True)
    expect_reject(s, req.header(), P.RejectReason.PROTOCOL_ERROR)
    text_request(s, b"SendTargets=All\0")
    pdu = s.recv()
    assert isinstance(pdu, P.TextResponse) and pdu.final
    assert ("TargetName", daemon.iqn) in K.parse_text(bytes(pdu.data)), "stale continued text was kept"
    still_works(s, WITNESS_LBA)
    s.close()


def test_text_request_with_ttt_ffffffff_starts_afresh(daemon, clean_log):
    """§11.10.4: TTT 0xffffffff tells the target this is a new request; the state of the
    exchange in progress is reset.  Was: the new request's text was appended to a stale
    half-sent one ("SendTarg" + "SendTargets=All" answered SendTargSendTargets=NotUnderstood)."""
    s = logged_in(daemon)
    text_request(s, b"SendTarg", cont=True, final=False)
    pdu = s.recv()
    assert isinstance(pdu, P.TextResponse) and not pdu.final, pdu
    text_request(s, b"SendTargets=All\0")
    pdu = s.recv()
    assert isinstance(pdu, P.TextResponse) and pdu.final, pdu
    assert ("TargetName", daemon.iqn) in K.parse_text(bytes(pdu.data)), K.parse_text(bytes(pdu.data))
    still_works(s, WITNESS_LBA)
    s.close()


def test_text_continuation_with_another_itt_is_rejected(daemon, clean_log):
    """§11.10.3: every request of a text sequence carries the same ITT; a continuation (our
    TTT copied) under another ITT is refused (Reject 0x09) and the sequence dropped."""
    s = logged_in(daemon)
    itt = s.next_itt()
    text_request(s, b"SendTarg", itt=itt, cont=True, final=False)
    pdu = s.recv()
    assert isinstance(pdu, P.TextResponse) and not pdu.final and pdu.ttt != P.RESERVED_TAG, pdu
    req = text_request(s, b"ets=All\0", itt=itt + 1000, ttt=pdu.ttt)
    expect_reject(s, req.header(), P.RejectReason.INVALID_PDU_FIELD)
    # The same split, continued properly (same ITT, our TTT copied), is one request.
    itt = s.next_itt()
    text_request(s, b"SendTarg", itt=itt, cont=True, final=False)
    pdu = s.recv()
    text_request(s, b"ets=All\0", itt=itt, ttt=pdu.ttt)
    pdu = s.recv()
    assert isinstance(pdu, P.TextResponse) and pdu.final, pdu
    assert ("TargetName", daemon.iqn) in K.parse_text(bytes(pdu.data))
    still_works(s, WITNESS_LBA)
    s.close()


def test_max_recv_data_segment_length_declared_in_ffp_is_honoured(daemon, clean_log):
    """§13.12: MaxRecvDataSegmentLength is declarative and usable in Full Feature Phase (Use:
    ALL).  Was: answered, then ignored -- a 32 KiB READ came back as one 32 KiB Data-In."""
    s = logged_in(daemon)
    text_request(s, b"MaxRecvDataSegmentLength=4096\0")
    pdu = s.recv()
    assert isinstance(pdu, P.TextResponse) and pdu.final, pdu
    payload = bytes(range(256)) * 128
    assert s.write(3100, payload) == 0
    itt = s.command(read10(3100, len(payload) // BLOCK), read=True, edtl=len(payload))
    got = bytearray(len(payload))
    sizes = []
    while True:
        pdu = s.recv()
        if isinstance(pdu, P.DataIn) and pdu.itt == itt:
            sizes.append(len(pdu.data))
            got[pdu.offset:pdu.offset + len(pdu.data)] = pdu.data
            if pdu.has_status:
                assert pdu.status == 0
                break
        elif isinstance(pdu, P.ScsiResponse) and pdu.itt == itt:
            assert pdu.status == 0
            break
    assert max(sizes) <= 4096, f"Data-In segments {sizes} over the declared 4096"
    assert bytes(got) == payload
    s.close()


# -- Logout -----------------------------------------------------------------------------------

def test_logout_of_a_connection_the_session_does_not_have(daemon, clean_log):
    """§11.14.1 / §11.15.1: reason 1 (close the connection) names a CID; one the session does
    not have is response 1 (CID not found), and the connection asking is not closed.
    Was: response 0 and the asking connection (CID 0) closed."""
    s = logged_in(daemon)
    s.send(P.LogoutRequest(reason=1, cid=7, itt=s.next_itt(), cmdsn=s.cmdsn, expstatsn=s.expstatsn,
                           immediate=True))
    resp = s.recv()
    assert isinstance(resp, P.LogoutResponse) and resp.response == 1, resp
    still_works(s, WITNESS_LBA)
    assert s.logout().response == 0
    s.close()


# -- unsolicited data -------------------------------------------------------------------------

def test_immediate_data_beyond_first_burst_length_is_refused_and_not_written(daemon, clean_log):
    """§13.14: unsolicited data (here all immediate) must not exceed FirstBurstLength (64 KiB).
    Was: the fast lane wrote 128 KiB of immediate data and answered GOOD (the general path
    already refused it)."""
    s = logged_in(daemon)
    lba, size = 3200, 128 * 1024
    assert s.write(lba, bytes(size)) == 0  # known contents (zeros) first, within the burst
    cmd = P.ScsiCommandPdu(write=True, edtl=size, cmdsn=s.cmdsn, expstatsn=s.expstatsn,
                           cdb=write10(lba, size // BLOCK), itt=s.next_itt(), final=True, data=b"\x5a" * size)
    s.send(cmd)
    expect_reject(s, cmd.header(), P.RejectReason.PROTOCOL_ERROR)
    # §7.3 (usage of Reject PDU in recovery): a rejected command's CmdSN is not received, so
    # the next command reuses it.
    status, data = s.read(lba, size)
    assert status == 0 and data == bytes(size), "refused immediate data was written"
    still_works(s, WITNESS_LBA)
    s.close()


def test_immediate_data_with_edtl_0_is_refused_and_not_written(daemon, clean_log):
    """Immediate data on a write that announces EDTL 0: more data than the EDTL, refused as
    with any other EDTL (Reject 0x04).  Was: the data silently dropped, GOOD (overflow)."""
    s = logged_in(daemon)
    lba = 3400
    pattern = b"\x11" * BLOCK
    assert s.write(lba, pattern) == 0
    cmd = P.ScsiCommandPdu(write=True, edtl=0, cmdsn=s.cmdsn, expstatsn=s.expstatsn, cdb=write10(lba, 1),
                           itt=s.next_itt(), final=True, data=b"\x77" * BLOCK)
    s.send(cmd)
    expect_reject(s, cmd.header(), P.RejectReason.PROTOCOL_ERROR)
    status, data = s.read(lba, BLOCK)  # the rejected CmdSN is reused (§7.3)
    assert status == 0 and data == pattern
    still_works(s, WITNESS_LBA)
    s.close()


# -- reinstatement ------------------------------------------------------------------------------

def test_connection_reinstatement_gives_back_the_window_of_the_aborted_tasks(daemon, clean_log):
    """§6.3.4: a login with the ISID, TSIH and CID of a live connection replaces it and ends its
    tasks.  Each ended task must give its place in the session's command window back.
    Was: the old connection's tasks were aborted after it had let go of the session, so the
    window stayed short by one per task (10 here) -- for good, and a few such reinstatements
    (an initiator whose NOP timeout fires first) close it: the session hangs."""
    from .raw import INITIATOR, OPERATIONAL

    isid = 0x400000000900
    a = logged_in(daemon, isid=isid, extra=[("ImmediateData", "No"), ("InitialR2T", "Yes")])
    for i in range(10):
        a.command(write10(3800 + i * 8, 4), write=True, edtl=2048)
    r2ts = [a.recv() for _ in range(10)]
    assert all(isinstance(p, P.R2T) for p in r2ts)
    status, _ = a.read(0, BLOCK)
    assert status == 0
    busy = (a.maxcmdsn - a.expcmdsn + 1) & 0xFFFFFFFF
    b = RawSession(daemon.portals[0].host, daemon.portals[0].port)
    keys = [("InitiatorName", INITIATOR), ("TargetName", daemon.iqn), ("SessionType", "Normal")]
    b.send(P.LoginRequest(transit=True, csg=1, nsg=3, isid=isid, tsih=a.tsih, cid=0, itt=1, cmdsn=a.cmdsn,
                          data=K.encode_text(keys + OPERATIONAL)))
    resp = b.recv()
    assert resp.status_class == 0 and resp.tsih == a.tsih, resp
    b.cmdsn, b.expstatsn = a.cmdsn, (resp.statsn + 1) & 0xFFFFFFFF
    status, _ = b.read(0, BLOCK)
    assert status == 0
    free = (b.maxcmdsn - b.expcmdsn + 1) & 0xFFFFFFFF
    assert free == busy + 10, f"window {free} after the reinstatement, {busy} with 10 writes in flight"
    assert a.closed_by_target(3.0)
    still_works(b, WITNESS_LBA)
    a.close()
    b.close()


def test_connection_reinstatement_after_a_lost_command_does_not_hang(daemon, clean_log):
    """The old connection died with command N in flight (never read by the target) and N+1
    held behind it; the initiator logs in again with the session's TSIH and CmdSN N+2, the next
    it will use (§11.12.8), and the login response announces ExpCmdSN N+2.  Its commands must
    run.  Was: the window still waited for N -- which can never come now -- and held every new
    command: the session hung."""
    from .raw import INITIATOR, OPERATIONAL

    isid = 0x400000000901
    a = logged_in(daemon, isid=isid)
    n = a.cmdsn
    a.command(read10(0, 1), read=True, edtl=BLOCK, cmdsn=(n + 1) & 0xFFFFFFFF)  # N is lost
    a.ping()  # N+1 has arrived (and waits)
    b = RawSession(daemon.portals[0].host, daemon.portals[0].port)
    keys = [("InitiatorName", INITIATOR), ("TargetName", daemon.iqn), ("SessionType", "Normal")]
    b.send(P.LoginRequest(transit=True, csg=1, nsg=3, isid=isid, tsih=a.tsih, cid=0, itt=1,
                          cmdsn=(n + 2) & 0xFFFFFFFF, data=K.encode_text(keys + OPERATIONAL)))
    resp = b.recv()
    assert resp.status_class == 0 and resp.expcmdsn == (n + 2) & 0xFFFFFFFF, resp
    b.cmdsn, b.expstatsn = (n + 2) & 0xFFFFFFFF, (resp.statsn + 1) & 0xFFFFFFFF
    status, _ = b.read(0, BLOCK)
    assert status == 0
    still_works(b, WITNESS_LBA)
    a.close()
    b.close()


# -- task management ----------------------------------------------------------------------------

def test_abort_task_of_a_command_that_never_arrived_closes_the_cmdsn_gap(daemon, clean_log):
    """§11.6.1 b): ABORT TASK for a task the target does not have, whose RefCmdSN is in the
    window and below the TMF's CmdSN: that CmdSN counts as received, the answer is Function
    complete.  (A command rejected for a data digest error leaves exactly such a gap, §7.3.)
    Was: 'task does not exist', and the commands held behind the gap never ran -- the session
    hung."""
    s = logged_in(daemon)
    n = s.cmdsn
    held = s.command(read10(0, 1), read=True, edtl=BLOCK, cmdsn=(n + 1) & 0xFFFFFFFF)  # n is lost
    lost_itt = s.next_itt()
    tmf_itt = s.next_itt()
    s.send(P.TaskMgmtRequest(function=P.TmfFunction.ABORT_TASK, rtt=lost_itt, refcmdsn=n, itt=tmf_itt,
                             cmdsn=(n + 2) & 0xFFFFFFFF, expstatsn=s.expstatsn, immediate=True))
    s.cmdsn = (n + 2) & 0xFFFFFFFF
    seen = {}
    while len(seen) < 2:
        pdu = s.recv(timeout=3.0)
        if getattr(pdu, "itt", None) in (held, tmf_itt):
            seen[pdu.itt] = pdu
    assert isinstance(seen[tmf_itt], P.TaskMgmtResponse) and seen[tmf_itt].response == P.TmfResponse.COMPLETE
    assert isinstance(seen[held], P.DataIn) and seen[held].has_status and seen[held].status == 0
    # The lost command turning up late is outside the window now: silently ignored (§4.2.2.1).
    s.command(read10(0, 1), read=True, edtl=BLOCK, cmdsn=n, itt=lost_itt)
    ping_itt = s.next_itt()
    s.send(P.NopOut(itt=ping_itt, cmdsn=s.cmdsn, expstatsn=s.expstatsn, immediate=True))
    while True:
        pdu = s.recv()
        assert getattr(pdu, "itt", None) != lost_itt, f"late command answered: {pdu}"
        if isinstance(pdu, P.NopIn) and pdu.itt == ping_itt:
            break
    still_works(s, WITNESS_LBA)
    s.close()


def _no_reject_before_ping(s: RawSession) -> None:
    """Ping; nothing but the echo (no Reject) may come back before it."""
    itt = s.next_itt()
    s.send(P.NopOut(itt=itt, cmdsn=s.cmdsn, expstatsn=s.expstatsn, immediate=True))
    while True:
        pdu = s.recv()
        assert not isinstance(pdu, P.Reject), f"Reject {pdu.reason:#x} for Data-Out of an aborted task"
        if isinstance(pdu, P.NopIn) and pdu.itt == itt:
            return


def test_data_out_answering_the_r2t_of_an_aborted_task_is_dropped_quietly(daemon, clean_log):
    """RFC 7143 §11.6.2: the initiator goes on answering the R2Ts of an aborted task.  That
    Data-Out is dropped without a Reject -- libiscsi treats a Reject it cannot match to a
    request as a connection error.  Was: Reject 0x09 for each such Data-Out."""
    s = logged_in(daemon, extra=[("ImmediateData", "No"), ("InitialR2T", "Yes")])
    itt = s.command(write10(3500, 4), write=True, edtl=2048)
    r2t = s.recv()
    assert isinstance(r2t, P.R2T)
    s.send(P.TaskMgmtRequest(function=P.TmfFunction.ABORT_TASK, rtt=itt, refcmdsn=(s.cmdsn - 1) & 0xFFFFFFFF,
                             itt=s.next_itt(), cmdsn=s.cmdsn, expstatsn=s.expstatsn, immediate=True))
    resp = s.recv()
    assert isinstance(resp, P.TaskMgmtResponse) and resp.response == P.TmfResponse.COMPLETE, resp
    s.send(P.DataOut(itt=itt, ttt=r2t.ttt, datasn=0, offset=0, final=True, expstatsn=s.expstatsn,
                     data=b"\x42" * 2048))
    _no_reject_before_ping(s)
    status, data = s.read(3500, 2048)
    assert status == 0 and b"\x42" * 512 not in data, "data of an aborted write was written"
    still_works(s, WITNESS_LBA)
    s.close()


def test_data_out_of_a_write_another_session_reset_is_dropped_quietly(tmp_path):
    """LOGICAL UNIT RESET from another session aborts a write waiting for its Data-Out: the
    Data-Out that answers the R2T is dropped without a Reject, and the writer's next command
    sees the reset as a unit attention.  Was: Reject 0x09.  (A daemon of its own: the reset
    gives the module's witnesses a unit attention too.)"""
    with running_daemon(tmp_path) as daemon:
        _reset_while_another_session_writes(daemon)
        assert "conn.internal_error" not in daemon.log_text()


def _reset_while_another_session_writes(daemon) -> None:
    a = logged_in(daemon, extra=[("ImmediateData", "No"), ("InitialR2T", "Yes")])
    b = logged_in(daemon)
    itt = a.command(write10(3600, 4), write=True, edtl=2048)
    r2t = a.recv()
    assert isinstance(r2t, P.R2T)
    b.send(P.TaskMgmtRequest(function=P.TmfFunction.LOGICAL_UNIT_RESET, itt=b.next_itt(), cmdsn=b.cmdsn,
                             expstatsn=b.expstatsn, immediate=True))
    resp = b.recv()
    assert isinstance(resp, P.TaskMgmtResponse) and resp.response == P.TmfResponse.COMPLETE, resp
    a.send(P.DataOut(itt=itt, ttt=r2t.ttt, datasn=0, offset=0, final=True, expstatsn=a.expstatsn,
                     data=b"\x43" * 2048))
    _no_reject_before_ping(a)
    a.clear_unit_attentions()
    still_works(a, WITNESS_LBA)
    b.clear_unit_attentions()
    still_works(b, 3700)
    a.close()
    b.close()


# -- idle discovery sessions (in-process target with short timers) ------------------------------

async def test_a_silent_discovery_session_is_dropped_and_counts_against_the_session_limit(monkeypatch):
    """Discovery sessions are not pinged (NOP-In), so one that logs in and then says nothing was
    kept for ever, and MAX_SESSIONS counted only Normal sessions: a peer could park any number
    of them (two descriptors each).  Now one silent for nop_interval + nop_timeout is dropped,
    like a Normal session that does not answer its ping, and every session counts."""
    import asyncio

    from iscsi.target import server as S
    from tests.target.fakes import FakeLunMap, FakeRegistry, FakeTarget
    from tests.target.wire import Wire

    iqn = "iqn.2026-11.org.sanstack:hostile"
    server = S.IscsiServer(FakeRegistry({iqn: FakeTarget(iqn, luns=FakeLunMap(4096))}),
                           nop_interval=0.2, nop_timeout=0.4)
    _, port = await server.add_portal("127.0.0.1", 0)
    try:
        monkeypatch.setattr(S, "MAX_SESSIONS", 2)
        parked = []
        for i in range(2):
            w = await Wire.open(port)
            assert (await w.login(None, session_type="Discovery", isid=0x400000000700 + i)).status_class == 0
            parked.append(w)
        normal = await Wire.open(port)
        resp = await normal.login(iqn, isid=0x400000000710)
        assert (resp.status_class, resp.status_detail) == (3, 2), "sessions past MAX_SESSIONS accepted"
        # The parked sessions go within nop_interval + nop_timeout (plus a tick) of silence ...
        for w in parked:
            assert await w.closed(timeout=3.0), "a silent discovery session was kept"
        # ... and a Normal session that answers its pings is kept as long as it likes.
        normal = await Wire.open(port)
        assert (await normal.login(iqn, isid=0x400000000711)).status_class == 0
        deadline = asyncio.get_running_loop().time() + 1.5
        while asyncio.get_running_loop().time() < deadline:
            try:
                pdu = await normal.recv(timeout=0.3)
            except asyncio.TimeoutError:
                continue
            if isinstance(pdu, P.NopIn) and pdu.ttt != P.RESERVED_TAG:
                normal.send(P.NopOut(itt=P.RESERVED_TAG, ttt=pdu.ttt, cmdsn=normal.cmdsn,
                                     expstatsn=normal.expstatsn, immediate=True))
        assert not await normal.closed(timeout=0.1)
    finally:
        await server.shutdown(drain_timeout=1)
