"""Review of the software initiator as a new (and a hostile) user: the ``iscsi-initiator`` CLI
and ``open_session``/``open_device`` against our target, with bad URLs, bad options, missing
LUNs, read-only LUNs, CHAP mistakes and portals that are not iSCSI targets.

What every case must give: one ``error:`` line (or click's usage error) naming the cause, a
non-zero exit status, no traceback, no hang, no secret in the output.  The CLI runs in-process
(click's CliRunner) so the file stays fast; one hang check runs it as a subprocess with a timeout.
"""
from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from iscsi.initiator import cli as CLI
from iscsi.initiator.client import login_config, open_device, open_session
from iscsi.initiator.errors import (
    ConfigError, ConnectionLost, DataProtect, IllegalRequest, LoginError, LunNotAvailable, PortalError,
    SessionFailed, scsi_error,
)
from iscsi.initiator.url import UrlError, parse_portal, parse_url
from tools.peers import Chap, make_peer

REPO = Path(__file__).resolve().parents[2]
INITIATOR = "iqn.2026-11.org.sanstack:ux-review"
SECRET = "chapsecret1234"
TSECRET = "tsecret567890"
MiB = 1 << 20
LUN_BYTES = 16 * MiB


@pytest.fixture(scope="module")
def open_peer(tmp_path_factory):
    """Our target, no CHAP, one 16 MiB LUN."""
    peer = make_peer("sanstack", tmp_path_factory.mktemp("ux-open"), size="16M")
    peer.start()
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def ro_peer(tmp_path_factory):
    """Our target with a read-only (write-protected) 8 MiB LUN."""
    peer = make_peer("sanstack", tmp_path_factory.mktemp("ux-ro"), size="8M", read_only=True)
    peer.start()
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def chap_peer(tmp_path_factory):
    """Our target demanding mutual CHAP."""
    peer = make_peer("sanstack", tmp_path_factory.mktemp("ux-chap"), size="8M",
                     chap=Chap("chapuser", SECRET, "tuser", TSECRET))
    peer.start()
    yield peer
    peer.stop()


def run_cli(*args: str, env: dict | None = None):
    """Invoke the CLI in-process; a Python exception other than SystemExit is a bug here."""
    r = CliRunner().invoke(CLI.main, ["-i", INITIATOR, *args], env=env)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError(f"traceback instead of an error line: {r.exception!r}\n{r.output}")
    return r


def assert_error(r, *words: str, code: int | None = None) -> str:
    assert r.exit_code != 0, r.output
    if code is not None:
        assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    for w in words:
        assert w in r.output, (w, r.output)
    return r.output


def lun_url(peer, lun: int | None = None, **kw) -> str:
    url = peer.url(0, **kw)
    if lun is not None:
        url = url.rsplit("/", 1)[0] + f"/{lun}"
    return url


