"""Review of the block device's SCSI semantics against SPC-4/SBC-4, driven in-process.

Each test pins one behaviour a real initiator (Linux sd, ESXi, Windows, libiscsi's
iscsi-test-cu) relies on, asserting the bytes the logical unit answers.
"""
from __future__ import annotations

import asyncio
import struct
import threading

from tests.unit.test_scsi_support import Initiator, make_lu, parse_sense, request_sense

NOT_READY_SANITIZE = (0x2, 0x04, 0x1B)


async def ready(lu) -> Initiator:
    ini = Initiator(lu)
    await ini.clear_ua()
    return ini


def sanitize_cdb(sa: int, plen: int = 0, immed: int = 0) -> bytes:
    return bytes((0x48, sa | (0x80 if immed else 0), 0, 0, 0, 0, 0)) + struct.pack(">HB", plen, 0)


async def test_sanitize_in_progress_sense_carries_progress_indication():
    """SBC-4 §4.11: REQUEST SENSE during a sanitize returns NOT READY, SANITIZE IN PROGRESS with
    the PROGRESS INDICATION in the sense-key specific field (SKSV=1, bytes 16-17 fixed format)."""
    lu = make_lu("ram", size=1 << 20)
    ini = await ready(lu)
    gate = threading.Event()
    real = lu.backstore.write
    calls = []

    def slow_write(off, data, fua=False):
        calls.append(off)
        if len(calls) == 2:  # first chunk written, hold the second
            gate.wait(10)
        return real(off, data, fua)

    lu.backstore.write = slow_write
    import iscsi.scsi.lu as lu_mod
    old_chunk = lu_mod.SANITIZE_CHUNK_BYTES
    lu_mod.SANITIZE_CHUNK_BYTES = 256 << 10  # 4 chunks over the 1 MiB LU
    try:
        params = bytes((0x01, 0, 0, 4)) + b"\xde\xad\xbe\xef"
        await ini.ok(sanitize_cdb(0x01, len(params), immed=1), params)
        for _ in range(200):
            if len(calls) >= 2:
                break
            await asyncio.sleep(0.005)
        raw = bytes((await ini.ok(request_sense(0))).data)
        assert raw[0] == 0x70 and raw[2] & 0x0F == 0x2 and raw[12:14] == b"\x04\x1b"
        assert raw[15] == 0x80  # SKSV, progress indication
        assert struct.unpack_from(">H", raw, 16)[0] == 0x4000  # one quarter done
        raw = bytes((await ini.ok(request_sense(1))).data)
        assert raw[:4] == b"\x72\x02\x04\x1b"
        assert raw[8:16] == b"\x02\x06\x00\x00\x80\x40\x00\x00"
        s = await ini.fails(bytes(6))  # TEST UNIT READY refused with the same progress
        assert s.code == NOT_READY_SANITIZE and s.sks == b"\x80\x40\x00"
    finally:
        gate.set()
        lu_mod.SANITIZE_CHUNK_BYTES = old_chunk
        for _ in range(400):
            if not lu.sanitizing:
                break
            await asyncio.sleep(0.01)
    assert not lu.sanitizing
