"""Persistent reservations the way clusters drive them (SPC-4 §5.13), beyond libiscsi's suite.

Windows Failover Cluster validation, Pacemaker's fence_scsi, ESXi-style multipath (one IQN,
two ISIDs, two target ports) and ACL-mapped LUN numbers, all in-process through
:class:`LogicalUnit` / :class:`LunMap`.  Tests marked "fix" pin a rule the target broke before.
"""
from __future__ import annotations

import struct

import pytest

from iscsi.scsi.pr import encode_iscsi_transport_id
from iscsi.scsi.target import LunMap
from iscsi.scsi.types import ITNexus, Status
from tests.unit.test_scsi_support import (
    Initiator,
    compare_and_write,
    make_lu,
    parse_sense,
    read10,
    unmap_cdb,
    unmap_params,
    write10,
    write_same16,
)

TARGET = "iqn.2026-01.org.example:quorum"
CONFLICT = Status.RESERVATION_CONFLICT
GOOD = Status.GOOD

REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_AND_ABORT, REGISTER_IGNORE, REGISTER_AND_MOVE = range(8)
WE, EA, WE_RO, EA_RO, WE_AR, EA_AR = 1, 3, 5, 6, 7, 8
READ_KEYS, READ_RESERVATION, REPORT_CAPABILITIES, READ_FULL_STATUS = range(4)
REGISTRATIONS_PREEMPTED = (0x2A, 0x05)
RESERVATIONS_RELEASED = (0x2A, 0x04)
RESERVATIONS_PREEMPTED = (0x2A, 0x03)
INVALID_FIELD_IN_PARAMETER_LIST = (0x26, 0x00)


def nexus(host: str, isid: int = 1, port: int = 1) -> ITNexus:
    return ITNexus(f"iqn.1991-05.com.microsoft:{host},i,0x4000013700{isid:02x}",
                   f"{TARGET},t,0x{port:04x}", port, port)


def prout(sa: int, pr_type: int = 0, key: int = 0, sa_key: int = 0, *, all_tg_pt=False, aptpl=False,
          spec_i_pt=False, scope: int = 0) -> tuple[bytes, bytes]:
    flags = (0x08 if spec_i_pt else 0) | (0x04 if all_tg_pt else 0) | (0x01 if aptpl else 0)
    params = struct.pack(">QQ4xBxH", key, sa_key, flags, 0)
    return bytes((0x5F, sa, (scope << 4) | pr_type, 0, 0)) + len(params).to_bytes(4, "big") + b"\x00", params


def move(key: int, sa_key: int, rel_port: int, port_name: str, pr_type: int = 0, scope: int = 0,
         unreg: bool = False) -> tuple[bytes, bytes]:
    tid = encode_iscsi_transport_id(port_name)
    params = struct.pack(">QQxBHI", key, sa_key, 0x02 if unreg else 0, rel_port, len(tid)) + tid
    return bytes((0x5F, REGISTER_AND_MOVE, (scope << 4) | pr_type, 0, 0)) + len(params).to_bytes(4, "big") + b"\x00", params


def prin(sa: int, alloc: int = 4096) -> bytes:
    return bytes((0x5E, sa, 0, 0, 0, 0, 0)) + alloc.to_bytes(2, "big") + b"\x00"


async def ready(target, *nexuses: ITNexus, lun: int = 0) -> list[Initiator]:
    out = []
    for nx in nexuses:
        ini = Initiator(target, nx, lun)
        await ini.clear_ua()
        out.append(ini)
    return out


async def status(ini: Initiator, cdb_params) -> int:
    cdb, params = cdb_params
    return (await ini.cmd(cdb, params)).status


async def keys(ini: Initiator) -> tuple[int, list[int]]:
    data = bytes((await ini.ok(prin(READ_KEYS))).data)
    gen, length = struct.unpack_from(">II", data)
    return gen, [int.from_bytes(data[8 + i:16 + i], "big") for i in range(0, length, 8)]


async def reservation(ini: Initiator) -> tuple[int, int] | None:
    data = bytes((await ini.ok(prin(READ_RESERVATION))).data)
    if struct.unpack_from(">I", data, 4)[0] == 0:
        return None
    return int.from_bytes(data[8:16], "big"), data[21] & 0x0F


def pending(lu, ini: Initiator) -> list[tuple[int, int]]:
    return list(lu.ua.get(ini.nexus) or [])


