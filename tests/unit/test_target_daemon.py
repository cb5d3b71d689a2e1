"""TargetDaemon: registry semantics and runtime changes (serialized, persisted, rolled back)."""
from __future__ import annotations

import asyncio
import json
import logging

import pytest

from iscsi.target import config as C
from iscsi.target.config import Acl, ChapConfig, Config, ConfigError, Lun, PortalGroup, Target
from iscsi.target.daemon import AdminError, DaemonError, TargetDaemon

from ._target_fakes import FakeProvider, FakeServer

T1 = "iqn.2026-11.org.example:t1"
T2 = "iqn.2026-11.org.example:t2"
H1 = "iqn.1994-05.com.redhat:host1"
H2 = "iqn.1994-05.com.redhat:host2"
H3 = "iqn.1994-05.com.redhat:stranger"
SECRET = "target-secret-123"
ACL_SECRET = "acl-secret-45678"
MUTUAL = "mutual-secret-999"
DISC = "discovery-secret-1"


def base_config(tmp_path) -> Config:
    return Config(
        data_dir=str(tmp_path),
        targets=[
            Target(
                iqn=T1,
                alias="one",
                portal_groups=[PortalGroup(1, ["127.0.0.1:3260"]), PortalGroup(2, ["127.0.0.2:3260", "[::1]:3260"])],
                luns=[Lun(0, "a.img", 1 << 20), Lun(1, "b.img", 2 << 20)],
                acls=[Acl(H1, {0: 1}, ChapConfig("h1", ACL_SECRET, "t1", MUTUAL), {"HeaderDigest": "CRC32C"}),
                      Acl(H2)],
                chap=ChapConfig("tuser", SECRET),
                params={"DataDigest": "CRC32C,None"},
            ),
            Target(
                iqn=T2,
                portal_groups=[PortalGroup(1, ["0.0.0.0:3261"])],
                luns=[Lun(0, "c.img", 1 << 20)],
                open_access=True,
            ),
        ],
    )


@pytest.fixture
def env(tmp_path):
    cfg = base_config(tmp_path)
    path = tmp_path / "target.json"
    C.save_config(cfg, path)
    provider = FakeProvider()
    servers: list[FakeServer] = []

    def factory(reg):
        servers.append(FakeServer(reg))
        return servers[-1]

    daemon = TargetDaemon(C.load_config(path), path, provider=provider, server_factory=factory)
    return daemon, provider, servers, path


async def started(env):
    daemon, provider, servers, path = env
    await daemon.start()
    return daemon, provider, servers[0], path


# ------------------------------------------------------------------ start / stop


async def test_start_opens_every_lun_and_binds_every_portal(env):
    daemon, provider, server, _ = await started(env)
    assert len(provider.opened) == 3
    assert server.portals == {("127.0.0.1", 3260), ("127.0.0.2", 3260), ("::1", 3260), ("0.0.0.0", 3261)}
    await daemon.stop()
    assert server.shut_down
    assert len(provider.closed) == 3
    assert all(u.backstore.flushed and u.backstore.closed for u in provider.closed)


async def test_start_is_all_or_nothing(env):
    daemon, provider, servers, _ = env
    provider.fail_paths.add("c.img")
    with pytest.raises(DaemonError, match=f"{T2} LUN 0: cannot open .*c.img"):
        await daemon.start()
    assert len(provider.closed) == len(provider.opened) == 2  # what had opened is closed again
    assert servers[0].shut_down


async def test_start_fails_loudly_when_a_portal_is_busy(env):
    daemon, provider, servers, _ = env

    def factory(reg):
        s = FakeServer(reg)
        s.busy_ports.add(3261)
        servers.append(s)
        return s

    daemon._server_factory = factory
    with pytest.raises(DaemonError, match=r"cannot listen on 0.0.0.0:3261"):
        await daemon.start()
    assert len(provider.closed) == 3


# ------------------------------------------------------------------ registry semantics


