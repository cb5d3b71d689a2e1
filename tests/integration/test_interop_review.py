"""A new admin's review: real clients against a running daemon, and the mistakes admins make.

Each test pins one finding of that review (a traceback, a misleading message, a client that
breaks): the daemon runs in a thread (tests/threaded_daemon.py) with its real iSCSI server on
free loopback ports, or ``iscsi-target`` runs in-process through click's runner; clients are
libiscsi's tools and qemu. A test whose client tool is missing skips with the package name.
"""
from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from iscsi.backstore.file import FileBackstore
from iscsi.target import cli as CLI
from iscsi.target import config as C
from iscsi.target.config import ConfigError, Lun, PortalGroup, Target
from tests.cli_checks import one_line_error

from ..threaded_daemon import ThreadedDaemon
from .conftest import require, require_qemu_iscsi

T = "iqn.2026-11.org.example:review"
MIB = 1 << 20
#: Bound on one client command in these tests (they move a few MiB at most).
CLIENT_TIMEOUT = 60


def _free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _ipv6_loopback() -> bool:
    try:
        _free_port("::1")
        return True
    except OSError:
        return False


def cli(*args: str):
    return CliRunner().invoke(CLI.main, list(args), catch_exceptions=False)



def client(cmd: list[str], *, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=CLIENT_TIMEOUT,
                         stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return res


class Daemon(ThreadedDaemon):
    """A real daemon (real server, real images) on free loopback ports, in a thread."""

    def __init__(self, tmp: Path, targets: list[Target]) -> None:
        self.tmp = tmp
        super().__init__(C.Config(data_dir=str(tmp), targets=targets), tmp / "target.json", prefix="ir")

    def cli(self, *args: str):
        return cli("--control", str(self.ctl), *args)


def _target(portals: list[str], luns: list[Lun], **kw) -> Target:
    return Target(iqn=kw.pop("iqn", T), portal_groups=[PortalGroup(1, portals)], luns=luns,
                  open_access=kw.pop("open_access", True), **kw)


@pytest.fixture
def busy_portal():
    """A portal some other socket listens on: a config that passes by mistake fails at once
    ('cannot listen') instead of serving until the test times out."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield f"127.0.0.1:{busy.getsockname()[1]}"


@pytest.fixture
def daemon(tmp_path):
    port = _free_port()
    with Daemon(tmp_path, [_target([f"127.0.0.1:{port}"], [Lun(0, "l0.img", 4 * MIB)])]) as d:
        d.portal = f"127.0.0.1:{port}"
        yield d


# --------------------------------------------------------------------------- huge sizes


@pytest.mark.parametrize("size", ["8E", "100E", "9223372036854775808"])
def test_a_lun_bigger_than_a_linux_file_is_a_config_error_not_a_traceback(tmp_path, size):
    r = cli("--control", str(tmp_path / "c.sock"), "serve", "--data-dir", str(tmp_path / "data"),
            "--target", T, "--lun", f"{tmp_path}/huge.img:{size}", "--portal", f"127.0.0.1:{_free_port()}")
    assert r.exit_code == 1
    one_line_error(r.output, "8EiB")
    assert not (tmp_path / "huge.img").exists()


def test_lun_add_and_resize_past_a_linux_file_name_the_limit(daemon, tmp_path):
    before = daemon.path.read_text()
    r = daemon.cli("lun", "add", T, f"{tmp_path}/huge.img:9E")
    assert r.exit_code == 1
    one_line_error(r.output, "8EiB")
    assert not (tmp_path / "huge.img").exists()
    r = daemon.cli("lun", "resize", T, "0", "100E")
    assert r.exit_code == 1
    one_line_error(r.output, "8EiB")
    assert daemon.path.read_text() == before
    assert daemon.raw({"op": "status", "args": {}})["ok"] is True


def test_a_config_file_with_a_huge_size_names_the_entry(tmp_path, busy_portal):
    (tmp_path / "a.img").write_bytes(bytes(MIB))  # exists: the daemon would grow it to the config's size
    cfg = {"version": 1, "targets": [{"iqn": T, "portal_groups": [{"tag": 1, "portals": [busy_portal]}],
                                      "luns": [{"number": 0, "path": str(tmp_path / "a.img"), "size": 2**70}]}]}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    path.chmod(0o600)
    r = cli("--control", str(tmp_path / "c.sock"), "serve", "--config", str(path))
    assert r.exit_code == 1
    one_line_error(r.output, "luns[0]", "8EiB")
    assert (tmp_path / "a.img").stat().st_size == MIB


def test_an_image_that_cannot_be_made_its_size_is_not_left_behind_empty(tmp_path, monkeypatch):
    """ftruncate fails with EFBIG past the filesystem's largest file (16 TiB on ext4)."""
    def too_big(fd, size):
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(os, "ftruncate", too_big)
    with pytest.raises(OSError, match="File too large"):
        FileBackstore(tmp_path / "new.img", size=64 << 40)
    assert not (tmp_path / "new.img").exists()
    # An image that was there already is never removed.
    (tmp_path / "old.img").write_bytes(b"")
    with pytest.raises(OSError):
        FileBackstore(tmp_path / "old.img", size=64 << 40, create=True)
    assert (tmp_path / "old.img").exists()


def test_an_image_too_big_for_its_filesystem_says_so_not_cannot_open(daemon, tmp_path, monkeypatch):
    def too_big(fd, size):
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(os, "ftruncate", too_big)  # what ext4 answers past 16 TiB
    r = daemon.cli("lun", "add", T, f"{tmp_path}/big.img:64T")
    assert r.exit_code == 1
    line = one_line_error(r.output, f"{T} LUN 1", "cannot make", "64TiB", "File too large")
    assert "cannot open" not in line
    assert not (tmp_path / "big.img").exists()


def test_an_image_in_a_directory_nobody_may_create_in_gets_no_read_only_hint(daemon):
    """/sys refuses new files to root and users alike (EACCES); :ro cannot help a missing image."""
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no sysfs at /sys")
    r = daemon.cli("lun", "add", T, "/sys/sanstack-review.img:1M")
    assert r.exit_code == 1
    line = one_line_error(r.output, "/sys/sanstack-review.img", "cannot be created", "writable")
    assert ":ro" not in line and "read-only" not in line


# --------------------------------------------------------------------------- LUN specs and paths


@pytest.mark.parametrize("tail, bad", [
    ("readonly:8M", "readonly"),   # was: a writable LUN on an image named "q.img:readonly"
    ("8M:readonly", "readonly"),   # was: "image q.img:8M:readonly does not exist"
    ("size=8M", "size=8M"),
    ("8M:blocksize=4096", "blocksize=4096"),
])
def test_a_mistyped_lun_option_is_refused_not_made_part_of_the_file_name(daemon, tmp_path, tail, bad):
    spec = f"{tmp_path}/q.img:{tail}"
    with pytest.raises(ConfigError, match=f"'{bad}' is not a LUN option"):
        C.parse_lun_spec(spec)
    before = daemon.path.read_text()
    r = daemon.cli("lun", "add", T, spec)
    assert r.exit_code != 0
    assert "is not a LUN option" in r.output and "ro," in r.output, r.output
    assert "Traceback" not in r.output
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("q.img")] == []
    assert daemon.path.read_text() == before


