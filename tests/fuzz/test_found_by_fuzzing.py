"""Bugs the fuzzers found, each as a deterministic test (strict xfail until fixed).

When one of these turns red (XPASS), the bug is fixed: remove the xfail mark here and the
matching entry of tools.fuzz.targets.KNOWN_BUGS, so the fuzzer checks that invariant again.
"""
from __future__ import annotations

import pytest

from iscsi import keys as K
from iscsi import pdu as P
from iscsi.target.login import LoginSuccess, TargetLogin
from tools.fuzz.targets import KNOWN_BUGS, TARGET, _Registry, _Target

INITIATOR = "iqn.2026-11.org.sanstack.fuzz:found"


def _login(params: dict[str, str]) -> tuple[TargetLogin, list[P.LoginResponse]]:
    reg = _Registry(_Target(TARGET, params=params))
    machine = TargetLogin(reg, "127.0.0.1", 3260, lambda *a: 1)
    first = K.encode_text([("InitiatorName", INITIATOR), ("TargetName", TARGET), ("SessionType", "Normal"),
                           ("MaxRecvDataSegmentLength", "65536")])
    out = machine.receive(P.LoginRequest(transit=False, csg=1, nsg=3, isid=0x400000000001, itt=1, data=first))
    # The target answered with its own offer (it cannot accept the default); the initiator
    # ignores it and asks to go to Full Feature Phase with no keys at all.
    out += machine.receive(P.LoginRequest(transit=True, csg=1, nsg=3, isid=0x400000000001, itt=1, data=b""))
    return machine, out


@pytest.mark.parametrize("key,required", [
    ("HeaderDigest", "CRC32C"),  # was lost before login.py kept T=0 while an offer was open
    ("DataDigest", "CRC32C"),
    ("ImmediateData", "No"),  # holds: the AND rule keeps the target's No
])
def test_target_requirement_survives_an_initiator_that_ignores_the_offer(key, required):
    machine, responses = _login({key: required})
    offered = dict(K.parse_text(responses[0].data))
    assert offered.get(key) == required, "precondition: the target offers its requirement"
    ok = machine.outcome
    if isinstance(ok, LoginSuccess):
        neg = ok.params
        value = {"HeaderDigest": neg.connection.header_digest, "DataDigest": neg.connection.data_digest,
                 "ImmediateData": neg.session.immediate_data}[key]
        assert value == (required in ("CRC32C", "Yes")), f"{key} in force is not the required {required}"
    else:
        # Refusing the login or still waiting for the answer (T=0) are both correct.
        assert not responses[-1].transit or responses[-1].status_class != 0


def test_known_bugs_listed_have_a_test():
    assert KNOWN_BUGS <= {"unanswered-target-offer"}
