"""Large transfers end to end: our initiator's dd writes 1 MiB commands (many R2Ts) and reads
them back (many Data-In PDUs each), against both targets; qemu-img reads the same bytes
independently, so a symmetric bug in one client cannot hide."""
from __future__ import annotations

import hashlib
import os
import sys

from .conftest import require_qemu_iscsi, run

SIZE = 24 << 20  # 24 one-MiB commands each way


def _dd(src: str, dst: str, count: int | None = None) -> None:
    cmd = [sys.executable, "-m", "iscsi.initiator.cli", "dd", f"if={src}", f"of={dst}", "bs=1M"]
    if count is not None:
        cmd.append(f"count={count}")
    run(cmd)


def test_one_mib_commands_round_trip(peer, tmp_path):
    data = os.urandom(SIZE)
    src = tmp_path / "src.raw"
    src.write_bytes(data)
    url = peer.url(0)
    _dd(str(src), url)
    back = tmp_path / "back.raw"
    _dd(url, str(back), count=SIZE >> 20)
    assert hashlib.sha256(back.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    require_qemu_iscsi()
    other = tmp_path / "qemu.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(other)])
    assert hashlib.sha256(other.read_bytes()[:SIZE]).hexdigest() == hashlib.sha256(data).hexdigest()
