"""The raw lane for WRITEs (TargetConnection._write_arrived via PduReader.take_command).

A WRITE(10)/(16) whose immediate data is the whole transfer is written and answered from
the receive buffer, before any PDU object is built, when the regular fast lane would have
run it at once.  These tests hold it to the regular path: it must be taken for ordinary
writes (with digests too), and whatever else applies — ImmediateData=No, a bad data digest,
more data to follow, data shorter than the transfer, FUA, a CmdSN gap, an ORDERED task —
the command must get exactly the answer the regular path gives, and the medium with it.
"""
from __future__ import annotations

import os
import struct

import pytest

from iscsi import pdu as P

from .test_raw_read_lane import BS, answer, command_bytes, login, read10, served, write10  # noqa: F401 (fixture)


def write16(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, flags, lba, blocks, 0, 0)


async def read_back(wire, lba: int, nbytes: int) -> bytes:
    wire.send_raw(command_bytes(wire, read10(lba, nbytes // BS), read=True, edtl=nbytes))
    data, status = await answer(wire)
    assert status.status == 0
    return data


@pytest.mark.parametrize("digests", ["None", "CRC32C"])
async def test_ordinary_writes_take_the_raw_lane_and_reach_the_medium(served, digests):
    wire = await login(served, extra=[("HeaderDigest", digests), ("DataDigest", digests)])
    assert wire.data_digest == (digests == "CRC32C")
    cases = [(write10(10, 8), 10, 4096), (write16(200, 64), 200, 32 << 10), (write10(3000, 1), 3000, 512)]
    payloads = [os.urandom(n) for _, _, n in cases]
    served.taken.clear()
    wire.send_raw(b"".join(command_bytes(wire, cdb, write=True, edtl=n, data=d)
                           for (cdb, _, n), d in zip(cases, payloads)))
    for _ in cases:
        _, resp = await answer(wire)
        assert isinstance(resp, P.ScsiResponse) and resp.status == 0 and resp.residual == 0
    assert served.taken == [True] * len(cases)
    for (_, lba, n), d in zip(cases, payloads):
        assert await read_back(wire, lba, n) == d


async def test_a_bad_data_digest_is_not_written_and_is_rejected(served):
    wire = await login(served, extra=[("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")])
    before = await read_back(wire, 50, 4096)
    raw = bytearray(command_bytes(wire, write10(50, 8), write=True, edtl=4096, data=os.urandom(4096)))
    raw[52 + 100] ^= 0x01  # inside the immediate data: its digest no longer matches
    served.taken.clear()
    wire.send_raw(bytes(raw))
    pdu = await wire.recv(5.0)
    assert isinstance(pdu, P.Reject) and pdu.reason == P.RejectReason.DATA_DIGEST_ERROR
    assert True not in served.taken
    wire.cmdsn -= 1  # ERL 0: the command was dropped with its data, so its CmdSN was not used
    assert await read_back(wire, 50, 4096) == before


async def test_immediate_data_when_it_was_negotiated_off_is_refused(served):
    wire = await login(served, extra=[("ImmediateData", "No")])
    before = await read_back(wire, 60, 4096)
    served.taken.clear()
    wire.send_raw(command_bytes(wire, write10(60, 8), write=True, edtl=4096, data=os.urandom(4096)))
    pdu = await wire.recv(5.0)
    assert isinstance(pdu, P.Reject) and pdu.reason == P.RejectReason.PROTOCOL_ERROR
    assert True not in served.taken
    wire.cmdsn -= 1
    assert await read_back(wire, 60, 4096) == before


async def test_data_short_of_the_transfer_gets_an_r2t_for_the_rest(served):
    wire = await login(served)
    data = os.urandom(8192)
    served.taken.clear()
    wire.send_raw(command_bytes(wire, write10(70, 16), write=True, edtl=8192, data=data[:4096]))
    r2t = await wire.recv(5.0)
    assert isinstance(r2t, P.R2T) and r2t.offset == 4096 and r2t.length == 4096
    assert served.taken == [False]
    wire.send(P.DataOut(final=True, itt=r2t.itt, ttt=r2t.ttt, offset=4096, datasn=0,
                        expstatsn=wire.expstatsn, data=data[4096:]))
    _, resp = await answer(wire)
    assert resp.status == 0
    assert await read_back(wire, 70, 8192) == data


@pytest.mark.parametrize("case", ["fua", "ordered", "cmdsn_gap"])
async def test_what_the_lane_declines_is_written_by_the_regular_path(served, case):
    wire = await login(served)
    data = os.urandom(4096)
    served.taken.clear()
    if case == "fua":
        wire.send_raw(command_bytes(wire, write16(80, 8, 0x08), write=True, edtl=4096, data=data))
    elif case == "ordered":
        wire.send_raw(command_bytes(wire, write10(80, 8), write=True, edtl=4096, data=data, attr=2))
    else:  # the WRITE arrives before the command whose CmdSN precedes it
        first = wire.cmdsn
        wire.cmdsn += 1
        wire.send_raw(command_bytes(wire, write10(80, 8), write=True, edtl=4096, data=data))
        wire.send_raw(command_bytes(wire, read10(0, 1), read=True, edtl=512, cmdsn=first))
    answers = [await answer(wire) for _ in range(2 if case == "cmdsn_gap" else 1)]
    assert all(resp.status == 0 for _, resp in answers)
    assert served.taken[0] is False
    assert await read_back(wire, 80, 4096) == data


async def test_a_write_past_the_end_gets_the_regular_check_condition(served):
    wire = await login(served)
    blocks = served.lu.num_blocks
    served.taken.clear()
    wire.send_raw(command_bytes(wire, write16(blocks - 4, 8), write=True, edtl=4096, data=bytes(4096)))
    _, resp = await answer(wire)
    assert resp.status == 2 and bytes(resp.data)[2 + 12] == 0x21  # LBA OUT OF RANGE
    assert served.taken == [False]
