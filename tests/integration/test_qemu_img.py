"""qemu-img (Debian qemu-utils + qemu-block-extra's libiscsi driver) as a real client:
a 256 MiB random image copied into a LUN over iscsi:// and back comes out bit-identical, and
``qemu-img bench`` reads and writes at queue depth finish without error (issue 2)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .conftest import require_qemu_iscsi, run

IMAGE_SIZE = 256 << 20
CHUNK = 1 << 20


def random_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes; return their sha256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size // CHUNK):
            block = os.urandom(CHUNK)
            h.update(block)
            f.write(block)
    return h.hexdigest()


def sha256(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    remaining = limit if limit is not None else float("inf")
    with open(path, "rb") as f:
        while remaining > 0:
            block = f.read(int(min(CHUNK, remaining)))
            if not block:
                break
            h.update(block)
            remaining -= len(block)
    return h.hexdigest()


def test_convert_into_lun_and_back(peer_kind, peer_factory, tmp_path):
    require_qemu_iscsi()
    peer = peer_factory(peer_kind, size=IMAGE_SIZE)
    src, back = tmp_path / "src.raw", tmp_path / "back.raw"
    digest = random_file(src, IMAGE_SIZE)
    # -n: the LUN exists (qemu cannot create iscsi images); -t none: no host cache in between.
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", "-t", "none", str(src), peer.url()])
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", "-T", "none", peer.url(), str(back)])
    assert back.stat().st_size == IMAGE_SIZE
    assert sha256(back) == digest, "data read back over iSCSI differs from what was written"
    # And the target really stored it in its image file (not only in a cache it serves from).
    assert sha256(peer.luns[0].path, IMAGE_SIZE) == digest


def test_qemu_img_bench_reads_and_writes(peer_kind, peer_factory):
    require_qemu_iscsi()
    peer = peer_factory(peer_kind, size="64M")
    base = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-c", "2000", "-d", "16", "-s", "4096"]
    for extra in ([], ["-w"], ["-w", "--pattern=0x5a", "-S", "8192"]):
        out = run([*base, *extra, peer.url()]).stdout
        assert "Run completed in" in out, out
    # The patterned pass wrote 0x5a into every other 4 KiB block from offset 0.
    with open(peer.luns[0].path, "rb") as f:
        assert f.read(4096) == b"\x5a" * 4096
