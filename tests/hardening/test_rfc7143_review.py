"""RFC 7143 review of the target, as a hostile or merely unusual (but legal) initiator drives it:
login/text negotiation corners and Full Feature Phase rules that test_malformed.py,
test_hostile_peer_review.py and tests/target/test_login.py do not cover yet.

Live cases run against the module's daemon and end with the daemon alive, memory bounded, no
internal error in its log and the witness sessions doing verified I/O (``clean_log`` on top of
``baseline``); sans-IO cases drive the login/key/auth code alone.

Bugs found here were fixed in the files they belong to (keys, session, login, auth, pdu by the
review; connection.py and server.py right after it).
"""
from __future__ import annotations

import pytest

from iscsi import keys as K
from iscsi import pdu as P

from .conftest import BLOCK
from .raw import Closed, INITIATOR, OPERATIONAL, RawSession, logged_in, read10, still_works, write10

#: Where each case checks that its session still writes and reads.
WITNESS_LBA = 9000

ISID = 0x400000007100


def raw(daemon) -> RawSession:
    return RawSession(daemon.portals[0].host, daemon.portals[0].port)


def login_keys(daemon, extra=()) -> list[tuple[str, str]]:
    """open-iscsi's first login PDU; ``extra`` replaces or adds operational keys."""
    override = dict(extra)
    return [("InitiatorName", INITIATOR), ("TargetName", daemon.iqn), ("SessionType", "Normal")] + \
        [(k, override.pop(k, v)) for k, v in OPERATIONAL] + list(override.items())


# -- login: keys declared twice (§6.2) ------------------------------------------------------

def test_login_declaring_target_name_twice_is_refused(daemon, clean_log):
    """§6.2: a key declared twice in a login (other than the few that allow it in *answers*,
    TargetAddress/TargetName of SendTargets) is detected and the login rejected with initiator
    error.  Was: TargetName is 'repeatable' for both roles, so an initiator's second TargetName
    was taken silently (the session was bound to one name while the negotiated parameters
    carried the other)."""
    s = raw(daemon)
    text = K.encode_text([("InitiatorName", INITIATOR), ("TargetName", daemon.iqn + "x"), ("SessionType", "Normal"),
                          ("TargetName", daemon.iqn)] + OPERATIONAL)
    s.send(P.LoginRequest(transit=True, csg=1, nsg=3, isid=ISID, itt=1, data=text))
    resp = s.recv()
    assert isinstance(resp, P.LoginResponse) and (resp.status_class, resp.status_detail) == (2, 0), resp
    assert s.closed_by_target(3.0)
    s.close()


def test_target_name_redeclared_in_a_later_login_pdu_is_refused():
    """The same rule across the PDUs of one login: TargetName=A in the security stage,
    TargetName=B in the operational stage (sans-IO)."""
    from iscsi.target.login import LoginFailure, TargetLogin
    from tests.target.fakes import FakeRegistry, FakeTarget

    iqn = "iqn.2026-11.org.sanstack:t1"
    login = TargetLogin(FakeRegistry({iqn: FakeTarget(iqn)}), "127.0.0.1", 3260, lambda *a: 1)

    def req(keys, csg, nsg):
        return P.LoginRequest(transit=True, csg=csg, nsg=nsg, isid=ISID, itt=7, data=K.encode_text(keys))

    (r1,) = login.receive(req([("InitiatorName", INITIATOR), ("TargetName", iqn), ("AuthMethod", "None")], 0, 1))
    assert r1.status_class == 0 and r1.transit
    (r2,) = login.receive(req([("TargetName", "iqn.2026-11.org.sanstack:other")] + OPERATIONAL, 1, 3))
    assert (r2.status_class, r2.status_detail) == (2, 0), r2
    assert isinstance(login.outcome, LoginFailure)


# -- the CmdSN window (§4.2.2.1) ---------------------------------------------------------------

def test_commands_beyond_the_advertised_max_cmd_sn_are_ignored(daemon, clean_log):
    """§4.2.2.1: the target MUST silently ignore a non-immediate command outside
    [ExpCmdSN, MaxCmdSN].  Was: the check was against ExpCmdSN + 127, and ExpCmdSN moves up
    with every command that arrives in order -- so an initiator that ignores MaxCmdSN could
    park any number of writes waiting for their data (each holding its immediate data):
    memory without bound, from one session."""
    s = logged_in(daemon, extra=[("ImmediateData", "No"), ("InitialR2T", "Yes")])
    room = (s.maxcmdsn - s.cmdsn + 1) & 0xFFFFFFFF
    assert 0 < room <= 1024, (s.cmdsn, s.maxcmdsn)
    extra = 40
    burst = b"".join(
        P.ScsiCommandPdu(write=True, edtl=BLOCK, cmdsn=(s.cmdsn + i) & 0xFFFFFFFF, expstatsn=s.expstatsn,
                         itt=s.next_itt(), cdb=write10(9100, 1)).encode()
        for i in range(room + extra))
    first_itt = s.itt - (room + extra) + 1
    s.send_raw(burst)
    r2ts = []
    while True:
        try:
            pdu = s.recv(timeout=1.5)
        except TimeoutError:
            break
        if isinstance(pdu, P.R2T):
            r2ts.append(pdu.itt)
    beyond = [itt for itt in r2ts if itt - first_itt >= room]
    assert not beyond, f"{len(beyond)} commands beyond MaxCmdSN were accepted ({len(r2ts)} R2Ts, room {room})"
    assert len(r2ts) == room
    s.close()


