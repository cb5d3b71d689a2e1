"""A hostile or merely unusual initiator, exploring what the other hardening modules leave out:
duplicate CmdSNs held behind a gap, a Logout overtaken by a connection reinstatement, and Text
continuations that do not follow the target's lead (a TTT it never gave, text where it asked
for none).

Daemon cases end with the daemon alive, no internal error in its log, and the module's witness
sessions (raw + libiscsi, logged in before) doing verified I/O (``baseline``).
"""
from __future__ import annotations

import asyncio

import pytest

from iscsi import keys as K
from iscsi import pdu as P
from iscsi.session import CommandWindow

from .raw import RawSession, expect_reject, logged_in, read10, still_works, write10

#: Where each case checks that its session still writes and reads.
WITNESS_LBA = 4200

BLOCK = 512


def answers_until_ping(s: RawSession) -> list[P.Pdu]:
    """Everything the target sends before the echo of a ping sent now (immediate, so it
    overtakes nothing that was already answered)."""
    itt = s.next_itt()
    s.send(P.NopOut(itt=itt, cmdsn=s.cmdsn, expstatsn=s.expstatsn, immediate=True, data=b"mark"))
    got = []
    while True:
        pdu = s.recv(timeout=3.0)
        if isinstance(pdu, P.NopIn) and pdu.itt == itt:
            return got
        got.append(pdu)


# -- duplicate CmdSN (§4.2.2.1) ----------------------------------------------------------------

def test_a_duplicate_of_a_held_cmdsn_is_ignored_and_the_window_stays_whole(daemon, clean_log):
    """§4.2.2.1: the target "MUST silently ignore any non-immediate command outside of this range
    or non-immediate duplicates within the range".  Commands under another ITT with the CmdSN of
    one held behind a gap: ignored, never answered, and the window as wide as before once the
    gap closes.  Was: each duplicate became a task that never ran, kept its immediate data and
    its place in the window for the life of the session (MaxCmdSN one lower per duplicate:
    enough of them closed the window for good and pinned ~64 KiB each)."""
    s = logged_in(daemon)
    width = (s.maxcmdsn - s.expcmdsn) & 0xFFFFFFFF
    gap = s.cmdsn
    held = s.command(read10(0, 1), read=True, edtl=BLOCK, cmdsn=gap + 1)
    duplicates = [s.command(write10(4300, 2), write=True, edtl=2 * BLOCK, data=b"\x99" * (2 * BLOCK),
                            cmdsn=gap + 1) for _ in range(3)]
    first = s.command(read10(0, 1), read=True, edtl=BLOCK, cmdsn=gap)
    s.cmdsn = gap + 2
    answered = {pdu.itt for pdu in answers_until_ping(s) if isinstance(pdu, (P.DataIn, P.ScsiResponse))}
    assert answered == {first, held}, f"answered {answered}, duplicates {duplicates}"
    # A command after them runs, and reports the window back at its full width.
    status, _ = s.read(4300, 2 * BLOCK)
    assert status == 0
    assert (s.maxcmdsn - s.expcmdsn) & 0xFFFFFFFF == width, "the duplicates kept places in the window"
    status, data = s.read(4300, 2 * BLOCK)
    assert status == 0 and data != b"\x99" * (2 * BLOCK), "a duplicate's data was written"
    still_works(s, WITNESS_LBA)
    s.close()


def test_command_window_takes_a_held_cmdsn_once():
    """The sans-IO half: a CmdSN held back in ``pending`` is no longer in the window."""
    window = CommandWindow(10, depth=8)
    assert window.arrive(11, "held") == []
    assert not window.in_window(11)
    assert window.arrive(11, "duplicate") == []
    assert window.arrive(10, "first") == ["first", "held"]
    assert window.in_window(12) and not window.in_window(11)


# -- Logout overtaken by a connection reinstatement (§6.3.4, §11.14) ----------------------------

async def test_a_logout_overtaken_by_connection_reinstatement_leaves_the_session_alone():
    """A Logout waits for a command still running (§6.3.4: outstanding commands complete first);
    meanwhile a login with the session's TSIH and the same CID reinstates the connection, which
    terminates the old one, its tasks and that Logout.  The session goes on, on the new
    connection.  Was: once the aborted command let it go on, the stale Logout ended the session
    under the new connection -- gone from the session table (no status row, no way to reinstate
    it again, its nexus dropped from the LU) while the new connection kept using it."""
    from iscsi.target.server import IscsiServer
    from tests.target.fakes import FakeLunMap, FakeRegistry, FakeTarget
    from tests.target.wire import Wire

    iqn = "iqn.2026-11.org.sanstack:explore"
    luns = FakeLunMap(4096)
    server = IscsiServer(FakeRegistry({iqn: FakeTarget(iqn, luns=luns)}), nop_interval=30, nop_timeout=30)
    _, port = await server.add_portal("127.0.0.1", 0)
    try:
        old = await Wire.open(port)
        tsih = (await old.login(iqn)).tsih
        luns.gate = asyncio.Event()  # the read below waits until the test lets it go
        old.command(read10(0, 1), read=True, edtl=BLOCK)
        old.send(P.LogoutRequest(reason=P.LogoutReason.CLOSE_SESSION, itt=old.next_itt(), cmdsn=old.cmdsn,
                                 expstatsn=old.expstatsn, immediate=True))
        await asyncio.sleep(0.05)  # the Logout is waiting for the read
        new = await Wire.open(port)
        new.cmdsn = old.cmdsn
        resp = await new.login(iqn, tsih=tsih)
        assert (resp.status_class, resp.tsih) == (0, tsih), resp
        assert await old.closed()
        luns.gate.set()
        await asyncio.sleep(0.05)  # let a stale Logout run, if one is left
        rows = server.sessions()
        assert [r["tsih"] for r in rows] == [tsih], f"the reinstated session left the table: {rows}"
        new.command(bytes(6))
        answer = await new.recv()
        assert isinstance(answer, P.ScsiResponse) and answer.status == 0, answer
        # ... and it can be reinstated again, which needs it in the table.
        again = await Wire.open(port)
        again.cmdsn = new.cmdsn
        assert (await again.login(iqn, tsih=tsih)).status_class == 0
    finally:
        await server.shutdown(drain_timeout=1)


