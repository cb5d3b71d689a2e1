"""Initiator login state machine (sans-IO) against a scripted target built from the shared
Negotiator and ChapTargetAuth: stages, CHAP one-way/mutual, failures, redirects."""
from __future__ import annotations

import pytest

from iscsi import keys as K
from iscsi import pdu as P
from iscsi.auth import AuthState, ChapCredentials, ChapTargetAuth
from iscsi.initiator.errors import LoginError, LoginRedirect
from iscsi.initiator.login import InitiatorLogin, LoginConfig, random_isid

INI = "iqn.2026-11.org.sanstack:unit-initiator"
TGT = "iqn.2026-11.org.sanstack:unit-target"


class FakeTargetLogin:
    """Just enough of a target's login to exercise the initiator (one per connection)."""

    def __init__(self, *, users: dict[str, str] | None = None, mutual: ChapCredentials | None = None,
                 local: dict[str, str] | None = None, tsih: int = 0x1234, fail_status: int | None = None,
                 redirect: str | None = None) -> None:
        self.neg: K.Negotiator | None = None
        self.local = {"TargetPortalGroupTag": "1", **(local or {})}
        self.auth = (ChapTargetAuth(lambda name: (users or {}).get(name), mutual=mutual)
                     if users is not None else None)
        self.done_auth = users is None
        self.tsih = tsih
        self.statsn = 100
        self.fail_status = fail_status
        self.redirect = redirect
        self.requests: list[P.LoginRequest] = []
        self.received: list[tuple[str, str]] = []
        self.finished = False

    def respond(self, req: P.LoginRequest) -> P.LoginResponse:
        self.requests.append(req)
        pairs = K.parse_text(req.data)
        self.received += pairs
        if self.neg is None:
            stype = dict(pairs).get("SessionType", "Normal")
            self.neg = K.Negotiator("target", session_type=stype, local=self.local)
        if self.fail_status is not None:
            return self._resp(req, b"", transit=False, status=self.fail_status)
        if self.redirect is not None:
            return self._resp(req, K.encode_text([("TargetAddress", self.redirect)]), transit=False,
                              status=0x0101)
        answers: list[tuple[str, str]] = []
        if req.csg == 0:
            sec = [(k, v) for k, v in pairs if k == "AuthMethod" or k.startswith("CHAP_")]
            rest = [(k, v) for k, v in pairs if (k, v) not in sec]
            answers += self.neg.respond(rest, "security")
            if self.auth is None:
                if any(k == "AuthMethod" for k, _ in sec):
                    answers.append(("AuthMethod", "None"))
            else:
                step = self.auth.step(sec)
                if step.state is AuthState.FAILURE:
                    return self._resp(req, b"", transit=False, status=int(step.status))
                answers += step.keys
                self.done_auth = step.state is AuthState.SUCCESS
            answers += self.neg.pending_declarations("security")
            transit = req.transit and self.done_auth
        else:
            answers += self.neg.respond(pairs, "operational")
            answers += self.neg.pending_declarations("operational")
            transit = req.transit and not self.neg.outstanding
        resp = self._resp(req, K.encode_text(answers) if answers else b"", transit=transit)
        if transit and req.nsg == 3:
            resp.tsih = self.tsih
            self.finished = True
        return resp

    def _resp(self, req, data, *, transit, status=0):
        self.statsn += 1
        return P.LoginResponse(transit=transit, csg=req.csg, nsg=req.nsg if transit else 0,
                               isid=req.isid, tsih=req.tsih, itt=req.itt, statsn=self.statsn,
                               expcmdsn=req.cmdsn, maxcmdsn=req.cmdsn + 31,
                               status_class=status >> 8, status_detail=status & 0xFF, data=data)


def drive(login: InitiatorLogin, target: FakeTargetLogin, limit: int = 20):
    req = login.start()
    for _ in range(limit):
        if req is None:
            return login.result
        req = login.receive(target.respond(req))
    raise AssertionError("login did not finish")


def test_isid_is_random_type():
    isid = random_isid()
    assert isid >> 46 == 0x2          # T = 10b (random), RFC 7143 §11.12.5
    assert isid < 1 << 48
    assert random_isid() != isid