async def test_find_target_and_tpgt_per_portal(env):
    daemon, *_ = await started(env)
    t = daemon.find_target(T1.upper())
    assert t is not None and t.name == T1 and t.alias == "one"
    assert t.portal_group_tag("127.0.0.1", 3260) == 1
    assert t.portal_group_tag("127.0.0.2", 3260) == 2
    assert t.portal_group_tag("::1", 3260) == 2
    assert t.portal_group_tag("::ffff:127.0.0.1", 3260) == 1  # v4-mapped on a dual-stack socket
    assert t.portal_group_tag("127.0.0.1", 3261) is None
    t2 = daemon.find_target(T2)
    assert t2.portal_group_tag("127.0.0.5", 3261) == 1  # wildcard portal
    assert daemon.find_target("iqn.2026-11.org.example:nope") is None


async def test_authorize_follows_acls_and_lun_mapping(env):
    daemon, provider, *_ = await started(env)
    t = daemon.find_target(T1)
    units = {u.lun.number: u.lu for u in provider.opened if u.image.name in ("a.img", "b.img")}

    g1 = t.authorize(H1)
    assert dict(g1.luns) == {0: units[1]}  # ACL LUN 0 is target LUN 1
    assert g1.chap.username == "h1" and g1.chap.secret == ACL_SECRET and g1.chap.mutual_secret == MUTUAL
    assert g1.params == {"DataDigest": "CRC32C,None", "HeaderDigest": "CRC32C"}

    g2 = t.authorize(H2.upper())  # names compare after case mapping (RFC 3722)
    assert dict(g2.luns) == {0: units[0], 1: units[1]}
    assert g2.chap.username == "tuser"  # no own CHAP: the target's
    assert g2.luns is t.authorize(H2).luns  # sessions share one map object

    assert t.authorize(H3) is None  # not in the ACL, no open access: 0x0202
    assert t.authorize("not a name") is None


async def test_open_access_lets_anyone_in_and_sees_all_luns(env):
    daemon, *_ = await started(env)
    g = daemon.find_target(T2).authorize(H3)
    assert g is not None and g.chap is None and list(g.luns) == [0]


async def test_discovery_is_filtered_per_initiator_and_portal(env):
    daemon, *_ = await started(env)
    # H3 may see only the open target, and only on the portal it is offered on.
    assert daemon.discovery_targets(H3, "127.0.0.1", 3260) == []
    assert daemon.discovery_targets(H3, "127.0.0.1", 3261) == [(T2, ["127.0.0.1:3261,1"])]
    # H1 has an ACL on T1: all of T1's portals with their TPGTs.
    assert daemon.discovery_targets(H1, "127.0.0.2", 3260) == [
        (T1, ["127.0.0.1:3260,1", "127.0.0.2:3260,2", "[::1]:3260,2"])
    ]
    # wildcard portal reported with the address the initiator actually reached
    assert daemon.discovery_targets(H1, "127.0.0.3", 3261) == [(T2, ["127.0.0.3:3261,1"])]
    assert daemon.discovery_targets(H1, "::1", 3261) == []  # 0.0.0.0 does not listen on IPv6
    await daemon.portal_add(T2, "[::]:3261", tag=1)
    assert daemon.discovery_targets(H1, "::1", 3261) == [(T2, ["[::1]:3261,1"])]


async def test_discovery_auth_and_its_repr(env):
    daemon, *_ = await started(env)
    assert daemon.discovery_auth() is None
    await daemon.chap_set("discovery", "disc", DISC)
    creds = daemon.discovery_auth()
    assert creds.username == "disc" and creds.secret == DISC
    assert DISC not in repr(creds) and DISC not in str(creds)


# ------------------------------------------------------------------ runtime changes


