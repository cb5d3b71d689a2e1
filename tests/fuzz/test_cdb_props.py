"""Properties of CDB parsing in the SCSI core (iscsi/scsi/lu.py over a RAM backstore), hypothesis.

Whatever CDB and Data-Out an initiator sends, LogicalUnit.execute:
- never raises (an exception would become HARDWARE ERROR / INTERNAL TARGET FAILURE at best);
- returns a SAM-5 §5.3 status, and with CHECK CONDITION well-formed sense data (SPC-4 §4.5:
  fixed 70h/71h or descriptor 72h/73h, ADDITIONAL SENSE LENGTH matching, at most 252 bytes);
- never returns more Data-In than the CDB's ALLOCATION LENGTH (or TRANSFER LENGTH x block
  size for reads) allows (SPC-4 §4.2.5.6).
Commands run in sequences, so state the fuzzer creates (reservations, mode pages such as
D_SENSE, unit attentions, a sanitize) carries into the next command.
"""
from __future__ import annotations

import os

import asyncio
import struct


from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iscsi.backstore.ram import RamBackstore
from iscsi.scsi.lu import LogicalUnit
from iscsi.scsi.types import ITNexus, ScsiCommand, ScsiResult, Status, TaskAttr

# SANSTACK_FUZZ_EXAMPLES raises the count for a deeper run than CI's.
FUZZ = settings(max_examples=int(os.environ.get("SANSTACK_FUZZ_EXAMPLES", 300)), deadline=None, suppress_health_check=[HealthCheck.too_slow])

NEXUSES = [
    ITNexus("iqn.2026-11.org.example:a,i,0x000000000001", "iqn.2026-11.org.example:t,t,0x0001", 1, 1),
    ITNexus("iqn.2026-11.org.example:b,i,0x000000000002", "iqn.2026-11.org.example:t,t,0x0002", 2, 2),
]
# Every operation code the LU implements (commands.py), so most CDBs reach a handler.
KNOWN_OPCODES = [0x00, 0x03, 0x08, 0x0A, 0x12, 0x15, 0x16, 0x17, 0x1A, 0x1B, 0x1D, 0x1E, 0x25, 0x28, 0x2A,
                 0x2E, 0x2F, 0x34, 0x35, 0x37, 0x41, 0x42, 0x48, 0x55, 0x56, 0x57, 0x5A, 0x5E, 0x5F, 0x83,
                 0x84, 0x88, 0x89, 0x8A, 0x8B, 0x8E, 0x8F, 0x90, 0x91, 0x93, 0x9C, 0x9E, 0xA0, 0xA3, 0xA8,
                 0xAA, 0xAE, 0xAF, 0xB7]
STATUSES = {int(s) for s in Status}
MAX_SENSE = 252  # SPC-4 §4.5.1


def _be(cdb: bytes, start: int, end: int) -> int:
    return int.from_bytes(cdb[start:end], "big")


def data_in_limit(cdb: bytes, block_size: int) -> int:
    """Most Data-In bytes the CDB allows (its ALLOCATION LENGTH or TRANSFER LENGTH)."""
    op = cdb[0]
    if op in (0x03, 0x1A):
        return cdb[4]
    if op == 0x08:
        return (cdb[4] or 256) * block_size
    if op == 0x12:
        return _be(cdb, 3, 5)
    if op == 0x25:
        return 8
    if op == 0x28:
        return _be(cdb, 7, 9) * block_size
    if op in (0x37, 0x5A, 0x5E):
        return _be(cdb, 7, 9)
    if op in (0x84, 0x9E):
        return _be(cdb, 10, 14)
    if op == 0x88:
        return _be(cdb, 10, 14) * block_size
    if op in (0xA0, 0xA3, 0xB7):
        return _be(cdb, 6, 10)
    if op == 0xA8:
        return _be(cdb, 6, 10) * block_size
    return 0  # no Data-In for any other command


def check_sense(raw: bytes) -> None:
    assert 8 <= len(raw) <= MAX_SENSE, f"sense of {len(raw)} bytes"
    code = raw[0] & 0x7F
    if code in (0x70, 0x71):
        assert len(raw) >= 18 and len(raw) == 8 + raw[7], raw.hex()
    elif code in (0x72, 0x73):
        assert len(raw) == 8 + raw[7], raw.hex()
        pos = 8
        while pos < len(raw):
            assert pos + 2 <= len(raw), raw.hex()
            pos += 2 + raw[pos + 1]
        assert pos == len(raw), f"descriptors overrun the sense data: {raw.hex()}"
    else:
        raise AssertionError(f"sense response code {raw[0]:#x}")


