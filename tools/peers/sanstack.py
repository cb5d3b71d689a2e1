"""Run our own target daemon (``python -m iscsi.target serve``) as a managed test process.

Two forms, as a person would start it:
- quick start (no config file): ``serve --portal H:P [--portal ...] --target IQN --lun PATH:SIZE``
  -- open ACL, no CHAP, LUNs numbered 0.. in the order given;
- config file: when the test needs CHAP, an ACL or login-key overrides, a JSON config (the
  daemon's own format, iscsi/target/config.py) is written to the work directory and the daemon
  runs ``serve --config FILE``.

The daemon's stdout+stderr go to ``<workdir>/sanstack.log``. ``stop()`` is SIGTERM (clean:
in-flight commands finish, data flushed) with SIGKILL after STOP_TIMEOUT; ``kill()`` is SIGKILL
at once (crash tests); ``restart()`` starts the same configuration again on the same ports.

CLI: ``python -m tools.peers.sanstack --dir /tmp/s --size 1G [--portals 2]``
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .base import (
    START_TIMEOUT,
    STOP_TIMEOUT,
    Chap,
    TargetPeer,
    create_sparse,
    format_size,
    free_portals,
    lun_specs,
    serve_until_signal,
    stop_process,
    wait_listening,
)

DEFAULT_IQN = "iqn.2026-11.org.example:sanstack-peer"
#: Repository root, so ``python -m iscsi.target`` works from a checkout without installing.
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class SanstackPeer(TargetPeer):
    kind = "sanstack"

    #: Initiator names allowed in; None = open access.
    acl: list[str] | None = None
    #: Login-key preferences, e.g. {"HeaderDigest": "CRC32C"} to require header digests.
    params: dict[str, str] = field(default_factory=dict)
    #: Extra arguments appended to ``serve`` (e.g. ["--log-level", "debug"]).
    extra_args: list[str] = field(default_factory=list)
    #: Passed as ``--data-dir`` so the daemon's state (control socket, config) stays in the
    #: work directory and parallel instances never share it.
    data_dir: Path | None = None
    #: Force the config-file form even without CHAP/ACL/params.
    use_config: bool = False
    python: str = sys.executable
    start_timeout: float = START_TIMEOUT
    _ctldir: str | None = field(default=None, repr=False)

    @property
    def control_path(self) -> Path:
        """The daemon's control socket (admin commands: ``iscsi-target --control PATH ...``).

        Kept in a short private /tmp directory: a socket path must fit sun_path (108 bytes) and
        the default (/run/sanstack/... as root) would be shared by every instance.
        """
        if self._ctldir is None:
            self._ctldir = tempfile.mkdtemp(prefix="sst-", dir="/tmp")
        return Path(self._ctldir) / "ctl.sock"

    def admin(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run ``python -m iscsi.target --control SOCK ARGS`` against this daemon."""
        cmd = [self.python, "-m", "iscsi.target", "--control", str(self.control_path), *args]
        return subprocess.run(cmd, cwd=self.workdir, env=self._env(), capture_output=True, text=True, timeout=timeout)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        return env

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
    ) -> "SanstackPeer":
        workdir = Path(workdir)
        specs = lun_specs(workdir, "sanstack", size, luns, sizes, block_size, read_only, removable,
                          physical_block_size)
        kwargs.setdefault("data_dir", workdir / "data")
        return cls(iqn=iqn, portals=free_portals(portals, host), luns=specs, workdir=workdir, **kwargs)

    # -- command line -----------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.workdir / "sanstack-target.json"

    def needs_config(self) -> bool:
        return (
            self.use_config
            or self.chap is not None
            or self.acl is not None
            or bool(self.params)
        )

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "iscsi.target", "serve", "--control", str(self.control_path)]
        if self.data_dir is not None:
            cmd += ["--data-dir", str(self.data_dir)]
        if self.needs_config():
            self.write_config()
            cmd += ["--config", str(self.config_path)]
        else:
            for portal in self.portals:
                cmd += ["--portal", str(portal)]
            cmd += ["--target", self.iqn]
            for spec in self.luns:
                opts = f":bs={spec.block_size}" if spec.block_size != 512 else ""
                opts += ":ro" if spec.read_only else ""
                opts += ":removable" if spec.removable else ""
                opts += f":pbs={spec.physical_block_size}" if spec.physical_block_size else ""
                cmd += ["--lun", f"{spec.path}:{format_size(spec.size)}{opts}"]
        return cmd + list(self.extra_args)

    def config_dict(self) -> dict:
        """The daemon's JSON config (schema: iscsi/target/config.py, version 1)."""
        chap = None
        if self.chap is not None:
            chap = {"username": self.chap.user, "secret": self.chap.secret}
            if self.chap.mutual:
                chap.update(mutual_username=self.chap.target_user, mutual_secret=self.chap.target_secret)
        target = {
            "iqn": self.iqn,
            "open_access": self.acl is None,
            "chap": chap,
            "params": dict(self.params),
            # Like the quick-start form: one portal group (and target port) per portal.
            "portal_groups": [{"tag": n, "portals": [str(p)]} for n, p in enumerate(self.portals, 1)],
            "luns": [
                {"number": n, "path": str(spec.path), "size": spec.size, "block_size": spec.block_size,
                 "read_only": spec.read_only, "removable": spec.removable,
                 "physical_block_size": spec.physical_block_size}
                for n, spec in enumerate(self.luns)
            ],
            "acls": [{"initiator": name} for name in (self.acl or [])],
        }
        return {"version": 1, "data_dir": str(self.data_dir) if self.data_dir else None, "targets": [target]}

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.config_dict(), indent=2) + "\n")
        os.chmod(tmp, 0o600)  # holds CHAP secrets
        os.replace(tmp, self.config_path)
        return self.config_path

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> "SanstackPeer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "sanstack.log"
        for spec in self.luns:
            if spec.read_only:  # the daemon (rightly) will not create an image it may not write
                create_sparse(spec.path, spec.size)
        self.lun_ids = list(range(len(self.luns)))
        env = self._env()
        cmd = self.command()
        with open(self.log_path, "ab") as log:
            log.write(("### " + " ".join(cmd) + "\n").encode())
            log.flush()
            self.proc = subprocess.Popen(
                cmd, cwd=self.workdir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            wait_listening(self.portals, self.proc, self.start_timeout, self.log_path)
        except BaseException:
            self.kill()
            self.cleanup()
            raise
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status (negative = signal)."""
        if self.proc is None:
            return None
        status = stop_process(self.proc, signal.SIGTERM, timeout)
        self.cleanup()  # the socket died with the daemon; restart() makes a new directory
        return status

    def kill(self) -> int | None:
        status = super().kill()
        self.cleanup()
        return status

    def cleanup(self) -> None:
        """Remove the private control-socket directory (after the last stop)."""
        if self._ctldir is not None:
            shutil.rmtree(self._ctldir, ignore_errors=True)
            self._ctldir = None

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.cleanup()

def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run our target on free loopback ports until Ctrl-C.")
    ap.add_argument("--dir", type=Path, required=True, help="where images, config and log live")
    ap.add_argument("--size", default="1G")
    ap.add_argument("--luns", type=int, default=1)
    ap.add_argument("--portals", type=int, default=1)
    ap.add_argument("--iqn", default=DEFAULT_IQN)
    ap.add_argument("--chap", help="USER:SECRET[:TARGET_USER:TARGET_SECRET] (mutual)")
    ap.add_argument("--param", action="append", default=[], help="login key NAME=VALUE")
    args = ap.parse_args(argv)
    chap = Chap(*args.chap.split(":")) if args.chap else None
    peer = SanstackPeer.create(
        args.dir, size=args.size, luns=args.luns, portals=args.portals, iqn=args.iqn, chap=chap,
        params=dict(p.split("=", 1) for p in args.param),
    )
    serve_until_signal(peer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