async def test_lun_add_is_persisted_and_updates_maps_in_place(env, tmp_path):
    daemon, provider, server, path = await started(env)
    t = daemon.find_target(T1)
    m2 = t.authorize(H2).luns
    m1 = t.authorize(H1).luns
    res = await daemon.lun_add(T1, str(tmp_path / "new.img"), size="1M")
    assert res["lun"] == 2
    assert t.authorize(H2).luns is m2 and 2 in m2 and m2.changed == 1  # REPORTED LUNS DATA HAS CHANGED
    assert 2 not in m1 and m1.changed == 0  # explicit mapping: H1 does not see it
    assert server.notified == [T1]
    saved = C.load_config(path)
    lun = saved.target(T1).lun(2)
    assert lun.size == 1 << 20 and lun.serial == res["serial"]
    assert (tmp_path / "new.img").stat().st_size == 1 << 20


async def test_lun_remove_closes_the_unit_and_updates_maps(env):
    daemon, provider, server, path = await started(env)
    t = daemon.find_target(T1)
    m1, m2 = t.authorize(H1).luns, t.authorize(H2).luns
    await daemon.lun_remove(T1, 1)
    assert dict(m1) == {} and m1.changed == 1
    assert list(m2) == [0]
    assert [u.image.name for u in provider.closed] == ["b.img"]
    saved = C.load_config(path).target(T1)
    assert [l.number for l in saved.luns] == [0]
    assert saved.acl(H1).lun_map == {}


async def test_resize_grows_online_and_refuses_to_shrink_without_force(env):
    daemon, provider, server, path = await started(env)
    unit = daemon.find_target(T1).units[0]
    await daemon.lun_resize(T1, 0, "4M")
    assert unit.lu.capacity_changed == 1 and unit.size == 4 << 20
    assert C.load_config(path).target(T1).lun(0).size == 4 << 20
    with pytest.raises(AdminError, match="--force"):
        await daemon.lun_resize(T1, 0, "1M")
    assert unit.size == 4 << 20
    await daemon.lun_resize(T1, 0, "1M", force=True)
    assert unit.size == 1 << 20


async def test_failed_open_rolls_back_memory_and_file(env, tmp_path):
    daemon, provider, server, path = await started(env)
    before_file = path.read_bytes()
    before_cfg = C.dumps(daemon.config)
    provider.fail_paths.add("bad.img")
    with pytest.raises(DaemonError, match="cannot open"):
        await daemon.lun_add(T1, str(tmp_path / "bad.img"), size="1M")
    assert path.read_bytes() == before_file
    assert C.dumps(daemon.config) == before_cfg
    assert 2 not in daemon.find_target(T1).units


async def test_failed_save_rolls_back_everything(env, tmp_path, monkeypatch):
    daemon, provider, server, path = await started(env)
    before_file = path.read_bytes()
    before_cfg = C.dumps(daemon.config)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(C, "save_config", disk_full)
    with pytest.raises(DaemonError, match="No space left on device; nothing was changed"):
        await daemon.lun_add(T1, str(tmp_path / "n.img"), size="1M")
    with pytest.raises(DaemonError):
        await daemon.portal_add(T1, "127.0.0.9:3262")
    unit = daemon.find_target(T1).units[0]
    with pytest.raises(DaemonError):
        await daemon.lun_resize(T1, 0, "8M")
    assert unit.size == 1 << 20  # resize undone
    assert path.read_bytes() == before_file
    assert C.dumps(daemon.config) == before_cfg
    assert provider.closed and provider.closed[-1].image.name == "n.img"
    assert ("127.0.0.9", 3262) not in server.portals  # bound, then unbound again


async def test_invalid_change_is_refused_before_anything_happens(env):
    daemon, provider, server, path = await started(env)
    opened = len(provider.opened)
    with pytest.raises(ConfigError, match="already used by"):
        await daemon.lun_add(T2, "a.img", size="1M")  # same image as T1 LUN 0
    with pytest.raises(ConfigError, match="12"):
        await daemon.chap_set("target", "u", "short", iqn=T1)
    with pytest.raises(AdminError, match="no target"):
        await daemon.lun_add("iqn.2026-11.org.example:none", "x.img", size="1M")
    assert len(provider.opened) == opened


