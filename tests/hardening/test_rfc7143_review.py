"""RFC 7143 review of the target, as a hostile or merely unusual (but legal) initiator drives it:
login/text negotiation corners and Full Feature Phase rules that test_malformed.py,
test_hostile_peer_review.py and tests/target/test_login.py do not cover yet.

Live cases run against the module's daemon and end with the daemon alive, memory bounded and the
witness sessions doing verified I/O (``baseline``); sans-IO cases drive the login/key code alone.
"""
from __future__ import annotations

import pytest

from iscsi import keys as K
from iscsi import pdu as P

from .conftest import BLOCK
from .raw import INITIATOR, OPERATIONAL, Closed, RawSession, read10, write10

ISID = 0x400000007100


def session(daemon, **login_kw) -> RawSession:
    s = RawSession(daemon.portals[0].host, daemon.portals[0].port)
    resp = s.login(daemon.iqn, **login_kw)
    assert resp.status_class == 0, resp
    return s


def raw(daemon) -> RawSession:
    return RawSession(daemon.portals[0].host, daemon.portals[0].port)


def still_works(s: RawSession, lba: int = 9000) -> None:
    payload = bytes(range(256)) * 8
    assert s.write(lba, payload) == 0
    status, data = s.read(lba, len(payload))
    assert status == 0 and data == payload


def login_keys(daemon, extra=()) -> list[tuple[str, str]]:
    return [("InitiatorName", INITIATOR), ("TargetName", daemon.iqn), ("SessionType", "Normal")] + \
        list(OPERATIONAL) + list(extra)


@pytest.fixture
def clean_log(daemon, baseline):
    """No case may end in the connection's catch-all (a traceback instead of an answer)."""
    before = daemon.log_text().count("conn.internal_error")
    yield
    assert daemon.log_text().count("conn.internal_error") == before, daemon.log_text()[-3000:]


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
    from tests.target.fakes import FakeRegistry, FakeTarget
    from iscsi.target.login import LoginFailure, TargetLogin

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
    s = session(daemon, extra=[("ImmediateData", "No"), ("InitialR2T", "Yes")])
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
