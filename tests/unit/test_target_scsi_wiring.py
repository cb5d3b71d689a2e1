"""The daemon on the real SCSI core: LUs on sparse files, per-ACL LunMaps, UAs from runtime changes."""
from __future__ import annotations

import json
import struct

import pytest

from iscsi.scsi import sense as S
from iscsi.scsi.types import ITNexus, ScsiCommand, Status
from iscsi.target import config as C
from iscsi.target.config import Acl, Config, Lun, PortalGroup, Target
from iscsi.target.daemon import ScsiUnitProvider, TargetDaemon

from ._target_fakes import FakeServer

T = "iqn.2026-11.org.example:wired"
H1 = "iqn.1994-05.com.redhat:h1"
H2 = "iqn.1994-05.com.redhat:h2"

TUR = bytes(6)
REPORT_LUNS = bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0])
READ_CAPACITY_10 = bytes(10)[:0] + bytes([0x25]) + bytes(9)
REPORT_TPGS = bytes([0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0])


def nexus(initiator: str, tpgt: int = 1) -> ITNexus:
    return ITNexus(f"{initiator},i,0x000000000001", f"{T},t,0x{tpgt:04x}", tpgt, tpgt)


async def run(lun_map, cdb, lun, nx):
    return await lun_map.execute(ScsiCommand(cdb=cdb, lun=lun, nexus=nx, expected_length=4096))


def asc(result) -> tuple[int, int]:
    sense = bytes(result.sense)
    if sense[0] & 0x7F in (0x72, 0x73):
        return sense[2], sense[3]
    return sense[12], sense[13]


async def first_contact(lun_map, lun, nx):
    """The first command of a nexus sees POWER ON/RESET; consume it."""
    r = await run(lun_map, TUR, lun, nx)
    if r.status == Status.CHECK_CONDITION:
        assert asc(r)[0] == 0x29
    r = await run(lun_map, TUR, lun, nx)
    assert r.status == Status.GOOD


@pytest.fixture
async def daemon(tmp_path):
    cfg = Config(
        data_dir=str(tmp_path),
        targets=[Target(
            T,
            portal_groups=[PortalGroup(1, ["127.0.0.1:3260"]), PortalGroup(2, ["127.0.0.2:3260"])],
            luns=[Lun(0, "a.img", 1 << 20), Lun(1, "b.img", 2 << 20, block_size=4096)],
            acls=[Acl(H1, {0: 1}), Acl(H2)],
        )],
    )
    path = tmp_path / "target.json"
    C.save_config(cfg, path)
    d = TargetDaemon(C.load_config(path), path, provider=ScsiUnitProvider(), server_factory=FakeServer)
    await d.start()
    yield d
    await d.stop()


async def test_images_are_sparse_files_and_acl_maps_are_lunmaps(daemon, tmp_path):
    img = tmp_path / "a.img"
    assert img.stat().st_size == 1 << 20 and img.stat().st_blocks == 0
    t = daemon.find_target(T)
    m1 = t.authorize(H1).luns
    assert m1.numbers() == [0]
    r = await run(m1, READ_CAPACITY_10, 0, nexus(H1))  # first contact gives the UA...
    r = await run(m1, READ_CAPACITY_10, 0, nexus(H1))
    last_lba, block = struct.unpack(">II", bytes(r.data)[:8])
    assert (last_lba + 1) * block == 2 << 20 and block == 4096  # H1's LUN 0 is target LUN 1


async def test_lun_add_raises_reported_luns_data_has_changed(daemon, tmp_path):
    t = daemon.find_target(T)
    m2 = t.authorize(H2).luns
    await first_contact(m2, 0, nexus(H2))
    await daemon.lun_add(T, str(tmp_path / "c.img"), size="1M")
    assert m2.numbers() == [0, 1, 2]
    r = await run(m2, TUR, 0, nexus(H2))
    assert r.status == Status.CHECK_CONDITION and asc(r) == S.REPORTED_LUNS_DATA_HAS_CHANGED
    r = await run(m2, REPORT_LUNS, 0, nexus(H2))
    n = struct.unpack(">I", bytes(r.data)[:4])[0] // 8
    assert n == 3


async def test_resize_raises_capacity_data_has_changed(daemon):
    t = daemon.find_target(T)
    m2 = t.authorize(H2).luns
    await first_contact(m2, 0, nexus(H2))
    await daemon.lun_resize(T, 0, "4M")
    r = await run(m2, TUR, 0, nexus(H2))
    assert r.status == Status.CHECK_CONDITION and asc(r) == S.CAPACITY_DATA_HAS_CHANGED
    r = await run(m2, READ_CAPACITY_10, 0, nexus(H2))
    last_lba, block = struct.unpack(">II", bytes(r.data)[:8])
    assert (last_lba + 1) * block == 4 << 20


async def test_report_target_port_groups_lists_every_portal_group(daemon):
    m2 = daemon.find_target(T).authorize(H2).luns
    await first_contact(m2, 0, nexus(H2, 2))
    r = await run(m2, REPORT_TPGS, 0, nexus(H2, 2))
    data = bytes(r.data)
    groups, off = [], 4
    while off < 4 + struct.unpack(">I", data[:4])[0]:
        tpg = struct.unpack(">H", data[off + 2:off + 4])[0]
        count = data[off + 7]
        ports = [struct.unpack(">H", data[off + 8 + 4 * i + 2:off + 8 + 4 * i + 4])[0] for i in range(count)]
        groups.append((tpg, ports))
        off += 8 + 4 * count
    assert groups == [(1, [1]), (2, [2])]


