"""Run tgtd (Linux SCSI target framework, Debian package ``tgt``) as an isolated test peer.

Each instance gets its own management socket (``TGT_IPC_SOCKET`` in a private directory plus a
``-C`` control port number, so it never talks to a system tgtd), its own loopback portal(s) on
free ports, one target with disk LUNs 1..n backed by sparse image files (tgt keeps LUN 0 for its
controller device), an ACL (ALL, or a list of initiator names), optional CHAP (incoming, and an
outgoing account for mutual CHAP) and optional login-key overrides (e.g. HeaderDigest=CRC32C).

    with TgtPeer.create(tmp_path, size="1G") as tgt:
        subprocess.run(["iscsi-inq", tgt.url()])

CLI (handy when comparing by hand):

    python -m tools.peers.tgt --dir /tmp/t --size 1G [--portals 2] [--chap user:secret]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .base import (
    POLL_INTERVAL,
    START_TIMEOUT,
    STOP_TIMEOUT,
    Chap,
    TargetPeer,
    create_sparse,
    free_portals,
    lun_specs,
    log_tail,
    serve_until_signal,
    stop_process,
    wait_listening,
)

DEFAULT_IQN = "iqn.2026-11.org.example:tgt-peer"
TGTD = "tgtd"
TGTADM = "tgtadm"
#: tgt reserves LUN 0 for its controller; disks start at 1.
FIRST_DISK_LUN = 1
#: One management command should answer in well under a second; bound it anyway.
TGTADM_TIMEOUT = 15.0
TID = 1


def available() -> str | None:
    """None when tgtd and tgtadm are installed, else the reason they cannot be used."""
    missing = [b for b in (TGTD, TGTADM) if shutil.which(b) is None]
    return f"{', '.join(missing)} not installed (Debian package tgt)" if missing else None


@dataclass
class TgtPeer(TargetPeer):
    kind = "tgt"

    #: Initiator names allowed in; None = everyone (``-I ALL``).
    acl: list[str] | None = None
    #: Login keys set on the target, e.g. {"HeaderDigest": "CRC32C"} to require digests.
    params: dict[str, str] = field(default_factory=dict)
    control_port: int = 0
    _sockdir: str | None = field(default=None, repr=False)

    @classmethod
    def create(
        cls,
        workdir: Path,
        *,
        size: int | str = "1G",
        luns: int = 1,
        portals: int = 1,
        host: str = "127.0.0.1",
        iqn: str = DEFAULT_IQN,
        block_size: int = 512,
        sizes: list[int | str] | None = None,
        read_only: bool = False,
        removable: bool = False,
        physical_block_size: int | None = None,
        **kwargs,
    ) -> "TgtPeer":
        """A peer with ``luns`` sparse images of ``size`` under ``workdir`` (not started yet)."""
        workdir = Path(workdir)
        specs = lun_specs(workdir, "tgt", size, luns, sizes, block_size, read_only, removable,
                          physical_block_size)
        return cls(iqn=iqn, portals=free_portals(portals, host), luns=specs, workdir=workdir, **kwargs)

    # -- process ----------------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        assert self._sockdir is not None
        # The management socket path must fit sun_path (108 bytes): keep it in a short /tmp dir.
        return {**os.environ, "TGT_IPC_SOCKET": os.path.join(self._sockdir, "s")}

    def tgtadm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``tgtadm -C N --lld iscsi ARGS`` against this instance."""
        cmd = [TGTADM, "-C", str(self.control_port), "--lld", "iscsi", *args]
        res = subprocess.run(cmd, env=self._env(), capture_output=True, text=True, timeout=TGTADM_TIMEOUT)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def start(self) -> "TgtPeer":
        reason = available()
        if reason:
            raise RuntimeError(reason)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._sockdir = tempfile.mkdtemp(prefix="tgt-", dir="/tmp")
        self.log_path = self.workdir / "tgtd.log"
        for spec in self.luns:
            create_sparse(spec.path, spec.size)
        portal_arg = ",".join(f"portal={p}" for p in self.portals)
        cmd = [TGTD, "-f", "-C", str(self.control_port), "--iscsi", portal_arg]
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                cmd, env=self._env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        try:
            self._wait_mgmt()
            self._configure()
            wait_listening(self.portals, self.proc, START_TIMEOUT, self.log_path)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_mgmt(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tgtd exited with {self.proc.returncode}{log_tail(self.log_path)}")
            if self.tgtadm("--op", "show", "--mode", "sys", check=False).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"tgtd management socket not ready{log_tail(self.log_path)}")
            time.sleep(POLL_INTERVAL)

    def _configure(self) -> None:
        tid = str(TID)
        self.tgtadm("--op", "new", "--mode", "target", "--tid", tid, "-T", self.iqn)
        self.lun_ids = []
        for n, spec in enumerate(self.luns, start=FIRST_DISK_LUN):
            args = ["--op", "new", "--mode", "logicalunit", "--tid", tid, "--lun", str(n), "-b", str(spec.path)]
            if spec.block_size != 512:
                args += ["--blocksize", str(spec.block_size)]
            self.tgtadm(*args)
            if spec.physical_block_size and spec.physical_block_size > spec.block_size:
                exponent = (spec.physical_block_size // spec.block_size).bit_length() - 1
                self.tgtadm("--op", "update", "--mode", "logicalunit", "--tid", tid, "--lun", str(n),
                            "--params", f"lbppbe={exponent}")
            flags = [f"{k}=1" for k, on in (("readonly", spec.read_only), ("removable", spec.removable)) if on]
            if flags:
                self.tgtadm("--op", "update", "--mode", "logicalunit", "--tid", tid, "--lun", str(n),
                            "--params", ",".join(flags))
            self.lun_ids.append(n)
        if self.acl is None:
            self.tgtadm("--op", "bind", "--mode", "target", "--tid", tid, "-I", "ALL")
        else:
            for name in self.acl:
                self.tgtadm("--op", "bind", "--mode", "target", "--tid", tid, "-Q", name)
        if self.chap is not None:
            self._add_account(self.chap.user, self.chap.secret, outgoing=False)
            if self.chap.mutual:
                self._add_account(self.chap.target_user, self.chap.target_secret, outgoing=True)
        for name, value in self.params.items():
            self.tgtadm("--op", "update", "--mode", "target", "--tid", tid, "--name", name, "--value", value)

    def _add_account(self, user: str, secret: str, *, outgoing: bool) -> None:
        self.tgtadm("--op", "new", "--mode", "account", "--user", user, "--password", secret)
        extra = ["--outgoing"] if outgoing else []
        self.tgtadm("--op", "bind", "--mode", "account", "--tid", str(TID), "--user", user, *extra)

    def stop(self) -> int | None:
        """tgtd ignores SIGTERM: delete the target, ask the system to exit, SIGKILL if it lingers."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.tgtadm("--op", "delete", "--mode", "target", "--tid", str(TID), "--force", check=False)
                self.tgtadm("--op", "delete", "--mode", "system", check=False)
                self.proc.wait(timeout=STOP_TIMEOUT / 2)
            except (subprocess.TimeoutExpired, OSError):
                pass
        status = stop_process(self.proc, signal.SIGKILL)
        self._remove_sockdir()
        return status

    def kill(self) -> int | None:
        status = super().kill()
        self._remove_sockdir()
        return status

    def _remove_sockdir(self) -> None:
        if self._sockdir:
            shutil.rmtree(self._sockdir, ignore_errors=True)
            self._sockdir = None

    def show(self) -> str:
        return self.tgtadm("--op", "show", "--mode", "target").stdout


def _parse_chap(text: str | None) -> Chap | None:
    if not text:
        return None
    parts = text.split(":")
    if len(parts) == 2:
        return Chap(parts[0], parts[1])
    if len(parts) == 4:
        return Chap(*parts)
    raise argparse.ArgumentTypeError("--chap USER:SECRET[:TARGET_USER:TARGET_SECRET]")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run an isolated tgtd on free loopback ports until Ctrl-C.")
    ap.add_argument("--dir", type=Path, required=True, help="where images and tgtd.log live")
    ap.add_argument("--size", default="1G")
    ap.add_argument("--luns", type=int, default=1)
    ap.add_argument("--portals", type=int, default=1)
    ap.add_argument("--iqn", default=DEFAULT_IQN)
    ap.add_argument("--chap", help="USER:SECRET[:TARGET_USER:TARGET_SECRET] (mutual)")
    ap.add_argument("--acl", action="append", help="allowed initiator name (repeat); default ALL")
    ap.add_argument("--param", action="append", default=[], help="login key NAME=VALUE (e.g. HeaderDigest=CRC32C)")
    args = ap.parse_args(argv)
    params = dict(p.split("=", 1) for p in args.param)
    peer = TgtPeer.create(
        args.dir, size=args.size, luns=args.luns, portals=args.portals, iqn=args.iqn,
        chap=_parse_chap(args.chap), acl=args.acl, params=params,
    )
    serve_until_signal(peer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