@contextlib.contextmanager
def closing_listener():
    """A TCP port that accepts and at once closes: not an iSCSI target."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                continue
            c.close()

    th = threading.Thread(target=loop, daemon=True)
    th.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        th.join(2)
        srv.close()


# ---------------------------------------------------------------------------------------------
# URLs: an error message must not carry the password it failed to parse
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("url", [
    f"iscsi://user%{SECRET}@127.0.0.1",                             # no target
    f"iscsi://user%{SECRET}@127.0.0.1:3260/iqn.x:y/0/extra",        # path after the LUN
    f"iscsi://user%{SECRET}@127.0.0.1:3260/?target_password={TSECRET}",
])
def test_url_errors_hide_secrets(url):
    with pytest.raises(UrlError) as ei:
        parse_url(url)
    assert SECRET not in str(ei.value) and TSECRET not in str(ei.value)
    r = run_cli("readcap", url)
    out = assert_error(r, code=2)
    assert SECRET not in out and TSECRET not in out


def test_user_colon_password_as_libiscsi():
    # libiscsi lib/init.c splits at ':' when there is no '%'; the whole "user:secret" used to
    # become the CHAP name, printed back in the error message
    u = parse_url(f"iscsi://chapuser:{SECRET}@127.0.0.1:3261/iqn.x:y/2")
    assert (u.user, u.password, u.port, u.lun) == ("chapuser", SECRET, 3261, 2)
    assert SECRET not in str(u)


@pytest.mark.parametrize("raw", [f"pa@{SECRET}", f"pa/{SECRET}", f"pa?{SECRET}"])
def test_raw_special_characters_in_secret_do_not_leak(raw):
    url = f"iscsi://chapuser%{raw}@127.0.0.1:3260/iqn.x:y/0"
    try:
        u = parse_url(url)
    except UrlError as exc:
        assert SECRET not in str(exc) and "percent-encode" in str(exc)
    else:
        assert u.password == raw and u.host == "127.0.0.1"   # a raw '@' is taken as part of it


def test_bare_ipv6_portal_is_accepted():
    assert parse_portal("::1") == ("::1", 3260)
    assert parse_portal("[::1]:3261") == ("::1", 3261)
    with pytest.raises(UrlError):
        parse_portal("::1:zz")


# ---------------------------------------------------------------------------------------------
# options checked before any I/O: no ZeroDivisionError, struct.error, silent clamp or hang
# ---------------------------------------------------------------------------------------------

def test_bench_and_dd_refuse_bs_zero(open_peer, tmp_path):
    assert_error(run_cli("bench", open_peer.url(0), "--bs", "0", "-t", "1"), "--bs", code=2)
    assert_error(run_cli("dd", f"if={open_peer.url(0)}", f"of={tmp_path / 'o'}", "bs=0"), "bs", code=2)


@pytest.mark.parametrize("runtime", ["-1", "0", "nan"])
def test_bench_refuses_non_positive_runtime(open_peer, runtime):
    assert_error(run_cli("bench", open_peer.url(0), "-t", runtime), "--runtime", code=2)


def test_bench_size_checked_against_bs_and_lun(open_peer):
    # below one I/O used to mean "the whole LUN"; above the LUN was silently clamped
    assert_error(run_cli("bench", open_peer.url(0), "--size", "100", "-t", "0.2"), "--size", code=2)
    assert_error(run_cli("bench", open_peer.url(0), "--size", "0", "-t", "0.2"), "--size", code=2)
    assert_error(run_cli("bench", open_peer.url(0), "--size", "1G", "-t", "0.2"),
                 "larger than the LUN", code=1)
    assert_error(run_cli("bench", open_peer.url(0), "--bs", "32M", "-t", "0.2"),
                 "--bs 32M is larger than the LUN", code=1)


def test_bench_with_failed_ios_exits_non_zero(ro_peer):
    # reads succeed, writes fail DATA PROTECT: the run has ios and errors
    r = run_cli("bench", ro_peer.url(0), "--rw", "randrw", "--rwmixread", "90", "-t", "0.5")
    assert_error(r, "error(s)", code=1)


def test_dd_qd_zero_does_not_hang(open_peer, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "iscsi.initiator.cli", "dd", f"if={open_peer.url(0)}",
                           f"of={tmp_path / 'o'}", "qd=0", "count=1"], cwd=REPO, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "qd" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("op", ["count=-1", "count=abc", "skip=-2", "seek=x"])
def test_dd_bad_numbers_are_usage_errors(open_peer, tmp_path, op):
    key = op.split("=")[0]
    assert_error(run_cli("dd", f"if={open_peer.url(0)}", f"of={tmp_path / 'o'}", op), key, code=2)


def test_inquiry_page_out_of_range(open_peer):
    assert_error(run_cli("inquiry", open_peer.url(0), "--page", "999"), "--page", code=2)
    assert_error(run_cli("inquiry", open_peer.url(0), "--page", "zz"), "--page", code=2)


def test_write_pattern_must_be_a_byte(open_peer):
    # 0x1ab used to be written as 0xab
    assert_error(run_cli("write", open_peer.url(0), "--pattern", "0x1ab"), "--pattern", code=2)
    assert_error(run_cli("write", open_peer.url(0), "--pattern", "zz"), "--pattern", code=2)
    assert_error(run_cli("read", open_peer.url(0), "-n", "0"), code=2)


# ---------------------------------------------------------------------------------------------
# dd: sizes of devices, the end of the LUN, truncation of an existing output file
# ---------------------------------------------------------------------------------------------

def read_blocks(url: str, lba: int, count: int) -> bytes:
    """``count`` blocks at ``lba`` through a session of its own."""
    async def go() -> bytes:
        s, dev = await open_device(url, initiator_name=INITIATOR)
        try:
            return await dev.read(lba, count)
        finally:
            await s.close()
    return asyncio.run(go())


def test_dd_from_character_device_copies_count_blocks(open_peer):
    url = open_peer.url(0)
    assert run_cli("write", url, "--pattern", "0xab", "-n", "8").exit_code == 0
    r = run_cli("dd", "if=/dev/zero", f"of={url}", "bs=4k", "count=1")
    assert r.exit_code == 0, r.output
    assert "4096 bytes" in r.output            # /dev/zero's st_size 0 used to mean "copy nothing"
    assert read_blocks(url, 0, 8) == bytes(4096)


def test_dd_past_the_end_of_the_lun_fails_before_writing(open_peer):
    url = open_peer.url(0)
    assert run_cli("write", url, "--pattern", "0x5a", "-n", "1").exit_code == 0
    r = run_cli("dd", "if=/dev/zero", f"of={url}", "bs=1M", "count=20")
    assert_error(r, "do not fit", code=1)
    assert read_blocks(url, 0, 1) == b"\x5a" * 512


def test_dd_skip_past_the_end_names_skip(open_peer, tmp_path):
    r = run_cli("dd", f"if={open_peer.url(0)}", f"of={tmp_path / 'o'}", "bs=1M", "skip=100")
    assert_error(r, "skip=100", code=1)


def test_dd_truncates_an_existing_output_file(open_peer, tmp_path):
    out = tmp_path / "old.bin"
    out.write_bytes(b"\xff" * MiB)
    r = run_cli("dd", f"if={open_peer.url(0)}", f"of={out}", "bs=4k", "count=1")
    assert r.exit_code == 0, r.output
    assert out.stat().st_size == 4096           # dd(1) without conv=notrunc


def test_dd_error_does_not_print_the_url_secret(chap_peer):
    r = run_cli("dd", "if=/dev/zero", f"of={chap_peer.url(0)}", "bs=1M", "count=64")
    out = assert_error(r, "do not fit", code=1)
    assert SECRET not in out and TSECRET not in out


# ---------------------------------------------------------------------------------------------
# LUNs that are not there, read-only LUNs, sense in words
# ---------------------------------------------------------------------------------------------

def test_missing_lun_is_named(open_peer):
    assert_error(run_cli("read", lun_url(open_peer, 5)), "LUN 5 does not exist", code=1)
    assert_error(run_cli("bench", lun_url(open_peer, 5), "-t", "0.2"), "LUN 5 does not exist", code=1)


async def test_open_device_missing_lun_is_typed(open_peer):
    with pytest.raises(LunNotAvailable) as ei:
        await open_device(lun_url(open_peer, 7), initiator_name=INITIATOR)
    assert isinstance(ei.value, IllegalRequest) and ei.value.lun == 7
    assert ei.value.asc_ascq == (0x25, 0x00)
    # the session opened for it was closed: nothing left running
    await asyncio.sleep(0)
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()] == []


def test_write_to_read_only_lun_says_write_protected(ro_peer):
    out = assert_error(run_cli("write", ro_peer.url(0), "--pattern", "1"), "write protected", code=1)
    assert "WRITE 16" in out


def test_sense_names_the_additional_sense_code():
    fixed = bytes([0x70, 0, 0x07, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x27, 0x00, 0, 0, 0, 0])
    exc = scsi_error(0x02, fixed, bytes([0x8A]) + bytes(15))
    assert isinstance(exc, DataProtect) and "write protected" in str(exc)


# ---------------------------------------------------------------------------------------------
# login: keys, CHAP mistakes, portals that are not targets
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["TargetName=iqn.evil", "InitiatorName=iqn.evil", "SessionType=Discovery"])
def test_reserved_login_keys_refused(open_peer, key):
    assert_error(run_cli("-k", key, "readcap", open_peer.url(0)), key.split("=")[0], code=2)
    with pytest.raises(ConfigError):
        login_config(parse_url(open_peer.url(0)), keys=dict([key.split("=")]))


def test_bad_key_named_before_connecting():
    # used to report "connection refused" for the closed portal and hide the bad key
    r = run_cli("-k", "Foo=1", "readcap", "iscsi://127.0.0.1:1/iqn.x:y/0")
    assert_error(r, "Foo", code=2)
    assert "refused" not in r.output


def test_chap_name_without_secret(chap_peer):
    url = f"iscsi://chapuser@{chap_peer.portals[0]}/{chap_peer.iqn}/0"
    out = assert_error(run_cli("readcap", url, env={"ISCSI_PASSWORD": ""}), "without a secret", code=1)
    assert "shorter than 12" not in out
    with pytest.raises(ConfigError):
        login_config(parse_url(url))


@pytest.mark.parametrize("url", [
    "iscsi://chapuser%tiny1@127.0.0.1:1/iqn.x:y/0",
    f"iscsi://chapuser%{SECRET}@127.0.0.1:1/iqn.x:y/0?target_user=t&target_password={SECRET}",
    f"iscsi://chapuser%{'x' * 300}@127.0.0.1:1/iqn.x:y/0",
])
async def test_bad_chap_credentials_are_config_errors(url):
    # ChapCredentials' ValueError came out of open_session untyped
    with pytest.raises(ConfigError) as ei:
        await open_session(url, initiator_name=INITIATOR)
    assert SECRET not in str(ei.value) and "tiny1" not in str(ei.value)


def test_chap_errors_typed_and_secret_free(chap_peer):
    p = f"{chap_peer.portals[0]}/{chap_peer.iqn}/0"
    r = run_cli("readcap", f"iscsi://chapuser%wrongsecret123@{p}")
    out = assert_error(r, "authentication failure (0x0201)", code=1)
    assert "wrongsecret123" not in out
    r = run_cli("readcap", f"iscsi://{p}")
    assert_error(r, "authentication failure (0x0201)", code=1)
    r = run_cli("readcap", f"iscsi://chapuser%{SECRET}@{p}?target_user=tuser&target_password=WRONGsecret99")
    out = assert_error(r, "mutual", code=1)
    assert SECRET not in out and "WRONGsecret99" not in out

    async def typed():
        with pytest.raises(LoginError) as ei:
            await open_session(f"iscsi://chapuser%wrongsecret123@{p}", initiator_name=INITIATOR)
        assert (ei.value.status_class, ei.value.status_detail) == (2, 1)
    asyncio.run(typed())


@pytest.mark.parametrize("args, word", [
    (["-i", "bad name"], "initiator name"),
    (["-i", "iqn.2026-11.org.example:" + "a" * 300], "223"),
])
def test_malformed_initiator_name_is_named(open_peer, args, word):
    # the target only answered "authorization failure" / "initiator error (0x0200)"
    r = CliRunner().invoke(CLI.main, [*args, "readcap", open_peer.url(0)])
    assert r.exit_code == 1 and word in r.output and "0x02" not in r.output, r.output


def test_malformed_target_name_is_named(open_peer):
    url = f"iscsi://{open_peer.portals[0]}/my disk/0"
    assert_error(run_cli("readcap", url), "target name 'my disk'", code=1)


def test_wrong_target_name(open_peer):
    url = f"iscsi://{open_peer.portals[0]}/iqn.2026-11.org.example:nope/0"
    assert_error(run_cli("readcap", url), "target not found (0x0203)", code=1)


def test_closed_port_and_non_target_portal_are_named():
    with closing_listener() as port:
        r = run_cli("readcap", f"iscsi://127.0.0.1:{port}/iqn.x:y/0")
        assert_error(r, f"127.0.0.1:{port}", code=1)

        async def typed():
            with pytest.raises(PortalError) as ei:
                await open_session(f"iscsi://127.0.0.1:{port}/iqn.x:y/0", initiator_name=INITIATOR)
            assert isinstance(ei.value, ConnectionLost) and isinstance(ei.value, OSError)
            assert f"127.0.0.1:{port}" in str(ei.value)
        asyncio.run(typed())
    r = run_cli("discover", "127.0.0.1:1")
    assert_error(r, "127.0.0.1:1", code=1)


@contextlib.contextmanager
def silent_listener():
    """A TCP port that accepts and never says a word."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    try:
        yield srv.getsockname()[1]
    finally:
        srv.close()


