"""Zero-copy READs at the SCSI layer: held ranges, the writers that wait for them, spans."""
from __future__ import annotations

import asyncio
import errno
import os
import struct

import pytest

from iscsi.scsi import zerocopy
from iscsi.scsi.types import ScsiCommand, ScsiResult, TaskAttr
from iscsi.scsi.zerocopy import FileExtent, ReadFence, write_span

from .test_scsi_support import NEXUS_A, Initiator, make_lu, read10, write10

BS = 512
BLOCKS_128K = (128 << 10) // BS


class Owner:
    """Stands in for the connection a held READ went out on."""

    def __init__(self) -> None:
        self.solicited = 0
        self.timed_out = 0
        self.removed = 0

    def solicit_ack(self) -> None:
        self.solicited += 1

    def ack_timed_out(self) -> None:
        self.timed_out += 1

    def held_range_removed(self) -> None:
        self.removed += 1


def zc_read(lba: int, blocks: int) -> ScsiCommand:
    return ScsiCommand(read10(lba, blocks), 0, NEXUS_A, b"", blocks * BS, TaskAttr.SIMPLE, 1, True)


def write_cmd(lba: int, data: bytes, attr: TaskAttr = TaskAttr.SIMPLE, fua: bool = False) -> ScsiCommand:
    return ScsiCommand(write10(lba, len(data) // BS, 0x08 if fua else 0), 0, NEXUS_A, data, len(data), attr, 2)


async def ready_lu(tmp_path, kind: str = "file"):
    lu = make_lu(kind, tmp_path, size=8 << 20, block_size=BS)
    await Initiator(lu).clear_ua()
    return lu


async def settle(rounds: int = 5) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


# -- spans ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cdb,span", [
    (bytes([0x0A, 0x01, 0x02, 0x03, 0x04, 0]), (0x10203 * BS, (0x10203 + 4) * BS)),  # WRITE(6)
    (bytes([0x0A, 0, 0, 8, 0, 0]), (8 * BS, (8 + 256) * BS)),  # WRITE(6): 0 blocks means 256
    (struct.pack(">BBIBHB", 0x2A, 0, 100, 0, 8, 0), (100 * BS, 108 * BS)),  # WRITE(10)
    (struct.pack(">BBIBHB", 0x2E, 0, 100, 0, 8, 0), (100 * BS, 108 * BS)),  # WRITE AND VERIFY(10)
    (struct.pack(">BBIIBB", 0xAA, 0, 7, 9, 0, 0), (7 * BS, 16 * BS)),  # WRITE(12)
    (struct.pack(">BBQIBB", 0x8A, 0, 1 << 33, 2, 0, 0), ((1 << 33) * BS, ((1 << 33) + 2) * BS)),  # WRITE(16)
    (struct.pack(">BBQIBB", 0x93, 0, 5, 0, 0, 0), (5 * BS, 1 << 30)),  # WRITE SAME(16), 0 = to the end
    (struct.pack(">BBIBHB", 0x41, 0, 5, 0, 0, 0), (5 * BS, 1 << 30)),  # WRITE SAME(10), 0 = to the end
    (struct.pack(">BBQHHBB", 0x9C, 0, 40, 0, 3, 0, 0), (40 * BS, 43 * BS)),  # WRITE ATOMIC(16)
    (struct.pack(">BBQ3xBBB", 0x89, 0, 12, 1, 0, 0), (12 * BS, 13 * BS)),  # COMPARE AND WRITE
    (struct.pack(">BBIBHB", 0x42, 0, 0, 0, 24, 0), (0, 1 << 30)),  # UNMAP: the whole LU
    (bytes([0x8A, 0, 0]), (0, 1 << 30)),  # a short CDB: the whole LU, never an exception
])
def test_write_span(cdb, span):
    assert write_span(cdb, BS, 1 << 30) == span