def test_lun_specs_with_colons_in_real_file_names_still_parse():
    assert C.parse_lun_spec("/x/a:b.img:512M:ro").path == "/x/a:b.img"
    assert C.parse_lun_spec("/d/img:2026-01-01.img").path == "/d/img:2026-01-01.img"
    assert C.parse_lun_spec("/d/a.img:readonly").path == "/d/a.img:readonly"  # no option: a name


def test_a_path_with_a_nul_byte_is_refused_by_name(daemon, tmp_path, busy_portal):
    cfg = {"version": 1, "targets": [{"iqn": T, "portal_groups": [{"tag": 1, "portals": [busy_portal]}],
                                      "luns": [{"number": 0, "path": "a\u0000.img", "size": MIB}]}]}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    path.chmod(0o600)
    r = cli("--control", str(tmp_path / "c.sock"), "serve", "--config", str(path))
    assert r.exit_code == 1
    one_line_error(r.output, "luns[0]", "NUL")
    res = daemon.raw({"op": "lun.add", "args": {"iqn": T, "path": f"{tmp_path}/b\u0000.img", "size": MIB}})
    assert res["ok"] is False and "NUL" in res["error"] and "internal error" not in res["error"], res
    assert daemon.raw({"op": "status", "args": {}})["ok"] is True


# --------------------------------------------------------------------------- login refusals in the log


