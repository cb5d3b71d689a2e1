"""Unit attention sequencing per I_T nexus (SAM-5 §5.14, SPC-4 §5.14)."""
from __future__ import annotations

from iscsi.scsi.target import LunMap

from .test_scsi_support import (
    NEXUS_A, NEXUS_B, Initiator, inquiry, make_lu, parse_sense, read10, report_luns, request_sense,
)

UA = 0x6


async def test_first_command_of_new_nexus_gets_power_on_reset_once():
    lu = make_lu("ram")
    ini = Initiator(lu)
    s = await ini.fails(read10(0, 1))
    assert s.code == (UA, 0x29, 0x00)
    await ini.ok(read10(0, 1))
    # a second nexus gets its own
    assert (await Initiator(lu, NEXUS_B).fails(read10(0, 1))).code == (UA, 0x29, 0x00)


async def test_inquiry_and_report_luns_neither_blocked_nor_consuming():
    lu = make_lu("ram")
    m = LunMap({0: lu})
    ini = Initiator(m)
    await ini.ok(inquiry())
    await ini.ok(report_luns())
    assert (await ini.fails(bytes(6))).code == (UA, 0x29, 0x00)
    await ini.ok(bytes(6))


async def test_request_sense_reports_and_clears_the_ua():
    lu = make_lu("ram")
    ini = Initiator(lu)
    r = await ini.ok(request_sense())
    assert parse_sense(r.data).code == (UA, 0x29, 0x00)
    r = await ini.ok(request_sense(desc=1))
    s = parse_sense(r.data)
    assert s.descriptor and s.code == (0x0, 0x00, 0x00)
    await ini.ok(bytes(6))


async def test_lun_reset_reaches_every_nexus():
    lu = make_lu("ram")
    a, b = Initiator(lu, NEXUS_A), Initiator(lu, NEXUS_B)
    await a.clear_ua()
    await b.clear_ua()
    lu.lun_reset()
    assert (await a.fails(bytes(6))).code == (UA, 0x29, 0x03)
    assert (await b.fails(bytes(6))).code == (UA, 0x29, 0x03)
    lu.warm_reset()
    assert (await a.fails(bytes(6))).code == (UA, 0x29, 0x02)
    lu.cold_reset()
    assert (await a.fails(bytes(6))).code == (UA, 0x29, 0x01)  # a reset supersedes older UAs
    assert await a.clear_ua() == 0


async def test_resize_raises_capacity_changed(tmp_path):
    lu = make_lu("file", tmp_path, size=1 << 20)
    ini = Initiator(lu)
    await ini.clear_ua()
    lu.resize(2 << 20)
    assert (await ini.fails(bytes(6))).code == (UA, 0x2A, 0x09)
    assert lu.num_blocks == (2 << 20) // 512
    await ini.ok(read10(lu.num_blocks - 1, 1))


async def test_lun_added_raises_reported_luns_changed_and_report_luns_clears_it():
    lu0 = make_lu("ram", serial="zero")
    m = LunMap({0: lu0})
    ini = Initiator(m)
    await ini.clear_ua()
    m.add(1, make_lu("ram", serial="one"))
    await ini.ok(report_luns())  # clears REPORTED LUNS DATA HAS CHANGED
    await ini.ok(bytes(6))
    m.remove(1)
    assert (await ini.fails(bytes(6))).code == (UA, 0x3F, 0x0E)


async def test_nexus_loss_is_reported_to_the_returning_nexus():
    lu = make_lu("ram")
    a, b = Initiator(lu, NEXUS_A), Initiator(lu, NEXUS_B)
    await a.clear_ua()
    await b.clear_ua()
    lu.nexus_lost(NEXUS_A)
    assert (await a.fails(bytes(6))).code == (UA, 0x29, 0x07)
    await b.ok(bytes(6))


async def test_several_pending_conditions_come_one_per_command():
    lu = make_lu("ram")
    ini = Initiator(lu)
    await ini.clear_ua()
    lu.establish_ua((0x2A, 0x09))
    lu.establish_ua((0x3F, 0x0E))
    lu.establish_ua((0x2A, 0x09))  # duplicates are not queued twice
    assert (await ini.fails(bytes(6))).code == (UA, 0x2A, 0x09)
    assert (await ini.fails(bytes(6))).code == (UA, 0x3F, 0x0E)
    await ini.ok(bytes(6))


async def test_establish_except_nexus():
    lu = make_lu("ram")
    a, b = Initiator(lu, NEXUS_A), Initiator(lu, NEXUS_B)
    await a.clear_ua()
    await b.clear_ua()
    lu.establish_ua((0x2A, 0x01), except_nexus=NEXUS_A)
    await a.ok(bytes(6))
    assert (await b.fails(bytes(6))).code == (UA, 0x2A, 0x01)
