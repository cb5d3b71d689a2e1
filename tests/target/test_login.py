"""The target's login state machine, driven PDU by PDU with no network (RFC 7143 §6, §11.12)."""
import hashlib


from iscsi import keys as K
from iscsi import pdu as P
from iscsi.target.login import LoginFailure, LoginSuccess, TargetLogin
from iscsi.target.registry import ChapCredentials

from .fakes import FakeRegistry, FakeTarget

IQN_T = "iqn.2026-11.org.sanstack:t1"
IQN_I = "iqn.2004-10.com.ubuntu:01:abcdef"
OPEN_ISCSI_OPERATIONAL = [
    ("HeaderDigest", "None"), ("DataDigest", "None"), ("DefaultTime2Wait", "2"),
    ("DefaultTime2Retain", "0"), ("IFMarker", "No"), ("OFMarker", "No"), ("ErrorRecoveryLevel", "0"),
    ("InitialR2T", "No"), ("ImmediateData", "Yes"), ("MaxBurstLength", "16776192"),
    ("FirstBurstLength", "262144"), ("MaxOutstandingR2T", "1"), ("MaxConnections", "1"),
    ("DataPDUInOrder", "Yes"), ("DataSequenceInOrder", "Yes"), ("MaxRecvDataSegmentLength", "262144"),
]


def make(target: FakeTarget | None = None, **kw):
    reg = FakeRegistry({IQN_T: target or FakeTarget(IQN_T)}, **kw)
    tsihs = iter(range(1, 100))
    return TargetLogin(reg, "127.0.0.1", 3260, lambda *a: next(tsihs))


def req(keys, *, csg, nsg=0, transit=False, isid=0x23D000000001, tsih=0, cont=False):
    return P.LoginRequest(transit=transit, cont=cont, csg=csg, nsg=nsg, isid=isid, tsih=tsih, cid=0,
                          cmdsn=1, itt=7, data=K.encode_text(keys))


def answers(resp):
    return dict(K.parse_text(resp.data))


def test_open_iscsi_login_without_chap_starts_in_operational_stage():
    login = make()
    (resp,) = login.receive(req([("InitiatorName", IQN_I), ("InitiatorAlias", "guest"),
                                 ("TargetName", IQN_T), ("SessionType", "Normal")]
                                + OPEN_ISCSI_OPERATIONAL, csg=1, nsg=3, transit=True))
    assert resp.status_class == 0 and resp.transit and resp.nsg == 3
    got = answers(resp)
    assert got["TargetPortalGroupTag"] == "1"
    assert got["MaxBurstLength"] == str(min(16776192, int(got["MaxBurstLength"])))
    assert got["ErrorRecoveryLevel"] == "0"
    assert "MaxRecvDataSegmentLength" in got
    assert isinstance(login.outcome, LoginSuccess)
    assert login.outcome.tsih != 0 and resp.tsih == login.outcome.tsih
    assert login.outcome.params.session.immediate_data is True


def test_missing_initiator_name_is_0207():
    login = make()
    (resp,) = login.receive(req([("TargetName", IQN_T)], csg=1, nsg=3, transit=True))
    assert (resp.status_class, resp.status_detail) == (2, 7)
    assert isinstance(login.outcome, LoginFailure)


def test_unknown_target_is_0203():
    login = make()
    (resp,) = login.receive(req([("InitiatorName", IQN_I), ("TargetName", "iqn.2026-11.x:nope")],
                                csg=1, nsg=3, transit=True))
    assert (resp.status_class, resp.status_detail) == (2, 3)


def test_acl_refusal_is_0202():
    login = make(FakeTarget(IQN_T, allowed={"iqn.2026-11.org.other:host"}))
    (resp,) = login.receive(req([("InitiatorName", IQN_I), ("TargetName", IQN_T)], csg=1, nsg=3,
                                transit=True))
    assert (resp.status_class, resp.status_detail) == (2, 2)


def test_unsupported_version_is_0205():
    login = make()
    r = req([("InitiatorName", IQN_I), ("TargetName", IQN_T)], csg=1, nsg=3, transit=True)
    r.version_min = r.version_max = 3
    (resp,) = login.receive(r)
    assert (resp.status_class, resp.status_detail) == (2, 5)


def test_invalid_transition_refused():
    login = make()
    (resp,) = login.receive(req([("InitiatorName", IQN_I), ("TargetName", IQN_T)], csg=1, nsg=1,
                                transit=True))
    assert resp.status_class == 2


