"""Who shares an LU: its sole user (whose large READs may be held for zero-copy) exists only
while no other I_T nexus uses it *or has logged in through a map of it* (LunMap.joined).

A login is recorded once, in the map: it costs no memory per LU the session can reach (a
session on a target of 1024 LUNs used to add itself to 1024 per-LU sets).
"""
from __future__ import annotations

import pytest

from iscsi.scsi.target import LunMap
from iscsi.scsi.types import ITNexus

from .test_scsi_support import NEXUS_A, NEXUS_B, make_lu, read10, Initiator

pytestmark = pytest.mark.asyncio


def twin(nexus: ITNexus) -> ITNexus:
    """An equal I_T nexus of a new session (reinstatement): same ports, another object."""
    return ITNexus(nexus.initiator_port, nexus.target_port, nexus.relative_port_id, nexus.target_port_group)


async def test_a_login_makes_the_lu_shared_before_the_first_command():
    lu = make_lu()
    m = LunMap({0: lu})
    m.nexus_joined(NEXUS_A)
    await Initiator(m, NEXUS_A).cmd(read10(0, 1))
    assert lu.sole_user is NEXUS_A
    m.nexus_joined(NEXUS_B)               # logged in, nothing sent yet
    assert lu.sole_user is None
    await Initiator(m, NEXUS_A).cmd(read10(0, 1))
    assert lu.sole_user is None, "another host can reach the LU: A's READs must not be held"
    m.nexus_lost(NEXUS_B)
    assert lu.sole_user is NEXUS_A        # alone again


async def test_the_first_user_of_an_lu_another_host_reaches_is_not_sole():
    lu = make_lu()
    m = LunMap({0: lu})
    m.nexus_joined(NEXUS_B)
    m.nexus_joined(NEXUS_A)
    await Initiator(m, NEXUS_A).cmd(read10(0, 1))
    assert lu.sole_user is None


async def test_a_login_through_another_map_of_the_same_lu_counts():
    """An ACL's own view of the target is a second map over the same LU."""
    lu = make_lu()
    mine, theirs = LunMap({0: lu}), LunMap({3: lu})
    mine.nexus_joined(NEXUS_A)
    await Initiator(mine, NEXUS_A).cmd(read10(0, 1))
    assert lu.sole_user is NEXUS_A
    theirs.nexus_joined(NEXUS_B)
    assert lu.sole_user is None
    assert lu.reachable_by(NEXUS_B) and lu.reachable_by(NEXUS_A)
    theirs.nexus_lost(NEXUS_B)
    assert lu.sole_user is NEXUS_A and not lu.reachable_by(NEXUS_B)


async def test_mapping_changes_after_the_logins_are_taken_into_account():
    lu, other = make_lu(), make_lu(serial="other")
    mine, theirs = LunMap({0: lu}), LunMap({0: other})
    mine.nexus_joined(NEXUS_A)
    theirs.nexus_joined(NEXUS_B)
    await Initiator(mine, NEXUS_A).cmd(read10(0, 1))
    assert lu.sole_user is NEXUS_A
    theirs.add(1, lu)                     # B's sessions reach it from now on
    assert lu.sole_user is None and lu.reachable_by(NEXUS_B)
    theirs.remove(1)                      # and no longer
    assert lu.sole_user is NEXUS_A and not lu.reachable_by(NEXUS_B)


async def test_a_reinstated_sole_user_is_kept_as_its_new_object():
    """The fast paths compare the sole user by identity."""
    lu = make_lu()
    m = LunMap({0: lu})
    m.nexus_joined(NEXUS_A)
    await Initiator(m, NEXUS_A).cmd(read10(0, 1))
    again = twin(NEXUS_A)
    m.nexus_joined(again)                 # equal nexus: still one host
    await Initiator(m, again).cmd(read10(0, 1))
    assert lu.sole_user is again


async def test_logins_cost_the_lus_they_reach_no_memory():
    luns = {n: make_lu(size=1 << 20, serial=f"s{n}") for n in range(64)}
    m = LunMap(luns)
    sessions = [ITNexus(f"iqn.2026-01.org.example:h{i},i,0x{i:012x}", "iqn.2026-01.org.example:t,t,0x0001")
                for i in range(32)]
    for nexus in sessions:
        m.nexus_joined(nexus)
    assert all(not lu._users for lu in luns.values()), "a login added itself to every LU"
    assert all(lu.reachable_by(sessions[5]) for lu in luns.values())
    for nexus in sessions:
        m.nexus_lost(nexus)
    assert not m.joined and not any(lu.reachable_by(sessions[5]) for lu in luns.values())