async def full_status(ini: Initiator) -> list[tuple[int, int, int, int, bytes]]:
    """(key, flags, scope/type, relative target port, TransportID) of each descriptor."""
    data = bytes((await ini.ok(prin(READ_FULL_STATUS))).data)
    _, length = struct.unpack_from(">II", data)
    out, off = [], 8
    while off < 8 + length:
        key, flags, scope_type, rel, tid_len = struct.unpack_from(">Q4xBB4xHI", data, off)
        out.append((key, flags, scope_type, rel, data[off + 24:off + 24 + tid_len]))
        off += 24 + tid_len
    return out


# -- Windows Failover Cluster validation ("Validate SCSI-3 Persistent Reservation") ----------

async def test_windows_cluster_validation_sequence():
    lu = make_lu("ram", size=1 << 20)
    node1, node2 = await ready(lu, nexus("node1"), nexus("node2"))
    k1, k2 = 0x11110000CAFE, 0x22220000CAFE
    gen0 = (await keys(node1))[0]
    assert await status(node1, prout(REGISTER_IGNORE, sa_key=k1)) == GOOD
    assert await status(node2, prout(REGISTER_IGNORE, sa_key=k2)) == GOOD
    assert await keys(node1) == (gen0 + 2, [k1, k2])
    # Reserve WE-RO, then the holder "upgrades" by preempting itself to EA-RO.
    assert await status(node1, prout(RESERVE, WE_RO, key=k1)) == GOOD
    assert await status(node1, prout(RESERVE, WE_RO, key=k1)) == GOOD  # same again: no change
    assert await status(node2, prout(RESERVE, WE_RO, key=k2)) == CONFLICT
    assert (await node2.cmd(write10(0, 1), bytes(512))).status == GOOD  # registrant of a RO type
    assert await status(node1, prout(PREEMPT, EA_RO, key=k1, sa_key=k1)) == GOOD
    assert pending(lu, node2) == [RESERVATIONS_RELEASED]  # type changed
    assert await reservation(node1) == (k1, EA_RO)
    await node2.clear_ua()
    # RELEASE with the wrong type: INVALID RELEASE OF PERSISTENT RESERVATION, nothing changes.
    s = await node1.fails(*prout(RELEASE, WE_RO, key=k1))
    assert (s.key, s.asc, s.ascq) == (0x5, 0x26, 0x04)
    assert await reservation(node2) == (k1, EA_RO)
    # The challenger preempts node1 (arbitration) with PREEMPT AND ABORT.
    r = await node2.cmd(*prout(PREEMPT_AND_ABORT, WE_RO, key=k2, sa_key=k1))
    assert r.status == GOOD and r.extra["abort_nexuses"] == [node1.nexus]
    assert pending(lu, node1) == [REGISTRATIONS_PREEMPTED]
    assert await reservation(node2) == (k2, WE_RO)
    assert await keys(node2) == (gen0 + 4, [k2])
    await node1.clear_ua()
    assert (await node1.cmd(write10(0, 1), bytes(512))).status == CONFLICT
    assert (await node1.cmd(read10(0, 1))).status == GOOD  # Write Exclusive family: reads pass
    # node1 comes back with REGISTER AND IGNORE EXISTING KEY and is a registrant again.
    assert await status(node1, prout(REGISTER_IGNORE, sa_key=k1)) == GOOD
    assert (await node1.cmd(write10(0, 1), bytes(512))).status == GOOD
    # CLEAR: everything goes; everybody else hears RESERVATIONS PREEMPTED.
    assert await status(node2, prout(CLEAR, key=k2)) == GOOD
    assert pending(lu, node1) == [RESERVATIONS_PREEMPTED] and pending(lu, node2) == []
    assert await reservation(node2) is None and (await keys(node2))[1] == []


# -- fence_scsi (Pacemaker) --------------------------------------------------------------------

