"""Managed iSCSI target processes for tests and benchmarks: tgtd (the peer) and our own daemon."""
from __future__ import annotations

from pathlib import Path

from .base import Chap, LunSpec, Portal, TargetPeer, free_port, free_portals, iscsi_url, parse_size

PEER_KINDS = ("sanstack", "tgt")


def make_peer(kind: str, workdir: Path, **kwargs) -> TargetPeer:
    """A not-yet-started peer of ``kind`` ("sanstack" or "tgt") with sparse images under ``workdir``."""
    if kind == "tgt":
        from .tgt import TgtPeer

        return TgtPeer.create(workdir, **kwargs)
    if kind == "sanstack":
        from .sanstack import SanstackPeer

        return SanstackPeer.create(workdir, **kwargs)
    raise ValueError(f"unknown peer {kind!r}; choose from {', '.join(PEER_KINDS)}")


__all__ = [
    "Chap", "LunSpec", "PEER_KINDS", "Portal", "TargetPeer", "free_port", "free_portals", "iscsi_url",
    "make_peer", "parse_size",
]
