"""The admin's view of ``iscsi-target``: odd inputs to ``serve`` and to the control commands.

Each case is what a storage admin new to sanstack (or a hostile one) may type; the
expectation is a one-line error naming the thing at fault, a non-zero exit code, no
traceback, no "internal error", a daemon that keeps serving and nothing half-applied.

The control commands run against a real :class:`TargetDaemon` with the real image
provider (sparse files, SCSI LUs) on a control socket in a temp dir; only the iSCSI
listener is a fake, so no port is bound.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from iscsi.target import cli as CLI
from iscsi.target import config as C
from iscsi.target.config import ConfigError, Lun, PortalGroup, Target
from iscsi.target.daemon import TargetDaemon
from tests.cli_checks import one_line_error

from ..threaded_daemon import ThreadedDaemon

REPO = Path(__file__).resolve().parents[2]
T = "iqn.2026-11.org.example:ux"
MIB = 1 << 20


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(CLI.main, list(args), input=input, catch_exceptions=False)



# --------------------------------------------------------------------------- fakes


class ListenerFake:
    """The iSCSI listener (iscsi.target.server.IscsiServer) without sockets."""

    def __init__(self, registry) -> None:
        self.portals: set[tuple[str, int]] = set()
        self.rows: list[dict] = []  # what status/sessions report

    async def add_portal(self, host: str, port: int) -> None:
        self.portals.add((host, port))

    async def remove_portal(self, host: str, port: int) -> None:
        self.portals.discard((host, port))

    def sessions(self) -> list[dict]:
        return list(self.rows)

    async def drop_sessions(self, target=None, initiator=None) -> None:
        pass

    async def shutdown(self) -> None:
        self.portals.clear()


def _config(tmp: Path) -> C.Config:
    t = Target(iqn=T, portal_groups=[PortalGroup(1, ["127.0.0.1:3260"])],
               luns=[Lun(number=0, path="l0.img", size=4 * MIB)], open_access=True)
    return C.Config(data_dir=str(tmp), targets=[t])


class Live(ThreadedDaemon):
    """A real TargetDaemon (real images) in a thread, its control socket in a temp dir."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        super().__init__(_config(tmp), tmp / "target.json", prefix="ux", server_factory=ListenerFake)

    def cli(self, *args: str, input: str | None = None):
        return run("--control", str(self.ctl), *args, input=input)

    def saved(self) -> str:
        return self.path.read_text()