async def test_concurrent_changes_are_serialized(env, tmp_path):
    daemon, provider, server, path = await started(env)
    results = await asyncio.gather(
        *(daemon.lun_add(T2, str(tmp_path / f"c{i}.img"), size="1M") for i in range(10))
    )
    numbers = sorted(r["lun"] for r in results)
    assert numbers == list(range(1, 11))
    assert [l.number for l in C.load_config(path).target(T2).luns] == list(range(0, 11))


async def test_portal_add_remove_binds_and_unbinds(env):
    daemon, provider, server, path = await started(env)
    res = await daemon.portal_add(T2, "127.0.0.1:3262")
    assert res["tag"] == 2
    assert ("127.0.0.1", 3262) in server.portals
    assert daemon.find_target(T2).portal_group_tag("127.0.0.1", 3262) == 2
    await daemon.portal_remove(T2, "127.0.0.1:3262")
    assert ("127.0.0.1", 3262) not in server.portals
    # a portal shared by two targets stays bound until the last one lets go
    await daemon.portal_add(T2, "127.0.0.1:3260", tag=1)
    await daemon.portal_remove(T1, "127.0.0.1:3260")
    assert ("127.0.0.1", 3260) in server.portals
    assert [p["portal"] for p in await daemon.portal_list(T2)] == ["0.0.0.0:3261", "127.0.0.1:3260"]


async def test_acl_remove_logs_that_initiator_out(env):
    daemon, provider, server, path = await started(env)
    server.session_rows = [
        {"target": T1, "initiator": H2.upper().replace("IQN", "iqn"), "isid": "1", "tsih": 1},
        {"target": T1, "initiator": H1, "isid": "2", "tsih": 2},
    ]
    await daemon.acl_remove(T1, H2)
    assert server.dropped == [(T1, H2.upper().replace("IQN", "iqn"))]
    assert daemon.find_target(T1).authorize(H2) is None


async def test_closing_open_access_logs_out_initiators_without_acl(env):
    daemon, provider, server, path = await started(env)
    await daemon.acl_add(T2, H1)
    server.session_rows = [{"target": T2, "initiator": H1}, {"target": T2, "initiator": H3}]
    await daemon.target_set(T2, open_access=False)
    assert server.dropped == [(T2, H3)]
    assert daemon.find_target(T2).authorize(H3) is None
    assert daemon.find_target(T2).authorize(H1) is not None


async def test_target_remove_needs_force_when_busy(env):
    daemon, provider, server, path = await started(env)
    server.session_rows = [{"target": T2, "initiator": H3}]
    with pytest.raises(AdminError, match="1 session"):
        await daemon.target_remove(T2)
    await daemon.target_remove(T2, force=True)
    assert server.dropped == [(T2, None)]
    assert daemon.find_target(T2) is None
    assert ("0.0.0.0", 3261) not in server.portals
    assert C.load_config(path).target(T2) is None


async def test_target_add_defaults_to_loopback(env):
    daemon, provider, server, path = await started(env)
    await daemon.target_add("iqn.2026-11.org.example:T3", alias="three")
    t = C.load_config(path).target("iqn.2026-11.org.example:t3")
    assert t.portal_groups == [PortalGroup(1, ["127.0.0.1:3260"])]
    assert not t.open_access
    with pytest.raises(AdminError, match="already exists"):
        await daemon.target_add("iqn.2026-11.org.example:t3")


async def test_params_set_and_clear(env):
    daemon, provider, server, path = await started(env)
    await daemon.target_set(T2, params={"header_digest": "crc32c"})
    assert daemon.find_target(T2).authorize(H3).params == {"HeaderDigest": "CRC32C"}
    await daemon.target_set(T2, clear_params=["HeaderDigest"])
    assert daemon.find_target(T2).authorize(H3).params == {}


async def test_quick_start_daemon_changes_in_memory_only(tmp_path):
    cfg = base_config(tmp_path)
    d = TargetDaemon(cfg, None, provider=FakeProvider(), server_factory=FakeServer)
    await d.start()
    await d.lun_add(T2, str(tmp_path / "q.img"), size="1M")
    assert d.find_target(T2).units[1] is not None
    assert not list(tmp_path.glob("*.json"))
    with pytest.raises(AdminError, match="quick start"):
        await d.reload()
    await d.stop()