async def test_reopen_on_identity_change_keeps_the_map_object(daemon):
    t = daemon.find_target(T)
    m2 = t.authorize(H2).luns
    old = m2.get(0)
    await daemon.change(lambda cfg: setattr(cfg.target(T).lun(0), "removable", True), "test")
    assert t.authorize(H2).luns is m2
    assert m2.get(0) is not old and m2.get(0).removable


async def test_stop_flushes_and_closes(daemon, monkeypatch):
    flushed = []
    for unit in daemon.find_target(T).units.values():
        real = unit.backstore.flush
        monkeypatch.setattr(unit.backstore, "flush", lambda real=real, u=unit: (flushed.append(u.lun.number), real()))
    await daemon.stop()
    assert sorted(flushed) == [0, 1]


async def test_saved_reservations_are_restored_and_a_damaged_file_stops_the_start(tmp_path):
    cfg = Config(data_dir=str(tmp_path), targets=[Target(T, portal_groups=[PortalGroup(1, ["127.0.0.1:3260"])],
                                                         luns=[Lun(0, "a.img", 1 << 20, serial="SER1")],
                                                         open_access=True)])
    d = TargetDaemon(cfg.copy(), None, provider=ScsiUnitProvider(), server_factory=FakeServer)
    await d.start()
    lu = d.find_target(T).units[0].lu
    assert lu.pr is not None and lu.pr._persist is not None
    lu.pr._persist({"version": 1, "aptpl": False})  # what APTPL saving calls
    await d.stop()
    saved = tmp_path / "pr" / "SER1.json"
    assert json.loads(saved.read_text()) == {"version": 1, "aptpl": False} and C.file_is_private(saved)

    saved.write_text("{ torn")
    d = TargetDaemon(cfg.copy(), None, provider=ScsiUnitProvider(), server_factory=FakeServer)
    with pytest.raises(C.ConfigError, match="SER1.json: reservation state is not valid JSON"):
        await d.start()


async def test_saved_mode_pages_survive_a_daemon_restart_and_a_damaged_file_stops_the_start(tmp_path):
    """MODE SELECT SP=1 (SPC-4 §6.9) reaches the data dir: WCE=0 saved by an initiator still
    holds after a restart, or writes would be acknowledged from the page cache again."""
    cfg = Config(data_dir=str(tmp_path), targets=[Target(T, portal_groups=[PortalGroup(1, ["127.0.0.1:3260"])],
                                                         luns=[Lun(0, "a.img", 1 << 20, serial="SER1")],
                                                         open_access=True)])
    d = TargetDaemon(cfg.copy(), None, provider=ScsiUnitProvider(), server_factory=FakeServer)
    await d.start()
    lun_map = d.find_target(T).authorize(H1).luns
    nx = nexus(H1)
    await run(lun_map, TUR, 0, nx)  # the power-on unit attention
    caching = bytearray(20)
    caching[0], caching[1] = 0x08, 0x12  # WCE=0
    select = bytes((0x15, 0x11, 0, 0, 24, 0))  # MODE SELECT(6), PF, SP
    r = await lun_map.execute(ScsiCommand(cdb=select, lun=0, nexus=nx, data_out=bytes(4) + bytes(caching)))
    assert r.status == Status.GOOD
    await d.stop()
    saved = tmp_path / "mode" / "SER1.json"
    assert json.loads(saved.read_text())["pages"]["08"][4:6] == "00" and C.file_is_private(saved)

    d = TargetDaemon(cfg.copy(), None, provider=ScsiUnitProvider(), server_factory=FakeServer)
    await d.start()
    assert not d.find_target(T).units[0].lu.mode.wce
    await d.stop()

    saved.write_text(json.dumps({"version": 1, "pages": {"08": "zz"}}))
    d = TargetDaemon(cfg.copy(), None, provider=ScsiUnitProvider(), server_factory=FakeServer)
    with pytest.raises(Exception, match=r"saved mode pages .*SER1.json cannot be restored"):
        await d.start()


def test_open_file_limit_is_raised_for_the_sessions_the_server_admits(monkeypatch):
    import resource

    from iscsi.target import daemon as D
    from iscsi.target.server import MAX_SESSIONS

    assert D.WANTED_OPEN_FILES >= 2 * MAX_SESSIONS  # a socket and its zero-copy duplicate each
    calls = []
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 524288))
    monkeypatch.setattr(resource, "setrlimit", lambda which, lim: calls.append(lim))
    assert D.raise_open_file_limit() == D.WANTED_OPEN_FILES and calls == [(D.WANTED_OPEN_FILES, 524288)]
    calls.clear()
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 2048))  # hard limit caps it
    assert D.raise_open_file_limit() == 2048 and calls == [(2048, 2048)]
    calls.clear()
    monkeypatch.setattr(resource, "getrlimit", lambda which: (65536, 65536))  # never lowered
    assert D.raise_open_file_limit() == 65536 and calls == []

    def refuse(which, lim):
        raise ValueError("not permitted")
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 524288))
    monkeypatch.setattr(resource, "setrlimit", refuse)
    assert D.raise_open_file_limit() == 1024