@pytest.fixture
def live(tmp_path):
    with Live(tmp_path) as d:
        yield d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(tmp: Path, *args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    """``python -m iscsi.target serve ...`` that is expected to refuse to start."""
    env = dict(os.environ, PYTHONPATH=str(REPO), SANSTACK_DATA_DIR=str(tmp / "data"))
    ctl = Path(tempfile.mkdtemp(prefix="uxs", dir="/tmp"))
    try:
        return subprocess.run([sys.executable, "-m", "iscsi.target", "--control", str(ctl / "c.sock"), "serve", *args],
                              check=False, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    finally:
        shutil.rmtree(ctl, ignore_errors=True)


# --------------------------------------------------------------------------- serve: images


def test_serve_an_image_that_is_not_whole_blocks_is_aone_line_error(tmp_path):
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(1000))
    r = _serve(tmp_path, "--target", T, "--lun", str(odd), "--portal", "127.0.0.1:1")
    assert r.returncode == 1
    one_line_error(r.stderr, str(odd), "1000 bytes", "512")
    assert odd.stat().st_size == 1000  # untouched


def test_serve_a_character_device_is_refused_clearly(tmp_path):
    r = _serve(tmp_path, "--target", T, "--lun", "/dev/null", "--portal", "127.0.0.1:1")
    assert r.returncode == 1
    one_line_error(r.stderr, "/dev/null", "not a regular file")


async def test_an_empty_image_with_a_size_is_grown_like_a_missing_one(tmp_path):
    empty = tmp_path / "empty.img"
    empty.touch()
    cfg = CLI.quickstart_config(T, [f"{empty}:2M"], ["127.0.0.1:3260"])
    daemon = TargetDaemon(cfg, None, server_factory=ListenerFake)
    await daemon.start()
    try:
        assert daemon.find_target(T).units[0].size == 2 * MIB
        assert empty.stat().st_size == 2 * MIB
    finally:
        await daemon.stop()


async def test_an_empty_image_without_a_size_says_to_give_one(tmp_path):
    empty = tmp_path / "empty.img"
    empty.touch()
    cfg = CLI.quickstart_config(T, [str(empty)], ["127.0.0.1:3260"])
    daemon = TargetDaemon(cfg, None, server_factory=ListenerFake)
    with pytest.raises(ConfigError, match="is empty; give a size"):
        await daemon.start()


# --------------------------------------------------------------------------- serve: LUN specs


@pytest.mark.parametrize("suffix, words", [
    ("-1", "negative"),
    ("1,5G", "not understood"),
    ("10XB", "not understood"),
    ("1GiB:1M", "two sizes"),
])
def test_lun_spec_with_a_bad_size_is_refused_not_taken_as_a_file_name(tmp_path, suffix, words):
    spec = f"{tmp_path}/a.img:{suffix}"
    with pytest.raises(ConfigError, match=words):
        C.parse_lun_spec(spec)
    r = run("--control", str(tmp_path / "c.sock"), "serve", "--target", T, "--lun", spec)
    assert r.exit_code == 1
    one_line_error(r.output, words)
    assert list(tmp_path.iterdir()) == []  # no "a.img:1GiB" or "a.img:-1" created


def test_lun_spec_keeps_paths_with_a_colon_and_good_sizes(tmp_path):
    assert C.parse_lun_spec("/d/img:2026-01-01.img").path == "/d/img:2026-01-01.img"
    assert C.parse_lun_spec("/d/x.img:1.5G").size == 1536 * MIB


def test_unknown_lun_option_says_it_became_part_of_the_file_name(tmp_path):
    r = run("--control", str(tmp_path / "c.sock"), "serve", "--target", T, "--lun", f"{tmp_path}/a.img:readonly")
    assert r.exit_code == 1
    one_line_error(r.output, "'readonly' was taken as part of the file name", "ro,")


# --------------------------------------------------------------------------- serve: config files


def test_config_with_a_non_string_data_dir_is_a_config_error(tmp_path):
    cf = tmp_path / "t.json"
    cf.write_text(json.dumps({"version": 1, "data_dir": 5, "targets": [
        {"iqn": T, "luns": [{"number": 0, "path": "x.img", "size": "1M"}]}]}))
    with pytest.raises(ConfigError, match="data_dir"):
        C.load_config(cf)
    r = run("--control", str(tmp_path / "c.sock"), "serve", "--config", str(cf))
    assert r.exit_code == 1
    one_line_error(r.output, "data_dir")


def test_reload_of_a_bad_config_is_refused_and_the_old_one_stays(live, tmp_path):
    good = live.saved()
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(1000))
    for bad in ({**json.loads(good), "data_dir": 5},
                {**json.loads(good), "targets": [{**json.loads(good)["targets"][0], "luns": [
                    {"number": 0, "path": "l0.img", "size": 4 * MIB}, {"number": 1, "path": str(odd)}]}]}):
        live.path.write_text(json.dumps(bad))
        r = live.cli("config", "reload")
        assert r.exit_code == 1
        one_line_error(r.output)
    assert sorted(live.daemon.find_target(T).units) == [0]
    live.path.write_text(good)
    assert live.cli("config", "reload").exit_code == 0


# --------------------------------------------------------------------------- control commands


def test_lun_add_of_an_image_that_is_not_whole_blocks(live, tmp_path):
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(1000))
    before = live.saved()
    r = live.cli("lun", "add", T, str(odd))
    assert r.exit_code == 1
    one_line_error(r.output, "1000 bytes")
    assert live.saved() == before and sorted(live.daemon.find_target(T).units) == [0]


