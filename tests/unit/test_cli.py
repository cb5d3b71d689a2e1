"""iscsi-target CLI: serve modes and their config, LUN specs, admin commands against a live daemon."""
from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from iscsi.target import cli as CLI
from iscsi.target import config as C
from iscsi.target.config import ConfigError
from iscsi.target.daemon import TargetDaemon

from ..threaded_daemon import ThreadedDaemon
from ._target_fakes import FakeProvider, FakeServer
from .test_target_daemon import H1, T1, T2, base_config

SECRET = "cli-secret-0123456"
MUTUAL = "cli-mutual-654321"


def run(*args, input=None, env=None):
    return CliRunner().invoke(CLI.main, list(args), input=input, env=env, catch_exceptions=False)


# ------------------------------------------------------------------ quick start config


def test_quickstart_one_portal_group_per_portal(tmp_path):
    cfg = CLI.quickstart_config(
        "iqn.2026-11.org.example:t1",
        [f"{tmp_path}/a.img:1G", f"{tmp_path}/b.img:512M:ro:bs=4096", f"{tmp_path}/c.img:10GiB:removable"],
        ["127.0.0.1:3261", "[::1]:3262"],
    )
    t = cfg.targets[0]
    assert [(g.tag, g.portals) for g in t.portal_groups] == [(1, ["127.0.0.1:3261"]), (2, ["[::1]:3262"])]
    assert [(l.number, l.size, l.block_size, l.read_only, l.removable) for l in t.luns] == [
        (0, 1 << 30, 512, False, False), (1, 512 << 20, 4096, True, False), (2, 10 << 30, 512, False, True)]
    assert t.open_access and t.chap is None and t.acls == []


def test_quickstart_defaults_and_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = CLI.quickstart_config("iqn.2026-11.org.example:t1", ["disk.img:1M", "other.img:1M:lun=5"], [])
    t = cfg.targets[0]
    assert t.portal_groups[0].portals == ["127.0.0.1:3260"]  # loopback unless told
    assert t.luns[0].path == str(tmp_path / "disk.img")
    assert [l.number for l in t.luns] == [0, 5]


def test_quickstart_needs_a_size_for_a_missing_image(tmp_path):
    with pytest.raises(ConfigError, match="add a size"):
        CLI.quickstart_config("iqn.2026-11.org.example:t1", [f"{tmp_path}/missing.img"], [])
    existing = tmp_path / "there.img"
    existing.write_bytes(bytes(4096))
    cfg = CLI.quickstart_config("iqn.2026-11.org.example:t1", [str(existing)], [])
    assert cfg.targets[0].luns[0].size is None


# ------------------------------------------------------------------ serve: usage and first run


@pytest.fixture
def captured(monkeypatch):
    """Replace TargetDaemon.run so `serve` returns with the daemon it would have run."""
    seen: list[TargetDaemon] = []

    async def fake_run(self):
        seen.append(self)

    monkeypatch.setattr(TargetDaemon, "run", fake_run)
    return seen


def test_serve_usage_errors_exit_2(tmp_path):
    (tmp_path / C.CONFIG_FILENAME).write_text("{}")  # a default form whose config exists: --portal is refused
    for args in (["serve", "--target", "iqn.2026-11.org.example:t1"],
                 ["serve", "--lun", "/x.img:1G"],
                 ["serve", "--config", "/x.json", "--target", "iqn.2026-11.org.example:t1", "--lun", "/x:1G"],
                 ["serve", "--config", "/x.json", "--portal", "127.0.0.1:3261"],
                 ["serve", "--data-dir", str(tmp_path), "--portal", "127.0.0.1:3261"]):
        r = run(*args)
        assert r.exit_code == 2, (args, r.output)


def test_serve_user_errors_are_one_line_exit_1(tmp_path, captured):
    r = run("serve", "--target", "target1", "--lun", f"{tmp_path}/a.img:1G")
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [r.output.strip()]
    assert "iqn., eui. or naa." in r.output and "Traceback" not in r.output
    r = run("serve", "--target", "iqn.2026-11.org.example:t1", "--lun", f"{tmp_path}/a.img:1000")
    assert r.exit_code == 1 and "multiple of the block size" in r.output
    r = run("serve", "--config", str(tmp_path / "nope.json"))
    assert r.exit_code == 1 and "no such config file" in r.output
    assert captured == []