def test_an_acl_refusal_logs_the_target_and_a_bracketed_ipv6_portal(tmp_path, caplog):
    """The admin greps the log for the target an initiator was refused from; '::1:3260' does
    not parse back as a portal."""
    require("iscsi-inq")
    if not _ipv6_loopback():
        pytest.skip("no IPv6 loopback")
    port = _free_port("::1")
    caplog.set_level(logging.INFO)
    with Daemon(tmp_path, [_target([f"[::1]:{port}"], [Lun(0, "l0.img", MIB)], open_access=False)]):
        res = client(["iscsi-inq", "-i", "iqn.2026-11.org.example:stranger", f"iscsi://[::1]:{port}/{T}/0"],
                     check=False)
    assert res.returncode != 0 and "Authorization failure" in res.stdout + res.stderr
    refused = [r.getMessage() for r in caplog.records if "login.failed" in r.getMessage()]
    assert refused, caplog.text
    assert f"target={T}" in refused[0] and f"portal=[::1]:{port}" in refused[0], refused[0]


def test_a_login_over_ipv6_logs_bracketed_peer_and_portal(tmp_path, caplog):
    """login.ok names both ends as portals an admin can paste: [::1]:port, not ::1:port."""
    require("iscsi-inq")
    if not _ipv6_loopback():
        pytest.skip("no IPv6 loopback")
    port = _free_port("::1")
    caplog.set_level(logging.INFO)
    with Daemon(tmp_path, [_target([f"[::1]:{port}"], [Lun(0, "l0.img", MIB)])]):
        client(["iscsi-inq", f"iscsi://[::1]:{port}/{T}/0"])
    ok = [r.getMessage() for r in caplog.records if "login.ok" in r.getMessage()]
    assert ok, caplog.text
    assert "peer=[::1]:" in ok[0] and f"portal=[::1]:{port}" in ok[0], ok[0]


# --------------------------------------------------------------------------- qemu on a 4 KiB-block LUN


def test_qemu_reads_an_unwritten_range_of_a_4k_block_lun(tmp_path):
    require("qemu-io")
    require_qemu_iscsi()
    port = _free_port()
    with Daemon(tmp_path, [_target([f"127.0.0.1:{port}"], [Lun(0, "l0.img", 32 * MIB, block_size=4096)])]):
        res = client(["qemu-io", "-f", "raw", "-c", "read 8M 1M", f"iscsi://127.0.0.1:{port}/{T}/0"], check=False)
    assert res.returncode == 0 and "read 1048576/1048576 bytes" in res.stdout, res.stdout + res.stderr


# --------------------------------------------------------------------------- portals that cannot be bound