def test_lun_add_negative_number_is_a_usage_error(live, tmp_path):
    r = live.cli("lun", "add", T, f"{tmp_path}/n.img:1M", "--lun", "-5")
    assert r.exit_code == 2 and "0<=x<=16383" in r.output
    assert not (tmp_path / "n.img").exists() and sorted(live.daemon.find_target(T).units) == [0]


def test_resize_past_the_file_size_limit_names_the_lun_and_changes_nothing(live):
    before = live.saved()
    r = live.cli("lun", "resize", T, "0", "1E")
    assert r.exit_code == 1
    one_line_error(r.output, f"{T} LUN 0", "1EiB")
    assert "Errno" not in r.output
    assert live.saved() == before
    rows = json.loads(live.cli("lun", "list", "--json").output)
    assert rows[0]["size"] == 4 * MIB


def test_target_set_refuses_an_unknown_clear_param_and_contradictory_alias(live):
    r = live.cli("target", "set", T, "--clear-param", "HeaderDigets")
    assert r.exit_code == 1
    one_line_error(r.output, "unknown iSCSI parameter 'HeaderDigets'")
    r = live.cli("target", "set", T, "--alias", "a", "--no-alias")
    assert r.exit_code == 2 and "not both" in r.output
    # the daemon refuses the unknown key too (a hand-written request)
    res = live.raw({"op": "target.set", "args": {"iqn": T, "clear_params": ["Bogus"]}})
    assert res["ok"] is False and "Bogus" in res["error"]


@pytest.mark.parametrize("op, args, name", [
    ("lun.add", {"iqn": T, "path": 5, "size": "1M"}, "path"),
    ("lun.add", {"iqn": T, "path": "/tmp/x.img", "size": "1M", "number": "x"}, "number"),
    ("lun.add", {"iqn": T, "path": "/tmp/x.img", "size": "1M", "block_size": "4096"}, "block_size"),
    ("lun.resize", {"iqn": T, "number": "0", "size": "8M"}, "number"),
    ("lun.remove", {"iqn": T, "number": None}, "number"),
    ("lun.remove", {"iqn": T, "number": True}, "number"),
    ("acl.add", {"iqn": T, "initiator": "iqn.2026-11.org.example:i", "lun_map": [0]}, "lun_map"),
    ("acl.add", {"iqn": T, "initiator": "iqn.2026-11.org.example:i", "params": [1]}, "params"),
    ("acl.remove", {"iqn": T, "initiator": 5}, "initiator"),
    ("chap.set", {"scope": "acl", "iqn": T, "initiator": 5, "username": "u", "secret": "s" * 16}, "initiator"),
    ("target.add", {"iqn": "iqn.2026-11.org.example:t9", "portals": "127.0.0.1:3999"}, "portals"),
    ("target.set", {"iqn": T, "params": [1]}, "params"),
    ("target.set", {"iqn": T, "clear_params": "HeaderDigest"}, "clear_params"),
    ("portal.add", {"iqn": T, "portal": "127.0.0.1:3999", "tag": "x"}, "tag"),
])
def test_hand_written_requests_with_wrong_types_get_a_clear_refusal(live, op, args, name):
    before = live.saved()
    res = live.raw({"op": op, "args": args})
    assert res["ok"] is False
    assert "internal error" not in res["error"] and f"{op}: {name} must be" in res["error"], res
    assert live.saved() == before
    assert live.raw({"op": "status", "args": {}})["ok"] is True  # still serving


# --------------------------------------------------------------------------- CHAP secrets


def _chap(live: Live, secret_file: str, input: str | None = None):
    return live.cli("chap", "set", "--target", T, "--username", "u", "--secret-file", secret_file, input=input)


