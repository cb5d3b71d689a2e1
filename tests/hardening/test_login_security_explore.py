"""Login authentication and access control, attacked as a hostile initiator on the network would.

Adds to test_security.py (discovery filtering, 0x0202, LUN masking, CHAP right/wrong/reflected,
secrets out of logs, control socket), test_hostile_peer_review.py, test_rfc7143_review.py,
test_malformed.py (another initiator's TSIH) and tests/unit/test_auth.py, tests/target/test_login.py
(CHAP state machine, skipping the security stage).  Found here and fixed:

- TARGET WARM RESET from one initiator aborted, without a response, the tasks another initiator
  had on a LU the first one has no access to (its ACL does not map it): RFC 7143 §11.5.1 limits a
  target reset to "all LUs known to the issuing initiator" (and SAM access controls: no change to
  an LU the initiator is denied).  The other initiator's write hung until its own timeout.
"""
from __future__ import annotations

import pytest

from iscsi import pdu as P
from tools.peers.base import free_portals

from .raw import RawSession, write10
from .test_security import Daemon

TARGET = "iqn.2026-11.org.sanstack.lsx:t"
INIT_A = "iqn.2026-11.org.sanstack.lsx:host-a"
INIT_B = "iqn.2026-11.org.sanstack.lsx:host-b"
# A write that waits for its Data-Out: no immediate data, InitialR2T=Yes (the target sends an R2T).
SOLICITED_ONLY = [("InitialR2T", "Yes"), ("ImmediateData", "No")]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    work = tmp_path_factory.mktemp("lsx")
    portals = free_portals(1)
    p = str(portals[0])
    config = {
        "version": 1, "data_dir": str(work), "discovery_auth": None,
        "targets": [
            {"iqn": TARGET, "portal_groups": [{"tag": 1, "portals": [p]}],
             "luns": [{"number": 0, "path": "a.img", "size": "8M"}, {"number": 1, "path": "b.img", "size": "8M"}],
             # A sees target LUN 0 only; B sees target LUN 1 only (as its LUN 0).
             "acls": [{"initiator": INIT_A, "lun_map": {"0": 0}}, {"initiator": INIT_B, "lun_map": {"0": 1}}]},
        ],
    }
    d = Daemon(work, config, portals)
    yield d
    d.stop()


def raw(daemon) -> RawSession:
    return RawSession(daemon.portals[0].host, daemon.portals[0].port)


def tmf(s: RawSession, function: int) -> P.TaskMgmtResponse:
    s.send(P.TaskMgmtRequest(function=function, itt=s.next_itt(), cmdsn=s.cmdsn, expstatsn=s.expstatsn,
                             immediate=True))
    while True:
        pdu = s.recv()
        if isinstance(pdu, P.TaskMgmtResponse):
            return pdu


def test_a_target_warm_reset_leaves_another_initiators_private_lu_alone(daemon):
    """RFC 7143 §11.5.1: TARGET WARM RESET cancels the pending operations "across all LUs known to
    the issuing initiator".  B has a write waiting for its data on a LU only B may reach; A (whose
    ACL maps another LU) resets the target.  Was: B's write was aborted silently (no status, no
    unit attention -- B's LU is not reset), the Data-Out answering its R2T dropped, and B waited
    for ever.  Now B's write completes GOOD and A's own LU is reset (A sees the unit attention)."""
    b = raw(daemon)
    a = raw(daemon)
    try:
        assert b.login(TARGET, initiator=INIT_B, operational=SOLICITED_ONLY).status_class == 0
        assert a.login(TARGET, initiator=INIT_A).status_class == 0
        payload = b"\xb5" * 65536
        b.pending_write = payload
        itt = b.command(write10(0, len(payload) // 512), write=True, edtl=len(payload))
        r2t = b.recv()
        assert isinstance(r2t, P.R2T) and r2t.itt == itt, r2t

        assert tmf(a, P.TmfFunction.TARGET_WARM_RESET).response == P.TmfResponse.COMPLETE

        b.queue.insert(0, r2t)  # now answer the R2T
        status, _ = b.wait_status(itt, timeout=3.0)
        assert isinstance(status, P.ScsiResponse) and status.status == 0, status
        got, data = b.read(0, len(payload))
        assert got == 0 and data == payload
        # The issuer's own LU was reset: its next command reports it (SAM-5 §6.3.2 BUS RESET).
        t = a.command(bytes(16))
        first, _ = a.wait_status(t)
        assert first.status == 0x02, "A's LU was not reset by A's own TARGET WARM RESET"
    finally:
        a.close()
        b.close()


def test_a_refused_login_is_logged_with_the_address_it_came_from(daemon):
    """Who tried, and from where: an admin looking at refused logins (wrong ACL, bad CHAP,
    a guessing initiator) needs the initiator's address, not only the portal it reached."""
    s = raw(daemon)
    try:
        here = "%s:%d" % s.sock.getsockname()[:2]
        resp = s.login(TARGET, initiator="iqn.2026-11.org.sanstack.lsx:stranger", ready=False)
        assert (resp.status_class, resp.status_detail) == (2, 2)   # authorization failure (0x0202)
    finally:
        s.close()
    lines = [line for line in daemon.log_path.read_text().splitlines()
             if "login.failed" in line and "stranger" in line]
    assert lines and f"peer={here}" in lines[-1], lines
