"""libiscsi's utilities against a live target: discovery, INQUIRY (standard and VPD pages),
READ CAPACITY(16). Issue 2, "How it is checked": these must answer right.

VPD page contents are also read raw (tools/libiscsi.py) where iscsi-inq prints binary
designators as text.
"""
from __future__ import annotations

import re

import pytest

from tools.libiscsi import Session
from tools.peers import TargetPeer

from .conftest import known_gap, require, run

# SPC-4 §7.8 VPD page codes the issue requires.
REQUIRED_VPD = [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]


def fields(text: str) -> dict[str, str]:
    """``Key:Value`` lines of iscsi-inq / iscsi-readcapacity16 output (first occurrence wins)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out.setdefault(k.strip(), v.strip())
    return out


def inq(peer: TargetPeer, page: int | None = None, lun: int = 0) -> str:
    require("iscsi-inq")
    cmd = ["iscsi-inq"]
    if page is not None:
        cmd += ["-e", "1", "-c", str(page)]  # iscsi-inq reads -c with atoi(): decimal only
    return run([*cmd, peer.url(lun)]).stdout


def ls_size(block_size: int, nblocks: int) -> str:
    """The size string iscsi-ls prints: block_size * last LBA, divided by 1024 while > 1024."""
    size, units = block_size * (nblocks - 1), " kMGT"
    i = 0
    while i < 4 and size > 1024:
        size //= 1024
        i += 1
    return f"{size}{units[i]}"


def designators(page83: bytes) -> list[tuple[int, int, int, bytes]]:
    """(association, designator type, code set, designator) from raw VPD 0x83 (SPC-4 §7.8.6)."""
    assert page83[1] == 0x83
    end = 4 + int.from_bytes(page83[2:4], "big")
    out, pos = [], 4
    while pos + 4 <= min(end, len(page83)):
        code_set = page83[pos] & 0x0F
        assoc, dtype = (page83[pos + 1] >> 4) & 0x3, page83[pos + 1] & 0x0F
        length = page83[pos + 3]
        out.append((assoc, dtype, code_set, bytes(page83[pos + 4:pos + 4 + length])))
        pos += 4 + length
    return out


# ----------------------------------------------------------------------------- discovery


def test_iscsi_ls_lists_target_and_lun_sizes(peer_kind, peer_factory):
    require("iscsi-ls")
    peer = peer_factory(peer_kind, sizes=["1G", "64M"])
    out = run(["iscsi-ls", "-s", peer.portal_url()]).stdout
    m = re.search(r"^Target:(\S+) Portal:(\S+),(\d+)$", out, re.M)
    assert m, out
    assert m.group(1) == peer.iqn
    assert m.group(2) == str(peer.portals[0])
    for lun_id, spec in zip(peer.lun_ids, peer.luns):
        want = f"Lun:{lun_id}\\s+Type:DIRECT_ACCESS \\(Size:{ls_size(512, spec.size // 512)}\\)"
        assert re.search(want, out), f"no line matching {want!r} in:\n{out}"


def test_sendtargets_lists_every_portal(peer_kind, peer_factory, request):
    """Two portals: discovery through either names the target at both addresses (RFC 7143,
    SendTargets: in a discovery session the target returns all path information)."""
    known_gap(request, peer_kind, "tgt", "SendTargets lists only the portal the initiator connected to")
    require("iscsi-ls")
    peer = peer_factory(peer_kind, portals=2)
    for p in range(2):
        out = run(["iscsi-ls", peer.portal_url(p)]).stdout
        listed = set(re.findall(rf"^Target:{re.escape(peer.iqn)} Portal:(\S+),\d+$", out, re.M))
        assert {str(x) for x in peer.portals} <= listed, out


# ----------------------------------------------------------------------------- INQUIRY


def test_standard_inquiry(peer):
    f = fields(inq(peer))
    assert f["Peripheral Qualifier"] == "CONNECTED"
    assert f["Peripheral Device Type"] == "DIRECT_ACCESS"
    assert f["Removable"] == "0"
    assert f["ReponseDataFormat"] == "2"  # SPC-4 §6.4.2: RESPONSE DATA FORMAT shall be 2
    assert int(f["Version"].split()[0]) >= 5  # SPC-3 or later
    assert f["CmdQue"] == "1"  # tagged queueing: initiators queue more than one command
    assert f["HiSup"] == "1"  # hierarchical LUN addressing (REPORT LUNS)
    assert f["Vendor"].strip() and f["Product"].strip()


def test_standard_inquiry_raw_lengths(peer):
    """ADDITIONAL LENGTH matches what came back, and short allocation lengths are honoured."""
    with Session.to_peer(peer) as s:
        full = s.inquiry(None, 255)
        assert len(full) >= 36 and full[4] + 5 == len(full)
        assert s.inquiry(None, 36) == full[:36]
        assert s.inquiry(None, 5) == full[:5]


def test_vpd_supported_pages(peer):
    out = inq(peer, 0x00)
    pages = [int(x, 16) for x in re.findall(r"^Page:0x([0-9a-f]{2})", out, re.M)]
    assert pages == sorted(pages), "SPC-4 §7.8.13: page codes in ascending order"
    missing = [f"{p:#04x}" for p in REQUIRED_VPD if p not in pages]
    assert not missing, f"VPD pages missing: {missing}\n{out}"


def test_vpd_unit_serial_number_unique_per_lun(peer_kind, peer_factory):
    peer = peer_factory(peer_kind, luns=2)
    serials = []
    for i in range(2):
        m = re.search(r"^Unit Serial Number:\[(.*)\]$", inq(peer, 0x80, i), re.M)
        assert m and m.group(1).strip(), "empty unit serial number"
        assert m.group(1).isprintable()
        serials.append(m.group(1).strip())
    assert serials[0] != serials[1]


def test_vpd_device_identification(peer_kind, peer_factory):
    """VPD 0x83: LUN-associated NAA and T10 vendor id designators, unique per LUN; ESXi uses
    only the first 8 characters of the T10 vendor-specific id, so those differ too (field notes)."""
    peer = peer_factory(peer_kind, luns=2)
    text = inq(peer, 0x83)
    assert "Page Code:(0x83) DEVICE_IDENTIFICATION" in text
    assert re.search(r"Association:\(0\) LOGICAL_UNIT\nDesignator Type:\(3\) NAA", text), text
    ids = []
    for i in range(2):
        with Session.to_peer(peer, i) as s:
            raw = s.inquiry(0x83, 1024)
        des = designators(raw)
        naa = [d for a, t, cs, d in des if a == 0 and t == 3]
        t10 = [d for a, t, cs, d in des if a == 0 and t == 1]
        assert naa, f"no LUN-associated NAA designator: {des}"
        assert t10, f"no LUN-associated T10 vendor id designator: {des}"
        for d in naa:
            assert d[0] >> 4 in (2, 3, 5, 6), f"NAA type {d[0] >> 4} is not a defined NAA format"
            assert len(d) == {2: 8, 3: 8, 5: 8, 6: 16}[d[0] >> 4]
        ids.append((naa[0], t10[0]))
    (naa0, t10_0), (naa1, t10_1) = ids
    assert naa0 != naa1, "NAA designator must differ between LUNs"
    assert t10_0 != t10_1, "T10 designator must differ between LUNs"
    # T10 vendor id designator: 8 bytes T10 VENDOR IDENTIFICATION, then the vendor-specific id.
    assert t10_0[8:16] != t10_1[8:16], "first 8 characters of the vendor-specific id must differ"


def test_vpd_block_limits(peer):
    f = fields(inq(peer, 0xB0))
    values = {k: int(v) for k, v in f.items() if v.lstrip("-").isdigit()}
    assert {"maximum transfer length", "optimal transfer length", "wsnz"} <= set(values), f
    if values["maximum transfer length"] and values["optimal transfer length"]:
        assert values["optimal transfer length"] <= values["maximum transfer length"]
    if values["maximum unmap lba count"]:
        assert values["maximum unmap block descriptor count"] > 0


def test_vpd_block_device_characteristics(peer):
    f = fields(inq(peer, 0xB1))
    rpm = int(f["Medium Rotation Rate"].removesuffix("RPM"))
    # SBC-4 §6.6.2: 0 = not reported, 1 = non-rotating, 0x401..0xFFFE = nominal rpm.
    assert rpm in (0, 1) or 0x401 <= rpm <= 0xFFFE


def test_vpd_logical_block_provisioning_matches_read_capacity(peer):
    """VPD B2 and READ CAPACITY(16) LBPME tell the same story (SBC-4 §6.6.4, §5.16.2)."""
    require("iscsi-readcapacity16")
    b2 = fields(inq(peer, 0xB2))
    rc = fields(run(["iscsi-readcapacity16", peer.url()]).stdout)
    lbpme = rc["LBPME"].split()[0] == "1"
    ptype = int(b2["provisioning type"])
    unmap_cmds = any(b2[k] == "1" for k in ("lbpu", "lbpws", "lbpws10"))
    if lbpme:
        assert ptype == 2, "thin provisioned (LBPME=1) needs provisioning type 2"
        assert unmap_cmds, "LBPME=1 but no UNMAP/WRITE SAME(UNMAP) advertised"
    else:
        assert ptype == 0 and not unmap_cmds, b2


# ----------------------------------------------------------------------------- capacity


@pytest.mark.parametrize("block_size", [512, 4096])
def test_readcapacity16(peer_kind, peer_factory, block_size):
    require("iscsi-readcapacity16")
    size = 256 << 20
    peer = peer_factory(peer_kind, size=size, block_size=block_size)
    f = fields(run(["iscsi-readcapacity16", peer.url()]).stdout)
    assert int(f["LOGICAL BLOCK LENGTH IN BYTES"]) == block_size
    assert int(f["RETURNED LOGICAL BLOCK ADDRESS"]) == size // block_size - 1
    assert int(f["Total size"]) == size