def test_timeout_bounds_a_silent_portal():
    import time

    with silent_listener() as port:
        t0 = time.monotonic()
        r = run_cli("--timeout", "2", "readcap", f"iscsi://127.0.0.1:{port}/iqn.x:y/0")
        took = time.monotonic() - t0
    assert_error(r, f"127.0.0.1:{port}", "timed out", code=1)
    assert took < 6                         # was the fixed 15 s login timeout


def test_timeout_bounds_a_stopped_target(tmp_path):
    """A target that stops answering mid-run (SIGSTOP): the command fails within the NOP-Out
    detection (5 s + 5 s) plus --timeout, not open-iscsi's 120 s replacement timeout."""
    import os
    import signal
    import threading
    import time

    peer = make_peer("sanstack", tmp_path / "stopped", size="8M")
    peer.start()
    try:
        pid = peer.proc.pid
        timer = threading.Timer(1.0, os.kill, (pid, signal.SIGSTOP))
        timer.start()
        t0 = time.monotonic()
        try:
            proc = subprocess.run([sys.executable, "-m", "iscsi.initiator.cli", "-i", INITIATOR, "--timeout", "3",
                                   "bench", peer.url(0), "-t", "30", "--qd", "4"], cwd=REPO,
                                  capture_output=True, text=True, timeout=45)
        finally:
            timer.cancel()
            os.kill(pid, signal.SIGCONT)
        took = time.monotonic() - t0
    finally:
        peer.stop()
    assert proc.returncode == 1 and "error" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert took < 25, took


