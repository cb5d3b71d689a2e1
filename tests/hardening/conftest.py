"""A live target daemon (python -m iscsi.target serve) shared by a module's hardening tests,
the memory it uses, and witnesses: sessions opened before the abuse that must keep working.
"""
from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tools.peers.sanstack import SanstackPeer

from .raw import RawSession

LUN_SIZE = 64 << 20
BLOCK = 512
#: What one abusive case may add to the daemon's resident memory: the largest legitimate
#: buffer is one 256 KiB data segment per connection; 64 MiB is far above any honest use
#: and far below what an unbounded allocation reaches.
RSS_GROWTH_LIMIT = 64 << 20


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Witness:
    """A raw session and a libiscsi session, each verifying its own blocks when checked."""

    def __init__(self, peer: SanstackPeer, lba: int) -> None:
        self.peer = peer
        self.lba = lba
        self.rng = random.Random(lba)
        host, port = peer.portals[0].host, peer.portals[0].port
        self.raw = RawSession(host, port)
        resp = self.raw.login(peer.iqn, initiator="iqn.2026-11.org.sanstack.hardening:witness")
        assert resp.status_class == 0, resp
        self.libiscsi = None
        try:
            from tools.libiscsi import Session

            self.libiscsi = Session.to_peer(peer, initiator="iqn.2026-11.org.sanstack.hardening:libiscsi").connect()
        except OSError:  # libiscsi7 not installed: the raw witness alone
            self.libiscsi = None
        self.checks = 0

    def check(self) -> None:
        """Write, read back and compare on both sessions; ping; raises if anything is off."""
        payload = self.rng.randbytes(8 * BLOCK)
        assert self.raw.write(self.lba, payload) == 0
        status, data = self.raw.read(self.lba, len(payload))
        assert status == 0 and data == payload, "witness read back other data"
        assert self.raw.ping(timeout=2.0) < 1.0
        if self.libiscsi is not None:
            other = self.rng.randbytes(8 * BLOCK)
            self.libiscsi.write16(self.lba + 64, other)
            assert self.libiscsi.read16(self.lba + 64, 8) == other
        self.checks += 1

    def close(self) -> None:
        try:
            self.raw.logout()
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass
        self.raw.close()
        if self.libiscsi is not None:
            self.libiscsi.close()


@contextmanager
def running_daemon(workdir: Path, size: int | str = LUN_SIZE, *, sizes: list | None = None,
                   configure: Callable[[SanstackPeer], None] | None = None) -> Iterator[SanstackPeer]:
    """Our target daemon with one LU of ``size`` (or one per ``sizes``), stopped and cleaned
    up afterwards; ``configure`` changes the peer (e.g. where an image lives) before it starts."""
    peer = SanstackPeer.create(workdir, sizes=sizes) if sizes is not None else SanstackPeer.create(workdir, size=size)
    if configure is not None:
        configure(peer)
    peer.start()
    try:
        yield peer
    finally:
        try:
            if peer.alive():
                peer.stop()
        finally:
            peer.cleanup()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory) -> SanstackPeer:
    with running_daemon(tmp_path_factory.mktemp("hardening-target")) as peer:
        yield peer


@pytest.fixture(scope="module")
def witness(daemon) -> Witness:
    w = Witness(daemon, lba=100_000)
    w.check()
    yield w
    w.close()


@pytest.fixture
def baseline(daemon, witness):
    """RSS before the case; after it: the daemon lives, memory is bounded, the witness works."""
    before = rss_bytes(daemon.proc.pid)
    yield before
    assert daemon.alive(), "the target daemon died\n" + daemon.log_text()[-3000:]
    witness.check()
    grown = rss_bytes(daemon.proc.pid) - before
    assert grown < RSS_GROWTH_LIMIT, f"target RSS grew by {grown >> 20} MiB during one case"


@pytest.fixture
def clean_log(daemon, baseline):
    """No case may end in the connection's catch-all (a traceback instead of an answer)."""
    before = daemon.log_text().count("conn.internal_error")
    yield
    assert daemon.log_text().count("conn.internal_error") == before, daemon.log_text()[-3000:]