async def test_fence_scsi_preempt_and_abort_of_a_multipath_victim():
    """Each node registers one key on every path (two ISIDs, two target ports); the survivor
    fences the victim with PREEMPT AND ABORT of its key: every victim path is aborted and hears
    REGISTRATIONS PREEMPTED, the survivor's other path hears nothing (the type is unchanged)."""
    lu = make_lu("ram", size=1 << 20)
    v1, v2, s1, s2 = await ready(lu, nexus("victim", 1, 1), nexus("victim", 2, 2),
                                 nexus("survivor", 1, 1), nexus("survivor", 2, 2))
    for ini, key in ((v1, 0xA), (v2, 0xA), (s1, 0xB), (s2, 0xB)):
        assert await status(ini, prout(REGISTER_IGNORE, sa_key=key)) == GOOD
    assert await status(s1, prout(RESERVE, WE_RO, key=0xB)) == GOOD
    r = await s1.cmd(*prout(PREEMPT_AND_ABORT, WE_RO, key=0xB, sa_key=0xA))
    assert r.status == GOOD
    ports = lambda nxs: {(n.initiator_port, n.target_port) for n in nxs}  # noqa: E731
    assert ports(r.extra["abort_nexuses"]) == ports((v1.nexus, v2.nexus))
    assert pending(lu, v1) == pending(lu, v2) == [REGISTRATIONS_PREEMPTED]
    assert pending(lu, s2) == []
    for v in (v1, v2):
        await v.clear_ua()
        assert (await v.cmd(write10(0, 1), bytes(512))).status == CONFLICT
    assert (await s2.cmd(write10(0, 1), bytes(512))).status == GOOD


async def test_preempt_and_abort_releases_the_victims_medium_removal_prevention():
    """fix: SPC-4 §5.13.11.2.6 h): PREEMPT AND ABORT acts as PREVENT ALLOW MEDIUM REMOVAL with
    PREVENT=0 from each preempted I_T nexus.  A fenced node's PREVENT stayed in force."""
    lu = make_lu("ram", size=1 << 20, removable=True)
    victim, survivor = await ready(lu, nexus("victim"), nexus("survivor"))
    assert await status(victim, prout(REGISTER_IGNORE, sa_key=0xA)) == GOOD
    assert await status(survivor, prout(REGISTER_IGNORE, sa_key=0xB)) == GOOD
    await victim.ok(bytes((0x1E, 0, 0, 0, 0x01, 0)))  # PREVENT=01b
    assert lu.removal_prevented()
    assert await status(survivor, prout(PREEMPT, WE_RO, key=0xB, sa_key=0xA)) == GOOD
    assert lu.removal_prevented()  # PREEMPT (no abort) leaves it alone
    await victim.clear_ua()
    assert await status(victim, prout(REGISTER_IGNORE, sa_key=0xA)) == GOOD
    assert await status(survivor, prout(PREEMPT_AND_ABORT, WE_RO, key=0xB, sa_key=0xA)) == GOOD
    assert not lu.removal_prevented()


async def test_preempting_ones_own_key_removes_ones_own_registration():
    """fix: SPC-4 §5.13.11.2.5: PREEMPT whose SERVICE ACTION RESERVATION KEY is the sender's own
    key and does not identify the reservation holder removes every registration with that key,
    the sender's too ("The registration is removed"), without a unit attention for the sender.
    The sender stayed registered."""
    lu = make_lu("ram", size=1 << 20)
    a1, a2, b = await ready(lu, nexus("a", 1, 1), nexus("a", 2, 2), nexus("b"))
    for ini, key in ((a1, 0xA), (a2, 0xA), (b, 0xB)):
        assert await status(ini, prout(REGISTER_IGNORE, sa_key=key)) == GOOD
    assert await status(b, prout(RESERVE, WE, key=0xB)) == GOOD
    gen = (await keys(b))[0]
    assert await status(a1, prout(PREEMPT, EA, key=0xA, sa_key=0xA)) == GOOD
    assert await keys(b) == (gen + 1, [0xB])
    assert await reservation(b) == (0xB, WE)  # SCOPE and TYPE ignored, reservation untouched
    assert pending(lu, a1) == [] and pending(lu, a2) == [REGISTRATIONS_PREEMPTED]
    assert await status(a1, prout(PREEMPT, WE, key=0xA, sa_key=0xB)) == CONFLICT  # unregistered now


async def test_preempting_the_last_all_registrants_key_ends_the_reservation():
    """fix: SPC-4 Table 71: an all-registrants reservation ends when its last registration is
    removed, whatever removed it (here the only registrant preempting its own key)."""
    lu = make_lu("ram", size=1 << 20)
    a, c = await ready(lu, nexus("a"), nexus("c"))
    assert await status(a, prout(REGISTER_IGNORE, sa_key=0xA)) == GOOD
    assert await status(a, prout(RESERVE, EA_AR, key=0xA)) == GOOD
    assert (await c.cmd(read10(0, 1))).status == CONFLICT
    assert await status(a, prout(PREEMPT, EA_AR, key=0xA, sa_key=0xA)) == GOOD
    assert await reservation(a) is None and (await keys(a))[1] == []
    assert (await c.cmd(read10(0, 1))).status == GOOD