# ---------------------------------------------------------------------------------------------
# library: session lifecycle
# ---------------------------------------------------------------------------------------------

async def test_closed_session_is_refused_and_close_is_idempotent(open_peer):
    s, dev = await open_device(open_peer.url(0), initiator_name=INITIATOR)
    await s.close()
    await s.close()
    with pytest.raises(SessionFailed):
        await asyncio.wait_for(dev.read(0, 1), 5)


async def test_cancelled_executes_leave_nothing_in_flight(open_peer):
    from iscsi.initiator import scsi

    s, dev = await open_device(open_peer.url(0), initiator_name=INITIATOR)
    try:
        tasks = [asyncio.ensure_future(s.execute(0, scsi.read16(i * 8, 8), read_len=4096)) for i in range(32)]
        await asyncio.sleep(0)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(50):
            if s.in_flight == 0 and s.queued == 0:
                break
            await asyncio.sleep(0.02)
        assert (s.in_flight, s.queued) == (0, 0)
        assert len(await dev.read(0, 1)) == 512       # the session still works
    finally:
        await s.close()


async def test_close_leaves_no_task_pending(open_peer):
    s, dev = await open_device(open_peer.url(0), initiator_name=INITIATOR)
    await dev.read(0, 1)
    await s.close()
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert pending == []


