"""libiscsi's iscsi-test-cu against our target in deployment variants (tools/conformance.py VARIANTS).

The CI profiles (test_conformance.py) all use one configuration shape: no digests, no CHAP,
512-byte blocks, a 1 GiB LUN 0, IPv4 loopback. Each variant here configures the target the way
real deployments differ -- header digest required, mutual CHAP required, 4096-byte logical
blocks, a 3 TiB LUN (more than 2^32 blocks), a small LUN, LUN 1 / 255 / 16383 of a multi-LUN
target, an IPv6 portal, conservative login keys -- and runs only the families that depend on
what the variant changes (a few seconds each; whole runs would blow the CI budget), judged
against the variant's whole-run expectation file tests/conformance/sanstack-<variant>.json:

    python -m tools.conformance --variant bs4096 --write-expected     # refresh one file

Besides "no test does worse than recorded", each variant checks that the setting was really in
force (the daemon's login line, READ CAPACITY(16) from another libiscsi tool), so a variant that
silently fell back to the default shape cannot pass.
"""
from __future__ import annotations

import re
import socket

import pytest

from iscsi import keys as K
from iscsi.target import config as C
from iscsi.target.config import ConfigError, _check_bursts, _validate_params
from tools import conformance as cf
from tools.peers.base import parse_size

from .conftest import require, run

#: One subset takes 2-10 s; a hang still fails after the idle timeout.
SUBSET_TIMEOUT = 240.0


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _login_params(log: str) -> list[str]:
    return re.findall(r"login\.ok .*type=Normal.*", log)


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(cf.VARIANTS))
def test_variant_subset_against_expectation(variant, tmp_path):
    require("iscsi-test-cu", "iscsi-readcapacity16")
    if variant == "ipv6" and not _ipv6_loopback():
        pytest.skip("no IPv6 loopback (::1) on this machine")
    spec = cf.VARIANTS[variant]
    path = cf.variant_expectation_path(variant)
    doc = cf.load_expected(path)
    expected = doc["results"]
    assert doc["counts"]["total"] == len(expected) and doc["counts"]["hang"] == doc["counts"]["crash"] == 0

    peer = cf.variant_peer(variant, tmp_path)
    peer.start()
    try:
        url = cf.variant_url(variant, peer)
        # The setting is in force: READ CAPACITY(16) through the same URL (login, digest, CHAP, LUN).
        rc16 = run(["iscsi-readcapacity16", url], timeout=60).stdout
        report = cf.run_suite([url], flags=cf.PROFILES["basic"]["flags"], tests=spec["ci_tests"],
                              timeout=SUBSET_TIMEOUT, log=tmp_path / "iscsi-test-cu.log",
                              target_alive=peer.alive, progress=print)
        assert peer.alive(), "the target died during the run"
        log = peer.log_text()
    finally:
        if peer.alive():
            peer.stop()
    print(cf.format_table(report, expected))
    print(cf.format_summary(report))

    # The variant really was what it claims.
    size = parse_size(spec.get("peer", {}).get("size", "1G"))
    block = spec.get("peer", {}).get("block_size", 512)
    assert re.search(rf"^LOGICAL BLOCK LENGTH IN BYTES:{block}$", rc16, re.M), rc16
    assert re.search(rf"^RETURNED LOGICAL BLOCK ADDRESS:{size // block - 1}$", rc16, re.M), rc16
    logins = _login_params(log)
    assert logins, log[-2000:]
    if variant == "hdigest":
        assert all("HeaderDigest=CRC32C" in line for line in logins), logins[:2]
    if variant == "chap":
        assert all(f"user={cf.VARIANT_CHAP[0]}" in line for line in logins), logins[:2]
    if variant == "keys":
        # MaxBurstLength 8192 pinned alone lowers FirstBurstLength with it (RFC 7143 §13.14).
        for want in ("ImmediateData=No", "InitialR2T=Yes", "MaxBurstLength=8192", "FirstBurstLength=8192",
                     "MaxRecvDataSegmentLength=4096"):
            assert all(want in line for line in logins), (want, logins[:2])
    if "lun_numbers" in spec:
        number = spec["lun_numbers"][spec["lun_index"]]
        assert f"lun={number} " in log, log[-2000:]

    # Judged against the whole-run expectation file, on the subset.
    selected = cf._spec_tests(spec["ci_tests"], cf.list_tests())
    assert selected and set(selected) <= set(expected), sorted(set(selected) - set(expected))
    assert not report.broken(), {n: report.results[n].detail[-300:] for n in report.broken()}
    assert report.counts()["notrun"] == 0, report.notes
    regressions, improvements = cf.compare(report, expected)
    for name, want, now in improvements:
        print(f"improved: {name}: {want} -> {now} (refresh {path.name})")
    assert not regressions, "\n".join(
        f"{n}: expected {want}, got {now}: {report.results[n].reason if n in report.results else ''}"
        for n, want, now in regressions)
    # Every test of the subset passes or skips for a recorded reason; none is a known failure.
    assert all(expected[n] in (cf.PASS, cf.SKIP) for n in selected), {n: expected[n] for n in selected}