def test_secret_file_that_is_not_text_is_aone_line_error(live, tmp_path):
    f = tmp_path / "bin"
    f.write_bytes(b"\xff\xfe" + b"x" * 14)
    r = _chap(live, str(f))
    assert r.exit_code == 1
    one_line_error(r.output, "not UTF-8")


def _limit_memory() -> None:  # an unbounded read then fails in the child, not in the machine
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def test_secret_file_read_is_bounded(live):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "iscsi.target", "--control", str(live.ctl), "chap", "set",
                        "--target", T, "--username", "u", "--secret-file", "/dev/zero"],
                       check=False, capture_output=True, text=True, timeout=30, env=env, stdin=subprocess.DEVNULL,
                       preexec_fn=_limit_memory)
    assert r.returncode == 1
    one_line_error(r.stderr, "longer than 255 bytes")


def test_secret_length_errors_say_it_once(live, tmp_path):
    f = tmp_path / "short"
    f.write_text("short")
    r = _chap(live, str(f))
    assert r.exit_code == 1
    one_line_error(r.output, "5 bytes is too short", "RFC 7143")
    assert r.output.count("CHAP secret") == 1


def test_secrets_stay_out_of_status_lists_config_show_and_the_file_mode(live, tmp_path, caplog):
    secret, mutual = "ux-secret-0123456", "ux-mutual-6543210"
    (tmp_path / "s").write_text(secret + "\n")
    (tmp_path / "m").write_text(mutual)
    r = live.cli("chap", "set", "--target", T, "--username", "u", "--secret-file", str(tmp_path / "s"),
                 "--mutual-username", "tu", "--mutual-secret-file", str(tmp_path / "m"))
    assert r.exit_code == 0, r.output
    outputs = [r.output] + [live.cli(*cmd).output for cmd in (
        ("status",), ("status", "--json"), ("target", "list", "--json"), ("acl", "list", "--json"),
        ("config", "show"))]
    for out in outputs + [caplog.text]:
        assert secret not in out and mutual not in out
    assert secret in live.saved()  # it is persisted ...
    assert C.file_is_private(live.path)  # ... in a 0600 file


def test_format_size_covers_the_largest_sizes():
    assert C.format_size(1 << 60) == "1EiB" and C.format_size(3 << 50) == "3PiB"


# --------------------------------------------------------------------------- control socket paths


def test_control_socket_under_a_regular_file_names_the_path(tmp_path):
    cf = tmp_path / "t.json"
    cfg = _config(tmp_path)
    cfg.targets[0].portal_groups[0].portals = [f"127.0.0.1:{_free_port()}"]
    C.save_config(cfg, cf)
    (tmp_path / "plain").touch()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "iscsi.target", "--control", str(tmp_path / "plain" / "c.sock"),
                        "serve", "--config", str(cf)],
                       check=False, capture_output=True, text=True, timeout=20, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 1
    one_line_error(r.stderr, f"{tmp_path / 'plain'} is not a directory")
    assert "ERROR asyncio" not in r.stderr


def test_admin_command_on_a_regular_file_is_not_called_a_stale_socket(tmp_path):
    (tmp_path / "plain").touch()
    r = run("--control", str(tmp_path / "plain"), "status")
    assert r.exit_code == 1
    one_line_error(r.output, "is not a control socket")
    assert "stale" not in r.output


# --------------------------------------------------------------------------- nothing half-applied


