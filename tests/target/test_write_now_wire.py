"""WRITE(10)/(16) through the transport's shortcut (LogicalUnit.write_now) on the wire: the
bare GOOD response, an error's CHECK CONDITION, and the full path for what it declines."""
from __future__ import annotations

import os
import struct

import pytest

from iscsi import pdu as P
from iscsi.scsi.lu import LogicalUnit

from .test_raw_read_lane import answer, command_bytes, login, read10, served  # noqa: F401 (fixture)


def write16(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, flags, lba, blocks, 0, 0)


@pytest.mark.parametrize("flags", [0, 0x08])  # plain: the shortcut; FUA: the full path
async def test_a_write_is_answered_good_without_residual_and_reads_back(served, monkeypatch, flags):
    calls = []
    real = LogicalUnit.write_now

    def spy(self, cdb, nexus, data):
        r = real(self, cdb, nexus, data)
        calls.append(r is not None)
        return r

    monkeypatch.setattr(LogicalUnit, "write_now", spy)
    wire = await login(served)
    data = os.urandom(8192)
    wire.send_raw(command_bytes(wire, write16(500, 16, flags), write=True, edtl=8192, data=data))
    _, resp = await answer(wire)
    assert isinstance(resp, P.ScsiResponse) and resp.status == 0 and not resp.data
    assert not (resp.overflow or resp.underflow) and resp.residual == 0
    # Plain: done on the raw lane.  FUA: declined there, then asked again (and declined) by
    # the regular fast lane before start() takes it.
    assert calls == ([True] if flags == 0 else [False, False])
    wire.send_raw(command_bytes(wire, read10(500, 16), read=True, edtl=8192))
    got, status = await answer(wire)
    assert status.status == 0 and got == data


async def test_a_failing_write_gets_its_check_condition(served, monkeypatch):
    wire = await login(served)

    def broken(offset, data, fua=False):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(served.lu.backstore, "write", broken)
    wire.send_raw(command_bytes(wire, write16(7, 8), write=True, edtl=4096, data=bytes(4096)))
    _, resp = await answer(wire)
    assert isinstance(resp, P.ScsiResponse) and resp.status == 2 and resp.residual == 0
    sense = bytes(resp.data)[2:]
    assert sense[2] & 0x0F == 0x07  # DATA PROTECT: SPACE ALLOCATION FAILED WRITE PROTECT (thin LU full)
