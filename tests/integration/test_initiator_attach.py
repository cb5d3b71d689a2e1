"""attach → mkfs.ext4 → mount → files → umount → detach → attach again → files intact.

Needs root, /dev/fuse, loop devices, pyfuse3 and e2fsprogs; skipped (with the reason)
where any is missing.  Runs against tgt and our target through the real CLI.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from iscsi.initiator.attach import fuse_problem
from tests.integration.test_initiator_peers import INITIATOR, PEERS, start_peer

REPO = Path(__file__).resolve().parents[2]


def _problem() -> str | None:
    return fuse_problem() or (None if shutil.which("mkfs.ext4") else "mkfs.ext4 missing (e2fsprogs)")


pytestmark = pytest.mark.skipif(_problem() is not None, reason=_problem() or "")


def _cli(*args: str, env_extra: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "ISCSI_INITIATOR_NAME": INITIATOR, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "iscsi.initiator.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def _run(*cmd: str, timeout: float = 120) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)}: {res.stderr}"
    return res.stdout


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    d = tmp_path / "run"
    monkeypatch.setenv("SANSTACK_INITIATOR_RUN", str(d))
    monkeypatch.setenv("SANSTACK_INITIATOR_DIR", str(tmp_path / "cfg"))
    yield d
    # Never leave a loop device or mount behind, whatever failed.
    _cli("detach", "--all", env_extra={"SANSTACK_INITIATOR_RUN": str(d)})


@pytest.mark.parametrize("kind", PEERS)
def test_attach_mkfs_mount_detach_reattach(kind, tmp_path, run_dir):
    peer = start_peer(kind, tmp_path, size="128M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {"SANSTACK_INITIATOR_RUN": str(run_dir)}
    try:
        res = _cli("attach", peer.url(), env_extra=env)
        assert res.returncode == 0, res.stderr
        loop = res.stdout.strip()
        assert loop.startswith("/dev/loop")
        listing = _cli("list", env_extra=env).stdout
        assert loop in listing and peer.iqn in listing
        _run("mkfs.ext4", "-q", "-F", loop)
        _run("mount", loop, str(mnt))
        try:
            payload = os.urandom(3 << 20)
            (mnt / "big.bin").write_bytes(payload)
            (mnt / "dir").mkdir()
            (mnt / "dir" / "hello.txt").write_text("hello from sanstack\n")
            digest = hashlib.sha256(payload).hexdigest()
        finally:
            _run("umount", str(mnt))
        res = _cli("detach", loop, env_extra=env)
        assert res.returncode == 0, res.stderr
        assert loop not in _run("losetup", "-a")
        assert _cli("list", env_extra=env).stdout.strip() == ""

        res = _cli("attach", peer.url(), env_extra=env)
        assert res.returncode == 0, res.stderr
        loop2 = res.stdout.strip()
        _run("mount", loop2, str(mnt))
        try:
            assert hashlib.sha256((mnt / "big.bin").read_bytes()).hexdigest() == digest
            assert (mnt / "dir" / "hello.txt").read_text() == "hello from sanstack\n"
        finally:
            _run("umount", str(mnt))
        _run("fsck.ext4", "-n", "-f", loop2)
        res = _cli("detach", "--all", env_extra=env)
        assert res.returncode == 0, res.stderr
    finally:
        peer.stop()


def test_node_records_login_logout(tmp_path, run_dir):
    peer = start_peer("tgt", tmp_path, size="64M")
    env = {"SANSTACK_INITIATOR_RUN": str(run_dir)}
    try:
        res = _cli("discover", str(peer.portals[0]), "--save", env_extra=env)
        assert res.returncode == 0, res.stderr
        cfg = Path(os.environ["SANSTACK_INITIATOR_DIR"]) / "nodes.json"
        assert cfg.stat().st_mode & 0o777 == 0o600
        assert peer.iqn in _cli("node", "list", env_extra=env).stdout
        res = _cli("login", peer.iqn, env_extra=env)
        assert res.returncode == 0, res.stderr
        assert "/dev/loop" in res.stdout
        sess = _cli("session", env_extra=env).stdout
        assert peer.iqn in sess and f"lun {peer.lun_ids[0]}" in sess
        res = _cli("logout", peer.iqn, env_extra=env)
        assert res.returncode == 0, res.stderr
        assert _cli("session", env_extra=env).stdout.strip() == ""
    finally:
        peer.stop()


@pytest.mark.parametrize("kind", PEERS)
def test_multipath_attach(kind, tmp_path, run_dir):
    peer = start_peer(kind, tmp_path, size="64M", portals=2)
    env = {"SANSTACK_INITIATOR_RUN": str(run_dir)}
    try:
        res = _cli("attach", peer.url(0, portal=0), peer.url(0, portal=1), "--policy", "least-queue",
                   env_extra=env)
        assert res.returncode == 0, res.stderr
        loop = res.stdout.strip()
        import json
        states = json.loads(_cli("list", "--json", env_extra=env).stdout)
        assert len(states) == 1 and len(states[0]["paths"]) == 2
        data = os.urandom(4 << 20)
        with open(loop, "r+b", buffering=0) as f:
            os.pwrite(f.fileno(), data, 1 << 20)
            os.fsync(f.fileno())
        res = _cli("detach", loop, env_extra=env)
        assert res.returncode == 0, res.stderr
        back = tmp_path / "back.bin"
        res = _cli("dd", f"if={peer.url()}", f"of={back}", "bs=1M", "skip=1", "count=4", env_extra=env)
        assert res.returncode == 0, res.stderr
        assert back.read_bytes() == data
    finally:
        peer.stop()


def test_login_attaches_a_target_saved_at_two_portals_once_with_both_paths(tmp_path, run_dir):
    """discover --save records the target at each portal SendTargets lists; login must make
    one multipath device of each LU over those records, not one loop device per portal (two
    devices of one LU invite mounting its filesystem twice)."""
    peer = start_peer("sanstack", tmp_path, size="64M", portals=2)
    env = {"SANSTACK_INITIATOR_RUN": str(run_dir)}
    try:
        res = _cli("discover", str(peer.portals[0]), "--save", env_extra=env)
        assert res.returncode == 0, res.stderr
        import json
        records = json.loads(_cli("node", "list", "--json", env_extra=env).stdout)
        assert len([r for r in records if r["target"] == peer.iqn]) == 2, records
        res = _cli("login", peer.iqn, env_extra=env)
        assert res.returncode == 0, res.stderr
        assert res.stdout.count("/dev/loop") == 1 and "(2 paths)" in res.stdout, res.stdout
        states = json.loads(_cli("list", "--json", env_extra=env).stdout)
        assert len(states) == 1 and len(states[0]["paths"]) == 2, states
        again = _cli("login", peer.iqn, env_extra=env)
        assert again.returncode == 0 and "already logged in" in again.stdout, again.stdout
        assert len(json.loads(_cli("list", "--json", env_extra=env).stdout)) == 1
        res = _cli("logout", peer.iqn, "--portal", str(peer.portals[1]), env_extra=env)
        assert res.returncode == 0, res.stderr
        assert _cli("session", env_extra=env).stdout.strip() == ""
    finally:
        peer.stop()
