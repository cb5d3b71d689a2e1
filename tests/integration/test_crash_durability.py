"""Acknowledged writes survive a crash of the target (issue 2).

A write acknowledged with FUA, or followed by an acknowledged SYNCHRONIZE CACHE, must be in
the image file when the daemon is SIGKILLed right afterwards -- no chance to flush anything.
The commands go out through libiscsi (tools/libiscsi.py) so nothing else (no client-side
flush on close) happens between the acknowledgement and the kill.

(SIGKILL proves the data left the daemon's own memory for the kernel; it cannot prove the
kernel wrote it to the platter -- that needs fdatasync, which the unit tests of the backstore
check.)
"""
from __future__ import annotations

import os
import random
import zlib

import pytest

from tools.libiscsi import Session

BLOCK = 512
IO_SIZE = 4096
WRITES = 16


def _blocks(seed: int, nblocks: int) -> dict[int, bytes]:
    rng = random.Random(seed)
    lbas = rng.sample(range(0, nblocks - IO_SIZE // BLOCK, IO_SIZE // BLOCK), WRITES)
    return {lba: rng.randbytes(IO_SIZE) for lba in lbas}


def _image_holds(path, blocks: dict[int, bytes]) -> list[int]:
    """LBAs whose data is NOT in the image file."""
    bad = []
    with open(path, "rb") as f:
        for lba, data in blocks.items():
            f.seek(lba * BLOCK)
            if f.read(len(data)) != data:
                bad.append(lba)
    return bad


@pytest.mark.parametrize("mode", ["fua", "sync-cache-10", "sync-cache-16"])
def test_acknowledged_writes_survive_sigkill(peer_kind, peer_factory, mode):
    peer = peer_factory(peer_kind, size="64M")
    blocks = _blocks(zlib.crc32(mode.encode()), peer.luns[0].size // BLOCK)
    s = Session.to_peer(peer).connect()
    try:
        for lba, data in blocks.items():
            s.write16(lba, data, block_size=BLOCK, fua=(mode == "fua"))
        if mode == "sync-cache-10":
            s.synchronize_cache10()
        elif mode == "sync-cache-16":
            s.synchronize_cache16()
        peer.kill()  # right after the last GOOD status
    finally:
        s.close(logout=False)
    assert not peer.alive()
    missing = _image_holds(peer.luns[0].path, blocks)
    assert not missing, f"acknowledged ({mode}) writes lost after SIGKILL at LBAs {missing}"
    # And the restarted daemon serves them.
    peer.restart()
    with Session.to_peer(peer) as s:
        for lba, data in blocks.items():
            assert s.read16(lba, len(data) // BLOCK, block_size=BLOCK) == data, f"LBA {lba} after restart"


@pytest.mark.peers("sanstack")  # tgtd ignores SIGTERM
def test_sigterm_finishes_and_flushes(peer_kind, peer_factory):
    """SIGTERM stops the daemon cleanly (exit 0) with plain writes -- no FUA, no SYNCHRONIZE
    CACHE -- in the image file (issue 2: in-flight commands finish, data flushed)."""
    peer = peer_factory(peer_kind, size="64M")
    blocks = _blocks(7, peer.luns[0].size // BLOCK)
    with Session.to_peer(peer) as s:
        for lba, data in blocks.items():
            s.write16(lba, data, block_size=BLOCK)
    assert peer.stop() == 0, peer.log_text()[-2000:]
    assert not _image_holds(peer.luns[0].path, blocks)
    # A sparse image stays sparse: 16 x 4 KiB written must not allocate the 64 MiB.
    assert os.stat(peer.luns[0].path).st_blocks * 512 < 8 << 20