def test_login_without_authentication_negotiates_keys():
    cfg = LoginConfig(INI, TGT, keys={"HeaderDigest": "CRC32C,None", "MaxBurstLength": "524288"})
    target = FakeTargetLogin(local={"MaxBurstLength": "262144"})
    login = InitiatorLogin(cfg, isid=0x80_0000_0001, cmdsn=7, itt=5)
    res = drive(login, target)
    first = target.requests[0]
    assert first.csg == 0 and first.transit and first.nsg == 1
    got = dict(target.received)
    assert got["InitiatorName"] == INI and got["TargetName"] == TGT and got["AuthMethod"] == "None"
    assert got["SessionType"] == "Normal"
    assert all(r.isid == 0x80_0000_0001 and r.itt == 5 and r.cmdsn == 7 for r in target.requests)
    # ExpStatSN acknowledges each Login Response (§11.12).
    assert [r.expstatsn for r in target.requests[1:]] == [102 + i for i in range(len(target.requests) - 1)]
    assert res.tsih == 0x1234 and res.cmdsn == 7
    assert res.params.connection.header_digest is True
    assert res.params.session.max_burst_length == 262144
    assert res.params.session.target_portal_group_tag == 1
    assert res.auth_method == "None"


def test_one_way_chap():
    cfg = LoginConfig(INI, TGT, chap=ChapCredentials("alice", "alice-secret-12"))
    target = FakeTargetLogin(users={"alice": "alice-secret-12"})
    res = drive(InitiatorLogin(cfg, isid=random_isid()), target)
    assert res.auth_method == "CHAP"
    assert dict(target.received)["CHAP_N"] == "alice"


def test_mutual_chap_and_wrong_target_secret():
    mutual = ChapCredentials("target-name", "target-secret-34")
    cfg = LoginConfig(INI, TGT, chap=ChapCredentials("alice", "alice-secret-12"), mutual_chap=mutual)
    target = FakeTargetLogin(users={"alice": "alice-secret-12"}, mutual=mutual)
    res = drive(InitiatorLogin(cfg, isid=random_isid()), target)
    assert res.auth_method == "CHAP"
    assert "CHAP_C" in dict(target.received)   # we challenged the target
    liar = FakeTargetLogin(users={"alice": "alice-secret-12"},
                           mutual=ChapCredentials("target-name", "some-other-secret"))
    with pytest.raises(LoginError, match="mutual CHAP"):
        drive(InitiatorLogin(cfg, isid=random_isid()), liar)


def test_mutual_chap_refuses_a_target_that_skips_authentication():
    cfg = LoginConfig(INI, TGT, chap=ChapCredentials("alice", "alice-secret-12"),
                      mutual_chap=ChapCredentials("t", "target-secret-34"))
    with pytest.raises(LoginError):
        drive(InitiatorLogin(cfg, isid=random_isid()), FakeTargetLogin())  # answers AuthMethod=None


def test_wrong_secret_gives_authentication_failure_status():
    cfg = LoginConfig(INI, TGT, chap=ChapCredentials("alice", "not-the-secret"))
    target = FakeTargetLogin(users={"alice": "alice-secret-12"})
    with pytest.raises(LoginError) as err:
        drive(InitiatorLogin(cfg, isid=random_isid()), target)
    assert err.value.status == 0x0201


def test_status_failure_and_redirect():
    cfg = LoginConfig(INI, TGT)
    with pytest.raises(LoginError) as err:
        drive(InitiatorLogin(cfg, isid=random_isid()), FakeTargetLogin(fail_status=0x0203))
    assert err.value.status == 0x0203 and "not found" in str(err.value)
    assert not err.value.retryable
    with pytest.raises(LoginRedirect) as red:
        drive(InitiatorLogin(cfg, isid=random_isid()), FakeTargetLogin(redirect="10.0.0.9:3261,2"))
    assert red.value.address == "10.0.0.9:3261,2" and not red.value.permanent


def test_discovery_session_sends_no_target_name():
    cfg = LoginConfig(INI, None, session_type="Discovery")
    target = FakeTargetLogin()
    drive(InitiatorLogin(cfg, isid=random_isid()), target)
    got = dict(target.received)
    assert got["SessionType"] == "Discovery" and "TargetName" not in got


def test_target_leaving_security_before_chap_is_an_error():
    cfg = LoginConfig(INI, TGT, chap=ChapCredentials("alice", "alice-secret-12"))
    login = InitiatorLogin(cfg, isid=random_isid())
    req = login.start()
    bogus = P.LoginResponse(transit=True, csg=0, nsg=1, isid=req.isid, itt=req.itt, statsn=1,
                            data=K.encode_text([("AuthMethod", "CHAP")]))
    with pytest.raises(LoginError):
        login.receive(bogus)
