"""Security, end to end against a daemon started from a config file (what an admin deploys).

Adds to tests/unit/test_config.py, test_control.py, test_cli.py and
tests/integration/test_target_admin.py (which cover ACL-filtered iscsi-ls, the 12-byte minimum
in-process, masked config output):
- discovery answers SendTargets=All, =<name> and, in a Normal session, only with targets this
  initiator may log in to (RFC 7143 §4.3, Appendix C);
- a login from an initiator outside the ACL gets status 0x0202 exactly (§11.13.5), then the close;
- LUN masking per ACL: REPORT LUNS and I/O see only the mapped LUNs, under the ACL's numbers;
- the admin CLI refuses CHAP secrets shorter than 12 or longer than 255 bytes, over the control
  socket of a running daemon, and accepts both limits;
- mutual CHAP: an initiator that sends the target's own challenge back is cut off without an
  answer (§12.1.3), and one-way/mutual logins with right and wrong secrets behave;
- no secret (nor its hex form) in the daemon's log at debug level or in any status output;
- the control socket is 0600, owned by root, unusable by another user;
- with no --portal the daemon listens on loopback only (checked in a private network namespace).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from iscsi import auth as A
from iscsi import keys as K
from iscsi import pdu as P
from tools.peers.base import Portal, free_portals, stop_process, wait_listening

from .raw import Closed, RawSession

REPO = Path(__file__).resolve().parents[2]
T_OPEN = "iqn.2026-11.org.sanstack.sec:open"
T_ACL = "iqn.2026-11.org.sanstack.sec:acl"
T_CHAP = "iqn.2026-11.org.sanstack.sec:chap"
INIT_A = "iqn.2026-11.org.sanstack.sec:host-a"
INIT_B = "iqn.2026-11.org.sanstack.sec:host-b"
INIT_X = "iqn.2026-11.org.sanstack.sec:stranger"
SECRET = "s3cret-one-way-chap"
MUTUAL = "s3cret-target-side-xyz"
DISC_SECRET = "s3cret-discovery-chap"
ALL_SECRETS = (SECRET, MUTUAL, DISC_SECRET)


class Daemon:
    def __init__(self, workdir: Path, config: dict, portals: list[Portal]) -> None:
        self.workdir, self.portals = workdir, portals
        self.ctldir = Path(tempfile.mkdtemp(prefix="sst-sec-", dir="/tmp"))
        self.control = self.ctldir / "ctl.sock"
        self.config_path = workdir / "target.json"
        self.config_path.write_text(json.dumps(config, indent=2))
        os.chmod(self.config_path, 0o600)
        self.log_path = workdir / "daemon.log"
        self.env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "iscsi.target", "serve", "--config", str(self.config_path),
               "--control", str(self.control), "--log-level", "debug"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        wait_listening(portals, self.proc, 20, self.log_path)
        deadline = time.monotonic() + 10
        while not self.control.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def admin(self, *args: str, input: str | None = None, user: int | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "iscsi.target", "--control", str(self.control), *args],
                              cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=30,
                              input=input, user=user)

    def stop(self) -> None:
        if self.proc.poll() is None:
            stop_process(self.proc, signal.SIGTERM, 10)
        shutil.rmtree(self.ctldir, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    work = tmp_path_factory.mktemp("sec")
    portals = free_portals(1)
    p = str(portals[0])
    chap = {"username": "alice", "secret": SECRET, "mutual_username": "target-t", "mutual_secret": MUTUAL}
    config = {
        "version": 1, "data_dir": str(work),
        "discovery_auth": None,
        "targets": [
            {"iqn": T_OPEN, "open_access": True, "portal_groups": [{"tag": 1, "portals": [p]}],
             "luns": [{"number": 0, "path": "open.img", "size": "8M"}]},
            {"iqn": T_ACL, "portal_groups": [{"tag": 1, "portals": [p]}],
             "luns": [{"number": 0, "path": "acl0.img", "size": "8M"}, {"number": 1, "path": "acl1.img", "size": "16M"},
                      {"number": 2, "path": "acl2.img", "size": "4M"}],
             "acls": [{"initiator": INIT_A, "lun_map": {"0": 1}}, {"initiator": INIT_B}]},
            {"iqn": T_CHAP, "portal_groups": [{"tag": 1, "portals": [p]}], "chap": chap,
             "luns": [{"number": 0, "path": "chap.img", "size": "8M"}],
             "acls": [{"initiator": INIT_B}]},
        ],
    }
    d = Daemon(work, config, portals)
    yield d
    d.stop()


def raw(daemon) -> RawSession:
    return RawSession(daemon.portals[0].host, daemon.portals[0].port)


# -- discovery --------------------------------------------------------------------------------

def send_targets(daemon, initiator: str, value: str = "All", *, session_type="Discovery",
                 target: str | None = None) -> list[str]:
    s = raw(daemon)
    keys = [("InitiatorName", initiator), ("SessionType", session_type), ("HeaderDigest", "None"),
            ("DataDigest", "None"), ("MaxRecvDataSegmentLength", "65536")]
    if target:
        keys.append(("TargetName", target))
    s.send(P.LoginRequest(transit=True, csg=1, nsg=3, isid=0x400000000123, itt=1, data=K.encode_text(keys)))
    resp = s.recv()
    assert resp.status_class == 0, resp
    s.expstatsn = (resp.statsn + 1) & 0xFFFFFFFF
    s.send(P.TextRequest(itt=2, cmdsn=resp.expcmdsn, expstatsn=s.expstatsn,
                         data=K.encode_text([("SendTargets", value)])))
    text = s.recv()
    assert isinstance(text, P.TextResponse) and text.final, text
    s.close()
    return [v for k, v in K.parse_text(text.data) if k == "TargetName"]


@pytest.mark.parametrize("initiator,expected", [
    (INIT_A, {T_OPEN, T_ACL}),
    (INIT_B, {T_OPEN, T_ACL, T_CHAP}),
    (INIT_X, {T_OPEN}),
])
def test_send_targets_all_shows_only_allowed_targets(daemon, initiator, expected):
    assert set(send_targets(daemon, initiator)) == expected


def test_send_targets_by_name_does_not_reveal_a_hidden_target(daemon):
    assert send_targets(daemon, INIT_X, T_ACL) == []
    assert send_targets(daemon, INIT_X, T_CHAP) == []
    assert send_targets(daemon, INIT_B, T_CHAP) == [T_CHAP]


def test_send_targets_in_a_normal_session_shows_only_its_own_target(daemon):
    assert send_targets(daemon, INIT_B, "All", session_type="Normal", target=T_ACL) == [T_ACL]
    assert send_targets(daemon, INIT_B, T_CHAP, session_type="Normal", target=T_ACL) == []


# -- ACL and LUN masking ----------------------------------------------------------------------

@pytest.mark.parametrize("target", [T_ACL, T_CHAP])
def test_login_outside_acl_is_0202_then_closed(daemon, target):
    s = raw(daemon)
    resp = s.login(target, initiator=INIT_X, ready=False)
    assert (resp.status_class, resp.status_detail) == (0x02, 0x02), resp
    assert resp.data == b"" or b"TargetPortalGroupTag" not in bytes(resp.data)
    assert s.closed_by_target(3.0)
    s.close()


def _report_luns(s: RawSession) -> list[int]:
    itt = s.command(struct.pack(">BBBBBBIBB", 0xA0, 0, 0, 0, 0, 0, 4096, 0, 0), read=True, edtl=4096)
    status, data = s.wait_status(itt)
    assert status.status == 0
    n = struct.unpack_from(">I", data)[0] // 8
    return [P.decode_lun(struct.unpack_from(">Q", data, 8 + 8 * i)[0]) for i in range(n)]


def _capacity(s: RawSession, lun: int) -> tuple[int, bytes]:
    itt = s.next_itt()
    s.send(P.ScsiCommandPdu(read=True, edtl=8, lun=P.encode_lun(lun), cmdsn=s.cmdsn, expstatsn=s.expstatsn,
                            itt=itt, cdb=bytes([0x25]) + bytes(15)))
    s.cmdsn += 1
    status, data = s.wait_status(itt)
    return status.status, data


def test_lun_masking_per_acl(daemon):
    a = raw(daemon)
    assert a.login(T_ACL, initiator=INIT_A).status_class == 0
    assert _report_luns(a) == [0], "host A must see exactly one LUN"
    status, cap = _capacity(a, 0)
    assert status == 0 and (struct.unpack(">I", cap[:4])[0] + 1) * 512 == 16 << 20, "A's LUN 0 is target LUN 1"
    for hidden in (1, 2):
        status, _ = _capacity(a, hidden)
        assert status == 0x02, f"host A reached target LUN {hidden}"
    a.logout()
    a.close()
    b = raw(daemon)
    assert b.login(T_ACL, initiator=INIT_B).status_class == 0
    assert _report_luns(b) == [0, 1, 2]
    b.logout()
    b.close()


# -- CHAP -------------------------------------------------------------------------------------

def chap_login(daemon, *, name="alice", secret=SECRET, mutual=False, reflect=False, initiator=INIT_B):
    """Security stage by hand; returns (final LoginResponse or None if the target hung up, session)."""
    s = raw(daemon)
    isid = 0x400000000321
    who = [("InitiatorName", initiator), ("TargetName", T_CHAP), ("SessionType", "Normal")]
    s.send(P.LoginRequest(csg=0, nsg=1, isid=isid, itt=1, data=K.encode_text(who + [("AuthMethod", "CHAP")])))
    r1 = s.recv()
    assert r1.status_class == 0 and dict(K.parse_text(r1.data)).get("AuthMethod") == "CHAP", r1
    s.send(P.LoginRequest(csg=0, nsg=1, isid=isid, itt=1, data=K.encode_text([("CHAP_A", "5")])))
    r2 = s.recv()
    ch = dict(K.parse_text(r2.data))
    challenge = K.decode_binary(ch["CHAP_C"])
    proof = A.chap_response(5, int(ch["CHAP_I"]), secret.encode(), challenge)
    keys = [("CHAP_N", name), ("CHAP_R", K.encode_hex(proof))]
    mine = challenge if reflect else os.urandom(16)
    if mutual or reflect:
        keys += [("CHAP_I", "42"), ("CHAP_C", K.encode_hex(mine))]
    s.send(P.LoginRequest(transit=True, csg=0, nsg=1, isid=isid, itt=1, data=K.encode_text(keys)))
    try:
        r3 = s.recv()
    except Closed:
        return None, s
    if mutual and r3.status_class == 0:
        got = dict(K.parse_text(r3.data))
        assert got["CHAP_N"] == "target-t"
        assert K.decode_binary(got["CHAP_R"]) == A.chap_response(5, 42, MUTUAL.encode(), mine), \
            "target's mutual CHAP answer is wrong"
    return r3, s


def test_chap_one_way_and_mutual_succeed(daemon):
    for mutual in (False, True):
        resp, s = chap_login(daemon, mutual=mutual)
        assert resp is not None and resp.status_class == 0 and resp.transit, resp
        s.close()


@pytest.mark.parametrize("kw", [dict(secret="wrong-secret-123456"), dict(name="mallory")])
def test_chap_wrong_credentials_are_0201(daemon, kw):
    resp, s = chap_login(daemon, **kw)
    assert resp is not None and (resp.status_class, resp.status_detail) == (2, 1), resp
    assert s.closed_by_target(3.0)
    s.close()


def test_mutual_chap_refuses_a_reflected_challenge(daemon):
    """RFC 7143 §12.1.3: a challenge equal to the one the target sent is an attack on the other
    direction (reflection): the target must not answer it -- it closes the connection."""
    resp, s = chap_login(daemon, reflect=True)
    assert resp is None or resp.status_class != 0, "target answered a reflected challenge"
    if resp is not None:
        assert b"CHAP_R" not in bytes(resp.data), "target computed a response to its own challenge"
    assert s.closed_by_target(3.0)
    s.close()


@pytest.mark.parametrize("length,ok", [(11, False), (12, True), (255, True), (256, False)])
def test_admin_cli_chap_secret_length(daemon, tmp_path, length, ok):
    secret_file = tmp_path / "secret"
    secret = ("k" * length)
    secret_file.write_text(secret + "\n")
    res = daemon.admin("chap", "set", "--target", T_OPEN, "--username", "bob", "--secret-file", str(secret_file))
    if ok:
        assert res.returncode == 0, res.stderr
        assert daemon.admin("chap", "clear", "--target", T_OPEN).returncode == 0
    else:
        assert res.returncode != 0, f"a {length}-byte CHAP secret was accepted"
        assert "Traceback" not in res.stderr and secret not in res.stdout + res.stderr
    for args in (["status"], ["config", "show"]):
        out = daemon.admin(*args)
        assert secret not in out.stdout + out.stderr


def test_admin_cli_mutual_secret_length(daemon, tmp_path):
    short = tmp_path / "m"
    short.write_text("tooshort\n")
    good = tmp_path / "g"
    good.write_text("a-good-secret-1234\n")
    res = daemon.admin("chap", "set", "--target", T_OPEN, "--username", "bob", "--secret-file", str(good),
                       "--mutual-username", "t", "--mutual-secret-file", str(short))
    assert res.returncode != 0 and "tooshort" not in res.stdout + res.stderr


# -- secrets never shown ----------------------------------------------------------------------

def test_no_secret_in_logs_or_status(daemon):
    # Produce log traffic around every secret: logins right, wrong, reflected; discovery.
    chap_login(daemon)[1].close()
    chap_login(daemon, mutual=True)[1].close()
    chap_login(daemon, secret="wrong-secret-123456")[1].close()
    chap_login(daemon, reflect=True)[1].close()
    send_targets(daemon, INIT_B)
    time.sleep(0.5)
    outputs = {" ".join(a): daemon.admin(*a) for a in (["status"], ["status", "--json"], ["config", "show"],
                                                        ["target", "list"], ["acl", "list", T_CHAP])}
    for name, res in outputs.items():
        assert res.returncode == 0, (name, res.stderr)
    log = daemon.log_path.read_text(errors="replace")
    assert "login.auth.ok" in log or "login.ok" in log, "debug log is empty: the test would prove nothing"
    for secret in ALL_SECRETS:
        for form in (secret, secret.encode().hex(), K.encode_hex(secret.encode())):
            assert form not in log, f"secret {secret[:4]}... in the daemon log"
            for name, res in outputs.items():
                assert form not in res.stdout + res.stderr, f"secret {secret[:4]}... in `{name}`"
    assert SECRET not in Path(daemon.config_path).read_text() or os.stat(daemon.config_path).st_mode & 0o077 == 0


# -- control socket and portals -----------------------------------------------------------------

def test_control_socket_is_0600_root_and_refuses_other_users(daemon):
    st = os.stat(daemon.control)
    assert st.st_mode & 0o777 == 0o600, oct(st.st_mode)
    assert st.st_uid == os.getuid() == 0
    os.chmod(daemon.ctldir, 0o755)  # let another user reach the directory: the socket itself must hold
    try:
        pid = os.fork()
        if pid == 0:  # child: become nobody and knock
            code = 3
            try:
                os.setgid(65534)
                os.setuid(65534)
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.settimeout(5)
                try:
                    c.connect(str(daemon.control))
                    c.sendall(b'{"op": "status"}\n')
                    reply = c.recv(1 << 20)
                    code = 1 if T_OPEN.encode() in reply else 0  # a refusal message is fine
                except (PermissionError, ConnectionRefusedError, ConnectionResetError, socket.timeout):
                    code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        os.chmod(daemon.ctldir, 0o700)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, \
        f"user nobody got through the control socket (child status {status})"


@pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("ip") is None,
                    reason="unshare (util-linux) or ip (iproute2) not installed")
def test_default_portal_is_loopback_only(tmp_path):
    """`serve` with no --portal, in a private network namespace (port 3260 free, no traffic out):
    every listening socket of the namespace is on 127.0.0.1 or ::1."""
    script = f"""
import os, subprocess, sys, time
subprocess.run(["ip", "link", "set", "lo", "up"], check=False)
p = subprocess.Popen([sys.executable, "-m", "iscsi.target", "serve", "--data-dir", {str(tmp_path / 'd')!r},
                      "--control", {str(tmp_path / 'c.sock')!r}], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                      env=dict(os.environ, PYTHONPATH={str(REPO)!r}))
listen = []
for _ in range(200):
    listen = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(name).read().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A":
                listen.append(f[1])
    if listen:
        break
    time.sleep(0.1)
p.terminate(); p.wait(10)
print(" ".join(listen))
"""
    res = subprocess.run(["unshare", "-n", sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    if res.returncode != 0 and "Operation not permitted" in res.stderr:
        pytest.skip("no permission to create a network namespace here")
    assert res.returncode == 0, res.stderr
    addrs = res.stdout.split()
    assert addrs, "the daemon listened on nothing"
    loopback = {"0100007F:0CBC", "00000000000000000000000001000000:0CBC"}
    assert set(addrs) <= loopback, f"listening beyond loopback: {addrs}"