def test_every_medium_writing_opcode_has_a_span():
    assert {0x0A, 0x2A, 0x2E, 0x41, 0x42, 0x48, 0x89, 0x8A, 0x8B, 0x8E, 0x93, 0x9C, 0xAA, 0xAE} <= zerocopy.WRITE_OPCODES
    assert 0x28 not in zerocopy.WRITE_OPCODES and 0x88 not in zerocopy.WRITE_OPCODES


# -- the fence -----------------------------------------------------------------------------

async def test_clear_returns_once_the_overlapping_hold_is_released():
    fence = ReadFence()
    hold = fence.hold(None, 4096, 8192)
    hold.owner = owner = Owner()
    assert fence.overlapping(0, 4097) and fence.overlapping(12287, 20000)
    assert not fence.overlapping(0, 4096) and not fence.overlapping(12288, 20000)
    waiter = asyncio.ensure_future(fence.clear(8000, 9000))
    await settle()
    assert not waiter.done() and owner.solicited == 1  # the initiator is asked at once
    hold.release()
    await asyncio.wait_for(waiter, 1)
    assert not fence.holds
    hold.release()  # twice is harmless


async def test_clear_drops_a_holder_that_never_acknowledges():
    fence = ReadFence(ack_timeout=0.2)
    hold = fence.hold(None, 0, 4096)
    hold.owner = owner = Owner()
    other = fence.hold(None, 1 << 20, 4096)  # not in the way: stays held
    await asyncio.wait_for(fence.clear(0, 512), 2)
    assert owner.timed_out == 1 and owner.solicited >= 1
    assert hold.released and not other.released


async def test_extent_read_of_an_image_cut_short_fails_and_stops_zero_copy(tmp_path):
    """The LU never reads past its size, so an image shorter than the extent was truncated
    behind the daemon's back: its lost blocks must not be sent as zeroes under the GOOD
    status already queued.  The read fails and the LU's READs are copied from then on (the
    retry gets the backstore's MEDIUM ERROR)."""
    path = tmp_path / "f"
    path.write_bytes(b"x" * 1000)
    fd = os.open(path, os.O_RDONLY)

    class Source:
        fileno = fd

    fence = ReadFence()
    whole = fence.hold(Source(), 0, 1000)
    assert whole.read() == b"x" * 1000 and whole.read(400) == b"x" * 600
    assert fence.sendfile_ok
    ext = fence.hold(Source(), 512, 1024)
    with pytest.raises(OSError) as err:
        ext.read()
    assert err.value.errno == errno.EIO and "shorter than the logical unit" in str(err.value)
    assert not fence.sendfile_ok
    os.close(fd)
    Source.fileno = -1
    with pytest.raises(OSError):
        whole.read()


# -- the logical unit ----------------------------------------------------------------------

async def test_large_zero_copy_read_is_an_extent_of_the_image(tmp_path):
    lu = await ready_lu(tmp_path)
    data = os.urandom(128 << 10)
    lu.backstore.write(64 * BS, data)
    r = lu.start(zc_read(64, BLOCKS_128K))
    assert isinstance(r, ScsiResult) and isinstance(r.data, FileExtent)
    assert len(r.data) == len(data) and r.data.read() == data
    assert lu.fence.holds == {r.data}
    # without the transport's consent, or too small, or from RAM: bytes as always
    plain = ScsiCommand(read10(64, BLOCKS_128K), 0, NEXUS_A, b"", len(data), TaskAttr.SIMPLE, 1)
    assert bytes(lu.start(plain).data) == data
    assert not isinstance(lu.start(zc_read(64, 8)).data, FileExtent)
    ram = await ready_lu(tmp_path, "ram")
    assert not isinstance(ram.start(zc_read(0, BLOCKS_128K)).data, FileExtent)


