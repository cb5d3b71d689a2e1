"""One iSCSI connection on the target: the asyncio edge around the sans-IO core.

Bytes from the socket go through :class:`~iscsi.framing.PduReader`; login PDUs go
to :class:`~iscsi.target.login.TargetLogin`; in Full Feature Phase the PDUs are
dispatched here to the session (command window, R2T bookkeeping from
iscsi/session.py) and to the SCSI core (``LunMap.execute``).  Everything that
is written goes through :meth:`TargetConnection.send`, which stamps StatSN,
ExpCmdSN and MaxCmdSN in one place.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
import os
import socket
import time
from typing import TYPE_CHECKING

from .. import keys as K
from ..keys import format_portal
from .. import eager
from ..digest import crc32c, crc32c_extend, pack_digest
from .. import pdu as P
from ..framing import BadPdu, DataDigestFailure, HeaderDigestError, PduReader, encode
from ..backstore.gather import drain_all as drain_gathered_writes, pending_runs as _gathered_writes
from ..log import event
from ..scsi import zerocopy
from ..scsi.types import ScsiCommand, ScsiResult, Status, TaskAttr
from ..scsi.zerocopy import FileExtent
from ..scsi.lu import GOOD_WRITE as _GOOD_WRITE
from . import sendpath
from ..session import DataOutError, StatSequence, WriteTransfer, residual
from .login import LoginFailure, LoginSuccess, TargetLogin, describe_params

if TYPE_CHECKING:
    from .server import IscsiServer, TargetSession

log = logging.getLogger("iscsi.target.connection")

# A connection must finish its login within this time, or it is dropped: a peer
# that opens sockets and never logs in must not hold resources (LIO uses 15 s;
# ESXi's own login timeout is 5 s, so real initiators finish far sooner).
LOGIN_TIMEOUT = 15.0
# Ping an initiator that has sent nothing for NOP_INTERVAL seconds, and drop the
# connection when it has stayed silent NOP_TIMEOUT seconds after the ping.  Any PDU
# from it counts as the answer.  The timeout is long on purpose: libiscsi's
# synchronous API does not read the socket while the application sleeps (its own
# conformance suite sleeps 60 s), and a dead peer holding reservations is still
# found within ~2 minutes, inside open-iscsi's 120 s replacement timeout.
NOP_INTERVAL = 10.0
NOP_TIMEOUT = 90.0
# Stop reading from, and starting commands for, a connection whose unsent output exceeds
# this (back-pressure): a peer that does not read cannot make us buffer without bound.
WRITE_HIGH_WATER = 4 * 1024 * 1024
# A connection closed (Logout) with output still unsent waits this long for the peer to
# read it, then is cut off.
CLOSE_LINGER = 10.0
# Most text one Text Request sequence may carry (a SendTargets answer for many targets
# is the biggest legitimate one, and it goes the other way).
TEXT_EXCHANGE_LIMIT = 65536
# In each turn of the loop the first EARLY_FLUSH responses are written at once, the rest
# together at the end of the turn.  Writing everything at the end made a single-threaded
# initiator and this target take turns (each idle while the other worked through a whole
# queue's worth); one early write lets the initiator start on those while we go on.
EARLY_FLUSH = int(os.environ.get("SANSTACK_EARLY_FLUSH", "8"))
# Tasks one connection may hold: the CmdSN window (128) bounds ordinary commands; this
# bounds immediate ones too, which the window does not count.
MAX_TASKS_PER_CONNECTION = 256
# Zero-copy READs held for one connection, at most: an initiator that does not move its
# ExpStatSN gets copies beyond this, so holds (and the writers' checks) stay bounded.
ZERO_COPY_UNACKED_LIMIT = 64
# A writer waiting for a held READ re-pings the initiator at most this often.
ZERO_COPY_PING_INTERVAL = 0.25
# The largest READ sent from the page cache: a hold this size keeps 16 MiB of the LU from
# being rewritten until the initiator has read it all; larger READs are copied.
ZERO_COPY_MAX_BYTES = 16 << 20


_BHS = P.BHS_STRUCT  # packs a whole response header in one call
_TASK_ATTRS = tuple(TaskAttr(i) for i in range(5))
_READ_NOW_OPS = frozenset({0x28, 0x88})  # READ(10), READ(16): LogicalUnit.read_now
_WRITE_NOW_OPS = frozenset({0x2A, 0x8A})  # WRITE(10), WRITE(16): LogicalUnit.write_now
_PADDING = (b"", b"\0", b"\0\0", b"\0\0\0")  # by pad length (RFC 7143 §11.1: 4-byte boundary)
DATA_PHASE_ERROR = (0x4B, 0x00)  # SPC-4 Annex D: ABORTED COMMAND for a broken Data-Out sequence
decode_lun = P.decode_lun


class Task:
    """One SCSI command in flight on this connection."""

    __slots__ = ("pdu", "lun", "itt", "transfer", "ready", "started", "aborted", "future",
                 "needed", "cmdsn", "reserved")

    def __init__(self, pdu: P.ScsiCommandPdu, lun: int) -> None:
        self.pdu = pdu
        self.lun = lun
        self.itt = pdu.itt
        self.cmdsn = pdu.cmdsn
        self.transfer: WriteTransfer | None = None
        self.ready = False        # its turn in CmdSN order has come
        self.started = False
        self.aborted = False
        self.future: asyncio.Task | None = None
        self.needed: int | None = None  # Data-Out bytes the CDB asks for
        self.reserved = 0  # Data-In bytes it may still produce (counted as pending output)


class TargetConnection(asyncio.Protocol):
    def __init__(self, server: "IscsiServer") -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.reader = PduReader(allowed=P.INITIATOR_OPCODES)
        self.login: TargetLogin | None = None
        self.session: "TargetSession | None" = None
        self.cid = 0
        self.stat = StatSequence(int.from_bytes(os.urandom(2), "big"))
        self.params: K.SessionParams | None = None  # session-wide values in force
        self.header_digest = False
        self.data_digest = False
        self.max_send_segment = 8192
        self._one_data_in = 8192
        # Most immediate data a write may carry: FirstBurstLength with ImmediateData=Yes,
        # -1 (none) otherwise (§13.11, §13.14); more is refused on the general path.
        self._immediate_max = -1
        self.tasks: dict[int, Task] = {}
        self.ttt_map: dict[int, Task] = {}
        self._next_ttt = 1
        self.closed = False
        self.peer = ("?", 0)
        self.local = ("?", 0)
        self._login_timer: asyncio.TimerHandle | None = None
        self._nop_timer: asyncio.TimerHandle | None = None
        self._nop_outstanding: int | None = None
        self._last_rx = time.monotonic()
        self._paused = False
        self.logging_out = False
        self.loop = asyncio.get_running_loop()
        self._out: list = []
        self._out_bytes = 0  # queued in _out, not yet handed to the transport
        # Traffic counters for `iscsi-target stats` (like LIO's iscsi_sess_stats rx/txdata_octs),
        # added once per recv and once per writev, never per PDU: every byte received; the
        # headers and data segments sent (their digests and padding are not counted).
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.data_digest_errors = 0
        # Data-In that running (suspended) READs will produce: a large READ is read in steps
        # (sbc.LARGE_TRANSFER_STEP), so its output exists before it is queued.
        self._reserved = 0
        self._flush_scheduled = False
        self._turn_responses = 0  # responses queued in this turn of the loop (EARLY_FLUSH)
        self._deferred: deque[Task] = deque()  # ready commands held while output is congested
        # Full Feature Phase text exchanges (§11.10): request text still arriving with C=1,
        # and the rest of a long answer the initiator has not asked for yet.
        self.text_in = K.TextAccumulator(TEXT_EXCHANGE_LIMIT)
        self.text_out: list[bytes] = []
        self.text_itt: int | None = None  # ITT of that exchange (§11.10.3)
        self.text_ttt: int | None = None  # TTT of our last Text Response with F=0 (§11.10.4)
        # Zero-copy READs (iscsi/scsi/zerocopy.py): our duplicate of the socket (None: not
        # possible), the smallest/largest READ sent that way (an empty range: off), whether ``_out`` holds
        # a FileExtent, and the held ranges whose status the initiator has not yet
        # acknowledged, by StatSN.
        self._sock: socket.socket | None = None
        self._zc_min = 1
        self._zc_max = 0
        self._zc_out = False
        self._zc_unacked: deque = deque()
        # Zero-copy output the socket did not take yet: sent when it is writable again, with
        # everything newer queued behind it; its size counts for back-pressure.
        self._backlog: list = []
        self._backlog_bytes = 0
        self._backlog_watched = False  # a writer callback is registered for the socket
        self._close_when_sent: asyncio.TimerHandle | None = None
        # The NOP-In sent for a waiting writer: (TTT, StatSN when sent, time).  Its echo proves
        # the initiator read everything before it, whatever ExpStatSN the echo carries.
        self._zc_ping: tuple[int, int, float] | None = None
        # ITTs of writes aborted by a TMF while waiting for data (oldest first, bounded).
        self._aborted_writes: dict[int, None] = {}

    # ------------------------------------------------------------------
    # asyncio.Protocol
    # ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername") or ("?", 0)
        local = transport.get_extra_info("sockname") or ("?", 0)
        self.peer, self.local = (peer[0], peer[1]), (local[0], local[1])
        self.login = TargetLogin(self.server.registry, self.local[0], self.local[1],
                                 self.server.allocate_tsih, self.stat.statsn,
                                 session_params=self._joined_session_params, peer=self._peer_str())
        self._login_timer = self.loop.call_later(LOGIN_TIMEOUT, self._login_timeout)
        self.server.connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None and getattr(self.server, "zero_copy", True):
            try:
                # Our own socket object on a duplicate of the transport's descriptor: it
                # can send with flags (MSG_MORE), which the transport's wrapper cannot.
                self._sock = socket.socket(fileno=os.dup(sock.fileno()))
            except (OSError, AttributeError, ValueError):  # not a real socket: no zero-copy
                self._sock = None
        try:
            transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        except Exception:  # pragma: no cover
            pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for timer in (self._login_timer, self._nop_timer):
            if timer is not None:
                timer.cancel()
        self.server.connections.discard(self)
        self._zc_release_all()
        self._stop_backlog()
        if self._close_when_sent is not None:
            self._close_when_sent.cancel()
        if self._sock is not None:
            self._sock.close()  # the duplicate only; the transport closes its own
            self._sock = None
        for task in list(self.tasks.values()):
            self._cancel_task(task)
        self.tasks.clear()
        self.ttt_map.clear()
        if self.session is not None:
            self.session.connection_lost(self)

    def pause_writing(self) -> None:
        # The peer does not read fast enough: stop reading and starting commands (RFC 7143
        # §4.2.2.1: the window closes as the held commands count against it).
        if self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and self._paused:
            self._paused = False
            self.transport.resume_reading()
            self._run_deferred()

    def _congested(self) -> bool:
        """Output the peer has not taken yet is over the high-water mark: start nothing new."""
        return self._paused or self._out_bytes + self._reserved > WRITE_HIGH_WATER

    def _run_deferred(self) -> None:
        deferred = self._deferred
        while deferred and not self._congested() and not self.closed:
            task = deferred.popleft()
            if not task.aborted and self.tasks.get(task.itt) is task:
                self._maybe_execute(task)

    def data_received(self, data: bytes) -> None:
        self._last_rx = time.monotonic()
        self.rx_bytes += len(data)
        self._nop_outstanding = None  # the peer is alive; whatever it sent answers our ping
        try:
            pdus = self.reader.feed(data)  # READs on the raw lane are answered in there
        except HeaderDigestError:
            event(log, "conn.header_digest_error", logging.WARNING, peer=self._peer_str())
            self.close()
            return
        except P.PduFormatError as err:
            self._protocol_violation(str(err), err.reason, getattr(err, "header", None))
            return
        except Exception:  # a fault on the raw lane: as for any PDU, never take the daemon down
            log.exception("conn.internal_error peer=%s", self._peer_str())
            self.close()
            return
        for item in pdus:
            if self.closed:
                return
            if isinstance(item, DataDigestFailure):
                self._data_digest_failure(item)
                continue
            if isinstance(item, BadPdu):
                if self.session is None:
                    # Before Full Feature Phase only Login Requests are acceptable (§6.1).
                    event(log, "login.bad_pdu", logging.WARNING, peer=self._peer_str(), why=item.message)
                    self.close()
                    return
                self._reject(None, item.reason, header=item.header)
                continue
            try:
                if self.session is None:
                    self._login_pdu(item)
                else:
                    self._ffp_pdu(item)
            except P.PduFormatError as err:
                self._reject(item, err.reason)
            except Exception:  # never let one bad PDU take the daemon down
                log.exception("conn.internal_error peer=%s", self._peer_str())
                self.close()
                return

    # ------------------------------------------------------------------
    # Output
    # ------------------------------------------------------------------
    def _peer_str(self) -> str:
        return format_portal(self.peer[0], self.peer[1])  # [::1]:port, not ::1:port

    def send(self, pdu: P.Pdu, *, status: bool = True) -> None:
        """Stamp sequence numbers and write one PDU.

        ``status`` PDUs take the next StatSN (§4.2.2.2); others carry the current one.
        """
        if self.closed or self.transport is None:
            return
        pdu.statsn = self.stat.next() if status else self.stat.statsn  # type: ignore[attr-defined]
        session = self.session
        if session is not None:
            window = session.window
            pdu.expcmdsn = window.expcmdsn  # type: ignore[attr-defined]
            pdu.maxcmdsn = window.maxcmdsn  # type: ignore[attr-defined]
        parts = encode(pdu, header_digest=self.header_digest, data_digest=self.data_digest)
        self._out += parts
        self._out_bytes += len(pdu.data) + P.BHS_LEN
        self._schedule_flush()

    def _response_queued(self) -> None:
        """A SCSI response (with its Data-In) is in ``_out``: write early or at the turn's end."""
        n = self._turn_responses = self._turn_responses + 1
        if n == EARLY_FLUSH:
            self._write_out()
        if not self._flush_scheduled:  # (tested here too: a call fewer per response)
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            # Coalesce every PDU produced in this turn of the loop into one writev:
            # a syscall per PDU was the largest cost per command.
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._turn_responses = 0
        self._write_out()
        if self._deferred:
            # Also when nothing was left to write: an early write (_response_queued) or a
            # finished READ's reservation may have ended the congestion that held them, and
            # nothing else would start them (the initiator may be waiting for exactly these).
            self._run_deferred()

    def _write_out(self) -> bool:
        """Hand everything queued to the transport (one writev); False when nothing went."""
        if _gathered_writes:
            # Writes merged so far reach the file before anything is acknowledged.
            drain_gathered_writes()
        if not self._out or self.closed or self.transport is None:
            return False
        out, self._out = self._out, []
        self.tx_bytes += self._out_bytes
        self._out_bytes = 0
        if self._backlog:
            self._zc_out = False
            self._backlog += out  # behind what the socket has not taken yet
            self._backlog_grew(sum(map(len, out)))
            return True
        if self._zc_out:
            self._zc_out = False
            try:
                left = sendpath.write_out(self._sock, out, self.transport)
            except OSError as err:
                self._zero_copy_failed(err)
                return False
            if left:
                self._backlog = left
                self.loop.add_writer(self._sock.fileno(), self._send_backlog)  # type: ignore[union-attr]
                self._backlog_watched = True
                self._backlog_grew(sum(map(len, left)))
            return True
        self.transport.writelines(out)  # may call pause_writing()
        return True

    def _zero_copy_failed(self, err: OSError) -> None:
        # A READ's status is already in the stream: its data cannot be replaced by an
        # error any more, so the connection goes (the initiator retries).
        event(log, "conn.zero_copy_send_failed", logging.WARNING, peer=self._peer_str(), why=str(err))
        self.abort_connection()

    def _backlog_grew(self, size: int) -> None:
        self._backlog_bytes += size
        if self._backlog_bytes > WRITE_HIGH_WATER:
            self.pause_writing()

    def _send_backlog(self) -> None:
        """The socket is writable again: send what it did not take before."""
        try:
            self._backlog = sendpath.send_parts(self._sock, self._backlog)  # type: ignore[arg-type]
        except OSError as err:
            self._zero_copy_failed(err)
            return
        before, self._backlog_bytes = self._backlog_bytes, sum(map(len, self._backlog))
        if self._backlog:
            if self._paused and self._backlog_bytes <= WRITE_HIGH_WATER // 2:
                self.resume_writing()
            if self._close_when_sent is not None and self._backlog_bytes < before:
                self._arm_close_linger()  # the peer reads: CLOSE_LINGER counts from now
            return
        self._stop_backlog()
        if self._close_when_sent is not None:
            self.transport.close()  # type: ignore[union-attr]
        elif self._paused:
            self.resume_writing()

    def _arm_close_linger(self) -> None:
        if self._close_when_sent is not None:
            self._close_when_sent.cancel()
        self._close_when_sent = self.loop.call_later(CLOSE_LINGER, self.abort_connection)

    def _stop_backlog(self) -> None:
        self._backlog.clear()
        self._backlog_bytes = 0
        if self._backlog_watched:
            self._backlog_watched = False
            if self._sock is not None:
                self.loop.remove_writer(self._sock.fileno())

    # -- zero-copy READs: holds released once the initiator has read them --------------------
    def _acknowledge(self, expstatsn: int) -> None:
        """The initiator's ExpStatSN (§4.2.2.2), and the holds of the READs it covers."""
        self.stat.acknowledge(expstatsn)
        if self._zc_unacked:
            self._zc_acknowledged()

    def _held_until_acknowledged(self, statsn: int, extent: FileExtent) -> None:
        """A READ answered from the file with status ``statsn``: its hold is ours to release."""
        extent.owner = self
        self._zc_unacked.append((statsn, extent))
        self._zc_out = True

    def _zc_acknowledged(self, bound: int | None = None) -> None:
        """Release the holds of every READ whose StatSN is below ``bound`` (default: the
        initiator's ExpStatSN): its status, and so its data before it, has been read."""
        q = self._zc_unacked
        exp = self.stat.expstatsn if bound is None else bound
        while q and 0 < (exp - q[0][0]) & 0xFFFFFFFF < 0x80000000:
            q.popleft()[1].release()

    def _zc_release_all(self) -> None:
        q = self._zc_unacked
        while q:
            q.popleft()[1].release()

    def solicit_ack(self) -> None:
        """A writer waits for one of our held READs: ping the initiator, whose echo (or a
        newer ExpStatSN) tells that it has read that far (§11.19: it must answer)."""
        if self.closed or self.session is None:
            return
        now = time.monotonic()
        if self._zc_ping is not None and now - self._zc_ping[2] < ZERO_COPY_PING_INTERVAL:
            return  # one is on its way
        statsn = self.stat.statsn  # every READ queued so far has a lower one
        self._zc_ping = (self._ping(now), statsn, now)

    def ack_timed_out(self) -> None:
        """The initiator neither read nor acknowledged a held READ in time: drop it."""
        self._drop_holding("conn.zero_copy_ack_timeout")

    def held_range_removed(self) -> None:
        """A range one of our READs holds is about to disappear (the LU shrinks): drop it."""
        self._drop_holding("conn.zero_copy_range_removed")

    def _drop_holding(self, why: str) -> None:
        if self.transport is not None and (not self.closed or self._backlog):
            # A closed connection still sending its backlog goes too: that backlog may
            # hold this very range, which is about to change.
            event(log, why, logging.WARNING, peer=self._peer_str())
            self.abort_connection()
        self._zc_release_all()

    def _extent_bytes(self, extent: FileExtent) -> bytes:
        """A held READ's bytes for sending as a copy (none once closed); its hold ends here.
        The image failing now drops the connection."""
        try:
            return extent.read() if not self.closed else b""
        except OSError:
            self.abort_connection()
            return b""
        finally:
            extent.release()

    @staticmethod
    def _drop_result(result: ScsiResult) -> None:
        """A result that will never be sent: let go of its held range."""
        data = result.data
        if data.__class__ is FileExtent:
            data.release()

    def close(self) -> None:
        """Close after what was queued has been written (e.g. a Logout Response).

        A peer that reads nothing more for CLOSE_LINGER is cut off, whether the rest waits in
        our backlog or in the transport's buffer (which would otherwise keep the connection,
        and what it holds, for as long as the peer keeps its socket open)."""
        if not self.closed and self.transport is not None:
            self._flush()
            self.closed = True
            self._arm_close_linger()
            if self._backlog:
                return  # the transport closes once the socket has taken the rest
            self.transport.close()

    @property
    def backlogged(self) -> bool:
        """READ data the peer has not taken yet is queued on our side (zero-copy backlog)."""
        return bool(self._backlog)

    def abort_connection(self) -> None:
        if self.transport is not None:
            self.closed = True
            self._stop_backlog()
            self.transport.abort()

    def _reject(self, pdu: P.Pdu | None, reason: int, header: bytes | None = None) -> None:
        hdr = header if header is not None else (pdu.header()[:P.BHS_LEN] if pdu is not None else b"")
        event(log, "conn.reject", logging.WARNING, peer=self._peer_str(), reason=f"0x{reason:02x}",
              opcode=f"0x{hdr[0] & 0x3f:02x}" if hdr else None)
        self.send(P.Reject(reason=reason, data=hdr))

    def _protocol_violation(self, why: str, reason: int = P.RejectReason.PROTOCOL_ERROR,
                            header: bytes | None = None) -> None:
        """The byte stream cannot be trusted any more: Reject (with the offending header,
        §11.17) if we are in Full Feature Phase, then drop the connection (§7.1)."""
        event(log, "conn.protocol_error", logging.WARNING, peer=self._peer_str(), why=why)
        if self.session is not None and header is not None:
            self.send(P.Reject(reason=reason, data=header))
        self.close()

    # ------------------------------------------------------------------
    # Login phase
    # ------------------------------------------------------------------
    def _login_timeout(self) -> None:
        if self.session is None and not self.closed:
            event(log, "login.timeout", logging.WARNING, peer=self._peer_str())
            self.abort_connection()

    def _login_pdu(self, pdu: P.Pdu) -> None:
        assert self.login is not None
        if not isinstance(pdu, P.LoginRequest):
            # §6.1: only Login Requests before Full Feature Phase; anything else ends it.
            event(log, "login.unexpected_pdu", logging.WARNING, peer=self._peer_str(),
                  opcode=f"0x{type(pdu).OPCODE:02x}")
            self.close()
            return
        responses = self.login.receive(pdu)
        if not self.login.drop_without_response:
            for resp in responses:
                self.transport.writelines(encode(resp))  # type: ignore[union-attr]
        outcome = self.login.outcome
        if isinstance(outcome, LoginFailure):
            self.close()
        elif isinstance(outcome, LoginSuccess):
            self.stat.statsn = outcome.statsn
            self.stat.expstatsn = outcome.statsn
            self._enter_full_feature(outcome)

    def _enter_full_feature(self, ok: LoginSuccess) -> None:
        if self._login_timer is not None:
            self._login_timer.cancel()
            self._login_timer = None
        conn_params = ok.params.connection
        self.params = ok.params.session
        self.cid = ok.cid
        self.header_digest = conn_params.header_digest
        self.data_digest = conn_params.data_digest
        self.max_send_segment = conn_params.max_send_data_segment_length
        # A Data-In PDU fits the initiator's MaxRecvDataSegmentLength and the sequence it
        # ends, MaxBurstLength (§13.14): an answer up to this size is one PDU.
        self._one_data_in = min(self.max_send_segment, self.params.max_burst_length)
        self._immediate_max = self.params.first_burst_length if self.params.immediate_data else -1
        if self._sock is not None and not self.data_digest:
            # READs from 64 KiB up go out with sendfile (zerocopy.py).  A data digest needs
            # the bytes in hand anyway: summing a scratch copy and then sending the pages
            # measured slower than reading and sending the copy.
            self._zc_min = zerocopy.MIN_BYTES
            self._zc_max = ZERO_COPY_MAX_BYTES
        self.reader.header_digest = conn_params.header_digest
        self.reader.data_digest = conn_params.data_digest
        self.reader.max_data_segment = conn_params.max_recv_data_segment_length
        self.session = self.server.bind_session(self, ok)
        if self.session.luns is not None:  # a Normal session: READs and WRITEs may take the raw lane
            self.reader.take_command = self._command_arrived_raw
        event(log, "login.ok", initiator=ok.initiator_name, target=ok.target.name if ok.target else None,
              type=ok.session_type, isid=f"{ok.isid:012x}", tsih=ok.tsih, cid=ok.cid, tpgt=ok.tpgt,
              peer=self._peer_str(), portal=format_portal(self.local[0], self.local[1]),
              user=ok.authenticated_as,
              params=" ".join(f"{k}={v}" for k, v in describe_params(ok.params).items()))
        self._schedule_nop()

    def peer_max_recv_changed(self, size: int) -> None:
        """The initiator declared a new MaxRecvDataSegmentLength in a Text Request (§13.12:
        Use ALL): the PDUs we send from now on are cut to it."""
        self.max_send_segment = size
        if self.params is not None:
            self._one_data_in = min(size, self.params.max_burst_length)

    # ------------------------------------------------------------------
    # NOP-In pings of idle initiators
    # ------------------------------------------------------------------
    def _schedule_nop(self) -> None:
        if not self.closed:
            self._nop_timer = self.loop.call_later(self.server.nop_interval, self._nop_tick)

    def _nop_tick(self) -> None:
        if self.closed or self.session is None:
            return
        now = time.monotonic()
        if self._nop_outstanding is not None:
            if now - self._nop_sent_at > self.server.nop_timeout:
                event(log, "conn.nop_timeout", logging.WARNING, peer=self._peer_str())
                self.abort_connection()
                return
        elif now - self._last_rx >= self.server.nop_interval:
            if self.session.session_type == "Normal":
                self._ping(now)
            elif now - self._last_rx > self.server.nop_interval + self.server.nop_timeout:
                # Discovery sessions are not pinged; one silent as long as an unanswered ping
                # would take is dropped too, so none can be parked for ever.
                event(log, "conn.discovery_idle", logging.WARNING, peer=self._peer_str())
                self.abort_connection()
                return
        self._schedule_nop()

    def _ping(self, now: float) -> int:
        """NOP-In asking for an answer (§11.19); its TTT.  Unanswered, _nop_tick drops us."""
        ttt = self._new_ttt()
        self._nop_outstanding = ttt
        self._nop_sent_at = now
        self.send(P.NopIn(ttt=ttt, itt=P.RESERVED_TAG), status=False)
        return ttt

    # ------------------------------------------------------------------
    # Full Feature Phase dispatch
    # ------------------------------------------------------------------
    def _joined_session_params(self, isid: int, initiator: str, target: str, tsih: int):
        """The values in force in the session a login with ``tsih`` joins (session-wide keys
        are negotiated once, on the leading connection: RFC 7143 §6.3.4, §13), or None."""
        s = self.server.by_tsih.get(tsih)
        return s.params if s is not None and s.key == (initiator, isid, target) else None

    def _ffp_pdu(self, pdu: P.Pdu) -> None:
        session = self.session
        assert session is not None
        if type(pdu) is P.ScsiCommandPdu and session.luns is not None and pdu.itt != P.RESERVED_TAG:
            self._acknowledge(pdu.expstatsn)
            self._scsi_command_arrived(pdu)
            return
        bad = P.request_violation(pdu)
        if bad is not None:
            # A task under ITT 0xffffffff (§11.2.1.8), a reserved Logout reason (§11.14.1).
            event(log, "conn.request_refused", logging.WARNING, peer=self._peer_str(), why=bad[1])
            self._reject(pdu, bad[0])
            return
        op = type(pdu).OPCODE
        if op in (P.Opcode.SCSI_COMMAND, P.Opcode.NOP_OUT, P.Opcode.TEXT_REQUEST,
                  P.Opcode.TASK_MGMT_REQUEST, P.Opcode.LOGOUT_REQUEST, P.Opcode.DATA_OUT):
            self._acknowledge(pdu.expstatsn)  # type: ignore[attr-defined]
        if op == P.Opcode.DATA_OUT:
            self._data_out(pdu)  # type: ignore[arg-type]
            return
        if op == P.Opcode.LOGIN_REQUEST:
            # §6.1: a Login Request in Full Feature Phase is a protocol error.
            self._protocol_violation("Login Request in Full Feature Phase")
            return
        if op == P.Opcode.SNACK_REQUEST:
            # ErrorRecoveryLevel=0: SNACK is not supported (§11.16 / §7.1).
            self._reject(pdu, P.RejectReason.PROTOCOL_ERROR)
            return
        if session.session_type == "Discovery" and op in (P.Opcode.SCSI_COMMAND, P.Opcode.TASK_MGMT_REQUEST):
            # §4.3: a discovery session carries only Text, NOP and Logout.
            self._reject(pdu, P.RejectReason.PROTOCOL_ERROR)
            return
        if op == P.Opcode.SCSI_COMMAND:
            self._scsi_command_arrived(pdu)  # type: ignore[arg-type]
            return
        if op == P.Opcode.NOP_OUT and pdu.itt == P.RESERVED_TAG:  # type: ignore[attr-defined]
            # Answer to our NOP-In (TTT echoed) or a pure ExpStatSN update: no reply (§11.18).
            if pdu.ttt != P.RESERVED_TAG and pdu.ttt == self._nop_outstanding:  # type: ignore[attr-defined]
                self._nop_outstanding = None
            ping = self._zc_ping
            if ping is not None and pdu.ttt == ping[0]:  # type: ignore[attr-defined]
                self._zc_ping = None
                self._zc_acknowledged(ping[1])
            if not pdu.immediate:
                # §11.18.1: ITT=0xffffffff NOP-Out must be immediate; tolerate but do not
                # consume a CmdSN.
                pass
            return
        # NOP-Out (ping), Text, TMF, Logout: ordered by CmdSN unless immediate.
        for item in session.window.arrive(pdu.cmdsn, pdu, pdu.immediate):  # type: ignore[attr-defined]
            self._run_in_order(item)

    def _run_in_order(self, item: object) -> None:
        """A PDU whose CmdSN turn has come (or an immediate one)."""
        if isinstance(item, Task):
            item.ready = True
            self._maybe_execute(item)
        elif isinstance(item, P.NopOut):
            # §11.19: echo the ping data at once; never queued behind SCSI work.  The echo is
            # cut to the initiator's MaxRecvDataSegmentLength (§11.18.3), which may be smaller
            # than the ping it was allowed to send us.
            data = item.data
            if len(data) > self.max_send_segment:
                data = data[:self.max_send_segment]
            self.send(P.NopIn(itt=item.itt, ttt=P.RESERVED_TAG, lun=item.lun, data=data))
        elif isinstance(item, P.TextRequest):
            self.session.text_request(self, item)  # type: ignore[union-attr]
        elif isinstance(item, P.TaskMgmtRequest):
            self.loop.create_task(self.session.task_management(self, item))  # type: ignore[union-attr]
        elif isinstance(item, P.LogoutRequest):
            self.loop.create_task(self.session.logout(self, item))  # type: ignore[union-attr]

    # ------------------------------------------------------------------
    # SCSI commands
    # ------------------------------------------------------------------
    def _new_ttt(self) -> int:
        ttt = self._next_ttt
        self._next_ttt = (ttt + 1) & 0x7FFFFFFF or 1
        return ttt

    def _runs_now(self, cmdsn: int, itt: int) -> bool:
        """The fast lane's rule for a non-immediate command: the next CmdSN with nothing held
        back, a fresh ITT (not the reserved one), nothing deferred, no congestion.  (The raw
        READ lane writes it out, see _command_arrived_raw.)"""
        window = self.session.window  # type: ignore[union-attr]
        return (cmdsn == window.expcmdsn and not window.pending and itt != 0xFFFFFFFF
                and itt not in self.tasks and not self._deferred and not self._congested())

    def _scsi_command_arrived(self, pdu: P.ScsiCommandPdu) -> None:
        session = self.session
        assert session is not None
        window = session.window
        # Fast lane: its turn now, all its data already here (a read, or a write whose
        # immediate data is the whole transfer).
        if (not pdu.immediate and self._runs_now(pdu.cmdsn, pdu.itt)
                and (not pdu.write or (pdu.final and len(pdu.data) == pdu.edtl <= self._immediate_max))
                and (pdu.write or not pdu.data)):
            window.expcmdsn = (pdu.cmdsn + 1) & 0xFFFFFFFF
            self._run_now(pdu, session)
            return
        if not pdu.immediate and not window.in_window(pdu.cmdsn):
            # §4.2.2.1: silently ignore commands outside the window.
            event(log, "cmd.outside_window", logging.DEBUG, cmdsn=pdu.cmdsn,
                  expcmdsn=session.window.expcmdsn)
            return
        if pdu.itt in self.tasks:
            self._reject(pdu, P.RejectReason.TASK_IN_PROGRESS)
            return
        if pdu.immediate and len(self.tasks) >= MAX_TASKS_PER_CONNECTION:
            # Immediate commands bypass the CmdSN window; past our limit they are
            # refused (§11.17.1 reason 0x06) instead of queued without bound.
            self._reject(pdu, P.RejectReason.IMMEDIATE_COMMAND_REJECT)
            return
        lun = P.decode_lun(pdu.lun)
        task = Task(pdu, lun)
        params = self.params
        assert params is not None
        if pdu.data and (not pdu.write or not params.immediate_data or len(pdu.data) > pdu.edtl):
            # Data on a non-write command; with ImmediateData=No (§13.11); more than the
            # EDTL (with EDTL 0 no transfer checks it later; else §11.4.5 via WriteTransfer).
            self._reject(pdu, P.RejectReason.PROTOCOL_ERROR)
            return
        # Data-Out bytes the CDB calls for, whatever the W bit and EDTL say: a write
        # with EDTL 0 is a residual overflow of the whole transfer (§11.4.5.1).
        needed = session.luns.data_out_length(lun, pdu.cdb) if not pdu.read or pdu.write else None
        task.needed = needed
        # More than the LU would ever accept in one command (Block Limits VPD MAXIMUM TRANSFER
        # LENGTH) is not solicited: the command runs without data and the LU answers ILLEGAL
        # REQUEST at once (SBC-4 §6.6.4), instead of us buffering what a CDB announces.
        too_long = needed is not None and needed > self._max_data_out(session, lun)
        if pdu.write and pdu.edtl and not too_long:
            total = pdu.edtl if needed is None else min(needed, pdu.edtl)
            transfer = WriteTransfer(
                total=total, edtl=pdu.edtl, max_burst=params.max_burst_length,
                first_burst=params.first_burst_length,
                max_outstanding_r2t=params.max_outstanding_r2t, initial_r2t=params.initial_r2t)
            try:
                transfer.start(pdu.data, pdu.final)
            except DataOutError as err:
                event(log, "cmd.data_error", logging.WARNING, peer=self._peer_str(), why=str(err))
                self._reject(pdu, P.RejectReason.PROTOCOL_ERROR)
                return
            task.transfer = transfer
        self.tasks[pdu.itt] = task
        session.window.in_flight += 1
        if task.transfer is not None:
            self._send_r2ts(task)
        for item in session.window.arrive(pdu.cmdsn, task, pdu.immediate):
            self._run_in_order(item)

    def _command_arrived_raw(self, f: tuple, buf: bytearray, pos: int, data_start: int) -> bool:
        """The raw lane (PduReader.take_command): a non-immediate SCSI Command PDU at
        ``buf[pos:]``, ``f`` its unpacked BHS, its data segment (if any) from ``data_start``.
        A READ(10)/(16) that would take the fast lane of :meth:`_scsi_command_arrived` and
        that the LU answers at once (:meth:`LogicalUnit.read_now`) is answered here, without
        a PDU object or the dispatch; a WRITE goes to :meth:`_write_arrived`; anything else
        returns False and is decoded and dispatched as usual.

        The conditions are those of the fast lane: F and R set, W clear, no data, SIMPLE or
        untagged, not immediate (the caller checked byte 0), the next CmdSN with nothing held
        back, a fresh ITT, nothing deferred, no congestion.
        """
        b1 = f[1]
        if b1 != 0xC1 and b1 != 0xC0:
            return (b1 == 0xA1 or b1 == 0xA0) and self._write_arrived(f, buf, pos, data_start)
        op = buf[pos + 32]
        if (op != 0x88 and op != 0x28) or f[4] or self.closed:
            return False
        session = self.session
        window = session.window  # type: ignore[union-attr]
        itt = f[6]
        cmdsn = f[8]
        # _runs_now() (with _congested()) and _zero_copy_ok() (below) written out: the calls
        # cost 3.6 % of a READ's instructions on this lane (callgrind); test_raw_read_lane
        # holds it to the regular path.
        if (cmdsn != window.expcmdsn or window.pending or itt == 0xFFFFFFFF or itt in self.tasks
                or self._deferred or self._paused or self._out_bytes + self._reserved > WRITE_HIGH_WATER):
            return False
        self._acknowledge(f[9])  # as _ffp_pdu would (harmless to repeat if we decline below)
        edtl = f[7]
        data = session.luns.read_now(  # type: ignore[union-attr]
            decode_lun(f[5]), bytes(buf[pos + 32:pos + 48]), session.nexus,  # type: ignore[union-attr]
            self._zc_min <= edtl <= self._zc_max and len(self._zc_unacked) < ZERO_COPY_UNACKED_LIMIT)
        if data is None:
            return False
        window.expcmdsn = (cmdsn + 1) & 0xFFFFFFFF
        # The usual answer, all the data with the status, without _read_answered's call.
        cls = data.__class__
        n = data.length if cls is FileExtent else -1 if cls is ScsiResult else len(data)
        if n == edtl and n <= self._one_data_in:
            self._data_in_with_status(itt, f[5], data, n, 0, 0)
        else:
            self._read_answered(itt, f[5], edtl, data)
        return True

    def _write_arrived(self, f: tuple, buf: bytearray, pos: int, data_start: int) -> bool:
        """The raw lane for a WRITE(10)/(16) whose immediate data is the whole transfer (F and
        W set, R clear, SIMPLE or untagged): done by :meth:`LogicalUnit.write_now` and answered
        here, without a PDU object or the dispatch, when the fast lane of
        :meth:`_scsi_command_arrived` would have run it at once and the LU writes it at once;
        otherwise False, nothing done, and the PDU is decoded and dispatched as usual."""
        op = buf[pos + 32]
        edtl = f[7]
        if (op != 0x8A and op != 0x2A) or f[4] != edtl or edtl > self._immediate_max or self.closed:
            return False  # (f[4] is the data length: no AHS is offered here)
        cmdsn = f[8]
        if not self._runs_now(cmdsn, f[6]):
            return False
        self._acknowledge(f[9])  # as _ffp_pdu would (harmless to repeat if we decline below)
        session = self.session
        result = session.luns.write_now(  # type: ignore[union-attr]
            decode_lun(f[5]), bytes(buf[pos + 32:pos + 48]), session.nexus,  # type: ignore[union-attr]
            bytes(buf[data_start:data_start + edtl]))
        if result is None:
            return False
        session.window.expcmdsn = (cmdsn + 1) & 0xFFFFFFFF  # type: ignore[union-attr]
        self._write_answered(f[6], f[5], edtl, result)
        return True

    def _write_answered(self, itt: int, lun_field: int, edtl: int, result: ScsiResult) -> None:
        """The response to a WRITE that LogicalUnit.write_now did: the bare GOOD (it took data
        of exactly the CDB's length, so there is no residual), or its CHECK CONDITION."""
        if result is _GOOD_WRITE:
            self._scsi_response(itt, 0, 0, 0, 0, b"")
        else:
            self._respond(itt, lun_field, False, True, edtl, edtl, result)

    def _read_answered(self, itt: int, lun_field: int, edtl: int, data) -> None:
        """Data-In (with status) for a READ that LogicalUnit.read_now answered: its data, or
        the ScsiResult of a read that failed."""
        if data.__class__ is ScsiResult:
            self._respond(itt, lun_field, True, False, edtl, None, data)
            return
        n = len(data)
        if n == edtl and n <= self._one_data_in:
            self._data_in_with_status(itt, lun_field, data, n, 0, 0)
        else:
            self._respond(itt, lun_field, True, False, edtl, None, ScsiResult(Status.GOOD, data))

    def _run_now(self, pdu: P.ScsiCommandPdu, session: "TargetSession") -> None:
        """Execute a command whose turn it is and whose data is complete, without a Task
        unless the SCSI layer has to wait (flush, lock, worker thread)."""
        luns = session.luns
        lun = decode_lun(pdu.lun)
        cdb = pdu.cdb
        if pdu.read and cdb[0] in _READ_NOW_OPS and pdu.attr <= 1 and not pdu.write and not self.closed:
            # The common READ: its data at once (LogicalUnit.read_now), or None for start().
            edtl = pdu.edtl
            data = luns.read_now(lun, cdb, session.nexus, edtl >= self._zc_min and self._zero_copy_ok(pdu))
            if data is not None:
                self._read_answered(pdu.itt, pdu.lun, edtl, data)
                return
        elif pdu.write and cdb[0] in _WRITE_NOW_OPS and pdu.attr <= 1 and not pdu.read and not self.closed:
            # The common WRITE, its data all here (the fast lane's condition): done at once
            # (LogicalUnit.write_now, which takes only data of exactly the CDB's length, so
            # nothing is left over: no residual), or None for start().
            result = luns.write_now(lun, cdb, session.nexus, pdu.data)
            if result is not None:
                self._write_answered(pdu.itt, pdu.lun, pdu.edtl, result)
                return
        needed = luns.data_out_length(lun, cdb) if pdu.write or not pdu.read else None
        data_out = pdu.data
        if needed is not None and len(data_out) > needed:
            data_out = memoryview(data_out)[:needed]
        attr = pdu.attr
        edtl = pdu.edtl
        cmd = ScsiCommand(cdb, lun, session.nexus, data_out, edtl,
                          _TASK_ATTRS[attr] if attr < 5 else TaskAttr.SIMPLE, pdu.itt,
                          edtl >= self._zc_min and pdu.read and self._zero_copy_ok(pdu))
        try:
            result = luns.start(cmd)
        except Exception:
            result = self._internal_error(cdb, lun)
        if result.__class__ is ScsiResult:
            self._respond(pdu.itt, pdu.lun, pdu.read, pdu.write, pdu.edtl, needed, result)  # type: ignore[arg-type]
            return
        # It has to wait: run its first step now (eagerly, as a command would on a Task), and
        # only if it suspends make it an ordinary task (abortable, counted).
        coro = result
        try:
            yielded = coro.send(None)  # type: ignore[union-attr]
        except StopIteration as stop:
            self._respond(pdu.itt, pdu.lun, pdu.read, pdu.write, pdu.edtl, needed, stop.value)
            return
        except Exception:
            self._respond(pdu.itt, pdu.lun, pdu.read, pdu.write, pdu.edtl, needed, self._internal_error(cdb, lun))
            return
        task = Task(pdu, lun)
        task.needed = needed
        task.ready = task.started = True
        self._reserve(task)
        self.tasks[pdu.itt] = task
        session.window.in_flight += 1
        task.future = eager.finish_later(coro, yielded, self.loop,  # type: ignore[arg-type]
                                         lambda rest: self._finish_suspended(task, rest))

    async def _finish_suspended(self, task: Task, pending) -> None:
        try:
            result = await pending
        except asyncio.CancelledError:
            self._forget(task)
            raise
        except Exception:
            result = self._internal_error(task.pdu.cdb, task.lun)
        if task.aborted:
            self._forget(task)
            self._drop_result(result)
            return
        self._finish_task(task, result)

    def _internal_error(self, cdb: bytes, lun: int) -> ScsiResult:
        from ..scsi.sense import INTERNAL_TARGET_FAILURE, SenseKey, build_sense

        log.exception("cmd.internal_error cdb=%s", bytes(cdb[:16]).hex())
        return ScsiResult(status=Status.CHECK_CONDITION,
                          sense=build_sense(SenseKey.HARDWARE_ERROR, INTERNAL_TARGET_FAILURE,
                                            descriptor=self._descriptor_sense(lun)))

    def _descriptor_sense(self, lun: int) -> bool:
        """The LU's D_SENSE (Control mode page): sense this transport builds for it follows the
        format the LU's own errors use (SPC-4 §7.5.8)."""
        session = self.session
        luns = session.luns if session is not None else None
        lu = luns.get(lun) if luns is not None else None
        return bool(getattr(getattr(lu, "mode", None), "d_sense", False))

    @staticmethod
    def _max_data_out(session: "TargetSession", lun: int) -> int:
        """Largest Data-Out the LU accepts in one command (MAXIMUM TRANSFER LENGTH x block size)."""
        lu = session.luns.get(lun)
        if lu is None:
            return 0
        return getattr(lu, "max_transfer", 65536) * getattr(lu, "block_size", 512)

    def _send_r2ts(self, task: Task) -> None:
        transfer = task.transfer
        assert transfer is not None
        for ttt, r2tsn, offset, length in transfer.r2ts(self._new_ttt):
            self.ttt_map[ttt] = task
            self.send(P.R2T(lun=task.pdu.lun, itt=task.itt, ttt=ttt, r2tsn=r2tsn, offset=offset,
                            length=length), status=False)

    def _data_out(self, pdu: P.DataOut) -> None:
        task = self.ttt_map.get(pdu.ttt) if pdu.ttt != P.RESERVED_TAG else self.tasks.get(pdu.itt)
        if task is None or task.itt != pdu.itt or task.transfer is None:
            if task is None and pdu.itt in self._aborted_writes:
                return  # data for a write aborted by a TMF: dropped quietly (§11.6.2)
            # §11.7.4: Data-Out for a task we do not know: Reject.
            self._reject(pdu, P.RejectReason.INVALID_PDU_FIELD)
            return
        try:
            task.transfer.data_out(pdu)
        except DataOutError as err:
            event(log, "cmd.data_error", logging.WARNING, peer=self._peer_str(), itt=f"0x{task.itt:x}",
                  why=str(err))
            self._fail_task(task, err)
            return
        if pdu.final and pdu.ttt != P.RESERVED_TAG and pdu.ttt not in task.transfer.outstanding:
            self.ttt_map.pop(pdu.ttt, None)
        if pdu.final:
            self._send_r2ts(task)
        self._maybe_execute(task)

    def _fail_task(self, task: Task, err: Exception) -> None:
        """A data-transfer error ends the task with CHECK CONDITION (ABORTED COMMAND)."""
        from ..scsi.sense import SenseKey, build_sense

        for ttt in [t for t, tk in self.ttt_map.items() if tk is task]:
            del self.ttt_map[ttt]
        task.transfer = None
        task.aborted = True  # when its CmdSN turn comes, the window advances and nothing runs
        sense = build_sense(SenseKey.ABORTED_COMMAND, DATA_PHASE_ERROR, descriptor=self._descriptor_sense(task.lun))
        self._finish_task(task, ScsiResult(status=Status.CHECK_CONDITION, sense=sense))

    def _maybe_execute(self, task: Task) -> None:
        if task.started or task.aborted or not task.ready:
            return
        if task.transfer is not None and not task.transfer.complete:
            return
        if self._congested():
            # Its Data-In would only pile up behind output the peer is not reading.
            self._deferred.append(task)
            return
        task.started = True
        self._reserve(task)
        # Most commands complete without waiting (page-cache pread/pwrite): run them
        # now and only make a Task for the ones that block (flush, locks, threads).
        task.future = eager.start(self._execute(task), self.loop)

    async def _execute(self, task: Task) -> None:
        session = self.session
        assert session is not None
        pdu = task.pdu
        data_out = b""
        if task.transfer is not None:
            data_out = memoryview(task.transfer.buffer)
        cmd = ScsiCommand(cdb=pdu.cdb, lun=task.lun, nexus=session.nexus, data_out=data_out,
                          expected_length=pdu.edtl, task_attr=_TASK_ATTRS[pdu.attr] if pdu.attr < 5 else TaskAttr.SIMPLE,
                          task_tag=task.itt, zero_copy=self._zero_copy_ok(pdu))
        try:
            result = await session.luns.execute(cmd)
        except asyncio.CancelledError:
            self._forget(task)
            raise
        except Exception:
            result = self._internal_error(pdu.cdb, task.lun)
        if task.aborted:
            self._forget(task)
            self._drop_result(result)
            return
        self._finish_task(task, result)

    def _zero_copy_ok(self, pdu: P.ScsiCommandPdu) -> bool:
        """May this READ's data be sent from the image file (zerocopy.py)?"""
        return (pdu.read and self._zc_min <= pdu.edtl <= self._zc_max
                and len(self._zc_unacked) < ZERO_COPY_UNACKED_LIMIT)

    def _reserve(self, task: Task) -> None:
        """A READ starts: its Data-In counts as pending output until it is forgotten."""
        if task.pdu.read:
            task.reserved = task.pdu.edtl
            self._reserved += task.reserved

    def _forget(self, task: Task) -> None:
        if task.reserved:
            self._reserved -= task.reserved
            task.reserved = 0
            if self._deferred:
                self._schedule_flush()  # less reserved output: _flush starts what waited for it
        if self.tasks.get(task.itt) is task:
            del self.tasks[task.itt]
            if self.session is not None:
                self.session.window.in_flight = max(0, self.session.window.in_flight - 1)
        if task.transfer is not None:
            for ttt in [t for t, tk in self.ttt_map.items() if tk is task]:
                del self.ttt_map[ttt]

    def _finish_task(self, task: Task, result: ScsiResult) -> None:
        """Send the response of a completed task and forget it."""
        self._forget(task)
        pdu = task.pdu
        self._respond(pdu.itt, pdu.lun, pdu.read, pdu.write, pdu.edtl, task.needed, result)

    def _respond(self, itt: int, lun_field: int, read: bool, write: bool, edtl: int,
                 needed: int | None, result: ScsiResult) -> None:
        """Data-In and/or SCSI Response for a completed command (§11.4, §11.7).

        Headers are packed directly (one struct call each) rather than built as PDU
        objects: this runs once per I/O.
        """
        if not result.status and not result.sense and result.extra is None and not self.closed:
            # The common answers first: GOOD with exactly what was asked for, no residual.
            if read:
                data = result.data
                n = len(data)
                if n == edtl and 0 < n <= self._one_data_in:
                    self._data_in_with_status(itt, lun_field, data, n, 0, 0)
                    return
            elif write and needed == edtl:
                # A write that moved what the initiator announced: a bare SCSI Response.
                self._scsi_response(itt, 0, 0, 0, 0, b"")
                return
        if result.extra:
            self._side_effects(result, lun_field)
        data = result.data if read else b""
        if data.__class__ is FileExtent and (self.closed or result.status or result.sense
                                              or len(data) > edtl):
            data = self._extent_bytes(data)  # only a GOOD answer of the asked length goes in place
        if self.closed:
            return
        status = result.status
        sense = result.sense
        if read:
            produced = len(result.data)
            overflow, underflow, resid = residual(edtl, produced)
            if overflow:
                data = memoryview(data)[:edtl]
        elif write or needed:
            # Writes: what the CDB asked for against what the initiator announced.
            overflow, underflow, resid = residual(edtl, needed if needed is not None else edtl)
        else:
            # Neither R nor W: whatever the CDB would transfer counts as overflow.
            produced = len(result.data)
            overflow, underflow, resid = residual(edtl, produced if produced else edtl)
        flags = (0x04 if overflow else 0) | (0x02 if underflow else 0)
        n = len(data)
        datasn = 0
        if n:
            collapse = status == 0 and not sense
            if n <= self._one_data_in and collapse:
                self._data_in_with_status(itt, lun_field, data, n, flags, resid)
                return
            datasn = self._data_in_pdus(itt, lun_field, data, status, flags, resid, collapse)
            if collapse:
                self._response_queued()
                return
        segment = P.ScsiResponse.sense_segment(bytes(sense)) if sense else b""
        self._scsi_response(itt, status, flags, resid, datasn, segment)

    def _scsi_response(self, itt: int, status: int, flags: int, resid: int, datasn: int,
                       segment: bytes) -> None:
        """Queue a SCSI Response PDU (§11.4): ``flags`` are the residual bits (O/U) for
        ``resid``, ``datasn`` the ExpDataSN (Data-In PDUs sent before it), ``segment`` the
        sense data segment (empty without sense)."""
        statsn = self.stat.statsn
        self.stat.statsn = (statsn + 1) & 0xFFFFFFFF
        window = self.session.window  # type: ignore[union-attr]
        header = _BHS.pack(0x21, 0x80 | flags, 0, status, len(segment), 0, itt, 0,
                           statsn, window.expcmdsn, window.maxcmdsn, datasn, 0, resid)
        out = self._out
        out.append(header + pack_digest(crc32c(header)) if self.header_digest else header)
        if segment:
            padded = segment + _PADDING[-len(segment) & 3]
            out.append(padded)
            if self.data_digest:
                out.append(pack_digest(crc32c(padded)))
        self._out_bytes += len(segment) + 48
        self._response_queued()

    def _data_in_with_status(self, itt: int, lun_field: int, data, n: int, flags: int, resid: int) -> None:
        """A GOOD READ's ``n`` bytes as one Data-In that carries the status too (phase
        collapse, §11.7.4); ``flags`` are the residual bits (O/U) for ``resid``."""
        statsn = self.stat.statsn
        self.stat.statsn = (statsn + 1) & 0xFFFFFFFF
        window = self.session.window  # type: ignore[union-attr]
        header = _BHS.pack(0x25, 0x81 | flags, 0, 0, n, lun_field, itt, 0xFFFFFFFF,
                           statsn, window.expcmdsn, window.maxcmdsn, 0, 0, resid)
        if n & 3:
            self._append_pdu(header, data)
        else:
            # Without padding: the header (and its digest, one piece with it), the data and
            # its digest are all there is, written out here rather than in _append_pdu (per
            # READ).  A data digest never meets a FileExtent: zero-copy is off with it.
            out = self._out
            out.append(header + pack_digest(crc32c(header)) if self.header_digest else header)
            out.append(data)
            if self.data_digest:
                out.append(pack_digest(crc32c(data)))
        if data.__class__ is FileExtent:  # _held_until_acknowledged, written out (per READ)
            data.owner = self
            self._zc_unacked.append((statsn, data))
            self._zc_out = True
        self._out_bytes += n + 48
        self._response_queued()

    def _append_pdu(self, header: bytes, data) -> None:
        """Queue a packed header and its data segment, with padding and the digests in use."""
        out = self._out
        out.append(header + pack_digest(crc32c(header)) if self.header_digest else header)
        out.append(data)
        pad = -len(data) & 3
        if pad:
            out.append(_PADDING[pad])
        if self.data_digest:
            crc = crc32c(data)
            out.append(pack_digest(crc32c_extend(crc, _PADDING[pad]) if pad else crc))

    def _data_in_pdus(self, itt: int, lun_field: int, data, status: int, flags: int, resid: int,
                      collapse: bool) -> int:
        """Queue ``data`` as Data-In PDUs (RFC 7143 §11.7) and return how many.

        Each PDU carries at most the initiator's MaxRecvDataSegmentLength; they form
        sequences of at most MaxBurstLength, the last PDU of each with the F bit (§11.7.1,
        §13.14).  With ``collapse`` the last PDU carries the status too (S bit, §11.7.4).
        A :class:`FileExtent` is sent from the image in pieces, and held as a whole until
        the initiator acknowledges the status.
        """
        window = self.session.window  # type: ignore[union-attr]
        expcmdsn, maxcmdsn = window.expcmdsn, window.maxcmdsn
        segment = self.max_send_segment
        burst = self.params.max_burst_length  # type: ignore[union-attr]
        n = len(data)
        extent = data if data.__class__ is FileExtent else None
        view = None if extent is not None else (data if data.__class__ is memoryview else memoryview(data))
        statsn = self.stat.statsn  # Data-In without status repeats it (meaningless without S)
        offset = datasn = 0
        burst_left = burst
        while offset < n:
            size = min(segment, burst_left, n - offset)
            end = offset + size
            burst_left -= size
            if end == n and collapse:
                self.stat.statsn = (statsn + 1) & 0xFFFFFFFF
                header = _BHS.pack(0x25, 0x81 | flags, 0, status, size, lun_field, itt, 0xFFFFFFFF,
                                   statsn, expcmdsn, maxcmdsn, datasn, offset, resid)
            else:
                header = _BHS.pack(0x25, 0x80 if end == n or not burst_left else 0, 0, 0, size,
                                   lun_field, itt, 0xFFFFFFFF, statsn, expcmdsn, maxcmdsn,
                                   datasn, offset, 0)
            if not burst_left:
                burst_left = burst
            if extent is not None:
                # A piece to send from the file (no data digest here); the hold is ``extent``.
                self._append_pdu(header, FileExtent(extent.source, extent.offset + offset, size, extent.fence))
            else:
                self._append_pdu(header, view[offset:end])  # type: ignore[index]
            offset = end
            datasn += 1
        self._out_bytes += n + 48 * datasn
        if extent is not None:
            self._held_until_acknowledged(statsn, extent)
        return datasn

    def _side_effects(self, result: ScsiResult, lun_field: int) -> None:
        """Effects a SCSI command has on other tasks: PERSISTENT RESERVE OUT with PREEMPT AND
        ABORT aborts every task of the preempted I_T nexuses on that LU (SPC-4 §5.13.11.2.4)."""
        patterns = result.extra.get("abort_nexuses")
        if patterns and self.session is not None and self.session.luns is not None:
            lu = self.session.luns.get(decode_lun(lun_field))
            if lu is not None:
                self.server.abort_tasks_of_nexuses(lu, patterns)

    def _cancel_task(self, task: Task) -> None:
        task.aborted = True
        if task.future is not None and not task.future.done():
            task.future.cancel()
        self._forget(task)

    def abort_tasks(self, predicate, *, by_tmf: bool = False) -> int:
        """Abort every task matching ``predicate(task)``; no response is sent for them (§4.2.3.3).
        ``by_tmf``: a task management function aborts them, so Data-Out still answering their
        R2Ts is dropped quietly (§11.6.2)."""
        victims = [t for t in self.tasks.values() if predicate(t)]
        for task in victims:
            if by_tmf and task.transfer is not None and not task.transfer.complete:
                self._aborted_write(task.itt)
            self._cancel_task(task)
        return len(victims)

    def _aborted_write(self, itt: int) -> None:
        """Remember an aborted write still waiting for data: the initiator goes on answering
        its R2Ts (§11.6.2), and that Data-Out is dropped, not Rejected (a Reject it cannot
        match to a request is a connection error to libiscsi)."""
        seen = self._aborted_writes
        seen[itt] = None
        if len(seen) > MAX_TASKS_PER_CONNECTION:
            del seen[next(iter(seen))]  # the oldest

    def _data_digest_failure(self, item: DataDigestFailure) -> None:
        """RFC 7143 §7.8: Reject the PDU with reason Data Digest Error; ERL 0 then fails the task."""
        event(log, "conn.data_digest_error", logging.WARNING, peer=self._peer_str())
        self.data_digest_errors += 1
        self._reject(None, P.RejectReason.DATA_DIGEST_ERROR, header=item.header)
        pdu = item.pdu
        task = None
        if isinstance(pdu, P.DataOut):
            task = self.ttt_map.get(pdu.ttt) if pdu.ttt != P.RESERVED_TAG else self.tasks.get(pdu.itt)
        elif isinstance(pdu, P.ScsiCommandPdu):
            # The command itself is unharmed but its immediate data is lost; at ERL 0
            # we cannot ask for it again, so the command is not executed.
            return
        if task is not None:
            self._fail_task(task, DataOutError("data digest error"))