def test_lun_add_that_cannot_be_saved_leaves_no_new_image(live, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(C, "save_config", disk_full)
    r = live.cli("lun", "add", T, f"{tmp_path}/new.img:1M")
    assert r.exit_code == 1
    one_line_error(r.output, "No space left on device", "nothing was changed")
    assert not (tmp_path / "new.img").exists()
    assert sorted(live.daemon.find_target(T).units) == [0]


def test_serve_on_a_busy_port_leaves_no_new_image(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = _serve(tmp_path, "--target", T, "--lun", f"{tmp_path}/fresh.img:1M", "--portal", f"127.0.0.1:{port}")
    assert r.returncode == 1
    one_line_error(r.stderr, f"cannot listen on 127.0.0.1:{port}", "address already in use")
    assert not (tmp_path / "fresh.img").exists()


# --------------------------------------------------------------------------- an image bigger than its config


def _bigger_image(tmp: Path) -> Path:
    """l0.img at 8 MiB with data near its end, while the config says 4 MiB."""
    img = tmp / "l0.img"
    with open(img, "wb") as f:
        f.truncate(8 * MIB)
        f.seek(7 * MIB)
        f.write(b"precious")
    return img


def _tail(img: Path) -> bytes:
    with open(img, "rb") as f:
        f.seek(7 * MIB)
        return f.read(8)


@pytest.mark.parametrize("change", ["acl", "reload", "lun"])
async def test_an_unrelated_change_never_shrinks_an_image_found_bigger(tmp_path, change):
    img = _bigger_image(tmp_path)
    path = tmp_path / "target.json"
    C.save_config(_config(tmp_path), path)  # LUN 0: 4 MiB
    daemon = TargetDaemon(C.load_config(path), path, server_factory=ListenerFake)
    await daemon.start()
    try:
        assert daemon.find_target(T).units[0].size == 8 * MIB  # served as found
        if change == "acl":
            await daemon.acl_add(T, "iqn.2026-11.org.example:host")
        elif change == "lun":
            await daemon.lun_add(T, str(tmp_path / "other.img"), size="1M")
        else:
            await daemon.reload()  # the file still says 4 MiB
        assert daemon.find_target(T).units[0].size == 8 * MIB
        assert img.stat().st_size == 8 * MIB and _tail(img) == b"precious"
    finally:
        await daemon.stop()


async def test_resize_of_an_image_found_bigger_needs_force_and_then_happens(tmp_path):
    img = _bigger_image(tmp_path)
    path = tmp_path / "target.json"
    C.save_config(_config(tmp_path), path)
    daemon = TargetDaemon(C.load_config(path), path, server_factory=ListenerFake)
    await daemon.start()
    try:
        with pytest.raises(ConfigError, match="--force"):
            await daemon.lun_resize(T, 0, "4M")
        assert img.stat().st_size == 8 * MIB
        res = await daemon.lun_resize(T, 0, "4M", force=True)
        assert (res["was"], res["size"]) == (8 * MIB, 4 * MIB)
        assert img.stat().st_size == 4 * MIB and daemon.find_target(T).units[0].size == 4 * MIB
    finally:
        await daemon.stop()


# --------------------------------------------------------------------------- one image, one daemon


async def test_an_image_served_by_another_daemon_is_a_loud_warning(tmp_path, caplog):
    path = tmp_path / "target.json"
    C.save_config(_config(tmp_path), path)
    first = TargetDaemon(C.load_config(path), path, server_factory=ListenerFake)
    await first.start()
    try:
        assert "lun.image_in_use" not in caplog.text
        other = CLI.quickstart_config("iqn.2026-11.org.example:other", [str(tmp_path / "l0.img")], ["127.0.0.1:3260"])
        second = TargetDaemon(other, None, server_factory=ListenerFake)
        await second.start()  # served (tools/bench_all.py does this on purpose), but not silently
        await second.stop()
        assert "lun.image_in_use" in caplog.text and "corrupt" in caplog.text
        caplog.clear()
        # a LUN reopened by its own daemon (removable changed) is no conflict
        await first.change(lambda cfg: setattr(cfg.target(T).luns[0], "removable", True))
        assert first.find_target(T).units[0].lun.removable
        assert "lun.image_in_use" not in caplog.text
    finally:
        await first.stop()
    again = TargetDaemon(C.load_config(path), path, server_factory=ListenerFake)
    await again.start()  # the lock went with the first daemon
    await again.stop()
    assert "lun.image_in_use" not in caplog.text


# --------------------------------------------------------------------------- terminal safety


@pytest.mark.parametrize("text", ["evil\x1b[31m", "evil\x9b31m", "a\rb", "a\x85b"])
def test_alias_and_chap_names_with_control_characters_are_refused(tmp_path, text):
    cfg = _config(tmp_path)
    cfg.targets[0].alias = text
    with pytest.raises(ConfigError, match="alias: contains control characters"):
        cfg.validate()
    cfg = _config(tmp_path)
    cfg.targets[0].chap = C.ChapConfig(text, "s" * 16)
    with pytest.raises(ConfigError, match="username: contains control characters"):
        cfg.validate()


def test_log_fields_never_carry_raw_control_characters():
    from iscsi.log import format_fields

    line = format_fields({"initiator": "iqn.2026-11.org.x:evil\x1b[2J\rforged", "reason": "x\x00y"})
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in line), repr(line)


def test_serve_alias_without_quick_start_is_a_usage_error_not_ignored(tmp_path):
    r = run("--control", str(tmp_path / "c.sock"), "serve", "--data-dir", str(tmp_path), "--alias", "mine")
    assert r.exit_code == 2 and "target set" in r.output
    assert not (tmp_path / C.CONFIG_FILENAME).exists()  # no default config made behind the admin's back


def test_lun_add_usage_line_is_not_broken_mid_word():
    r = run("lun", "add", "--help")
    usage = r.output.split("\n\n")[0]
    assert "PATH[:SIZE][:OPTION]..." in usage and "removabl\n" not in usage


def test_lun_add_of_an_image_another_daemon_serves_warns_the_admin(live, tmp_path):
    import fcntl

    img = tmp_path / "held.img"
    img.write_bytes(bytes(MIB))
    with open(img, "rb") as other:  # another process's daemon, as far as the lock can tell
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        r = live.cli("lun", "add", T, str(img))
    assert r.exit_code == 0
    assert "LUN 1 added" in r.output and "warning:" in r.output and "another process" in r.output
    r = live.cli("lun", "add", T, f"{tmp_path}/free.img:1M")
    assert r.exit_code == 0 and "warning" not in r.output


# --------------------------------------------------------------------------- config file handling


def test_a_change_saved_through_a_symlinked_config_updates_the_real_file(tmp_path):
    real_dir, link_dir = tmp_path / "real", tmp_path / "etc"
    real_dir.mkdir()
    link_dir.mkdir()
    real = real_dir / "target.json"
    C.save_config(_config(tmp_path), real)
    link = link_dir / "target.json"
    link.symlink_to(real)
    cfg = C.load_config(link)
    cfg.targets[0].alias = "changed"
    C.save_config(cfg, link)
    assert link.is_symlink()  # still the admin's link ...
    assert C.load_config(real).targets[0].alias == "changed"  # ... and the real file has the change
    assert C.file_is_private(real)
    assert not [p for p in link_dir.iterdir() if p.name != "target.json"]  # no temp file left there


def test_a_relative_data_dir_is_taken_from_the_config_files_directory(tmp_path, monkeypatch):
    cf = tmp_path / "conf" / "target.json"
    cf.parent.mkdir()
    cf.write_text(json.dumps({"version": 1, "data_dir": "images", "targets": [
        {"iqn": T, "luns": [{"number": 0, "path": "x.img", "size": "1M"}]}]}))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = C.load_config(cf)
    assert cfg.resolve_path("x.img") == tmp_path / "conf" / "images" / "x.img"


def test_a_mutual_secret_that_authenticates_initiators_elsewhere_is_refused(live, tmp_path):
    live.cli("acl", "add", T, "iqn.2026-11.org.example:host")
    (tmp_path / "a").write_text("target-secret-AAAA")
    (tmp_path / "b").write_text("acl-secret-BBBBBB")
    r = live.cli("chap", "set", "--target", T, "--username", "u", "--secret-file", str(tmp_path / "a"))
    assert r.exit_code == 0, r.output
    before = live.saved()
    r = live.cli("chap", "set", "--target", T, "--initiator", "iqn.2026-11.org.example:host", "--username", "h",
                 "--secret-file", str(tmp_path / "b"), "--mutual-username", "t",
                 "--mutual-secret-file", str(tmp_path / "a"))
    assert r.exit_code == 1
    one_line_error(r.output, "mutual_secret", "RFC 7143 §12.1.3")
    assert "target-secret-AAAA" not in r.output
    assert live.saved() == before


def test_lun_remove_with_sessions_tells_the_admin(live, tmp_path):
    assert live.cli("lun", "add", T, f"{tmp_path}/two.img:1M").exit_code == 0
    r = live.cli("lun", "remove", T, "1")
    assert r.exit_code == 0 and "note" not in r.output
    assert live.cli("lun", "add", T, f"{tmp_path}/two.img:1M").exit_code == 0
    live.daemon.server.rows = [{"target": T, "initiator": "iqn.2026-11.org.example:host", "isid": "1", "tsih": 1}]
    r = live.cli("lun", "remove", T, "1")
    assert r.exit_code == 0 and "LUN 1 removed" in r.output
    assert "1 session(s) were logged in" in r.output


# --------------------------------------------------------------------------- deeply nested JSON


def test_a_deeply_nested_config_file_is_a_config_error(tmp_path):
    cf = tmp_path / "deep.json"
    cf.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="nested too deeply"):
        C.load_config(cf)