def test_serve_quick_start_builds_the_daemon(tmp_path, captured):
    ctl = tmp_path / "c.sock"
    r = run("serve", "--portal", "127.0.0.1:3261", "--portal", "127.0.0.1:3262",
            "--target", "iqn.2026-11.org.example:t1", "--lun", f"{tmp_path}/disk.img:1G", "--control", str(ctl))
    assert r.exit_code == 0, r.output
    (d,) = captured
    assert d.config_path is None and d.control_path == ctl
    t = d.config.targets[0]
    assert t.iqn == "iqn.2026-11.org.example:t1" and [g.tag for g in t.portal_groups] == [1, 2]
    assert not list(tmp_path.glob("*.json"))  # quick start writes no config


def test_serve_first_run_writes_default_config_then_loads_it(tmp_path, captured):
    data = tmp_path / "data"
    r = run("serve", "--data-dir", str(data), "--control", str(tmp_path / "c.sock"))
    assert r.exit_code == 0, r.output
    path = data / "target.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    cfg = C.load_config(path)
    t = cfg.targets[0]
    assert t.iqn == CLI.DEFAULT_TARGET and t.open_access
    assert t.portal_groups[0].portals == ["127.0.0.1:3260"]
    assert (t.luns[0].path, t.luns[0].size) == ("lun0.img", 1 << 30)
    assert cfg.resolve_path(t.luns[0].path) == data / "lun0.img"
    assert captured[0].config_path == path
    # next start loads what is there (edited by the admin meanwhile)
    cfg.targets[0].alias = "edited"
    C.save_config(cfg, path)
    r = run("serve", "--data-dir", str(data), "--control", str(tmp_path / "c.sock"))
    assert r.exit_code == 0
    assert captured[1].config.targets[0].alias == "edited"


def test_serve_refuses_a_broken_config_loudly(tmp_path, captured):
    data = tmp_path / "data"
    data.mkdir()
    (data / "target.json").write_text('{"version": 1, "targets": [{"iqn": "iqn.2026-11.org.example:t1", '
                                      '"luns": [{"number": 0, "path": "x.img", "size": "1G", "block_size": 999}]}]}')
    r = run("serve", "--data-dir", str(data))
    assert r.exit_code == 1
    assert "luns[0]" in r.output and "block_size" in r.output and str(data / "target.json") in r.output
    assert captured == []