# -- REGISTER AND MOVE (SPC-4 §5.13.8) ---------------------------------------------------------

async def test_register_and_move_to_a_registered_nexus_gives_it_the_new_key():
    """fix: SPC-4 §5.13.8 c)-e): the destination is registered with the SERVICE ACTION RESERVATION
    KEY "regardless" of an earlier registration.  It kept its old key, so READ RESERVATION showed
    a key the backup application never asked for."""
    lu = make_lu("ram", size=1 << 20)
    a, b = await ready(lu, nexus("a"), nexus("b"))
    assert await status(a, prout(REGISTER_IGNORE, sa_key=0xA)) == GOOD
    assert await status(b, prout(REGISTER_IGNORE, sa_key=0xB)) == GOOD
    assert await status(a, prout(RESERVE, EA, key=0xA)) == GOOD
    gen = (await keys(a))[0]
    assert await status(a, move(0xA, 0xC, 1, b.nexus.initiator_port, unreg=True)) == GOOD
    assert await reservation(b) == (0xC, EA)
    assert await keys(b) == (gen + 1, [0xC])  # REGISTER AND MOVE counts (SPC-4 §6.15.2)
    assert (await b.cmd(write10(0, 1), bytes(512))).status == GOOD
    assert (await a.cmd(read10(0, 1))).status == CONFLICT


async def test_register_and_move_ignores_scope_and_type():
    """fix: SPC-4 §5.13.8 b): SCOPE and TYPE are ignored; a non-zero SCOPE was refused."""
    lu = make_lu("ram", size=1 << 20)
    a, b = await ready(lu, nexus("a"), nexus("b"))
    assert await status(a, prout(REGISTER_IGNORE, sa_key=0xA)) == GOOD
    assert await status(a, prout(RESERVE, WE_RO, key=0xA)) == GOOD
    assert await status(a, move(0xA, 0xB, 1, b.nexus.initiator_port, pr_type=EA, scope=2)) == GOOD
    assert await reservation(a) == (0xB, WE_RO)  # the type moved with it


async def test_register_and_move_to_the_senders_own_initiator_port_elsewhere_is_refused():
    """fix: SPC-4 §5.13.8: a TransportID naming the sender's own initiator port is INVALID FIELD
    IN PARAMETER LIST, through whichever target port; moving to the same port via target port 2
    went through and left two registrations of one initiator port."""
    lu = make_lu("ram", size=1 << 20)
    a1, a1_port2 = await ready(lu, nexus("a", 1, 1), nexus("a", 1, 2))
    assert await status(a1, prout(REGISTER_IGNORE, sa_key=0xA)) == GOOD
    assert await status(a1, prout(RESERVE, EA, key=0xA)) == GOOD
    for port_name in (a1.nexus.initiator_port, a1.nexus.initiator_name):
        s = await a1.fails(*move(0xA, 0xC, 2, port_name))
        assert (s.key, s.asc, s.ascq) == (0x5, *INVALID_FIELD_IN_PARAMETER_LIST)
    assert await reservation(a1) == (0xA, EA) and (await keys(a1))[1] == [0xA]
    # Another ISID of the same host is another initiator port: allowed.
    a2, = await ready(lu, nexus("a", 2, 2))
    assert await status(a1, move(0xA, 0xC, 2, a2.nexus.initiator_port)) == GOOD
    assert await reservation(a1) == (0xC, EA)
    assert (await a2.cmd(write10(0, 1), bytes(512))).status == GOOD
    assert (await a1_port2.cmd(read10(0, 1))).status == CONFLICT


# -- ESXi-style multipath: one IQN, two ISIDs, two target ports --------------------------------