async def test_overlapping_write_waits_for_the_hold_and_others_do_not(tmp_path):
    lu = await ready_lu(tmp_path)
    old = os.urandom(128 << 10)
    lu.backstore.write(0, old)
    extent = lu.start(zc_read(0, BLOCKS_128K)).data
    extent.owner = owner = Owner()

    elsewhere = lu.start(write_cmd(BLOCKS_128K, os.urandom(BS)))
    assert isinstance(elsewhere, ScsiResult) and elsewhere.status == 0  # at once

    new = os.urandom(8 * BS)
    pending = lu.start(write_cmd(8, new))
    assert not isinstance(pending, ScsiResult)
    task = asyncio.ensure_future(pending)
    await settle()
    assert not task.done() and owner.solicited
    assert extent.read() == old  # what the READ promised is still in the file
    # while the writer waits, new large READs are copied, not held (no starving the writer)
    assert not isinstance(lu.start(zc_read(0, BLOCKS_128K)).data, FileExtent)
    extent.release()
    assert (await asyncio.wait_for(task, 1)).status == 0
    assert lu.backstore.read(8 * BS, len(new)) == new
    assert lu.fence.writers == 0
    assert isinstance(lu.start(zc_read(0, BLOCKS_128K)).data, FileExtent)  # held again


async def test_ordered_write_and_unmap_wait_too(tmp_path):
    lu = await ready_lu(tmp_path)
    extent = lu.start(zc_read(0, BLOCKS_128K)).data
    ordered = asyncio.ensure_future(lu.execute(write_cmd(0, bytes(BS), TaskAttr.ORDERED)))
    unmap_param = struct.pack(">HH4xQI4x", 22, 16, 1000, 8)  # far from the hold: UNMAP waits anyway
    unmap = ScsiCommand(struct.pack(">BBIBHB", 0x42, 0, 0, 0, len(unmap_param), 0), 0, NEXUS_A,
                        unmap_param, len(unmap_param), TaskAttr.SIMPLE, 3)
    unmapping = asyncio.ensure_future(lu.execute(unmap))
    await settle()
    assert not ordered.done() and not unmapping.done()
    extent.release()
    assert (await asyncio.wait_for(ordered, 1)).status == 0
    assert (await asyncio.wait_for(unmapping, 1)).status == 0


async def test_no_hold_starts_under_a_suspended_writer(tmp_path):
    """A FUA write waits for its flush after writing; a large write in steps writes across
    loop turns: while either is unfinished, READs are copied."""
    lu = await ready_lu(tmp_path)
    writing = asyncio.ensure_future(lu.execute(write_cmd(0, os.urandom(BS), fua=True)))
    await asyncio.sleep(0)  # written, now waiting for the flush in a worker thread
    assert not writing.done() and lu.fence.writers == 1
    assert not isinstance(lu.start(zc_read(0, BLOCKS_128K)).data, FileExtent)
    await writing
    assert lu.fence.writers == 0


async def test_copy_manager_writes_wait_for_holds(tmp_path):
    lu = await ready_lu(tmp_path)
    extent = lu.start(zc_read(0, BLOCKS_128K)).data
    copy = asyncio.ensure_future(lu.write_blocks(16, b"\x55" * BS))
    await settle()
    assert not copy.done()
    extent.release()
    await asyncio.wait_for(copy, 1)
    assert lu.backstore.read(16 * BS, BS) == b"\x55" * BS


async def test_shrinking_the_lu_drops_the_holders_of_the_range_that_goes(tmp_path):
    """A hold promises the range unchanged until the initiator has it; a shrink cannot keep
    that promise for the part that goes, so that READ's connection is dropped first.  A hold
    below the new end stays."""
    lu = await ready_lu(tmp_path)
    low = lu.start(zc_read(0, BLOCKS_128K)).data
    high = lu.start(zc_read(4096, BLOCKS_128K)).data  # 2 MiB in
    low.owner, high.owner = Owner(), Owner()
    lu.resize(1 << 20)
    assert high.owner.removed == 1 and high.released
    assert not low.owner.removed and not low.released and lu.fence.holds == {low}
    lu.resize(8 << 20)  # growing drops nobody
    assert not low.owner.removed and lu.fence.holds == {low}
