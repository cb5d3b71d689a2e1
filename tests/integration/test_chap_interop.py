"""CHAP and digests with a real client (libiscsi), checked on the wire through a relay.

Issue 2: a wrong secret is refused with the right login status; mutual CHAP works with a real
client; with digests required, a real client negotiates CRC32C and works.
"""
from __future__ import annotations

import crcmod.predefined
import pytest

from tools.libiscsi import LoginError, Session
from tools.peers import Chap, iscsi_url
from tools.relay import Relay, login_keys, split_pdus

from .conftest import known_gap, require, run

INITIATOR_SECRET = "initiator-secret-1"  # RFC 7143 §12.1.3: at least 12 bytes without IPsec
TARGET_SECRET = "target-secret-2345"
ONE_WAY = Chap("alice", INITIATOR_SECRET)
MUTUAL = Chap("alice", INITIATOR_SECRET, "sanstack-target", TARGET_SECRET)
#: CRC32C from crcmod, not from iscsi.digest: the digests on the wire are checked by code
#: the target does not use (crcmod is a declared dependency; nothing else is needed).
CRC32C = crcmod.predefined.mkPredefinedCrcFun("crc-32c")
#: libiscsi's text for login status 0x0201 (RFC 7143 §11.13.5: Initiator Error, Authentication failure).
AUTH_FAILURE = "Authentication failure(513)"


def inq(url: str, check: bool = True):
    require("iscsi-inq")
    return run(["iscsi-inq", url], check=check, timeout=60)


def test_one_way_chap(peer_kind, peer_factory):
    peer = peer_factory(peer_kind, chap=ONE_WAY)
    assert "DIRECT_ACCESS" in inq(peer.url()).stdout
    with Session.to_peer(peer) as s:
        s.write16(0, b"\x11" * 512)
        assert s.read16(0, 1) == b"\x11" * 512


@pytest.mark.parametrize(
    "creds",
    [Chap("alice", "wrong-secret-0000"), Chap("mallory", INITIATOR_SECRET), None],
    ids=["wrong-secret", "unknown-user", "no-credentials"],
)
def test_chap_refused(peer_kind, peer_factory, creds):
    peer = peer_factory(peer_kind, chap=ONE_WAY)
    res = inq(iscsi_url(peer.portals[0], peer.iqn, peer.lun_ids[0], chap=creds), check=False)
    assert res.returncode != 0
    assert AUTH_FAILURE in res.stderr + res.stdout, res.stderr
    with pytest.raises(LoginError, match=r"Authentication failure"):
        Session.to_peer(peer, chap=creds).connect()
    # A refused login leaves the target serving the right credentials.
    assert inq(peer.url()).returncode == 0


def test_mutual_chap(peer_kind, peer_factory):
    peer = peer_factory(peer_kind, chap=MUTUAL)
    url = peer.url()
    assert "target_user=" in url
    assert "DIRECT_ACCESS" in inq(url).stdout
    with Session.to_peer(peer) as s:
        assert s.read_capacity16()[0] > 0


def test_mutual_chap_client_rejects_wrong_target_secret(peer_kind, peer_factory):
    """The client checks the target's answer: proof the target computed a real CHAP_R."""
    peer = peer_factory(peer_kind, chap=MUTUAL)
    impostor = Chap(MUTUAL.user, MUTUAL.secret, MUTUAL.target_user, "not-the-target-secret")
    res = inq(peer.url(chap=impostor), check=False)
    assert res.returncode != 0
    assert "Invalid CHAP_R response from the target" in res.stderr, res.stderr


def _check_header_digests(relay: Relay) -> int:
    """Every full-feature PDU in both directions carries a correct CRC32C header digest
    (RFC 7143 §12.1: CRC32C over BHS+AHS, least significant byte first). Returns PDUs checked."""
    checked = 0
    assert relay.connections, "the client never connected through the relay"
    for conn in relay.connections:
        keys = login_keys(bytes(conn.s2c))
        assert keys.get("HeaderDigest") == "CRC32C", keys
        for stream, from_target in ((conn.c2s, False), (conn.s2c, True)):
            for pdu in split_pdus(bytes(stream), from_target=from_target, header_digest=True):
                if not pdu.full_feature:
                    continue
                want = CRC32C(pdu.bhs + pdu.ahs).to_bytes(4, "little")
                assert pdu.header_digest == want, f"bad header digest on opcode {pdu.opcode:#x}"
                checked += 1
    return checked


# (iscsi-inq and friends reset the digest wish to "None,CRC32C" after parsing the URL, so its
# ?header_digest= argument has no effect there: these tests set it through libiscsi's API.)


def test_client_requires_header_digest(peer_kind, peer, request):
    """The initiator offers only CRC32C: the answer must come from the offered list
    (RFC 7143 §6.2.1 list negotiation) -- CRC32C, or a failed login, never None."""
    known_gap(request, peer_kind, "tgt", "answers HeaderDigest=None to an offer of CRC32C alone "
              "unless its target was configured for digests")
    with Relay(peer.portals[0]) as relay:
        with Session(str(relay.portal), peer.iqn, peer.lun_ids[0], header_digest="crc32c") as s:
            assert s.inquiry()[0] & 0x1F == 0  # direct-access block device
            s.write16(0, b"\x33" * 4096)
            assert s.read16(0, 8) == b"\x33" * 4096
    assert _check_header_digests(relay) >= 6


def test_target_configured_for_header_digest(peer_kind, peer_factory):
    peer = peer_factory(peer_kind, params={"HeaderDigest": "CRC32C"})
    with Relay(peer.portals[0]) as relay:
        # libiscsi offers "HeaderDigest=None,CRC32C" by default: the target must pick CRC32C.
        with Session(str(relay.portal), peer.iqn, peer.lun_ids[0]) as s:
            s.write16(8, b"\x22" * 4096)
            assert s.read16(8, 8) == b"\x22" * 4096
    assert _check_header_digests(relay) >= 4


def test_target_requires_header_digest_refuses_none(peer_kind, peer_factory, request):
    """A client that will only do None cannot agree with a target that requires CRC32C."""
    known_gap(request, peer_kind, "tgt", "cannot require digests (its parser adds None to any "
              "configured HeaderDigest value)")
    peer = peer_factory(peer_kind, params={"HeaderDigest": "CRC32C"})
    with pytest.raises(LoginError):
        Session.to_peer(peer, header_digest="none").connect()