async def test_multipath_all_tg_pt_spec_i_pt_and_full_status():
    lu = make_lu("ram", size=1 << 20)
    p1, p2, q1 = await ready(lu, nexus("esx", 1, 1), nexus("esx", 2, 2), nexus("esx2", 1, 2))
    # Two ISIDs are two initiator ports: registering one does not register the other.
    assert await status(p1, prout(REGISTER, sa_key=0xE1)) == GOOD
    assert await status(p2, prout(RESERVE, WE, key=0xE1)) == CONFLICT
    # ALL_TG_PT=1 covers the initiator port on every target port, one it never used included.
    assert await status(q1, prout(REGISTER, sa_key=0xE2, all_tg_pt=True)) == GOOD
    q1_port1, = await ready(lu, nexus("esx2", 1, 1))
    assert await status(q1_port1, prout(RESERVE, EA, key=0xE2)) == GOOD
    assert (await q1.cmd(write10(0, 1), bytes(512))).status == GOOD
    assert (await p1.cmd(read10(0, 1))).status == CONFLICT
    # SPEC_I_PT is not implemented: refused cleanly, nothing changes, SIP_C=0 says so.
    gen = (await keys(p1))[0]
    tid = encode_iscsi_transport_id(p2.nexus.initiator_port)
    cdb, params = prout(REGISTER, sa_key=0xE3, spec_i_pt=True)
    params += len(tid).to_bytes(4, "big") + tid
    s = await p2.fails(cdb[:5] + len(params).to_bytes(4, "big") + cdb[9:], params)
    assert (s.key, s.asc, s.ascq) == (0x5, *INVALID_FIELD_IN_PARAMETER_LIST)
    assert await keys(p1) == (gen, [0xE1, 0xE2])
    caps = bytes((await p1.ok(prin(REPORT_CAPABILITIES))).data)
    assert caps[2] & 0x08 == 0 and caps[2] & 0x04  # SIP_C=0, ATP_C=1
    # READ FULL STATUS: one descriptor per registration, iSCSI TransportIDs with ISID.
    desc = await full_status(p1)
    assert [(k, f, st, rel) for k, f, st, rel, _ in desc] == [(0xE1, 0, 0, 1), (0xE2, 0x03, EA, 0)]
    for (_, _, _, _, tid), ini in zip(desc, (p1, q1)):
        assert tid[0] == 0x45 and len(tid) % 4 == 0  # format 01b, protocol iSCSI
        assert tid[4:].rstrip(b"\x00").decode() == ini.nexus.initiator_port


# -- ACL-mapped LUN numbers: one LU, two LUN numbers -------------------------------------------

async def test_registration_through_an_acl_mapped_lun_number_is_the_lus():
    lu = make_lu("ram", size=1 << 20)
    acl_map, open_map = LunMap({3: lu}), LunMap({0: lu})
    n1, = await ready(acl_map, nexus("node1"), lun=3)
    n2, = await ready(open_map, nexus("node2"), lun=0)
    assert await status(n1, prout(REGISTER_IGNORE, sa_key=0x1)) == GOOD
    assert await status(n2, prout(REGISTER_IGNORE, sa_key=0x2)) == GOOD
    assert await status(n1, prout(RESERVE, EA_RO, key=0x1)) == GOOD
    assert await reservation(n2) == (0x1, EA_RO)
    r = await n2.cmd(*prout(PREEMPT_AND_ABORT, EA_RO, key=0x2, sa_key=0x1))
    assert r.status == GOOD and r.extra["abort_nexuses"] == [n1.nexus]
    assert pending(lu, n1) == [REGISTRATIONS_PREEMPTED]


# -- Reservation conflicts by command class (SPC-4 Table 63, SBC-4 Table 13) -------------------

CLASS_ROWS = [  # name, cdb, data, allowed to a non-registrant under WE, under EA
    ("READ(10)", read10(0, 1), b"", True, False),
    ("WRITE(10)", write10(0, 1), bytes(512), False, False),
    ("SYNCHRONIZE CACHE(10)", bytes((0x35,)) + bytes(9), b"", False, False),
    ("UNMAP", unmap_cdb(24), unmap_params([(0, 1)]), False, False),
    ("WRITE SAME(16)", write_same16(0, 1), bytes(512), False, False),
    ("COMPARE AND WRITE", compare_and_write(0, 1), bytes(1024), False, False),
    ("TEST UNIT READY", bytes(6), b"", True, True),
    ("READ CAPACITY(16)", bytes((0x9E, 0x10)) + bytes(11) + b"\x20\x00\x00", b"", True, True),
]