def _chap_login(login, secret: bytes, *, mutual=False):
    (r1,) = login.receive(req([("InitiatorName", IQN_I), ("TargetName", IQN_T),
                               ("SessionType", "Normal"), ("AuthMethod", "CHAP,None")], csg=0, nsg=1,
                              transit=True))
    assert answers(r1)["AuthMethod"] == "CHAP" and not r1.transit
    (r2,) = login.receive(req([("CHAP_A", "5")], csg=0, nsg=1, transit=True))
    a2 = answers(r2)
    assert a2["CHAP_A"] == "5"
    ident, challenge = int(a2["CHAP_I"]), bytes.fromhex(a2["CHAP_C"][2:])
    digest = hashlib.md5(bytes([ident]) + secret + challenge).hexdigest()
    keys = [("CHAP_N", "user1"), ("CHAP_R", "0x" + digest)]
    if mutual:
        keys += [("CHAP_I", "9"), ("CHAP_C", "0x" + "ab" * 16)]
    (r3,) = login.receive(req(keys, csg=0, nsg=1, transit=True))
    return r3


def test_chap_right_secret_then_operational():
    creds = ChapCredentials("user1", "sixteen-byte-sec")
    login = make(FakeTarget(IQN_T, chap=creds))
    r3 = _chap_login(login, b"sixteen-byte-sec")
    assert r3.status_class == 0 and r3.transit and r3.nsg == 1
    (r4,) = login.receive(req(OPEN_ISCSI_OPERATIONAL, csg=1, nsg=3, transit=True))
    assert r4.transit and isinstance(login.outcome, LoginSuccess)
    assert login.outcome.authenticated_as == "user1"


def test_chap_wrong_secret_is_0201():
    login = make(FakeTarget(IQN_T, chap=ChapCredentials("user1", "sixteen-byte-sec")))
    r3 = _chap_login(login, b"not-the-secret!!")
    assert (r3.status_class, r3.status_detail) == (2, 1)


def test_mutual_chap_target_proves_its_secret():
    creds = ChapCredentials("user1", "sixteen-byte-sec", "tgtuser", "target-secret-123")
    login = make(FakeTarget(IQN_T, chap=creds))
    r3 = _chap_login(login, b"sixteen-byte-sec", mutual=True)
    got = answers(r3)
    assert got["CHAP_N"] == "tgtuser"
    assert got["CHAP_R"] == "0x" + hashlib.md5(bytes([9]) + b"target-secret-123" + b"\xab" * 16).hexdigest()


def test_chap_required_but_initiator_skips_security_stage():
    login = make(FakeTarget(IQN_T, chap=ChapCredentials("user1", "sixteen-byte-sec")))
    (resp,) = login.receive(req([("InitiatorName", IQN_I), ("TargetName", IQN_T)] + OPEN_ISCSI_OPERATIONAL,
                                csg=1, nsg=3, transit=True))
    assert (resp.status_class, resp.status_detail) == (2, 1)


def test_discovery_session_declares_no_tpgt_and_skips_operational_keys():
    login = make()
    (resp,) = login.receive(req([("InitiatorName", IQN_I), ("SessionType", "Discovery"),
                                 ("MaxRecvDataSegmentLength", "32768")], csg=1, nsg=3, transit=True))
    assert resp.transit
    assert "TargetPortalGroupTag" not in answers(resp)
    assert login.outcome.session_type == "Discovery"


def test_discovery_with_an_invalid_initiator_name_is_refused_with_the_reason():
    """Every target lists only valid iSCSI names (RFC 7143 §4.2.7): a discovery login from an
    invalid one used to succeed and get an empty SendTargets list, with no word why."""
    login = make()
    (resp,) = login.receive(req([("InitiatorName", "my host"), ("SessionType", "Discovery")],
                                csg=1, nsg=3, transit=True))
    assert (resp.status_class, resp.status_detail) == (2, 2)
    assert isinstance(login.outcome, LoginFailure) and "InitiatorName refused" in login.outcome.reason


def test_text_continuation_c_bit():
    login = make()
    (r1,) = login.receive(req([("InitiatorName", IQN_I)], csg=1, nsg=3, cont=True))
    assert r1.data == b"" and not r1.transit and r1.status_class == 0
    (r2,) = login.receive(req([("TargetName", IQN_T)], csg=1, nsg=3, transit=True))
    assert r2.transit and isinstance(login.outcome, LoginSuccess)


def test_login_pdu_flood_is_bounded():
    login = make()
    resp = None
    for _ in range(100):
        first = [("InitiatorName", IQN_I), ("TargetName", IQN_T)]
        (resp,) = login.receive(req(first if login._pdus == 0 else [], csg=1, nsg=3, transit=False))
        if login.outcome is not None:
            break
    assert isinstance(login.outcome, LoginFailure)
    assert login._pdus > 10  # it was the PDU count, not a bad first PDU, that ended it