# ---------------------------------------------------------------------------------------------
# discovery, node records, attach
# ---------------------------------------------------------------------------------------------

def test_discovery_with_mutual_chap_explains_itself(chap_peer):
    url = chap_peer.portal_url()           # carries target_user/target_password
    assert "target_password" in url
    out = assert_error(run_cli("discover", url), "authentication failure (0x0201)", "mutual", code=1)
    assert SECRET not in out and TSECRET not in out


def test_logout_of_nothing_fails(tmp_path, monkeypatch):
    from iscsi.initiator import attach as attach_mod

    monkeypatch.setattr(attach_mod, "STATE_DIR", tmp_path / "run")
    assert_error(run_cli("logout", "iqn.2026-11.org.example:not-logged-in"), "not logged in", code=1)
    assert_error(run_cli("logout"), "--all", code=2)


def _attach_cli(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "PYTHONPATH": str(REPO), "SANSTACK_INITIATOR_RUN": str(run_dir)}
    return subprocess.run([sys.executable, "-m", "iscsi.initiator.cli", "-i", INITIATOR, *args],
                          capture_output=True, text=True, timeout=90, env=env)


@pytest.fixture
def attach_dir(tmp_path):
    from iscsi.initiator.attach import fuse_problem

    if fuse_problem():
        pytest.skip(fuse_problem())
    d = tmp_path / "run"
    yield d
    _attach_cli(d, "detach", "--all")


def test_attach_failure_is_one_line_and_leaves_no_log(open_peer, attach_dir):
    r = _attach_cli(attach_dir, "attach", lun_url(open_peer, 9))
    assert r.returncode == 1
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert lines == ["error: attach failed: LUN 9 does not exist (peripheral qualifier 3, device type 0x1f)"], r.stderr
    assert list(attach_dir.glob("*.log")) == []


def test_attach_write_protected_lun_read_only(ro_peer, attach_dir):
    r = _attach_cli(attach_dir, "attach", ro_peer.url(0))
    assert r.returncode == 0, r.stderr
    loop = r.stdout.strip()
    ro = subprocess.run(["blockdev", "--getro", loop], capture_output=True, text=True, timeout=30)
    assert ro.stdout.strip() == "1"        # was 0: writes only failed with EIO


@pytest.fixture(scope="module")
def acl_peer(tmp_path_factory):
    """Our target admitting only INITIATOR."""
    peer = make_peer("sanstack", tmp_path_factory.mktemp("ux-acl"), size="8M", acl=[INITIATOR])
    peer.start()
    yield peer
    peer.stop()