@pytest.mark.parametrize("name,cdb,data,we_ok,ea_ok", CLASS_ROWS, ids=[r[0] for r in CLASS_ROWS])
@pytest.mark.parametrize("pr_type", [WE, EA, WE_RO, EA_RO, WE_AR, EA_AR])
async def test_command_classes_through_the_logical_unit(name, cdb, data, we_ok, ea_ok, pr_type):
    lu = make_lu("ram", size=1 << 20)
    holder, registrant, outsider = await ready(lu, nexus("h"), nexus("r"), nexus("o"))
    assert await status(holder, prout(REGISTER_IGNORE, sa_key=0x1)) == GOOD
    assert await status(registrant, prout(REGISTER_IGNORE, sa_key=0x2)) == GOOD
    assert await status(holder, prout(RESERVE, pr_type, key=0x1)) == GOOD
    allowed = we_ok if pr_type in (WE, WE_RO, WE_AR) else ea_ok
    registrant_ok = allowed or pr_type not in (WE, EA)
    for ini, ok in ((holder, True), (registrant, registrant_ok), (outsider, allowed)):
        r = await ini.cmd(cdb, data)
        if ok:
            assert r.status != CONFLICT, (name, pr_type, ini.nexus.initiator_port)
            assert r.status == GOOD, (name, parse_sense(r.sense) if r.sense else r.status)
        else:
            assert r.status == CONFLICT, (name, pr_type, ini.nexus.initiator_port)


# -- PRgeneration (SPC-4 §6.15.2) ---------------------------------------------------------------

async def test_prgeneration_counts_exactly_the_service_actions_the_standard_names():
    lu = make_lu("ram", size=1 << 20)
    a, b, c, observer = await ready(lu, nexus("a"), nexus("b"), nexus("c"), nexus("observer"))
    steps = [  # (initiator, command, expected status, generation delta)
        (a, prout(REGISTER, sa_key=0xA), GOOD, 1),
        (a, prout(REGISTER, key=0xA, sa_key=0xA), GOOD, 1),  # same key again still counts
        (c, prout(REGISTER_IGNORE, sa_key=0), GOOD, 0),  # unregistered, zero key: nothing
        (c, prout(REGISTER, key=0x5, sa_key=0xC), CONFLICT, 0),
        (b, prout(REGISTER_IGNORE, sa_key=0xB), GOOD, 1),
        (a, prout(RESERVE, WE, key=0xA), GOOD, 0),
        (b, prout(RESERVE, WE, key=0xB), CONFLICT, 0),
        (a, prout(RELEASE, WE, key=0xA), GOOD, 0),
        (a, prout(RESERVE, EA, key=0xA), GOOD, 0),
        (b, prout(PREEMPT, EA, key=0xB, sa_key=0x99), CONFLICT, 0),
        (a, move(0xA, 0xC, 1, c.nexus.initiator_port), GOOD, 1),
        (c, prout(PREEMPT_AND_ABORT, WE, key=0xC, sa_key=0xB), GOOD, 1),
        (c, prout(CLEAR, key=0xC), GOOD, 1),
        (observer, prout(CLEAR, key=0xA), CONFLICT, 0),  # unregistered
    ]
    for i, (ini, command, expected, delta) in enumerate(steps):
        before = (await keys(observer))[0]  # never registered: no unit attentions for it
        assert (await ini.cmd(*command)).status == expected, i
        assert (await keys(observer))[0] == before + delta, i


async def test_preempting_ones_own_all_tg_pt_key_tells_the_other_target_ports():
    """SPC-4 §5.13.11.2.5 d): every I_T nexus that lost its registration but the sender hears
    REGISTRATIONS PREEMPTED, the other target ports of the sender's ALL_TG_PT registration too."""
    lu = make_lu("ram", size=1 << 20)
    a1, a1_port2, b = await ready(lu, nexus("a", 1, 1), nexus("a", 1, 2), nexus("b"))
    assert await status(a1, prout(REGISTER_IGNORE, sa_key=0xA, all_tg_pt=True)) == GOOD
    assert await status(b, prout(REGISTER_IGNORE, sa_key=0xB)) == GOOD
    r = await a1.cmd(*prout(PREEMPT_AND_ABORT, WE, key=0xA, sa_key=0xA))
    assert r.status == GOOD and not r.extra["abort_nexuses"]  # never the sender's own tasks
    assert pending(lu, a1) == [] and pending(lu, a1_port2) == [REGISTRATIONS_PREEMPTED]
    assert pending(lu, b) == [] and (await keys(b))[1] == [0xB]