def test_variant_expectation_files_exist_for_every_variant():
    for variant in cf.VARIANTS:
        doc = cf.load_expected(cf.variant_expectation_path(variant))
        assert doc.get("variant") == variant
        assert "secret" not in str(doc.get("variant_config", "")).lower()


# --- the defect the "keys" variant found: a pinned MaxBurstLength below 65536 failed every login

def test_pinned_max_burst_lowers_default_first_burst():
    """RFC 7143 §13.14: FirstBurstLength MUST NOT exceed MaxBurstLength. Pinning MaxBurstLength
    8192 alone made the target's Negotiator raise on every login (FirstBurstLength default 65536)."""
    neg = K.Negotiator("target", local={"MaxBurstLength": "8192"})
    assert neg.local["FirstBurstLength"] == "8192"
    answers = dict(neg.respond([("InitiatorName", "iqn.1994-05.com.example:x"), ("SessionType", "Normal"),
                                ("FirstBurstLength", "65536"), ("MaxBurstLength", "262144")], "operational"))
    assert answers["MaxBurstLength"] == "8192"
    assert answers["FirstBurstLength"] == "8192"
    # An explicit contradictory pair stays an error, and config loading refuses it up front.
    with pytest.raises(ValueError):
        K.Negotiator("target", local={"MaxBurstLength": "8192", "FirstBurstLength": "16384"})
    with pytest.raises(ConfigError, match="FirstBurstLength"):
        _check_bursts(_validate_params({"MaxBurstLength": 8192, "FirstBurstLength": 16384}, "p"), "p")
    with pytest.raises(ConfigError, match="FirstBurstLength"):  # above the default MaxBurstLength
        _check_bursts({"FirstBurstLength": str(2**24 - 1)}, "p")
    _check_bursts({"MaxBurstLength": "8192"}, "p")
    _check_bursts({"MaxBurstLength": "8192", "FirstBurstLength": "8192"}, "p")


def test_config_refuses_contradictory_bursts_across_target_and_acl(tmp_path):
    """Target and ACL params merge at login ({**target, **acl}); a contradiction between the
    two levels is refused at load time, not met as a failed login."""
    base = {"iqn": "iqn.2026-11.org.example:t", "luns": [{"number": 0, "path": str(tmp_path / "a.img"), "size": "1M"}],
            "portal_groups": [{"tag": 1, "portals": ["127.0.0.1:3260"]}]}
    good = {"version": 1, "targets": [{**base, "params": {"MaxBurstLength": 8192},
                                       "acls": [{"initiator": "iqn.2026-11.org.example:i", "params": {"FirstBurstLength": 4096}}]}]}
    bad = {"version": 1, "targets": [{**base, "params": {"MaxBurstLength": 8192},
                                      "acls": [{"initiator": "iqn.2026-11.org.example:i", "params": {"FirstBurstLength": 65536}}]}]}
    C.from_dict(good)
    with pytest.raises(ConfigError, match="FirstBurstLength=65536 exceeds MaxBurstLength=8192"):
        C.from_dict(bad)
