"""The targets the interop guest logs in to, as the harness starts them inside its namespace.

One layout for both kinds of target (ours and tgtd), so a step means the same against either:

- ``DISK``    open access, no CHAP, a 512 MiB LUN, reachable through two portals (multipath);
- ``CHAP``    one-way CHAP (the initiator proves itself), a small LUN;
- ``MUTUAL``  mutual CHAP (the target proves itself too), a small LUN.

Inside a fresh network namespace every port is free, so the portals are fixed: 127.0.0.1:3260
and 127.0.0.1:3261. Our target gets one portal group per portal (TPGT 1 and 2); tgtd puts every
portal in TPGT 1. The guest learns each TPGT from the kernel command line and checks that
SendTargets and the login agree with it.

The process handling (start, wait until listening, stop, restart) is tools/peers'; this module
only adds the several-target layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tools.peers.base import Chap, LunSpec, Portal
from tools.peers.sanstack import SanstackPeer
from tools.peers.tgt import TID, TgtPeer

IQN_PREFIX = "iqn.2026-11.org.sanstack.interop"
PORTS = (3260, 3261)  # RFC 7143 §4.2.4 well-known port, and the next one for the second path
HOST = "127.0.0.1"
MIB = 1 << 20
DISK_SIZE = 512 * MIB  # room for start/middle/end regions and a small ext4; sparse anyway
SMALL_SIZE = 64 * MIB
#: Test-only credentials. RFC 7143 §12.1.3: secrets of at least 12 bytes (96 bits); our config
#: refuses shorter ones. The mutual pair differs from the initiator's as §12.1.3 requires.
CHAP_ONEWAY = Chap("guest-user", "oneway-secret-0123")
CHAP_MUTUAL = Chap("guest-user2", "mutual-secret-4567", "target-user", "target-secret-89ab")


@dataclass(frozen=True)
class TargetDef:
    name: str
    iqn: str
    size: int
    chap: Chap | None
    #: indexes into PORTS
    portals: tuple[int, ...]


def layout(with_chap: bool = True) -> list[TargetDef]:
    defs = [TargetDef("disk", f"{IQN_PREFIX}:disk", DISK_SIZE, None, (0, 1))]
    if with_chap:
        defs += [
            TargetDef("chap", f"{IQN_PREFIX}:chap", SMALL_SIZE, CHAP_ONEWAY, (0,)),
            TargetDef("mutual", f"{IQN_PREFIX}:mutual", SMALL_SIZE, CHAP_MUTUAL, (0,)),
        ]
    return defs


def portals() -> list[Portal]:
    return [Portal(HOST, p) for p in PORTS]


# --------------------------------------------------------------------------- our target


@dataclass
class SanstackLayout(SanstackPeer):
    """Our daemon serving every target of the layout from one JSON config file.

    With ``defs`` holding only the plain disk target and ``quick`` set, it runs the quick-start
    form instead (``serve --portal ... --portal ... --target IQN --lun PATH:SIZE``).
    """

    defs: list[TargetDef] = field(default_factory=list)
    quick: bool = False

    def needs_config(self) -> bool:
        return not self.quick

    def config_dict(self) -> dict:
        targets = []
        for d in self.defs:
            chap = None
            if d.chap is not None:
                chap = {"username": d.chap.user, "secret": d.chap.secret}
                if d.chap.mutual:
                    chap.update(mutual_username=d.chap.target_user, mutual_secret=d.chap.target_secret)
            targets.append({
                "iqn": d.iqn,
                "open_access": True,
                "chap": chap,
                "params": {},
                "portal_groups": [{"tag": n, "portals": [str(self.portals[i])]} for n, i in enumerate(d.portals, 1)],
                "luns": [{"number": 0, "path": str(self.workdir / f"{d.name}.img"), "size": d.size,
                          "block_size": 512}],
                "acls": [],
            })
        return {"version": 1, "data_dir": str(self.data_dir) if self.data_dir else None, "targets": targets}

    def tpgt(self, portal_index: int) -> int:
        return portal_index + 1

    def image(self, name: str) -> Path:
        return self.workdir / f"{name}.img"


def sanstack_target(workdir: Path, defs: list[TargetDef], quick: bool = False) -> SanstackLayout:
    disk = defs[0]
    if quick and len(defs) > 1:
        raise ValueError("the quick-start form serves one target; CHAP targets need the config file")
    return SanstackLayout(
        iqn=disk.iqn, portals=portals(), workdir=workdir, data_dir=workdir / "data",
        luns=[LunSpec(workdir / f"{disk.name}.img", disk.size)], defs=defs, quick=quick,
        extra_args=["--log-level", "DEBUG"],
    )


# --------------------------------------------------------------------------- tgtd


@dataclass
class TgtLayout(TgtPeer):
    """tgtd with one target (tid 1, 2, 3...) per layout entry, disks at LUN 1 (tgt keeps 0)."""

    defs: list[TargetDef] = field(default_factory=list)

    def _configure(self) -> None:
        self.lun_ids = [1]
        for tid, d in enumerate(self.defs, start=TID):
            t = str(tid)
            self.tgtadm("--op", "new", "--mode", "target", "--tid", t, "-T", d.iqn)
            self.tgtadm("--op", "new", "--mode", "logicalunit", "--tid", t, "--lun", "1", "-b", str(self.image(d.name)))
            self.tgtadm("--op", "bind", "--mode", "target", "--tid", t, "-I", "ALL")
            # tgtd offers no digest by default (usr/iscsi/param.c: HeaderDigest None); allow
            # CRC32C so an initiator that asks for it gets it (the CRC32C step).
            for key in ("HeaderDigest", "DataDigest"):
                self.tgtadm("--op", "update", "--mode", "target", "--tid", t, "--name", key, "--value", "CRC32C,None")
            if d.chap is not None:
                self._account(tid, d.chap.user, d.chap.secret, outgoing=False)
                if d.chap.mutual:
                    self._account(tid, d.chap.target_user, d.chap.target_secret, outgoing=True)

    def _account(self, tid: int, user: str, secret: str, *, outgoing: bool) -> None:
        # Accounts are global in tgtd; create each once, bind it to its target.
        self.tgtadm("--op", "new", "--mode", "account", "--user", user, "--password", secret, check=False)
        extra = ["--outgoing"] if outgoing else []
        self.tgtadm("--op", "bind", "--mode", "account", "--tid", str(tid), "--user", user, *extra)

    def tpgt(self, portal_index: int) -> int:
        return 1  # tgtd: every portal is in portal group 1

    def image(self, name: str) -> Path:
        return self.workdir / f"{name}.img"


def tgt_target(workdir: Path, defs: list[TargetDef]) -> TgtLayout:
    specs = [LunSpec(workdir / f"{d.name}.img", d.size) for d in defs]
    return TgtLayout(iqn=defs[0].iqn, portals=portals(), luns=specs, workdir=workdir, defs=defs)


def make_target(kind: str, workdir: Path, defs: list[TargetDef], quick: bool = False):
    """A not-yet-started target of ``kind`` ('sanstack' or 'tgt') serving ``defs``."""
    workdir.mkdir(parents=True, exist_ok=True)
    if kind == "sanstack":
        return sanstack_target(workdir, defs, quick)
    if kind == "tgt":
        return tgt_target(workdir, defs)
    raise ValueError(f"unknown target kind {kind!r}")


def disk_lun(kind: str) -> int:
    """The LUN number the guest sees for each target's disk."""
    return 1 if kind == "tgt" else 0