def test_a_deeply_nested_control_request_gets_an_answer(live):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(live.ctl))
        s.sendall(b'{"op": "status", "args": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n")
        answer = s.makefile("rb").readline()
    assert json.loads(answer) == {"ok": False, "error": "request nested too deeply"}
    assert live.raw({"op": "status", "args": {}})["ok"] is True


@pytest.mark.parametrize("state", [
    {"version": 1, "aptpl": True, "registrations": [5]},
    {"version": 1, "aptpl": True, "registrations": [{"key": 1}]},
    {"version": 1, "aptpl": True, "reservation": {"type": "x"}},
])
async def test_damaged_saved_reservations_stop_the_start_naming_the_file(tmp_path, state):
    cfg = _config(tmp_path)
    cfg.targets[0].luns[0].serial = "myserial"
    pr = tmp_path / "pr" / "myserial.json"
    pr.parent.mkdir()
    pr.write_text(json.dumps(state))
    daemon = TargetDaemon(cfg, None, server_factory=ListenerFake)
    with pytest.raises(ConfigError, match=f"saved reservations {pr} cannot be restored"):
        await daemon.start()


async def test_an_image_that_cannot_be_opened_for_writing_suggests_read_only(tmp_path):
    import errno

    from iscsi.target.daemon import ScsiUnitProvider

    class WriteProtected(ScsiUnitProvider):  # what a 0444 image (non-root) or a read-only mount gives
        def open(self, cfg, target, lun):
            if not lun.read_only:
                raise PermissionError(errno.EACCES, "Permission denied", str(cfg.resolve_path(lun.path)))
            return super().open(cfg, target, lun)

    (tmp_path / "l0.img").write_bytes(bytes(4 * MIB))
    daemon = TargetDaemon(_config(tmp_path), None, provider=WriteProtected(), server_factory=ListenerFake)
    with pytest.raises(Exception, match=r"Permission denied \(to serve it read-only, add :ro"):
        await daemon.start()
    cfg = _config(tmp_path)
    cfg.targets[0].luns[0].read_only = True
    daemon = TargetDaemon(cfg, None, provider=WriteProtected(), server_factory=ListenerFake)
    await daemon.start()
    await daemon.stop()


def test_a_config_others_may_write_is_refused_at_serve_and_reload(live, tmp_path):
    cf = tmp_path / "open.json"
    C.save_config(_config(tmp_path), cf)
    os.chmod(cf, 0o666)
    r = run("--control", str(tmp_path / "c.sock"), "serve", "--config", str(cf))
    assert r.exit_code == 1
    one_line_error(r.output, "writable by group or others", "chmod 600")
    os.chmod(live.path, 0o620)
    try:
        r = live.cli("config", "reload")
        assert r.exit_code == 1
        one_line_error(r.output, "writable by group or others")
    finally:
        os.chmod(live.path, 0o600)
    assert live.cli("config", "reload").exit_code == 0


def test_an_ipv4_mapped_portal_is_the_ipv4_portal():
    assert C.canonical_portal("[::ffff:127.0.0.1]:3261") == "127.0.0.1:3261"
    assert C.canonical_portal("[::1]:3261") == "[::1]:3261"
    with pytest.raises(ConfigError, match="already in a portal group"):
        CLI.quickstart_config(T, ["/tmp/x.img:1M"], ["127.0.0.1:3261", "[::ffff:127.0.0.1]:3261"])


def test_the_same_image_through_a_symlink_is_a_duplicate_lun(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(MIB))
    (tmp_path / "alias.img").symlink_to(img)
    with pytest.raises(ConfigError, match="through the symlink .*alias.img.* is already used by"):
        CLI.quickstart_config(T, [str(img), str(tmp_path / "alias.img")], [])


def test_target_list_separates_portals_readably(live):
    assert live.cli("portal", "add", T, "[::1]:3260").exit_code == 0
    table = live.cli("target", "list").output.splitlines()
    assert "127.0.0.1:3260,1 [::1]:3260,2" in table[1], table


@pytest.mark.parametrize("spec, option", [
    ("n.img:1M:lun=5", ("--lun", "3")),
    ("n.img:1M", ("--size", "2M")),
    ("n.img:1M:bs=4096", ("--block-size", "512")),
])
def test_lun_add_option_contradicting_the_spec_is_a_usage_error(live, tmp_path, spec, option):
    r = live.cli("lun", "add", T, f"{tmp_path}/{spec}", *option)
    assert r.exit_code == 2 and "contradicts the LUN spec" in r.output
    assert not (tmp_path / "n.img").exists()


def test_lun_add_option_agreeing_with_the_spec_is_fine(live, tmp_path):
    r = live.cli("lun", "add", T, f"{tmp_path}/n.img:1M:lun=5", "--lun", "5", "--size", "1M")
    assert r.exit_code == 0 and "LUN 5 added" in r.output


def test_acl_add_on_an_open_target_says_everyone_still_gets_in(live):
    r = live.cli("acl", "add", T, "iqn.2026-11.org.example:host")
    assert r.exit_code == 0 and "every initiator may still log in" in r.output and "--no-open-access" in r.output
    assert live.cli("target", "set", T, "--no-open-access").exit_code == 0
    r = live.cli("acl", "add", T, "iqn.2026-11.org.example:host2")
    assert r.exit_code == 0 and "note" not in r.output


def test_chap_for_a_missing_acl_says_how_to_add_it(live, tmp_path):
    (tmp_path / "s").write_text("acl-secret-123456")
    r = live.cli("chap", "set", "--target", T, "--initiator", "iqn.2026-11.org.example:nobody", "--username", "u",
                 "--secret-file", str(tmp_path / "s"))
    assert r.exit_code == 1
    one_line_error(r.output, "has no ACL for", f"iscsi-target acl add {T} iqn.2026-11.org.example:nobody")


def test_a_target_left_without_portals_is_pointed_out(live, tmp_path, caplog):
    r = live.cli("portal", "remove", T, "127.0.0.1:3260")
    assert r.exit_code == 0 and "no portal left" in r.output
    assert live.cli("portal", "add", T, "127.0.0.1:3260").exit_code == 0


async def test_a_target_configured_without_portals_is_a_start_warning(tmp_path, caplog):
    cfg = _config(tmp_path)
    cfg.targets[0].portal_groups = []
    daemon = TargetDaemon(cfg, None, server_factory=ListenerFake)
    await daemon.start()
    await daemon.stop()
    assert "target.unreachable" in caplog.text and "portal add" in caplog.text