def test_default_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("SANSTACK_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("SANSTACK_CONTROL", str(tmp_path / "s.sock"))
    assert CLI.default_data_dir() == tmp_path / "d"
    assert CLI.default_control_path() == tmp_path / "s.sock"
    monkeypatch.delenv("SANSTACK_DATA_DIR")
    monkeypatch.delenv("SANSTACK_CONTROL")
    monkeypatch.setattr(CLI.os, "geteuid", lambda: 0)
    assert CLI.default_data_dir() == Path("/var/lib/sanstack")
    assert CLI.default_control_path() == Path("/run/sanstack/iscsi-target.sock")
    monkeypatch.setattr(CLI.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert CLI.default_data_dir() == tmp_path / "xdg" / "sanstack"
    assert CLI.default_control_path() == tmp_path / "xdg" / "sanstack" / "control.sock"


# ------------------------------------------------------------------ admin commands against a live daemon


class LiveDaemon(ThreadedDaemon):
    """A TargetDaemon with fake SCSI core and server, in its own thread and loop."""

    def __init__(self, tmp_path: Path) -> None:
        self.server: FakeServer | None = None
        super().__init__(base_config(tmp_path), tmp_path / "target.json", prefix="cli",
                         provider=FakeProvider(), server_factory=self._factory)

    def _factory(self, registry):
        self.server = FakeServer(registry)
        return self.server

    def cli(self, *args, input=None):
        return run(*args, "--control", str(self.ctl), input=input)


@pytest.fixture
def live(tmp_path):
    with LiveDaemon(tmp_path) as d:
        yield d


def test_no_daemon_exit_3_says_how_to_start(tmp_path):
    r = run("status", "--control", str(tmp_path / "none.sock"))
    assert r.exit_code == 3
    assert "iscsi-target serve" in r.output and "Traceback" not in r.output


def test_lun_add_list_resize_remove(live, tmp_path):
    r = live.cli("lun", "add", T2, f"{tmp_path}/n.img:2M:bs=4096")
    assert r.exit_code == 0, r.output
    assert "LUN 1 added" in r.output
    rows = json.loads(live.cli("lun", "list", T2, "--json").output)
    assert [(x["lun"], x["size"], x["block_size"]) for x in rows] == [(0, 1 << 20, 512), (1, 2 << 20, 4096)]
    table = live.cli("lun", "list", T2).output
    assert "2MiB" in table and "SERIAL" in table
    # USED: what the thin image has allocated, from the file itself.
    with open(tmp_path / "n.img", "r+b") as f:
        f.write(b"\x01" * (1 << 20))
        f.flush()
        os.fsync(f.fileno())
    row = json.loads(live.cli("lun", "list", T2, "--json").output)[1]
    assert (1 << 20) <= row["allocated"] <= (1 << 20) + (64 << 10) and row["fs_free"] > 0
    assert "1.0 MiB (50%)" in live.cli("lun", "list", T2).output
    r = live.cli("lun", "resize", T2, "1", "4M")
    assert r.exit_code == 0 and "2MiB -> 4MiB" in r.output
    r = live.cli("lun", "resize", T2, "1", "1M")
    assert r.exit_code == 1 and "--force" in r.output
    assert live.cli("lun", "remove", T2, "1").exit_code == 0
    assert [l.number for l in C.load_config(live.path).target(T2).luns] == [0]


def test_lun_add_resolves_relative_paths_on_the_client_side(live, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert live.cli("lun", "add", T2, "rel.img", "--size", "1M", "--read-only").exit_code == 0
    lun = C.load_config(live.path).target(T2).lun(1)
    assert lun.path == str(tmp_path / "rel.img") and lun.read_only


def test_target_and_portal_and_acl_commands(live):
    t3 = "iqn.2026-11.org.example:t3"
    assert live.cli("target", "add", t3, "--portal", "127.0.0.1:3270", "--portal", "[::1]:3270").exit_code == 0
    rows = json.loads(live.cli("portal", "list", t3, "--json").output)
    assert [(r["portal"], r["tag"]) for r in rows] == [("127.0.0.1:3270", 1), ("[::1]:3270", 2)]
    assert live.cli("portal", "add", t3, "127.0.0.2:3270", "--tpgt", "1").exit_code == 0
    assert live.cli("portal", "remove", t3, "[::1]:3270").exit_code == 0
    assert ("::1", 3270) not in live.server.portals
    assert live.cli("acl", "add", T2, H1, "--map", "0=0", "--param", "data_digest=crc32c").exit_code == 0
    acls = json.loads(live.cli("acl", "list", T2, "--json").output)
    assert acls == [{"target": T2, "initiator": H1, "lun_map": {"0": 0}, "chap": "none", "mutual_chap": False,
                     "params": {"DataDigest": "CRC32C"}}]
    r = live.cli("acl", "add", T2, H1)
    assert r.exit_code == 1 and "already has an ACL" in r.output
    assert live.cli("target", "set", t3, "--open-access", "--param", "HeaderDigest=CRC32C").exit_code == 0
    listing = live.cli("target", "list").output
    assert t3 in listing and "open" in listing
    r = live.cli("target", "set", t3, "--param", "HeaderDigest=MD5")
    assert r.exit_code == 1 and "HeaderDigest" in r.output
    assert live.cli("target", "remove", t3).exit_code == 0
    assert C.load_config(live.path).target(t3) is None


def test_chap_secret_from_prompt_is_not_echoed_and_never_shown(live, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    r = live.cli("chap", "set", "--target", T2, "--username", "u", "--mutual-username", "tgt",
                 input=f"{SECRET}\n{SECRET}\n{MUTUAL}\n{MUTUAL}\n")
    assert r.exit_code == 0, r.output
    assert SECRET not in r.output and MUTUAL not in r.output
    saved = C.load_config(live.path).target(T2).chap
    assert (saved.secret, saved.mutual_secret) == (SECRET, MUTUAL)
    for args in (["status"], ["status", "--json"], ["config", "show"], ["target", "list"], ["acl", "list"]):
        out = live.cli(*args).output
        assert SECRET not in out and MUTUAL not in out, args
    assert SECRET not in caplog.text and MUTUAL not in caplog.text
    assert live.cli("chap", "clear", "--target", T2).exit_code == 0
    assert C.load_config(live.path).target(T2).chap is None


def test_chap_secret_file_and_length_rule(live, tmp_path):
    short = tmp_path / "short"
    short.write_text("elevenbytes\n")
    r = live.cli("chap", "set", "--discovery", "--username", "d", "--secret-file", str(short))
    assert r.exit_code == 1 and "12 bytes" in r.output and "elevenbytes" not in r.output
    good = tmp_path / "good"
    good.write_text(SECRET + "\n")
    r = live.cli("chap", "set", "--discovery", "--username", "d", "--secret-file", str(good))
    assert r.exit_code == 0, r.output
    assert C.load_config(live.path).discovery_auth.secret == SECRET  # trailing newline dropped
    r = live.cli("chap", "set", "--target", T1, "--initiator", H1, "--username", "x", "--secret-file", "-",
                 input=SECRET)
    assert r.exit_code == 0, r.output
    assert C.load_config(live.path).target(T1).acl(H1).chap.username == "x"
    assert live.cli("chap", "set", "--username", "x", "--secret-file", str(good)).exit_code == 2


def test_status_renders_sessions_and_params(live):
    live.server.session_rows = [{
        "target": T1, "initiator": H1, "isid": "400001370000", "tsih": 3, "type": "Normal",
        "connections": [{"cid": 0, "peer": "127.0.0.1:40000", "local": "127.0.0.1:3260",
                         "params": {"HeaderDigest": "CRC32C", "MaxRecvDataSegmentLength": "262144"}}],
    }]
    out = live.cli("status").output
    assert "400001370000" in out and "127.0.0.1:40000 -> 127.0.0.1:3260" in out
    assert "HeaderDigest=CRC32C" in out and "MaxRecvDataSegmentLength=262144" in out
    st = json.loads(live.cli("status", "--json").output)
    assert st["sessions"][0]["tsih"] == 3 and st["config"] == str(live.path)


def test_config_show_is_masked_json_and_reload_works(live):
    shown = json.loads(live.cli("config", "show").output)
    assert shown["targets"][0]["chap"]["secret"] == "***"
    cfg = C.load_config(live.path)
    cfg.targets[1].alias = "from-file"
    C.save_config(cfg, live.path)
    r = live.cli("config", "reload")
    assert r.exit_code == 0 and "2 target(s)" in r.output
    assert json.loads(live.cli("config", "show").output)["targets"][1]["alias"] == "from-file"


def test_group_level_control_option(live):
    r = CliRunner().invoke(CLI.main, ["--control", str(live.ctl), "target", "list", "--json"])
    assert r.exit_code == 0 and {t["iqn"] for t in json.loads(r.output)} == {T1, T2}


def test_status_table_counts_luns_not_their_numbers():
    from iscsi.target.cli import _render_status

    st = {"config": None, "portals": ["127.0.0.1:3260"], "discovery_chap": False, "sessions": [],
          "targets": [{"iqn": "iqn.2026-11.org.x:t", "open_access": True, "chap": False, "mutual_chap": False,
                       "luns": [0], "acls": [], "sessions": 0}]}
    row = [line for line in _render_status(st).splitlines() if line.startswith("iqn.2026-11.org.x:t")][0]
    assert row.split()[1:3] == ["1", "(0)"]


def test_session_list_and_drop(live):
    rows = [{"target": T1, "initiator": H1, "isid": "400001370000", "tsih": 3, "type": "Normal",
             "stats": {"commands": 12, "rx_bytes": 1536, "tx_bytes": 5 << 20, "seconds": 9.0}},
            {"target": T1, "initiator": H1, "isid": "400001370001", "tsih": 4, "type": "Normal"},
            {"target": T2, "initiator": H1, "isid": "400001370002", "tsih": 5, "type": "Normal"}]
    live.server.session_rows = [dict(r) for r in rows]
    table = live.cli("session", "list", T1).output
    assert "CMDS" in table and "1.5 KiB" in table and "5.0 MiB" in table and T2 not in table
    assert [r["tsih"] for r in json.loads(live.cli("session", "list", "--json").output)] == [3, 4, 5]

    r = live.cli("session", "drop", T1)
    assert r.exit_code == 1 and "--all" in r.output and live.server.dropped == []
    r = live.cli("session", "drop", T1, "--all", "--tsih", "3")
    assert r.exit_code == 2
    r = live.cli("session", "drop", T1, "--tsih", "9")
    assert r.exit_code == 1 and "no session of TSIH 9" in r.output
    r = live.cli("session", "drop", T1, "--tsih", "3")
    assert r.exit_code == 0 and "1 session(s) dropped" in r.output, r.output
    assert live.server.dropped == [(T1, H1, 3)]
    r = live.cli("session", "drop", T1, "--initiator", H1.upper())  # names compare case-insensitively
    assert r.exit_code == 0 and "1 session(s) dropped" in r.output
    assert [s["tsih"] for s in live.server.session_rows] == [5]
    assert live.cli("session", "drop", "iqn.2026-11.org.example:none", "--all").exit_code == 1
    assert live.cli("session", "drop", T2, "--all").exit_code == 0
    assert live.cli("session", "list").output.strip() == "no sessions"