# -- login: text spanning PDUs (§6.2 C bit, §11.12.2) --------------------------------------

def test_login_key_split_across_pdus_mid_name_and_mid_value(daemon, clean_log):
    """§11.12.2: with C=1 the text goes on in the next PDU; a key=value pair may be cut
    anywhere, even inside the key name or the value.  Each piece gets an empty response."""
    s = raw(daemon)
    text = K.encode_text(login_keys(daemon, extra=[("MaxRecvDataSegmentLength", "65536")]))
    cut1 = text.index(b"TargetName") + 4           # inside a key name
    cut2 = text.index(b"MaxRecvDataSegmentLength=") + 27  # inside a value
    pieces = [text[:cut1], text[cut1:cut2], text[cut2:]]
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        s.send(P.LoginRequest(transit=last, cont=not last, csg=1, nsg=3, isid=ISID + 1, itt=1, cmdsn=s.cmdsn,
                              data=piece))
        resp = s.recv()
        assert resp.status_class == 0, resp
        if not last:
            assert not resp.transit and not resp.cont and resp.data == b"", resp
    assert resp.transit and resp.nsg == 3 and resp.tsih, resp
    s.tsih, s.expstatsn = resp.tsih, (resp.statsn + 1) & 0xFFFFFFFF
    s.expcmdsn, s.maxcmdsn = resp.expcmdsn, resp.maxcmdsn
    s.max_send = int(dict(K.parse_text(resp.data))["MaxRecvDataSegmentLength"])
    s.clear_unit_attentions()
    # Our declaration went through whole: a 64 KiB READ comes back in one Data-In.
    payload = bytes(range(256)) * 256
    assert s.write(9200, payload) == 0
    itt = s.command(read10(9200, len(payload) // BLOCK), read=True, edtl=len(payload))
    pdu = s.recv()
    assert isinstance(pdu, P.DataIn) and pdu.itt == itt and len(pdu.data) == len(payload) and pdu.has_status
    s.close()


# -- Text in Full Feature Phase: long answers (§11.11) -------------------------------------

def test_text_answer_longer_than_the_initiators_segment_is_continued(daemon, clean_log):
    """§11.11.2/§11.11.4/§11.11.6: an answer longer than the initiator's
    MaxRecvDataSegmentLength (512 here) is cut into pieces <= 512 bytes; every piece but the
    last has C=1, F=0 and a TTT other than 0xffffffff, which the initiator copies into an
    empty request to get the next; the last has C=0, F=1, TTT 0xffffffff."""
    s = logged_in(daemon, extra=[("MaxRecvDataSegmentLength", "512")])
    keys = [(f"X-org.example.k{i:03d}", "v") for i in range(60)]  # ~60 x 34 bytes answered
    itt = s.next_itt()
    s.send(P.TextRequest(itt=itt, cmdsn=s.cmdsn, expstatsn=s.expstatsn, immediate=True,
                         data=K.encode_text(keys)))
    answer, pieces = bytearray(), 0
    for _ in range(20):
        pdu = s.recv()
        assert isinstance(pdu, P.TextResponse) and pdu.itt == itt, pdu
        assert len(pdu.data) <= 512, f"text piece of {len(pdu.data)} bytes to a 512-byte receiver"
        answer += pdu.data
        pieces += 1
        if pdu.final:
            assert not pdu.cont and pdu.ttt == P.RESERVED_TAG, pdu
            break
        assert pdu.cont and pdu.ttt != P.RESERVED_TAG, pdu
        s.send(P.TextRequest(itt=itt, ttt=pdu.ttt, cmdsn=s.cmdsn, expstatsn=s.expstatsn, immediate=True))
    assert pieces > 2
    assert K.parse_text(bytes(answer)) == [(k, "NotUnderstood") for k, _ in keys]
    still_works(s, WITNESS_LBA)
    s.close()


def test_text_request_with_f_0_is_answered_with_f_0(daemon, clean_log):
    """§11.11.1: 'A Text Response with the F bit set to 1 in response to a Text Request with
    the F bit set to 0 is a protocol error'; a response with F=0 carries a TTT other than
    0xffffffff (§11.11.4), which the initiator's next (F=1) request copies to end the
    exchange."""
    s = logged_in(daemon)
    itt = s.next_itt()
    s.send(P.TextRequest(itt=itt, final=False, cmdsn=s.cmdsn, expstatsn=s.expstatsn, immediate=True,
                         data=b"SendTargets=All\0"))
    pdu = s.recv()
    assert isinstance(pdu, P.TextResponse) and pdu.itt == itt
    assert not pdu.final and pdu.ttt != P.RESERVED_TAG, pdu
    s.send(P.TextRequest(itt=itt, ttt=pdu.ttt, cmdsn=s.cmdsn, expstatsn=s.expstatsn, immediate=True))
    last = s.recv()
    assert isinstance(last, P.TextResponse) and last.final and last.ttt == P.RESERVED_TAG, last
    s.close()


# -- a second connection in a MaxConnections=1 session (§6.3, §11.13.5) ------------------

def test_second_connection_with_another_cid_is_refused_and_the_session_lives(daemon, clean_log):
    """A login with the TSIH of a live session and a new CID asks for a second connection;
    MaxConnections is 1: 0x0206 (too many connections), and the first connection goes on."""
    isid = ISID + 2
    a = logged_in(daemon, isid=isid)
    b = raw(daemon)
    b.send(P.LoginRequest(transit=True, csg=1, nsg=3, isid=isid, tsih=a.tsih, cid=1, itt=1, cmdsn=a.cmdsn,
                          data=K.encode_text(login_keys(daemon))))
    resp = b.recv()
    assert isinstance(resp, P.LoginResponse) and (resp.status_class, resp.status_detail) == (2, 6), resp
    assert b.closed_by_target(3.0)
    b.close()
    still_works(a, WITNESS_LBA)
    a.close()


# -- connection reinstatement keeps the session's values (§6.3.4, §13 "Use: LO") -----------

def _reinstate(daemon, a: RawSession, isid: int, keys) -> RawSession:
    b = raw(daemon)
    b.send(P.LoginRequest(transit=True, csg=1, nsg=3, isid=isid, tsih=a.tsih, cid=0, itt=1, cmdsn=a.cmdsn,
                          data=K.encode_text(keys)))
    resp = b.recv()
    assert resp.status_class == 0 and resp.tsih == a.tsih, resp
    b.login_answers = dict(K.parse_text(resp.data))
    b.tsih, b.cmdsn, b.expstatsn = resp.tsih, a.cmdsn, (resp.statsn + 1) & 0xFFFFFFFF
    b.max_send = int(b.login_answers.get("MaxRecvDataSegmentLength", 8192))
    return b


def test_connection_reinstatement_keeps_the_session_wide_values(daemon, clean_log):
    """Session-wide keys (Use: LO, §13.10-§13.20) are negotiated on the leading connection only;
    a login that replaces the session's connection (§6.3.4, same ISID/TSIH/CID) leaves them as
    they are.  Here the session agreed FirstBurstLength=262144; the replacing login offers only
    connection keys, and a 128 KiB immediate write (within the session's FirstBurstLength) must
    go through.  Was: the new connection took the RFC defaults (FirstBurstLength 65536,
    InitialR2T=Yes ...), so the initiator's writes were rejected."""
    isid = ISID + 3
    a = logged_in(daemon, isid=isid, extra=[("FirstBurstLength", "262144")])
    assert a.login_answers.get("FirstBurstLength") == "262144", a.login_answers
    conn_only = [("InitiatorName", INITIATOR), ("TargetName", daemon.iqn), ("SessionType", "Normal"),
                 ("HeaderDigest", "None"), ("DataDigest", "None"), ("MaxRecvDataSegmentLength", "262144")]
    b = _reinstate(daemon, a, isid, conn_only)
    b.clear_unit_attentions()
    payload = b"\x3c" * (128 * 1024)
    itt = b.command(write10(9300, len(payload) // BLOCK), write=True, edtl=len(payload), data=payload)
    status, _ = b.wait_status(itt)
    assert status.status == 0
    a.close()
    b.close()


def test_a_login_joining_a_session_starts_from_the_sessions_values():
    """The login side of the fix above (sans-IO): given the joined session's values
    (``session_params``), a TSIH != 0 login that offers only connection keys ends with the
    session's session-wide values, while connection keys start again from their defaults."""
    from dataclasses import replace

    from iscsi.target.login import LoginSuccess, TargetLogin
    from tests.target.fakes import FakeRegistry, FakeTarget

    iqn = "iqn.2026-11.org.sanstack:t1"
    agreed = K.Negotiated()
    agreed = K.Negotiated(
        session=replace(agreed.session, initial_r2t=False, first_burst_length=262144, max_burst_length=1048576,
                        max_outstanding_r2t=4, default_time2retain=0),
        connection=replace(agreed.connection, header_digest=True, max_send_data_segment_length=4096))
    asked = []

    def session_params(isid, initiator, target, tsih):
        asked.append((isid, initiator, target, tsih))
        return agreed

    login = TargetLogin(FakeRegistry({iqn: FakeTarget(iqn)}), "127.0.0.1", 3260, lambda *a: a[3],
                        session_params=session_params)
    keys = [("InitiatorName", INITIATOR), ("TargetName", iqn), ("HeaderDigest", "None"),
            ("MaxRecvDataSegmentLength", "65536")]
    (resp,) = login.receive(P.LoginRequest(transit=True, csg=1, nsg=3, isid=ISID, tsih=9, itt=7,
                                           data=K.encode_text(keys)))
    assert resp.status_class == 0 and resp.transit and resp.tsih == 9, resp
    assert asked == [(ISID, INITIATOR, iqn, 9)]
    ok = login.outcome
    assert isinstance(ok, LoginSuccess)
    s = ok.params.session
    assert (s.initial_r2t, s.first_burst_length, s.max_burst_length, s.max_outstanding_r2t,
            s.default_time2retain) == (False, 262144, 1048576, 4, 0)
    c = ok.params.connection
    assert not c.header_digest and c.max_send_data_segment_length == 65536


# -- Data-Out (§11.7) --------------------------------------------------------------------------

def test_burst_ended_by_an_empty_final_data_out(daemon, clean_log):
    """§11.7.7: 'initiators and targets MUST be able to properly receive 0-length data
    segments'.  A burst whose data all came with F=0 is ended by an empty Data-Out with F=1
    (DataSN and offset following on): the write completes GOOD with the data sent."""
    s = logged_in(daemon, extra=[("ImmediateData", "No"), ("InitialR2T", "Yes")])
    payload = bytes(range(256)) * 4
    itt = s.command(write10(9400, 2), write=True, edtl=len(payload))
    r2t = s.recv()
    assert isinstance(r2t, P.R2T) and r2t.length == len(payload), r2t
    s.send(P.DataOut(itt=itt, ttt=r2t.ttt, datasn=0, offset=0, final=False, expstatsn=s.expstatsn,
                     data=payload))
    s.send(P.DataOut(itt=itt, ttt=r2t.ttt, datasn=1, offset=len(payload), final=True, expstatsn=s.expstatsn))
    resp = s.recv()
    assert isinstance(resp, P.ScsiResponse) and resp.itt == itt and resp.status == 0, resp
    status, data = s.read(9400, len(payload))
    assert status == 0 and data == payload
    s.close()


def test_unsolicited_data_out_without_immediate_data(daemon, clean_log):
    """ImmediateData=No, InitialR2T=No (§13.10, §13.11): no data in the command PDU, the first
    burst as unsolicited Data-Out (TTT 0xffffffff, DataSN from 0, F on its last PDU), the rest
    solicited by R2T from the end of the first burst."""
    s = logged_in(daemon, extra=[("ImmediateData", "No"), ("InitialR2T", "No"), ("FirstBurstLength", "4096")])
    payload = bytes((i * 7) & 0xFF for i in range(8192))
    itt = s.command(write10(9500, len(payload) // BLOCK), write=True, edtl=len(payload), final=False)
    for sn, off in enumerate(range(0, 4096, 1024)):
        s.send(P.DataOut(itt=itt, datasn=sn, offset=off, final=off + 1024 == 4096, expstatsn=s.expstatsn,
                         data=payload[off:off + 1024]))
    s.pending_write = payload
    status, _ = s.wait_status(itt)
    assert status.status == 0
    st, data = s.read(9500, len(payload))
    assert st == 0 and data == payload
    s.close()


def test_immediate_data_when_immediate_data_is_no_is_rejected(daemon, clean_log):
    """§13.11: with ImmediateData=No the initiator MUST NOT send data with the command; the
    target refuses it (Reject 0x04 carrying the header) and writes nothing."""
    s = logged_in(daemon, extra=[("ImmediateData", "No"), ("InitialR2T", "Yes")])
    assert s.write(9600, b"\x11" * BLOCK) == 0
    cmd = P.ScsiCommandPdu(write=True, edtl=BLOCK, cmdsn=s.cmdsn, expstatsn=s.expstatsn, cdb=write10(9600, 1),
                           itt=s.next_itt(), data=b"\x99" * BLOCK)
    s.send(cmd)
    rej = s.recv()
    assert isinstance(rej, P.Reject) and rej.reason == P.RejectReason.PROTOCOL_ERROR, rej
    assert bytes(rej.data)[:P.BHS_LEN] == cmd.header()[:P.BHS_LEN]
    st, data = s.read(9600, BLOCK)  # the rejected CmdSN is used again (§7.3)
    assert st == 0 and data == b"\x11" * BLOCK
    s.close()


# -- Logout (§11.14) ---------------------------------------------------------------------------

@pytest.mark.parametrize("reason", [3, 0x7F])
def test_logout_with_a_reserved_reason_code_is_rejected(daemon, clean_log, reason):
    """§11.14.1: reason codes 0-2 are defined, the rest reserved.  A Logout with a reserved
    one is refused (Reject 0x09, invalid PDU field, with its header) and the session goes on.
    Was: taken as 'close the session' -- the session and its nexus (reservations, unit
    attentions) ended on a code the initiator never defined."""
    s = logged_in(daemon)
    req = P.LogoutRequest(reason=reason, itt=s.next_itt(), cmdsn=s.cmdsn, expstatsn=s.expstatsn, immediate=True)
    s.send(req)
    try:
        rej = s.recv()
    except Closed:
        pytest.fail("session closed on a reserved Logout reason")
    assert isinstance(rej, P.Reject) and rej.reason == P.RejectReason.INVALID_PDU_FIELD, rej
    assert bytes(rej.data)[:P.BHS_LEN] == req.header()[:P.BHS_LEN]
    still_works(s, WITNESS_LBA)
    assert s.logout().response == 0
    s.close()


@pytest.mark.parametrize("offset", [1024, 256])
def test_unsolicited_data_out_out_of_order_fails_the_task(daemon, clean_log, offset):
    """DataPDUInOrder=Yes (§13.18): unsolicited Data-Out goes on where the immediate data
    ended (512 here).  A PDU at 1024 leaves a hole that no R2T would ever ask for; one at 256
    overlaps.  Either ends the task with CHECK CONDITION and writes nothing.  Was: GOOD, with
    zeros written in the hole (R2Ts started after the highest offset seen)."""
    s = logged_in(daemon, extra=[("InitialR2T", "No")])
    lba = 9700
    assert s.write(lba, b"\x11" * 2048) == 0
    itt = s.command(write10(lba, 4), write=True, edtl=2048, data=b"\x22" * 512, final=False)
    s.send(P.DataOut(itt=itt, datasn=0, offset=offset, final=True, expstatsn=s.expstatsn, data=b"\x33" * 512))
    s.pending_write = b"\x44" * 2048
    while True:
        try:
            pdu = s.recv()
        except Closed:
            return  # dropping the connection is the other correct answer
        if isinstance(pdu, P.R2T) and pdu.itt == itt:
            s.send(P.DataOut(itt=itt, ttt=pdu.ttt, datasn=0, offset=pdu.offset, final=True,
                             expstatsn=s.expstatsn, data=s.pending_write[pdu.offset:pdu.offset + pdu.length]))
            continue
        if isinstance(pdu, P.Reject):
            continue
        assert isinstance(pdu, P.ScsiResponse) and pdu.itt == itt, pdu
        break
    assert pdu.status == 0x02, f"status {pdu.status:#x} for a write with a hole in its unsolicited data"
    st, data = s.read(lba, 2048)
    assert st == 0 and data == b"\x11" * 2048, "a failed write changed the blocks"
    still_works(s, WITNESS_LBA)
    s.close()


def test_session_type_changed_after_the_first_login_pdu_is_refused(daemon, clean_log):
    """SessionType is chosen by the first Login Request (§13.21; 'Normal' when absent, and the
    target looks up the target, ACL and CHAP by it).  A later SessionType that contradicts it
    is refused (0x0200).  Was: the operational stage was answered as a Discovery session
    (every session-wide key 'Irrelevant') while a Normal session was created: the two ends
    then disagreed on InitialR2T, burst lengths, ..."""
    s = raw(daemon)
    s.send(P.LoginRequest(transit=True, csg=0, nsg=1, isid=ISID + 4, itt=1, cmdsn=s.cmdsn,
                          data=K.encode_text([("InitiatorName", INITIATOR), ("TargetName", daemon.iqn),
                                              ("AuthMethod", "None")])))
    r = s.recv()
    assert r.status_class == 0 and r.transit, r
    s.send(P.LoginRequest(transit=True, csg=1, nsg=3, isid=ISID + 4, itt=1, cmdsn=s.cmdsn,
                          data=K.encode_text([("SessionType", "Discovery")] + OPERATIONAL)))
    r = s.recv()
    assert (r.status_class, r.status_detail) == (2, 0), (r, K.parse_text(r.data))
    assert s.closed_by_target(3.0)
    s.close()


# -- the reserved task tag (§11.2.1.8) ----------------------------------------------------------

@pytest.mark.parametrize("kind", ["scsi", "tmf", "text", "logout"])
def test_a_request_under_the_reserved_itt_is_rejected(daemon, clean_log, kind):
    """§11.2.1.8: ITT 0xffffffff 'is reserved and MUST NOT be assigned for a task by the
    initiator' (only a NOP-Out answering a NOP-In carries it).  A command, TMF, Text or Logout
    under it is refused with Reject 0x09 carrying its header, and the session goes on (the
    rejected CmdSN is used again).  Was: executed and answered under 0xffffffff -- a task no
    ABORT TASK can name; a Logout under it ended the session."""
    s = logged_in(daemon)
    R = P.RESERVED_TAG
    req = {
        "scsi": P.ScsiCommandPdu(read=True, edtl=BLOCK, cmdsn=s.cmdsn, expstatsn=s.expstatsn, cdb=read10(0, 1), itt=R),
        "tmf": P.TaskMgmtRequest(function=P.TmfFunction.ABORT_TASK_SET, itt=R, cmdsn=s.cmdsn,
                                 expstatsn=s.expstatsn, immediate=True),
        "text": P.TextRequest(itt=R, cmdsn=s.cmdsn, expstatsn=s.expstatsn, immediate=True, data=b"SendTargets=All\0"),
        "logout": P.LogoutRequest(reason=0, itt=R, cmdsn=s.cmdsn, expstatsn=s.expstatsn, immediate=True),
    }[kind]
    s.send(req)
    try:
        rej = s.recv()
    except Closed:
        pytest.fail("connection closed")
    assert isinstance(rej, P.Reject) and rej.reason == P.RejectReason.INVALID_PDU_FIELD, rej
    assert bytes(rej.data)[:P.BHS_LEN] == req.header()[:P.BHS_LEN]
    still_works(s, WITNESS_LBA)
    s.close()


def test_request_violation_names_what_a_target_must_refuse():
    """The sans-IO half of the two cases above: P.request_violation flags a task's reserved ITT
    and a reserved Logout reason (Reject 0x09) and nothing an honest initiator sends."""
    R, bad = P.RESERVED_TAG, P.RejectReason.INVALID_PDU_FIELD
    refused = [P.ScsiCommandPdu(itt=R, cdb=read10(0, 1)), P.TaskMgmtRequest(itt=R), P.TextRequest(itt=R),
               P.LogoutRequest(itt=R), P.LogoutRequest(reason=3, itt=1), P.LogoutRequest(reason=0x7F, itt=1)]
    for pdu in refused:
        decoded = P.decode_pdu(pdu.encode(), allowed=P.INITIATOR_OPCODES)
        assert P.request_violation(decoded)[0] == bad, pdu
    fine = [P.NopOut(itt=R, ttt=5), P.NopOut(itt=7), P.ScsiCommandPdu(itt=0, cdb=read10(0, 1)),
            P.DataOut(itt=9, ttt=R), P.LogoutRequest(reason=2, itt=1), P.LogoutRequest(reason=0, itt=0x7FFFFFFF),
            P.TaskMgmtRequest(itt=1, rtt=R), P.SnackRequest(itt=R)]
    for pdu in fine:
        assert P.request_violation(P.decode_pdu(pdu.encode(), allowed=P.INITIATOR_OPCODES)) is None, pdu


# -- CHAP keys sent twice (§6.2, §12.1.3) -------------------------------------------------------

@pytest.mark.parametrize("twice", ["CHAP_N", "CHAP_R", "CHAP_A"])
def test_a_chap_key_twice_in_one_pdu_fails_the_login(twice):
    """§6.2: a key sent twice MUST be detected and the login rejected (initiator error).  The
    security keys go to auth.py, not through the Negotiator's bookkeeping, so a second CHAP_N,
    CHAP_R or CHAP_A in one PDU was resolved silently (the first one won).  Sans-IO."""
    import hashlib

    from iscsi.target.login import LoginFailure, TargetLogin
    from iscsi.target.registry import ChapCredentials
    from tests.target.fakes import FakeRegistry, FakeTarget

    iqn = "iqn.2026-11.org.sanstack:t1"
    secret = b"sixteen-byte-sec"
    login = TargetLogin(FakeRegistry({iqn: FakeTarget(iqn, chap=ChapCredentials("user1", secret.decode()))}),
                        "127.0.0.1", 3260, lambda *a: 1)

    def req(keys):
        return P.LoginRequest(transit=True, csg=0, nsg=1, isid=ISID, itt=7, data=K.encode_text(keys))

    (r1,) = login.receive(req([("InitiatorName", INITIATOR), ("TargetName", iqn), ("AuthMethod", "CHAP")]))
    assert r1.status_class == 0, r1
    chap_a = [("CHAP_A", "5")] + ([("CHAP_A", "7")] if twice == "CHAP_A" else [])
    (r2,) = login.receive(req(chap_a))
    if twice == "CHAP_A":
        assert (r2.status_class, r2.status_detail) == (2, 0), r2
        assert isinstance(login.outcome, LoginFailure)
        return
    got = dict(K.parse_text(r2.data))
    ident, challenge = int(got["CHAP_I"]), bytes.fromhex(got["CHAP_C"][2:])
    right = "0x" + hashlib.md5(bytes([ident]) + secret + challenge).hexdigest()
    keys = [("CHAP_N", "user1"), ("CHAP_R", right)]
    keys.append((twice, "someone-else" if twice == "CHAP_N" else "0x" + "00" * 16))
    (r3,) = login.receive(req(keys))
    assert (r3.status_class, r3.status_detail) == (2, 0), r3
    assert isinstance(login.outcome, LoginFailure)


# -- Logout with tasks outstanding (§11.14) ------------------------------------------------------

@pytest.mark.parametrize("reason", [P.LogoutReason.CLOSE_SESSION, P.LogoutReason.CLOSE_CONNECTION])
def test_logout_while_a_write_waits_for_its_data(daemon, clean_log, reason):
    """A Logout (close the session, or close this connection -- the only one) while a write
    waits for the Data-Out its R2T asked for: the target does not wait for data that will not
    come; it answers the Logout (response 0), closes the connection, and the write is not
    performed."""
    s = logged_in(daemon, extra=[("ImmediateData", "No"), ("InitialR2T", "Yes")])
    lba = 9800
    assert s.write(lba, b"\x55" * BLOCK) == 0
    itt = s.command(write10(lba, 1), write=True, edtl=BLOCK)
    r2t = s.recv()
    assert isinstance(r2t, P.R2T) and r2t.itt == itt
    s.send(P.LogoutRequest(reason=reason, cid=0, itt=s.next_itt(), cmdsn=s.cmdsn, expstatsn=s.expstatsn,
                           immediate=True))
    resp = s.recv(timeout=3.0)
    assert isinstance(resp, P.LogoutResponse) and resp.response == 0, resp
    assert s.closed_by_target(3.0)
    s.close()
    t = logged_in(daemon)
    st, data = t.read(lba, BLOCK)
    assert st == 0 and data == b"\x55" * BLOCK
    t.close()


# -- ABORT TASK SET (§11.5.1) ----------------------------------------------------------------

def test_abort_task_set_ends_writes_waiting_for_data_and_held_commands(daemon, clean_log):
    """ABORT TASK SET aborts every task of this I_T nexus on the LU: writes waiting for the
    Data-Out their R2Ts asked for, and a command held behind a missing CmdSN.  The TMF response
    answers for all of them (no SCSI Response for an aborted task), their late Data-Out is
    dropped without a Reject (§11.6.2), nothing is written, and the session (its window
    included) goes on when the missing CmdSN arrives."""
    s = logged_in(daemon, extra=[("ImmediateData", "No"), ("InitialR2T", "Yes")])
    lba = 9900
    assert s.write(lba, b"\x66" * 2048) == 0
    writes = [s.command(write10(lba + 2 * i, 2), write=True, edtl=1024) for i in range(2)]
    r2ts = {}
    while len(r2ts) < 2:
        pdu = s.recv()
        assert isinstance(pdu, P.R2T), pdu
        r2ts[pdu.itt] = pdu
    gap = s.cmdsn
    held = s.command(read10(lba, 4), read=True, edtl=2048, cmdsn=(gap + 1) & 0xFFFFFFFF)
    tmf_itt = s.next_itt()
    s.send(P.TaskMgmtRequest(function=P.TmfFunction.ABORT_TASK_SET, itt=tmf_itt, cmdsn=gap, expstatsn=s.expstatsn,
                             immediate=True))
    resp = s.recv()
    assert isinstance(resp, P.TaskMgmtResponse) and resp.itt == tmf_itt and resp.response == 0, resp
    for itt, r2t in r2ts.items():
        s.send(P.DataOut(itt=itt, ttt=r2t.ttt, datasn=0, offset=0, final=True, expstatsn=s.expstatsn,
                         data=b"\x77" * 1024))
    # The missing CmdSN arrives now: it runs, the held (aborted) one behind it does not answer.
    s.cmdsn = gap
    st, data = s.read(lba, 2048)
    s.cmdsn = (gap + 2) & 0xFFFFFFFF
    assert st == 0 and data == b"\x66" * 2048, "an aborted write was performed"
    ping = s.next_itt()
    s.send(P.NopOut(itt=ping, cmdsn=s.cmdsn, expstatsn=s.expstatsn, immediate=True))
    while True:
        pdu = s.recv()
        assert not isinstance(pdu, P.Reject), f"Reject {pdu.reason:#x} after ABORT TASK SET"
        assert getattr(pdu, "itt", None) not in writes + [held], f"aborted task answered: {pdu}"
        if isinstance(pdu, P.NopIn) and pdu.itt == ping:
            break
    still_works(s, WITNESS_LBA)
    s.close()


# -- a login that skips the operational stage: every key at its RFC default (§13) ----------

def test_login_straight_from_security_to_full_feature_uses_the_rfc_defaults(daemon, clean_log):
    """CSG=0 -> NSG=3 (§6.3: the operational stage may be skipped) with no operational key:
    the target still declares its MaxRecvDataSegmentLength (§13.12), and everything else is at
    its default -- in particular the initiator's MaxRecvDataSegmentLength is 8192, so a 32 KiB
    READ comes back in Data-In PDUs of at most 8192 bytes, and InitialR2T=Yes: a write without
    immediate data is solicited by R2T."""
    s = raw(daemon)
    s.send(P.LoginRequest(transit=True, csg=0, nsg=3, isid=ISID + 5, itt=1, cmdsn=s.cmdsn,
                          data=K.encode_text([("InitiatorName", INITIATOR), ("TargetName", daemon.iqn),
                                              ("SessionType", "Normal"), ("AuthMethod", "None")])))
    resp = s.recv()
    assert resp.status_class == 0 and resp.transit and resp.nsg == 3 and resp.tsih, resp
    answers = dict(K.parse_text(resp.data))
    assert 512 <= int(answers["MaxRecvDataSegmentLength"]) <= 2**24 - 1, answers
    s.tsih, s.expstatsn = resp.tsih, (resp.statsn + 1) & 0xFFFFFFFF
    s.clear_unit_attentions()
    payload = bytes(range(256)) * 128
    s.immediate_data = False  # InitialR2T=Yes: the whole write answers R2Ts (raw.write solicits)
    assert s.write(9950, payload) == 0
    itt = s.command(read10(9950, len(payload) // BLOCK), read=True, edtl=len(payload))
    got, sizes = bytearray(len(payload)), []
    while True:
        pdu = s.recv()
        if isinstance(pdu, P.DataIn) and pdu.itt == itt:
            sizes.append(len(pdu.data))
            got[pdu.offset:pdu.offset + len(pdu.data)] = pdu.data
            if pdu.has_status:
                break
        elif isinstance(pdu, P.ScsiResponse) and pdu.itt == itt:
            break
    assert max(sizes) <= 8192, f"Data-In of {max(sizes)} bytes to an initiator that declared nothing (8192)"
    assert bytes(got) == payload
    s.close()


# -- offers of the wrong type or out of range (§6.2, §6.2.1, §6.2.2) ----------------------------

def test_offers_out_of_range_or_of_the_wrong_type_are_answered_reject_and_the_login_goes_on(daemon, clean_log):
    """A negotiated key whose offered value is out of its range or not of its type is answered
    'Reject' and keeps its current (default) value; the login itself goes on (§6.2: 'Reject'
    ... the key is left at its current value).  An unknown key is 'NotUnderstood', a value the
    rules cap (ErrorRecoveryLevel=2, Minimum) is answered with the result."""
    odd = [("MaxBurstLength", "100"), ("FirstBurstLength", "abc"), ("InitialR2T", "Maybe"),
           ("DataDigest", "Bogus"), ("MaxOutstandingR2T", "0"), ("DefaultTime2Wait", "3601"),
           ("ErrorRecoveryLevel", "2"), ("X-org.example.odd", "1")]
    s = logged_in(daemon, isid=ISID + 6, extra=odd)
    got = s.login_answers
    assert {k: got.get(k) for k, _ in odd} == {
        "MaxBurstLength": "Reject", "FirstBurstLength": "Reject", "InitialR2T": "Reject", "DataDigest": "Reject",
        "MaxOutstandingR2T": "Reject", "DefaultTime2Wait": "Reject", "ErrorRecoveryLevel": "0",
        "X-org.example.odd": "NotUnderstood"}, got
    # The rejected keys stay at their defaults: InitialR2T=Yes (a write gets an R2T for all of
    # its data when it carries none), MaxBurstLength 262144.
    payload = b"\x5e" * 4096
    itt = s.command(write10(9980, 8), write=True, edtl=len(payload))
    r2t = s.recv()
    assert isinstance(r2t, P.R2T) and r2t.itt == itt and (r2t.offset, r2t.length) == (0, 4096), r2t
    s.send(P.DataOut(itt=itt, ttt=r2t.ttt, datasn=0, offset=0, final=True, expstatsn=s.expstatsn, data=payload))
    resp = s.recv()
    assert isinstance(resp, P.ScsiResponse) and resp.status == 0, resp
    s.close()


# -- session reinstatement only by a login that succeeds (§6.3.5) --------------------------------

def test_a_failed_login_with_a_live_sessions_isid_leaves_that_session_alone(daemon, clean_log):
    """§6.3.5: a new login (TSIH 0) with the ISID of a live session reinstates it -- once the
    login succeeds.  One that fails (here: a key declared twice, §6.2) must not end or disturb
    the live session; the one that succeeds afterwards replaces it and closes its connection."""
    isid = ISID + 7
    a = logged_in(daemon, isid=isid)
    b = raw(daemon)
    bad = K.encode_text(login_keys(daemon) + [("InitiatorName", INITIATOR + "x")])
    b.send(P.LoginRequest(transit=True, csg=1, nsg=3, isid=isid, itt=1, cmdsn=b.cmdsn, data=bad))
    resp = b.recv()
    assert resp.status_class == 2, resp
    b.close()
    still_works(a, WITNESS_LBA)
    c = logged_in(daemon, isid=isid)
    assert c.tsih != a.tsih
    assert a.closed_by_target(3.0), "the reinstated session's connection was kept"
    still_works(c, WITNESS_LBA)
    a.close()
    c.close()


def test_an_initiator_name_in_other_case_is_the_same_initiator(daemon, clean_log):
    """iSCSI names are compared after stringprep, which folds case (RFC 7143 §4.2.7.1, RFC 3722):
    a login from 'IQN.2026-11.ORG...' with the ISID of a live session of 'iqn.2026-11.org...'
    comes from the same initiator port, so it reinstates that session (§6.3.5).  Was: a second
    session with the same I_T nexus (the nexus is case-folded) -- the first one's end (or a
    reset of either) then dropped the other's reservations and unit attentions."""
    isid = ISID + 8
    a = logged_in(daemon, isid=isid)
    b = logged_in(daemon, isid=isid, initiator=INITIATOR.upper())
    assert a.closed_by_target(3.0), "two sessions of one initiator port (names differing in case only)"
    still_works(b, WITNESS_LBA)
    a.close()
    b.close()
