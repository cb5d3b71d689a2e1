"""Sans-IO session rules: sequence numbers, the command window, Data-Out/R2T and Data-In.

Nothing here touches a socket or the event loop; the asyncio edges
(iscsi/target/connection.py, iscsi/initiator/) call these objects and send
what they return.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import pdu as P

SN_MOD = 1 << 32
_HALF = 1 << 31

# How many commands one session may have queued at the target.  open-iscsi's
# default node.session.cmds_max is 128 and its queue_depth 32; libiscsi keeps
# up to 64 in flight.  128 lets either fill its pipe while bounding memory.
DEFAULT_COMMAND_WINDOW = 128


# ---------------------------------------------------------------------------
# Serial number arithmetic (RFC 1982, as required by RFC 7143 §4.2.2.1)
# ---------------------------------------------------------------------------

def sn_add(a: int, n: int) -> int:
    return (a + n) % SN_MOD


def sn_lt(a: int, b: int) -> bool:
    """a < b in 32-bit serial arithmetic."""
    return a != b and ((a < b and b - a < _HALF) or (a > b and a - b > _HALF))


def sn_le(a: int, b: int) -> bool:
    return a == b or sn_lt(a, b)


def sn_gt(a: int, b: int) -> bool:
    return sn_lt(b, a)


def sn_diff(a: int, b: int) -> int:
    """Signed distance a - b."""
    d = (a - b) % SN_MOD
    return d - SN_MOD if d >= _HALF else d


# ---------------------------------------------------------------------------
# Command window (target side), RFC 7143 §4.2.2.1 and §3.2.2.1
# ---------------------------------------------------------------------------

class CommandWindow:
    """Tracks ExpCmdSN/MaxCmdSN and orders non-immediate commands by CmdSN.

    ``arrive`` takes a command's CmdSN and returns the list of commands that
    are now deliverable in CmdSN order.  Commands outside [ExpCmdSN, MaxCmdSN]
    are silently dropped, as §4.2.2.1 requires ("the target MUST silently
    ignore any non-immediate command outside of this range").  Immediate
    commands are delivered at once and do not advance ExpCmdSN.
    """

    __slots__ = ("expcmdsn", "depth", "pending", "in_flight", "highest")

    def __init__(self, expcmdsn: int, depth: int = DEFAULT_COMMAND_WINDOW) -> None:
        self.expcmdsn = expcmdsn % SN_MOD
        self.depth = depth
        # Commands held back until an earlier CmdSN arrives, by CmdSN (the transport's fast
        # lane reads it: an empty dict means nothing is waiting).
        self.pending: dict[int, object] = {}
        self.in_flight = 0  # commands accepted and not yet completed; shrinks the window
        # The highest MaxCmdSN handed out so far (every read of ``maxcmdsn`` may go on the
        # wire): the top of the range the initiator may use.  It starts at the whole window,
        # so an initiator that goes by the login response's narrower value is never refused.
        self.highest = (self.expcmdsn + depth - 1) & 0xFFFFFFFF

    @property
    def maxcmdsn(self) -> int:
        """MaxCmdSN advertised: the window closes as commands pile up (back-pressure)."""
        room = self.depth - self.in_flight - len(self.pending)
        # MaxCmdSN = ExpCmdSN - 1 means a closed window (§4.2.2.1).  (Read per response:
        # plain arithmetic, no helper calls.)
        top = (self.expcmdsn + (room if room > 0 else 0) - 1) & 0xFFFFFFFF
        if 0 < (top - self.highest) & 0xFFFFFFFF < _HALF:
            self.highest = top
        return top

    def in_window(self, cmdsn: int) -> bool:
        """Is ``cmdsn`` a new CmdSN in [ExpCmdSN, MaxCmdSN] (RFC 7143 §4.2.2.1)?

        MaxCmdSN is the highest one advertised, not ExpCmdSN + depth: ExpCmdSN moves up with
        every command that arrives in order, so a bound relative to it alone lets an initiator
        that ignores MaxCmdSN keep any number of commands (and their data) in the target.
        The CmdSN of a command held back (``pending``) is taken: §4.2.2.1, the target "MUST
        silently ignore ... non-immediate duplicates within the range" (a duplicate let in
        would never run, keep its place in the window and its data for good)."""
        exp = self.expcmdsn
        ahead = (cmdsn - exp) & 0xFFFFFFFF
        if ahead >= self.depth or cmdsn in self.pending:
            return False
        self.maxcmdsn  # noqa: B018 - refreshes ``highest`` (after a reinstatement moved ExpCmdSN)
        limit = (self.highest - exp) & 0xFFFFFFFF
        return limit < _HALF and ahead <= limit

    def arrive(self, cmdsn: int, item: object, immediate: bool = False) -> list[object]:
        if immediate:
            return [item]
        if not self.in_window(cmdsn):  # outside the window, or a duplicate (§4.2.2.1)
            return []
        self.pending[cmdsn] = item
        ready = []
        while self.expcmdsn in self.pending:
            ready.append(self.pending.pop(self.expcmdsn))
            self.expcmdsn = sn_add(self.expcmdsn, 1)
        return ready

    @property
    def waiting(self) -> int:
        """Commands held back because an earlier CmdSN has not arrived."""
        return len(self.pending)


class StatSequence:
    """StatSN of one connection (RFC 7143 §4.2.2.2)."""

    __slots__ = ("statsn", "expstatsn")

    def __init__(self, start: int = 0) -> None:
        self.statsn = start % SN_MOD
        self.expstatsn = self.statsn

    def next(self) -> int:
        sn = self.statsn
        self.statsn = sn_add(sn, 1)
        return sn

    def acknowledge(self, expstatsn: int) -> None:
        """Record the initiator's ExpStatSN if it lies in [ExpStatSN, StatSN] (serial arithmetic)."""
        exp = self.expstatsn
        if expstatsn != exp:
            # sn_le(exp, expstatsn) and sn_le(expstatsn, statsn), inlined: this runs per PDU.
            ahead = (expstatsn - exp) & 0xFFFFFFFF
            if ahead < 0x80000000 and ahead <= (self.statsn - exp) & 0xFFFFFFFF:
                self.expstatsn = expstatsn