def test_attach_uses_the_initiator_name(acl_peer, attach_dir):
    # -i was ignored by attach: the daemon logged in as the host's default name and the
    # target's ACL refused it (authorization failure)
    r = _attach_cli(attach_dir, "attach", acl_peer.url(0))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("/dev/loop")


def test_attach_passes_login_keys(open_peer, attach_dir):
    r = _attach_cli(attach_dir, "-k", "HeaderDigest=CRC32C", "attach", open_peer.url(0))
    assert r.returncode == 0, r.stderr
    argv = Path(f"/proc/{_state(attach_dir)['pid']}/cmdline").read_bytes().split(b"\0")
    assert b"HeaderDigest=CRC32C" in argv


def _state(run_dir: Path) -> dict:
    import json

    (path,) = run_dir.glob("*.json")
    return json.loads(path.read_text())


def test_lower_max_burst_alone_is_accepted(open_peer):
    # FirstBurstLength (default 256 KiB) used to make MaxBurstLength=65536 alone an error
    r = run_cli("-k", "MaxBurstLength=65536", "readcap", open_peer.url(0))
    assert r.exit_code == 0, r.output
    with pytest.raises(ConfigError):
        login_config(parse_url(open_peer.url(0)), keys={"MaxBurstLength": "65536", "FirstBurstLength": "131072"})


async def test_multipath_failed_open_closes_its_sessions(tmp_path):
    """tgtd's LUN 0 is its controller (type 0Ch): the multipath open fails, and the sessions it
    had logged in must not stay behind (their keepalive tasks were left running)."""
    from iscsi.initiator.multipath import open_multipath
    from tools.peers.tgt import available as tgt_problem

    if tgt_problem():
        pytest.skip(tgt_problem())
    peer = make_peer("tgt", tmp_path / "tgt", size="8M")
    peer.start()
    try:
        url = peer.url(0).rsplit("/", 1)[0] + "/0"
        with pytest.raises(LunNotAvailable, match="not a block device"):
            await open_multipath([url, url], initiator_name=INITIATOR)
        await asyncio.sleep(0.05)
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
        assert pending == []
    finally:
        peer.stop()


async def test_multipath_missing_lun_is_named(open_peer):
    from iscsi.initiator.multipath import open_multipath

    url = lun_url(open_peer, 6)
    with pytest.raises(LunNotAvailable, match="LUN 6 does not exist"):
        await open_multipath([url, url], initiator_name=INITIATOR)


def _cli_proc(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "iscsi.initiator.cli", "-i", INITIATOR, *args], cwd=REPO,
                          input=stdin, capture_output=True, timeout=60)


def test_dd_through_pipes(open_peer):
    """dd(1) reads and writes pipes: pwrite/pread on one failed with 'Illegal seek', and a pipe
    that ended before count= failed 'short read' and dropped its last partial chunk."""
    import os

    url = open_peer.url(0)
    data = os.urandom(200_000)                   # 3 whole 64k chunks and a partial one
    r = _cli_proc("dd", "if=/dev/stdin", f"of={url}", "bs=64k", "count=10", stdin=data)
    assert r.returncode == 0, r.stderr
    assert b"200000 bytes" in r.stderr
    r = _cli_proc("dd", f"if={url}", "of=/dev/stdout", "bs=64k", "count=4")
    assert r.returncode == 0, r.stderr
    assert r.stdout[:len(data)] == data and len(r.stdout) == 4 * 65536


def test_output_into_a_closed_pipe_is_quiet(open_peer):
    proc = subprocess.Popen([sys.executable, "-m", "iscsi.initiator.cli", "-i", INITIATOR, "read", open_peer.url(0),
                             "-n", "2000"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()                          # `| head -1`
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141
    assert b"Traceback" not in err and b"Broken pipe" not in err


def test_attach_twice_is_refused(open_peer, attach_dir):
    r = _attach_cli(attach_dir, "attach", open_peer.url(0))
    assert r.returncode == 0, r.stderr
    again = _attach_cli(attach_dir, "attach", open_peer.url(0))
    assert again.returncode == 1 and "already attached as " + r.stdout.strip() in again.stderr
    assert len(list(attach_dir.glob("*.json"))) == 1       # was a second loop device on the LU


def test_ctrl_c_is_one_line(open_peer):
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "iscsi.initiator.cli", "-i", INITIATOR, "bench", open_peer.url(0),
                             "-t", "30", "--qd", "4"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and err.strip() == "interrupted", err   # was a KeyboardInterrupt traceback