# ------------------------------------------------------------------ reload


async def test_reload_applies_the_file_difference(env, tmp_path):
    daemon, provider, server, path = await started(env)
    edited = C.load_config(path)
    edited.targets.append(Target("iqn.2026-11.org.example:t9", portal_groups=[PortalGroup(1, ["127.0.0.1:3300"])],
                                 luns=[Lun(0, "z.img", 1 << 20)], open_access=True))
    edited.target(T1).luns.pop()  # drop LUN 1 ...
    edited.target(T1).acl(H1).lun_map = {}  # ... and the mapping that used it
    C.save_config(edited, path)
    await daemon.reload()
    assert daemon.find_target("iqn.2026-11.org.example:t9") is not None
    assert ("127.0.0.1", 3300) in server.portals
    assert 1 not in daemon.find_target(T1).units


async def test_reload_of_a_broken_file_keeps_the_running_config(env):
    daemon, provider, server, path = await started(env)
    before = C.dumps(daemon.config)
    data = json.loads(path.read_text())
    data["targets"][0]["luns"][0]["block_size"] = 1234
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"targets\[0\].*luns\[0\].*block_size"):
        await daemon.reload()
    assert C.dumps(daemon.config) == before
    await daemon.reload_quietly()  # the SIGHUP path logs instead of raising
    assert C.dumps(daemon.config) == before


# ------------------------------------------------------------------ no secrets out


async def test_no_secret_in_status_lists_config_show_or_logs(env, caplog):
    caplog.set_level(logging.DEBUG)
    daemon, provider, server, path = await started(env)
    await daemon.chap_set("discovery", "disc", DISC)
    await daemon.chap_set("acl", "h2", "acl2-secret-00000", iqn=T1, initiator=H2,
                          mutual_username="tgt", mutual_secret="acl2-mutual-0000")
    server.session_rows = [{"target": T1, "initiator": H1, "connections": [{"params": {"CHAP_secret": "leak"}}]}]
    outputs = [
        await daemon.status(),
        await daemon.config_show(),
        await daemon.target_list(),
        await daemon.acl_list(),
        await daemon.lun_list(),
        await daemon.portal_list(),
    ]
    text = json.dumps(outputs) + caplog.text
    for secret in (SECRET, ACL_SECRET, MUTUAL, DISC, "acl2-secret-00000", "acl2-mutual-0000", "leak"):
        assert secret not in text
    assert SECRET in path.read_text()  # persisted, for the daemon only


async def test_handle_request_checks_op_and_args(env):
    daemon, *_ = await started(env)
    with pytest.raises(AdminError, match="unknown operation"):
        await daemon.handle_request("frob", {})
    with pytest.raises(AdminError, match="lun.add"):
        await daemon.handle_request("lun.add", {"iqn": T1, "colour": "red"})
    rows = await daemon.handle_request("lun.list", {"iqn": T1})
    assert [r["lun"] for r in rows] == [0, 1]


# ------------------------------------------------------------------ signals


async def test_sighup_reloads_and_sigterm_stops_cleanly(env):
    import os
    import signal

    daemon, provider, servers, path = env
    task = asyncio.create_task(daemon.run())
    for _ in range(100):
        if daemon._running:
            break
        await asyncio.sleep(0.01)
    assert daemon._running
    edited = C.load_config(path)
    edited.targets[1].alias = "after-hup"
    C.save_config(edited, path)
    os.kill(os.getpid(), signal.SIGHUP)
    for _ in range(100):
        if daemon.find_target(T2).alias == "after-hup":
            break
        await asyncio.sleep(0.01)
    assert daemon.find_target(T2).alias == "after-hup"
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(task, 5)
    assert servers[0].shut_down
    assert len(provider.closed) == len(provider.opened) == 3
    assert all(u.backstore.flushed for u in provider.closed)