# -- Text continuations (§11.10.4, §11.11) ------------------------------------------------------

def text_request(s: RawSession, data: bytes, *, itt: int | None = None, ttt: int = P.RESERVED_TAG,
                 final: bool = True, cont: bool = False) -> P.TextRequest:
    req = P.TextRequest(itt=s.next_itt() if itt is None else itt, cont=cont, final=final, cmdsn=s.cmdsn,
                        expstatsn=s.expstatsn, immediate=True, data=data, ttt=ttt)
    s.send(req)
    return req


LONG_ASK = K.encode_text([(f"X-org.example.k{i:03d}", "v") for i in range(40)])  # > 512 B answered


def long_answer_started(s: RawSession) -> tuple[int, P.TextResponse]:
    """A request whose answer (all NotUnderstood) takes several 512-byte Text Responses."""
    req = text_request(s, LONG_ASK)
    pdu = s.recv()
    assert isinstance(pdu, P.TextResponse) and pdu.cont and not pdu.final, pdu
    return req.itt, pdu


def assert_fresh_request_answered(s: RawSession, daemon) -> None:
    text_request(s, b"SendTargets=All\0")
    pdu = s.recv()
    assert isinstance(pdu, P.TextResponse) and pdu.final and pdu.ttt == P.RESERVED_TAG, pdu
    assert ("TargetName", daemon.iqn) in K.parse_text(bytes(pdu.data))


@pytest.mark.parametrize("ttt", [0x1234, P.RESERVED_TAG - 1])
def test_text_continuation_with_a_ttt_the_target_never_gave_is_rejected(daemon, clean_log, ttt):
    """§11.10.4: the initiator goes on with an exchange by copying the TTT of the target's last
    Text Response; §11.17.1 names "invalid TTT" as a case of reason 0x09.  Was: any TTT but
    0xffffffff was taken as "send the rest"."""
    s = logged_in(daemon, extra=[("MaxRecvDataSegmentLength", "512")])
    itt, _ = long_answer_started(s)
    req = text_request(s, b"", itt=itt, ttt=ttt)
    expect_reject(s, req.header(), P.RejectReason.INVALID_PDU_FIELD)
    assert_fresh_request_answered(s, daemon)
    still_works(s, WITNESS_LBA)
    s.close()


def test_text_continuation_after_the_exchange_ended_is_rejected(daemon, clean_log):
    """The TTT of a Text Response stands until the exchange ends (F=1 carries 0xffffffff,
    §11.11.4): copied into a request after that, it is stale (Reject 0x09).  Was: answered as
    a new, empty request."""
    s = logged_in(daemon, extra=[("MaxRecvDataSegmentLength", "512")])
    itt, pdu = long_answer_started(s)
    ttt = pdu.ttt
    while not pdu.final:
        text_request(s, b"", itt=itt, ttt=pdu.ttt)
        pdu = s.recv()
        assert isinstance(pdu, P.TextResponse), pdu
    req = text_request(s, b"", itt=itt, ttt=ttt)
    expect_reject(s, req.header(), P.RejectReason.INVALID_PDU_FIELD)
    assert_fresh_request_answered(s, daemon)
    s.close()


def test_text_in_a_request_for_the_rest_of_an_answer_is_rejected(daemon, clean_log):
    """While the target's answer goes on (C=1), the initiator asks for each next piece with an
    empty request (§6.2; at login the target refuses text there too).  Text in it is refused
    (Reject 0x04) and the exchange dropped.  Was: the piece was sent and the initiator's keys
    were dropped without a word -- never answered."""
    s = logged_in(daemon, extra=[("MaxRecvDataSegmentLength", "512")])
    itt, pdu = long_answer_started(s)
    req = text_request(s, b"X-org.example.late=1\0", itt=itt, ttt=pdu.ttt)
    expect_reject(s, req.header(), P.RejectReason.PROTOCOL_ERROR)
    assert_fresh_request_answered(s, daemon)
    still_works(s, WITNESS_LBA)
    s.close()


def test_a_long_answer_followed_to_its_end_is_whole(daemon, clean_log):
    """The honest path the checks above must not break: each piece asked for with the TTT just
    received; the pieces join to every key answered, the last with F=1 and TTT 0xffffffff."""
    s = logged_in(daemon, extra=[("MaxRecvDataSegmentLength", "512")])
    itt, pdu = long_answer_started(s)
    text = bytearray(pdu.data)
    for _ in range(16):
        if pdu.final:
            break
        text_request(s, b"", itt=itt, ttt=pdu.ttt)
        pdu = s.recv()
        assert isinstance(pdu, P.TextResponse) and len(pdu.data) <= 512, pdu
        text += pdu.data
    assert pdu.final and not pdu.cont and pdu.ttt == P.RESERVED_TAG, pdu
    assert K.parse_text(bytes(text)) == [(k, "NotUnderstood") for k, _ in K.parse_text(LONG_ASK)]
    s.close()
