"""An image that goes away under a daemon run from a config file.

Deleted while served, its data lives on only in the daemon's open file: `lun list` says so
and where to copy it from.  Missing at the next start, a new empty image would bring the LU
back blank under the same identity, so initiators would see their data gone without an
error: the start is refused, naming how to go on.  Removing the LUN through the daemon
(or a change that is undone) takes the note back, so the path can be used afresh.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.peers.sanstack import SanstackPeer

SIZE = 8 << 20


def initiator(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "iscsi.initiator.cli", "-i", "iqn.2026-11.org.sanstack:life", *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def write_then_read(peer: SanstackPeer, data: bytes) -> bytes:
    """Write ``data`` at LBA 0 of LUN 0 with the initiator CLI (FUA), then read it back."""
    src, back = peer.workdir / "src.bin", peer.workdir / "back.bin"
    src.write_bytes(data)
    initiator("write", peer.url(0), "--input", str(src), "--fua")
    initiator("dd", f"if={peer.url(0)}", f"of={back}", "bs=4k", f"count={len(data) // 4096}")
    return back.read_bytes()


@pytest.fixture
def peer(tmp_path):
    p = SanstackPeer.create(tmp_path / "t", sizes=[SIZE], use_config=True)
    yield p
    if p.alive():
        p.stop()
    p.cleanup()


def test_an_image_deleted_while_served_is_shown_with_where_its_data_still_is(peer):
    peer.start()
    data = os.urandom(64 << 10)
    assert write_then_read(peer, data) == data
    image = peer.luns[0].path
    image.unlink()
    listing = peer.admin("lun", "list")
    assert listing.returncode == 0, listing.stderr
    assert ",deleted" in listing.stdout and f"/proc/{peer.proc.pid}/fd/" in listing.stdout, listing.stdout
    held = listing.stdout.split(f"/proc/{peer.proc.pid}/fd/")[1].split()[0]
    with open(f"/proc/{peer.proc.pid}/fd/{held}", "rb") as f:   # the way back the listing names
        assert f.read(len(data)) == data


def test_a_missing_image_that_was_served_is_not_created_blank_at_the_next_start(peer):
    peer.start()
    data = os.urandom(64 << 10)
    assert write_then_read(peer, data) == data
    peer.stop()
    image = peer.luns[0].path
    image.unlink()
    with pytest.raises((RuntimeError, TimeoutError)):
        peer.start()
    assert not image.exists(), "a blank image was created in place of the served one"
    log = peer.log_text()
    assert "is missing, but this daemon served it before" in log, log[-2000:]
    note = Path(log.split("delete ")[-1].split()[0].rstrip(".,;'\""))
    assert note.exists(), log[-2000:]
    note.unlink()                       # the admin's decision: start over with an empty image
    peer.start()
    assert image.exists() and write_then_read(peer, data) == data


def test_a_lun_removed_through_the_daemon_may_be_added_afresh_at_the_same_path(peer):
    peer.start()
    image = peer.luns[0].path
    r = peer.admin("lun", "remove", peer.iqn, "0")
    assert r.returncode == 0, r.stderr
    image.unlink()
    r = peer.admin("lun", "add", peer.iqn, f"{image}:8M", "--lun", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    assert image.exists()
    peer.stop()
    peer.start()                        # and served again after a restart: the note is back
    assert peer.alive()
