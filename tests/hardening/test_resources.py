"""What one initiator can make the target hold in memory (its own daemon, so the figures are
not mixed with other cases).  A target must bound the memory a single connection can pin:
open-iscsi, ESXi and the Linux kernel all throttle a peer that does not read."""
from __future__ import annotations

import socket
import struct
import time

import pytest

from iscsi import pdu as P

from .conftest import rss_bytes
from .raw import RawSession

#: 16 READs of 65535 blocks (32 MiB each, within the Block Limits maximum): 512 MiB of Data-In.
READS, READ_BLOCKS = 16, 65535
#: What the target may hold for one connection that does not read: its write high-water mark
#: (4 MiB) plus one command in progress (32 MiB) plus slack.
PINNED_LIMIT = 64 << 20


def _slow_reader(daemon, immediate: bool) -> int:
    s = RawSession(daemon.portals[0].host, daemon.portals[0].port)
    s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    assert s.login(daemon.iqn).status_class == 0
    # Real data in the blocks read (a hole could come back as untouched zero pages).
    assert s.write(0, b"\xa5" * (READ_BLOCKS * 512)) == 0
    time.sleep(0.5)
    before = rss_bytes(daemon.proc.pid)
    # All the commands in one write, as one TCP segment: the target reads them in one go.
    cdb = struct.pack(">BBIBHB", 0x28, 0, 0, 0, READ_BLOCKS, 0).ljust(16, b"\0")
    burst = b""
    for _ in range(READS):
        burst += P.ScsiCommandPdu(read=True, edtl=READ_BLOCKS * 512, cmdsn=s.cmdsn, expstatsn=s.expstatsn,
                                  itt=s.next_itt(), cdb=cdb, immediate=immediate).encode()
        if not immediate:
            s.cmdsn += 1
    s.send_raw(burst)
    peak = before
    for _ in range(20):  # 5 s: the target has done all it will do by then
        time.sleep(0.25)
        peak = max(peak, rss_bytes(daemon.proc.pid))
    s.close()
    return peak - before


SLOW_READER_BUG = (
    "bug: iscsi/target/connection.py executes every command it reads (data_received -> "
    "_scsi_command_arrived -> _maybe_execute -> eager.start) and queues all Data-In in the "
    "transport, whether or not the initiator reads: pause_writing() only stops reading *further* "
    "bytes and MaxCmdSN ignores unsent output. 16 READ(10)s of 32 MiB sent in one TCP segment by "
    "an initiator that does not read pin 512 MiB (measured); the CmdSN window (128) allows 4 GiB per session, and "
    "immediate commands (not bounded by the window at all) more. Expected: stop starting commands "
    "while the connection's output is above its high-water mark and close the window (MaxCmdSN = "
    "ExpCmdSN - 1, RFC 7143 §4.2.2.1), Reject immediate commands beyond resources (reason 0x06, "
    "§11.17.1).")


@pytest.mark.parametrize("immediate", [False, True], ids=["in-window", "immediate"])
def test_initiator_that_does_not_read_cannot_pin_memory(daemon, witness, immediate):
    grown = _slow_reader(daemon, immediate)
    print(f"slow reader (immediate={immediate}): {grown >> 20} MiB")
    assert daemon.alive()
    witness.check()
    assert grown < PINNED_LIMIT, f"{READS} unread 32 MiB READs pinned {grown >> 20} MiB in the target"


def test_memory_comes_back_after_the_slow_reader_goes(daemon, witness):
    """Whatever was pinned is released when the connection goes (no leak beyond the session)."""
    before = rss_bytes(daemon.proc.pid)
    _slow_reader(daemon, immediate=False)
    deadline = time.monotonic() + 10
    while rss_bytes(daemon.proc.pid) - before > PINNED_LIMIT and time.monotonic() < deadline:
        time.sleep(0.2)
    assert rss_bytes(daemon.proc.pid) - before < PINNED_LIMIT, "memory pinned by a closed connection stays"
    assert daemon.alive()
    witness.check()


PREALLOC_BUG = (
    "bug: iscsi/session.py WriteTransfer.__post_init__ (bytearray(self.total)) allocates and zeroes "
    "the whole write buffer when the command arrives, before any Data-Out: 8 legal WRITE(10)s of "
    "65535 blocks (32 MiB each, within MAXIMUM TRANSFER LENGTH) whose data never comes pin 256 MiB "
    "(measured); the CmdSN window of 128 allows 4 GiB per session. Expected: memory follows the "
    "data actually received (at most MaxOutstandingR2T x MaxBurstLength solicited at a time, "
    "RFC 7143 §13.13, §13.17), not the length announced.")


def test_writes_whose_data_never_comes_do_not_pin_memory(daemon, witness):
    from .raw import write10

    s = RawSession(daemon.portals[0].host, daemon.portals[0].port)
    assert s.login(daemon.iqn).status_class == 0
    before = rss_bytes(daemon.proc.pid)
    for _ in range(8):
        s.command(write10(0, READ_BLOCKS), write=True, edtl=READ_BLOCKS * 512)
    peak = before
    for _ in range(12):
        time.sleep(0.25)
        peak = max(peak, rss_bytes(daemon.proc.pid))
    s.close()
    assert daemon.alive()
    witness.check()
    assert peak - before < PINNED_LIMIT, f"8 announced 32 MiB writes pinned {(peak - before) >> 20} MiB"