# ---------------------------------------------------------------------------
# Write data transfer (target side): immediate/unsolicited data and R2T
# ---------------------------------------------------------------------------

class DataOutError(Exception):
    """The initiator's Data-Out broke the rules (RFC 7143 §11.7); the task fails."""


@dataclass(slots=True)
class WriteTransfer:
    """Collects the Data-Out of one write command and says which R2Ts to send.

    References: RFC 7143 §3.2.4.2 (unsolicited data bounded by FirstBurstLength),
    §11.8 (R2T: at most MaxOutstandingR2T outstanding, each ≤ MaxBurstLength),
    §11.7.5 (DataSN starts at 0 in each sequence), DataPDUInOrder/DataSequenceInOrder
    = Yes (the only values open-iscsi and we use) so offsets must be contiguous.
    """

    total: int                      # bytes the target wants (min of EDTL and what the CDB asks)
    edtl: int                       # Expected Data Transfer Length from the initiator
    max_burst: int
    first_burst: int
    max_outstanding_r2t: int
    initial_r2t: bool
    # Grows as data arrives: memory follows what the initiator actually sent, never the
    # length a CDB merely announces (a 48-byte PDU must not cost gigabytes).
    buffer: bytearray = field(default_factory=bytearray)
    received: int = 0
    next_r2t_offset: int = 0
    r2tsn: int = 0
    outstanding: dict = field(default_factory=dict)  # ttt -> [offset, length, next_datasn, received]
    unsolicited_open: bool = False
    unsolicited_datasn: int = 0

    def start(self, immediate: bytes | memoryview, final: bool) -> None:
        """Account for immediate data in the command PDU (§3.2.4.2)."""
        if len(immediate) > self.first_burst:
            raise DataOutError("immediate data beyond FirstBurstLength")
        if not final and self.initial_r2t:
            raise DataOutError("F=0 on a write command while InitialR2T=Yes")
        self._store(0, immediate)
        # Unsolicited Data-Out may follow when InitialR2T=No and F=0 (§3.2.4.2); R2Ts
        # start where the unsolicited data ends.
        self.unsolicited_open = not final
        self.next_r2t_offset = len(immediate)

    def _store(self, offset: int, data: bytes | memoryview) -> None:
        n = len(data)
        if offset + n > self.edtl:
            raise DataOutError("Data-Out beyond the Expected Data Transfer Length")
        self.received += n
        end = min(offset + n, self.total)
        if end <= offset:
            return  # beyond what the command uses: counted, not kept
        buf = self.buffer
        have = len(buf)
        if offset == have:
            buf += data[:end - offset] if end - offset < n else data
        elif offset < have:
            buf[offset:end] = data[:end - offset]
        else:
            buf += bytes(offset - have)  # a gap (not in-order data): zero-filled until it comes
            buf += data[:end - offset]

    def data_out(self, pdu: P.DataOut) -> None:
        """Take one Data-Out PDU (solicited or unsolicited)."""
        if pdu.ttt == P.RESERVED_TAG:
            if not self.unsolicited_open:
                raise DataOutError("unsolicited Data-Out not allowed here")
            if pdu.datasn != self.unsolicited_datasn:
                raise DataOutError(f"DataSN {pdu.datasn} out of order (expected {self.unsolicited_datasn})")
            if pdu.offset != self.next_r2t_offset:
                # DataPDUInOrder=Yes (the only value we agree to, §13.18): each PDU starts
                # where the data before it ended.  A gap would never be solicited (R2Ts start
                # at the end of the unsolicited data) and would be written as zeros.
                raise DataOutError(f"unsolicited Data-Out at offset {pdu.offset}, expected "
                                   f"{self.next_r2t_offset} (DataPDUInOrder=Yes)")
            if pdu.offset + len(pdu.data) > min(self.first_burst, self.edtl):
                raise DataOutError("unsolicited data beyond FirstBurstLength")
            self.unsolicited_datasn += 1
            self._store(pdu.offset, pdu.data)
            end = pdu.offset + len(pdu.data)
            if end > self.next_r2t_offset:
                self.next_r2t_offset = end
            if pdu.final:
                self.unsolicited_open = False
            return
        burst = self.outstanding.get(pdu.ttt)
        if burst is None:
            raise DataOutError("Data-Out for an unknown Target Transfer Tag")
        offset, length, datasn, got = burst
        if pdu.datasn != datasn:
            raise DataOutError(f"DataSN {pdu.datasn} out of order (expected {datasn})")
        if pdu.offset != offset + got:
            raise DataOutError("Data-Out offset not contiguous (DataPDUInOrder=Yes)")
        if got + len(pdu.data) > length:
            raise DataOutError("Data-Out beyond the R2T's Desired Data Transfer Length")
        self._store(pdu.offset, pdu.data)
        burst[2] += 1
        burst[3] += len(pdu.data)
        if pdu.final:
            if burst[3] != length:
                raise DataOutError("F bit before the burst was complete")
            del self.outstanding[pdu.ttt]

    def r2ts(self, new_ttt) -> list[tuple[int, int, int, int]]:
        """R2Ts to send now: (ttt, r2tsn, offset, length), within MaxOutstandingR2T.

        ``new_ttt`` is a callable returning a fresh Target Transfer Tag.
        R2Ts are only sent once unsolicited data is over (the initiator may still
        be sending it; soliciting the same range twice would be a protocol error).
        """
        out = []
        if self.unsolicited_open:
            return out
        want = self.total
        while self.next_r2t_offset < want and len(self.outstanding) < self.max_outstanding_r2t:
            length = min(self.max_burst, want - self.next_r2t_offset)
            ttt = new_ttt()
            self.outstanding[ttt] = [self.next_r2t_offset, length, 0, 0]
            out.append((ttt, self.r2tsn, self.next_r2t_offset, length))
            self.r2tsn += 1
            self.next_r2t_offset += length
        return out

    @property
    def complete(self) -> bool:
        return (not self.unsolicited_open and not self.outstanding
                and self.next_r2t_offset >= self.total)


def split_data_in(length: int, max_segment: int, max_burst: int | None = None) -> list[tuple[int, int]]:
    """(offset, length) of each Data-In PDU for a read of ``length`` bytes.

    Each PDU carries at most the initiator's MaxRecvDataSegmentLength (§13.12).
    """
    if length == 0:
        return []
    step = max_segment
    return [(off, min(step, length - off)) for off in range(0, length, step)]


def residual(expected: int, actual: int) -> tuple[bool, bool, int]:
    """(overflow, underflow, residual count) per RFC 7143 §11.4.5."""
    if actual > expected:
        return True, False, actual - expected
    if actual < expected:
        return False, True, expected - actual
    return False, False, 0