def test_a_busy_port_says_what_may_hold_it_without_python_tuples(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = cli("--control", str(tmp_path / "c.sock"), "serve", "--data-dir", str(tmp_path / "data"),
                "--target", T, "--lun", f"{tmp_path}/x.img:1M", "--portal", f"127.0.0.1:{port}")
    assert r.exit_code == 1
    line = one_line_error(r.output, f"cannot listen on 127.0.0.1:{port}", "address already in use", "iscsi-target")
    assert "('127.0.0.1'" not in line


def test_a_portal_on_an_address_this_host_lacks_is_named_so(daemon):
    if Path("/proc/sys/net/ipv4/ip_nonlocal_bind").read_text().strip() != "0":
        pytest.skip("ip_nonlocal_bind is on: any address binds")
    r = daemon.cli("portal", "add", T, "192.0.2.1:3260")  # TEST-NET-1 (RFC 5737): never local
    assert r.exit_code == 1
    line = one_line_error(r.output, "192.0.2.1:3260", "no network interface")
    assert "('192.0.2.1'" not in line
    assert "192.0.2.1" not in daemon.path.read_text()


# --------------------------------------------------------------------------- a full filesystem


def test_a_write_the_full_filesystem_refuses_reports_space_allocation_failed(tmp_path, monkeypatch):
    pytest.importorskip("tools.libiscsi")
    from tools.libiscsi import CheckCondition, Session, load

    try:
        load()
    except OSError as e:
        pytest.skip(f"libiscsi shared library missing ({e}; apt-get install libiscsi-bin)")

    def disk_full(self, offset, data, fua=False):
        raise OSError(errno.ENOSPC, "No space left on device", self.path)

    port = _free_port()
    with Daemon(tmp_path, [_target([f"127.0.0.1:{port}"], [Lun(0, "l0.img", 4 * MIB)])]):
        with Session(f"127.0.0.1:{port}", T, 0) as s:
            s.test_unit_ready()
            monkeypatch.setattr(FileBackstore, "write", disk_full)
            with pytest.raises(CheckCondition) as e:
                s.write16(8, b"x" * 4096)
    assert (e.value.sense_key, e.value.ascq) == (0x07, 0x2707), str(e.value)


# --------------------------------------------------------------------------- what the tables show


def test_lun_list_shows_a_lun_an_initiator_write_protected(daemon):
    """After ``iscsi-swp -s on`` every write fails with DATA PROTECT; the table said 'rw'."""
    require("iscsi-swp")
    url = f"iscsi://{daemon.portal}/{T}/0"
    client(["iscsi-swp", "-s", "on", url])
    rows = json.loads(daemon.cli("lun", "list", "--json").output)
    assert rows[0]["swp"] is True
    table = daemon.cli("lun", "list").output
    assert "rw,swp" in table and "write protect" in table, table
    client(["iscsi-swp", "-s", "off", url])
    table = daemon.cli("lun", "list").output
    assert "swp" not in table, table


def test_lun_list_shows_a_removable_lun_whose_medium_an_initiator_ejected(tmp_path):
    from tools.libiscsi import Session, load

    try:
        lib = load()
    except OSError as e:
        pytest.skip(f"libiscsi shared library missing ({e}; apt-get install libiscsi-bin)")
    stop = lib.iscsi_startstopunit_sync  # (ctx, lun, immed, pcm, pc, no_flush, loej, start)
    stop.restype, stop.argtypes = load().iscsi_testunitready_sync.restype, [ctypes.c_void_p] + [ctypes.c_int] * 7
    port = _free_port()
    with Daemon(tmp_path, [_target([f"127.0.0.1:{port}"], [Lun(0, "l0.img", MIB, removable=True)])]) as d:
        with Session(f"127.0.0.1:{port}", T, 0) as s:
            s._run(stop(s._ctx, 0, 0, 0, 0, 0, 1, 0))  # LOEJ=1, START=0: eject
            table = d.cli("lun", "list").output
            assert "rw,removable,ejected" in table and "NOT READY" in table, table
            s._run(stop(s._ctx, 0, 0, 0, 0, 0, 1, 1))  # load
            assert "ejected" not in d.cli("lun", "list").output


def test_portal_remove_says_the_connections_through_it_go_on(tmp_path):
    from tools.libiscsi import Session

    p1, p2 = _free_port(), _free_port()
    with Daemon(tmp_path, [_target([f"127.0.0.1:{p1}", f"127.0.0.1:{p2}"], [Lun(0, "l0.img", MIB)])]) as d:
        with Session(f"127.0.0.1:{p2}", T, 0) as s:
            r = d.cli("portal", "remove", T, f"127.0.0.1:{p2}")
            assert r.exit_code == 0, r.output
            assert f"1 connection(s) to {T} made through 127.0.0.1:{p2} stay logged in" in r.output, r.output
            s.test_unit_ready()  # and it does go on
        r = d.cli("portal", "remove", T, f"127.0.0.1:{p1}")
        assert "connection(s)" not in r.output, r.output


@pytest.mark.parametrize("size, words", [("0", "above 0"), ("4000001", "not whole 512-byte blocks")])
def test_a_resize_no_force_can_make_valid_does_not_suggest_force(daemon, size, words):
    before = daemon.path.read_text()
    for force in ((), ("--force",)):
        r = daemon.cli("lun", "resize", *force, T, "0", size)
        assert r.exit_code == 1
        line = one_line_error(r.output, f"{T} LUN 0", words)
        assert "--force" not in line and "targets[0]" not in line, line
    assert daemon.path.read_text() == before


def test_access_params_and_chap_changes_tell_what_happens_to_logged_in_sessions(tmp_path):
    from tools.libiscsi import Session

    good, other = "iqn.2026-11.org.example:good", "iqn.2026-11.org.example:other"
    port = _free_port()
    target = _target([f"127.0.0.1:{port}"], [Lun(0, "l0.img", MIB)], acls=[C.Acl(good)])
    secret = tmp_path / "secret"
    secret.write_text("a-fine-chap-secret\n")
    with Daemon(tmp_path, [target]) as d:
        dropped = Session(f"127.0.0.1:{port}", T, 0, initiator=other, timeout=5).connect()
        try:
            with Session(f"127.0.0.1:{port}", T, 0, initiator=good, timeout=5) as kept:
                r = d.cli("target", "set", "--no-open-access", T)
                assert r.exit_code == 0, r.output
                assert "1 session(s) of initiators without an ACL were logged out" in r.output, r.output
                r = d.cli("target", "set", "--param", "MaxBurstLength=65536", T)
                assert "1 session(s) keep the parameters they negotiated" in r.output, r.output
                r = d.cli("chap", "set", "--target", T, "--username", "u", "--secret-file", str(secret))
                assert r.exit_code == 0, r.output
                assert "1 session(s) logged in before stay logged in" in r.output, r.output
                kept.test_unit_ready()
                sessions = d.raw({"op": "status", "args": {}})["result"]["sessions"]
                assert [s["initiator"] for s in sessions] == [good]
        finally:
            dropped.close(logout=False)  # its connection is gone: no logout, no reconnect


def test_acl_add_with_one_acl_lun_mapped_twice_is_refused(tmp_path):
    port = _free_port()
    target = _target([f"127.0.0.1:{port}"], [Lun(0, "l0.img", MIB), Lun(1, "l1.img", MIB)], open_access=False)
    with Daemon(tmp_path, [target]) as d:
        before = d.path.read_text()
        for maps in (("0=0", "0=1"), ("0=0", "00=1")):
            r = d.cli("acl", "add", *(f"--map={m}" for m in maps), T, "iqn.2026-11.org.example:i")
            assert r.exit_code != 0, r.output
            assert "ACL LUN 0 is given twice" in r.output, r.output
        res = d.raw({"op": "acl.add", "args": {"iqn": T, "initiator": "iqn.2026-11.org.example:i",
                                               "lun_map": {"0": 0, "00": 1}}})
        assert res["ok"] is False and "twice" in res["error"], res
        assert d.path.read_text() == before


# --------------------------------------------------------------------------- hand-edited config files


def _serve_config(tmp: Path, text: str):
    path = tmp / "c.json"
    path.write_text(text)
    path.chmod(0o600)
    return cli("--control", str(tmp / "c.sock"), "serve", "--config", str(path))


def test_a_config_key_given_twice_is_refused_not_last_one_wins(tmp_path, busy_portal):
    """The admin adds "read_only": true above the generated "read_only": false."""
    text = ('{"version": 1, "targets": [{"iqn": "%s", "portal_groups": [{"tag": 1, "portals": ["%s"]}],'
            ' "luns": [{"number": 0, "path": "a.img", "size": 1048576, "read_only": true, "read_only": false}]}]}'
            % (T, busy_portal))
    r = _serve_config(tmp_path, text)
    assert r.exit_code == 1
    one_line_error(r.output, "'read_only' appears twice")
    assert not (tmp_path / "a.img").exists()


def test_a_config_lun_map_naming_one_acl_lun_twice_is_refused(tmp_path, busy_portal):
    text = json.dumps({"version": 1, "targets": [{
        "iqn": T, "portal_groups": [{"tag": 1, "portals": [busy_portal]}],
        "luns": [{"number": 0, "path": "a.img", "size": MIB}, {"number": 1, "path": "b.img", "size": MIB}],
        "acls": [{"initiator": "iqn.2026-11.org.example:i", "lun_map": {"0": 0, "00": 1}}]}]})
    r = _serve_config(tmp_path, text)
    assert r.exit_code == 1
    one_line_error(r.output, "acls[0]", "lun_map", "twice")


# --------------------------------------------------------------------------- SendTargets


def test_send_targets_offers_wildcard_portals_only_in_their_own_family():
    """Found with iscsi-ls --url: discovery through 127.0.0.1 listed 127.0.0.1:P for a [::]:P
    portal, which (IPV6_V6ONLY) never answers there; and [::1]:Q for a 0.0.0.0:Q portal."""
    from iscsi.target.daemon import TargetRuntime

    rt = TargetRuntime(Target(iqn=T, portal_groups=[
        PortalGroup(1, ["127.0.0.1:3260", "[::1]:3260"]), PortalGroup(2, ["0.0.0.0:3261"]),
        PortalGroup(3, ["[::]:3262"])]))
    assert rt.addresses("127.0.0.1") == ["127.0.0.1:3260,1", "[::1]:3260,1", "127.0.0.1:3261,2"]
    assert rt.addresses("::1") == ["127.0.0.1:3260,1", "[::1]:3260,1", "[::1]:3262,3"]


class QuickStartDaemon(ThreadedDaemon):
    """What ``serve --target --lun`` runs: a daemon without a config file behind it."""

    def _main(self) -> None:
        import asyncio

        from iscsi.target.daemon import TargetDaemon

        asyncio.set_event_loop(self.loop)
        self.daemon = TargetDaemon(C.load_config(self.path), None, control_path=self.ctl)
        self.loop.run_until_complete(self.daemon.start())
        self.ready.set()
        self.loop.run_until_complete(self.daemon._stop.wait())
        self.loop.run_until_complete(self.daemon.stop())


def test_a_change_to_a_quick_start_daemon_says_it_is_not_saved(tmp_path):
    cfg = CLI.quickstart_config(T, [f"{tmp_path}/q0.img:1M"], [f"127.0.0.1:{_free_port()}"])
    with QuickStartDaemon(cfg, tmp_path / "only-read-at-start.json", prefix="irq") as d:
        r = cli("--control", str(d.ctl), "lun", "add", T, f"{tmp_path}/q1.img:1M")
        assert r.exit_code == 0, r.output
        assert "LUN 1 added" in r.output and "lasts until the daemon stops" in r.output, r.output
        r = cli("--control", str(d.ctl), "lun", "list")
        assert "lasts until" not in r.output  # only changes carry the note


# --------------------------------------------------------------------------- LU identity


def test_two_luns_with_one_serial_are_refused(tmp_path):
    """Both reported one NAA, one T10 id and one unit serial (found with iscsi-inq -e 1 -c 131):
    multipath takes two disks for two paths to one."""
    port = _free_port()
    t2 = "iqn.2026-11.org.example:review2"
    targets = [_target([f"127.0.0.1:{port}"], [Lun(0, "a.img", MIB, serial="SAME1")]),
               _target([f"127.0.0.1:{port}"], [Lun(0, "b.img", MIB)], iqn=t2)]
    with Daemon(tmp_path, targets) as d:
        before = d.path.read_text()
        r = d.cli("lun", "add", "--serial", "SAME1", t2, f"{tmp_path}/c.img:1M")
        assert r.exit_code == 1
        one_line_error(r.output, "SAME1", f"{T} LUN 0", "paths to one disk")
        taken = json.loads(d.cli("lun", "list", "--json", t2).output)[0]["serial"]  # a derived one
        r = d.cli("lun", "add", "--serial", taken, T, f"{tmp_path}/c.img:1M")
        assert r.exit_code == 1
        one_line_error(r.output, taken, "review2", "paths to one disk")
        assert d.path.read_text() == before
        assert not (tmp_path / "c.img").exists()


# --------------------------------------------------------------------------- the daemon's own log


def test_sigterm_is_logged_with_the_sessions_it_ends(tmp_path):
    import sys
    import time

    from tools.libiscsi import Session

    port = _free_port()
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(repo))
    ctl = Path(tempfile.mkdtemp(prefix="irs", dir="/tmp"))
    proc = subprocess.Popen([sys.executable, "-m", "iscsi.target", "--control", str(ctl / "c.sock"), "serve",
                             "--portal", f"127.0.0.1:{port}", "--target", T, "--lun", f"{tmp_path}/s.img:1M"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not (ctl / "c.sock").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
            time.sleep(0.05)
        s = Session(f"127.0.0.1:{port}", T, 0, timeout=5).connect()
        try:
            s.test_unit_ready()
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=30)
        finally:
            s.close(logout=False)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(ctl, ignore_errors=True)
    assert proc.returncode == 0, out
    stopping = [l for l in out.splitlines() if "daemon.stopping" in l]
    assert stopping and "signal=SIGTERM" in stopping[0] and "sessions=1" in stopping[0], out


def test_an_invalid_initiator_name_is_named_as_the_reason_not_a_missing_acl(daemon, caplog):
    """iscsi-inq -i foo against an open-access target: the log blamed the ACL it does not have."""
    require("iscsi-inq")
    caplog.set_level(logging.INFO)
    res = client(["iscsi-inq", "-i", "foo", f"iscsi://{daemon.portal}/{T}/0"], check=False)
    assert res.returncode != 0
    refused = [r.getMessage() for r in caplog.records if "login.failed" in r.getMessage()]
    assert refused and "InitiatorName refused" in refused[0] and "iqn." in refused[0], refused
    assert "ACL" not in refused[0]
