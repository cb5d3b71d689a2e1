"""The iscsi-target daemon administered at run time, seen by a real initiator (libiscsi).

- quick start on two portals: discovery reports both with their own TPGT;
- ``lun add`` / ``lun resize`` through the control socket reach logged-in initiators as
  REPORTED LUNS DATA HAS CHANGED / CAPACITY DATA HAS CHANGED (issue 3);
- config mode: ACLs filter discovery and login, CHAP set at run time is enforced, and every
  change survives a SIGTERM + restart (persisted atomically; issue 2, field notes);
- SIGTERM exits 0.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tools.libiscsi import CheckCondition, LoginError, Session
from tools.peers.base import Chap, free_portals, stop_process, wait_listening

from .conftest import require, run

REPO = Path(__file__).resolve().parents[2]
INIT_A = "iqn.2026-11.org.example:initiator-a"
INIT_B = "iqn.2026-11.org.example:initiator-b"
SECRET = "integration-secret-1"
REPORTED_LUNS_DATA_HAS_CHANGED = 0x3F0E
CAPACITY_DATA_HAS_CHANGED = 0x2A09
UNIT_ATTENTION = 0x6


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def admin(control: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "iscsi.target", "--control", str(control), *args],
                          capture_output=True, text=True, timeout=60, env=_env(), stdin=subprocess.DEVNULL)


def ls(portal, initiator: str, chap: Chap | None = None, check: bool = True) -> subprocess.CompletedProcess:
    auth = f"{chap.user}%{chap.secret}@" if chap else ""
    return run(["iscsi-ls", "-s", "-i", initiator, f"iscsi://{auth}{portal}"], timeout=60, check=check)


def _ua_after(session: Session, want: int) -> None:
    """The next command reports the unit attention ``want`` (then the LU is ready again)."""
    with pytest.raises(CheckCondition) as e:
        session.test_unit_ready()
    assert (e.value.sense_key, e.value.ascq) == (UNIT_ATTENTION, want), str(e.value)
    session.test_unit_ready()


def test_quick_start_runtime_changes_reach_the_initiator(peer_factory, tmp_path):
    require("iscsi-ls")
    peer = peer_factory("sanstack", size="64M", portals=2)
    out = ls(peer.portals[0], INIT_A).stdout
    assert f"Portal:{peer.portals[0]},1" in out and f"Portal:{peer.portals[1]},2" in out

    s = Session.to_peer(peer, portal=1).connect()
    try:
        s.test_unit_ready()
        res = peer.admin("lun", "add", peer.iqn, f"{tmp_path}/extra.img:32M:bs=4096")
        assert res.returncode == 0, res.stderr
        _ua_after(s, REPORTED_LUNS_DATA_HAS_CHANGED)
        assert "Lun:1" in ls(peer.portals[1], INIT_A).stdout

        res = peer.admin("lun", "resize", peer.iqn, "0", "128M")
        assert res.returncode == 0, res.stderr
        _ua_after(s, CAPACITY_DATA_HAS_CHANGED)
        assert s.read_capacity16() == ((128 << 20) // 512, 512)
    finally:
        s.close()

    status = peer.admin("status", "--json")
    assert status.returncode == 0
    assert json.loads(status.stdout)["portals"] == [str(p) for p in peer.portals]
    assert peer.stop() == 0


class ConfigDaemon:
    """``iscsi-target serve --config FILE`` as a subprocess, restartable on the same file."""

    def __init__(self, workdir: Path, config: dict) -> None:
        self.workdir = workdir
        self.config_path = workdir / "target.json"
        self.control = Path(tempfile.mkdtemp(prefix="adm", dir="/tmp")) / "c.sock"
        self.config_path.write_text(json.dumps(config, indent=2))
        os.chmod(self.config_path, 0o600)
        self.portals = []
        self.proc: subprocess.Popen | None = None

    def start(self, portals) -> "ConfigDaemon":
        self.portals = portals
        self.log = open(self.workdir / "daemon.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "iscsi.target", "serve", "--config", str(self.config_path),
             "--control", str(self.control)],
            env=_env(), stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        wait_listening(portals, self.proc, 30, self.workdir / "daemon.log")
        return self

    def stop(self) -> int:
        code = stop_process(self.proc, timeout=30)
        self.log.close()
        return code

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        if self.control.parent.exists():
            for p in self.control.parent.iterdir():
                p.unlink()
            self.control.parent.rmdir()


@pytest.fixture
def config_daemon(tmp_path):
    made: list[ConfigDaemon] = []

    def factory(config: dict) -> ConfigDaemon:
        made.append(ConfigDaemon(tmp_path, config))
        return made[-1]

    yield factory
    for d in made:
        d.cleanup()


def test_config_mode_acl_chap_and_persistence_across_restart(config_daemon, tmp_path):
    require("iscsi-ls")
    portal = free_portals(1)[0]
    iqn = "iqn.2026-11.org.example:admin"
    d = config_daemon({
        "version": 1,
        "data_dir": str(tmp_path),
        "targets": [{
            "iqn": iqn,
            "portal_groups": [{"tag": 1, "portals": [str(portal)]}],
            "luns": [{"number": 0, "path": "disk.img", "size": "64M"}],
            "acls": [{"initiator": INIT_A}],
        }],
    }).start([portal])

    # discovery shows the target only to initiators in its ACL; login follows the same rule
    assert iqn in ls(portal, INIT_A).stdout
    assert iqn not in ls(portal, INIT_B, check=False).stdout
    with pytest.raises(LoginError):
        Session(str(portal), iqn, 0, initiator=INIT_B).connect()

    res = admin(d.control, "acl", "add", iqn, INIT_B)
    assert res.returncode == 0, res.stderr
    assert iqn in ls(portal, INIT_B).stdout

    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    res = admin(d.control, "chap", "set", "--target", iqn, "--username", "alice", "--secret-file", str(secret_file))
    assert res.returncode == 0, res.stderr
    with pytest.raises(LoginError):
        Session(str(portal), iqn, 0, initiator=INIT_B).connect()
    Session(str(portal), iqn, 0, initiator=INIT_B, chap=Chap("alice", SECRET)).connect().close()

    for args in (["status"], ["config", "show"], ["acl", "list"]):
        out = admin(d.control, *args)
        assert out.returncode == 0 and SECRET not in out.stdout + out.stderr
    assert SECRET not in (tmp_path / "daemon.log").read_text()

    assert d.stop() == 0  # SIGTERM: clean exit
    saved = json.loads(d.config_path.read_text())
    assert [a["initiator"] for a in saved["targets"][0]["acls"]] == [INIT_A, INIT_B]
    assert os.stat(d.config_path).st_mode & 0o077 == 0

    d.start([portal])  # everything changed at run time is back after the restart
    Session(str(portal), iqn, 0, initiator=INIT_B, chap=Chap("alice", SECRET)).connect().close()
    with pytest.raises(LoginError):
        Session(str(portal), iqn, 0, initiator=INIT_B).connect()
    assert admin(d.control, "acl", "remove", iqn, INIT_B).returncode == 0
    with pytest.raises(LoginError):
        Session(str(portal), iqn, 0, initiator=INIT_B, chap=Chap("alice", SECRET)).connect()
    assert d.stop() == 0


def test_admin_without_daemon_says_how_to_start(tmp_path):
    res = admin(tmp_path / "none.sock", "status")
    assert res.returncode == 3
    assert "iscsi-target serve" in res.stderr and "Traceback" not in res.stderr