def check_result(cdb: bytes, result: object, block_size: int) -> None:
    assert isinstance(result, ScsiResult), result
    assert result.status in STATUSES, result.status
    if result.status == Status.CHECK_CONDITION:
        assert result.sense, "CHECK CONDITION without sense data"
    if result.sense:
        check_sense(bytes(result.sense))
    limit = data_in_limit(bytes(cdb).ljust(16, b"\0"), block_size)  # the LU reads a short CDB zero-padded
    assert len(result.data) <= limit, (
        f"CDB {cdb.hex()} returned {len(result.data)} bytes, allocation length allows {limit}")


@st.composite
def commands(draw):
    op = draw(st.one_of(st.sampled_from(KNOWN_OPCODES), st.integers(0, 255)))
    size = draw(st.sampled_from([6, 10, 12, 16, 16, 16]))
    rest = draw(st.binary(min_size=size - 1, max_size=size - 1))
    cdb = (bytes([op]) + rest).ljust(16, b"\0")
    data_out = draw(st.one_of(st.just(b""), st.binary(max_size=1100)))
    attr = draw(st.sampled_from(list(TaskAttr)))
    nexus = draw(st.sampled_from(NEXUSES))
    return cdb, data_out, attr, nexus


def _lu(block_size: int) -> LogicalUnit:
    return LogicalUnit(RamBackstore(256 * block_size, block_size), serial=f"fuzz-{block_size}")


async def _run(lu: LogicalUnit, cmds) -> None:
    for cdb, data_out, attr, nexus in cmds:
        # The transport asks how much to solicit first; that must not raise either.
        lu.data_out_length(cdb)
        try:
            result = await asyncio.wait_for(
                lu.execute(ScsiCommand(cdb, 0, nexus, data_out, len(data_out), attr)), 10)
        except Exception as exc:  # noqa: BLE001 - the property is "nothing escapes"
            raise AssertionError(f"CDB {cdb.hex()} raised {exc!r}") from exc
        check_result(cdb, result, lu.block_size)


@FUZZ
@given(cmds=st.lists(commands(), min_size=1, max_size=8), bs=st.sampled_from([512, 4096]))
def test_execute_never_raises_and_answers_well_formed(cmds, bs):
    asyncio.run(_run(_lu(bs), cmds))


def _raw(cdb: bytes, data_out: bytes) -> None:
    async def go():
        lu = _lu(512)
        lu.data_out_length(cdb)
        result = await lu.execute(ScsiCommand(cdb, 0, NEXUSES[0], data_out, len(data_out), TaskAttr.SIMPLE))
        check_result(cdb, result, 512)

    asyncio.run(go())


@FUZZ
@given(cdb=st.binary(min_size=16, max_size=32), data_out=st.binary(max_size=600))
def test_execute_on_raw_cdb_bytes(cdb, data_out):
    """Raw bytes as the iSCSI transport hands them over: 16 bytes, more with an extended-CDB AHS."""
    _raw(cdb, data_out)


def test_short_cdb_is_an_error_not_an_exception():
    """A CDB shorter than its opcode's length is read as if zero-padded (the IndexError seen
    first was in this file's oracle, not in the LU)."""
    for cdb in (b"\x03", b"\x12", b"\x28\x00", b"\x88", b"\x2a"):
        _raw(cdb, b"")


def test_known_allocation_lengths_are_honoured():
    """Sanity check of the oracle itself: INQUIRY with allocation length 5 gives 5 bytes."""
    async def go():
        lu = _lu(512)
        cdb = struct.pack(">BBBHB", 0x12, 0, 0, 5, 0).ljust(16, b"\0")
        r = await lu.execute(ScsiCommand(cdb, 0, NEXUSES[0]))
        assert r.status in (Status.GOOD, Status.CHECK_CONDITION)
        if r.status == Status.GOOD:
            assert len(r.data) == 5
        assert data_in_limit(cdb, 512) == 5

    asyncio.run(go())
