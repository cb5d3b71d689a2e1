"""One initiator TCP connection: the asyncio edge that moves PDUs, nothing more.

Receive path (the hot one).  An :class:`asyncio.BufferedProtocol` so the kernel copies
straight into our memory: headers land in a staging buffer and many PDUs are parsed per
read; the payload of a large Data-In is received *directly into the command's buffer*
(``get_buffer`` returns a view of it), so a 128 KiB read costs no user-space copy.  Every
BHS is decoded with one ``struct.unpack_from`` — the layout of :mod:`iscsi.pdu` (bytes
16..47 as words) — and the three per-I/O opcodes (Data-In, SCSI Response, R2T) go to the
session as that tuple; anything else becomes a typed PDU through :func:`iscsi.pdu.decode`.

In full feature phase without digests (the usual case) :meth:`_parse_fast` runs instead
of :meth:`_parse`: the same framing rules with the digest and login branches taken out.
After a payload received in place, the next BHS is read on its own (into ``_hbuf``) so a
following large payload can go in place too — or, when the task's buffer has RX_ROOM
spare bytes after read_len, with that payload in the same read (one read per large
Data-In).  ``get_buffer`` answers from ``_rbuf``, set at the end of each read.

Send path.  ``send`` queues buffers (header and data as separate items, data never copied)
and one ``writelines`` per event-loop iteration puts them on the wire, so 32 commands
issued back to back cost one system call, not 32.  Commands queued while a read is being
parsed (a completion callback issuing the next command) are written at the end of that
read, with no extra trip through the event loop.  The session's status bookkeeping
(StatSN, the command window) is likewise applied once per read (``sink.apply_sn``).

Digests (RFC 7143 §12.1).  With a header and/or data digest :meth:`_parse_dg` is the hot
loop: the same framing with the 4 digest bytes counted in, each digest checked with one CRC32C
call over the bytes it covers plus the digest (the CRC residue, :data:`DIGEST_RESIDUE`).  A
large Data-In is still received in place; the task buffer's RX_ROOM then takes the pad, the
data digest and the next header + its digest, so the data digest is computed where the data
landed (no copy) and one read per large Data-In remains.  Without that room, the trailer and
the next header are read on their own (``_lean``) into staging.  The digest-free path is left
exactly as it was: digest mode is separate code, not branches in it.
"""
from __future__ import annotations

import asyncio
import os
import logging
import socket
import struct
from collections import deque
from typing import Any, Callable, Protocol

from .. import pdu as P
from ..digest import RESIDUE, crc32c, pack_digest
from ..framing import LOGIN_MAX_DATA_SEGMENT, MAX_AHS_LENGTH, encode as encode_pdu
from ..keys import format_portal
from ..log import event
from .errors import ConnectionLost, ProtocolViolation

log = logging.getLogger("iscsi.initiator.connection")

#: The whole BHS as words, the same layout iscsi.pdu uses (bytes 16..47 = 8 words).
BHS = struct.Struct(">BBBBIQIIIIIIII")
BHS_LEN = 48
_unpack_bhs = BHS.unpack_from
#: Staging buffer: room for many small PDUs per read and one whole PDU of our
#: MaxRecvDataSegmentLength (262144, iscsi.keys default) plus headers and digests.
STAGING_SIZE = 1 << 20
#: Data-In payloads at least this big are received straight into the task's buffer once the
#: staged part is used up; smaller ones are cheaper to copy than to split reads for.
DIRECT_MIN = 16384
#: Spare bytes after a task's read_len (``Task.buf`` that long or longer) let the read that
#: completes a direct payload take what follows it as well: one system call per large
#: Data-In instead of two.  Those spare bytes are scratch (the benchmark's buffers have them).
#: Without digests that is the next BHS (48 bytes, _PLAIN_ROOM); with digests up to 3 pad
#: bytes + data digest + BHS + header digest = 59 (RFC 7143 §12.1), rounded up.
RX_ROOM = 64
_PLAIN_ROOM = BHS_LEN

#: One CRC call over header+digest (or data+pad+digest) checks a digest: iscsi.digest.RESIDUE.
DIGEST_RESIDUE = RESIDUE
#: crc32c(buffer[, crc to continue]): iscsi.digest's C function (hardware CRC) when present.
_crc = crc32c
HEADER_DIGEST_ERROR = "header digest mismatch (RFC 7143 §7.8: drop the connection)"
DATA_DIGEST_ERROR = "data digest mismatch (RFC 7143 §7.8)"

OP_DATA_IN = 0x25
OP_SCSI_RESPONSE = 0x21
OP_R2T = 0x31


class Sink(Protocol):
    """What the connection delivers to (the session in full feature phase, a login waiter before)."""

    def rx_data_in_dest(self, itt: int, offset: int, length: int, room: int = 0) -> memoryview | None: ...
    def rx_data_in(self, h: tuple, payload: memoryview | None) -> None: ...
    def rx_response(self, h: tuple, payload: bytes) -> None: ...
    def rx_r2t(self, h: tuple) -> None: ...
    def rx_pdu(self, pdu: P.Pdu) -> None: ...
    #: A status header whose sequence numbers apply_sn() still has to take (end of each read).
    sn_pending: tuple | None
    def apply_sn(self) -> None: ...
    def rx_lost(self, conn: "Connection", exc: BaseException | None) -> None: ...


class Connection(asyncio.BufferedProtocol):
    """Framing + digests over one transport. ``sink`` receives what arrives."""

    def __init__(self, *, name: str = "") -> None:
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.sink: Any = None
        self._rx_data_in: Callable[[tuple, memoryview | None], None] | None = None
        self.header_digest = False
        self.data_digest = False
        self.max_recv = LOGIN_MAX_DATA_SEGMENT
        self.ffp = False               # full feature phase: use the fast path
        # After the final Login Response, stop parsing until the session has switched this
        # connection to full feature phase (digests and limits change at that point, §6.3).
        self._hold = False
        self.closed = False
        self.close_reason: BaseException | None = None
        self.bytes_in = 0              # the session's keepalive watches this (no clock per read)
        self._connected = self.loop.create_future()
        self._login_queue: deque[P.Pdu] = deque()
        self._login_waiter: asyncio.Future | None = None
        # receive state
        self._buf = bytearray(STAGING_SIZE)
        self._mv = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._direct: memoryview | None = None   # rest of the payload being received in place
        self._direct_left = 0                      # payload bytes still to come into _direct
        self._direct_full: memoryview | None = None
        self._direct_hdr: tuple | None = None
        self._trailer = 0                          # pad + data digest after a direct payload
        # Fast mode, after a direct payload: the next read is one BHS into _hbuf (nothing else
        # is staged then), so a large Data-In costs two reads and no copy of our own — or one,
        # when the task's buffer has RX_ROOM spare bytes: its payload read takes the next BHS too.
        self._hdr_wait = False
        self._rbuf: memoryview | None = None       # get_buffer's answer when known (else computed)
        self._hbuf = bytearray(BHS_LEN)
        self._hmv = memoryview(self._hbuf)
        # After a large Data-In, read just the next header so a following large payload can go
        # straight to its task too (no staging copy); any other PDU turns this off again.
        self._lean = 0
        self._scratch: bytearray | None = None
        # send state
        self.out: list = []            # queued buffers (session's submit appends here directly)
        # True while a flush of ``out`` is due: scheduled with call_soon (_soon), or at the end
        # of the read being parsed (buffer_updated).  Whoever appends to ``out`` calls
        # schedule_flush() when it is False.
        self.flush_pending = False
        self._soon = False
        self._fast = False             # FFP without digests: _parse_fast
        self._dg = False               # FFP with a header and/or data digest: _parse_dg
        self._hd = 0                   # header digest bytes (0 or 4)
        self._dd = 0                   # data digest bytes (0 or 4)
        self._hlen = BHS_LEN           # BHS + header digest
        self._dcrc = 0                 # CRC32C of a direct payload whose trailer is still to come
        self._paused = False

    # ------------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                import socket
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if not self._connected.done():
            self._connected.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._shutdown(exc or ConnectionLost("connection closed by the target"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False

    def eof_received(self) -> bool:
        return False  # close the transport

    def _shutdown(self, exc: BaseException) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = exc
        if self._login_waiter is not None and not self._login_waiter.done():
            self._login_waiter.set_exception(ConnectionLost(str(exc)))
        if self.transport is not None:
            self.transport.abort()
        sink = self.sink
        if sink is not None:
            sink.rx_lost(self, exc)

    def abort(self, reason: BaseException | str = "aborted") -> None:
        """Drop the connection now (protocol violation, dead peer, shutdown)."""
        if isinstance(reason, str):
            reason = ConnectionLost(reason)
        self._shutdown(reason)

    # ------------------------------------------------------------------ receive
    def get_buffer(self, sizehint: int) -> memoryview:
        b = self._rbuf          # set by buffer_updated for the common cases
        if b is not None:
            return b
        if self._direct is not None:
            return self._direct
        if self._hdr_wait:
            return self._hmv
        if self._end == len(self._buf):
            self._compact(len(self._buf) // 2)
        lean = self._lean
        if lean and self._end - self._start < lean:
            if self._end + lean > len(self._buf):
                self._compact(lean)
            return self._mv[self._end:self._start + lean]
        return self._mv[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed:
            return
        self.bytes_in += nbytes
        direct = self._direct
        if direct is not None and nbytes < self._direct_left:
            self._direct_left -= nbytes
            self._rbuf = self._direct = direct[nbytes:]     # more of a large payload to come
            return
        self.flush_pending = True      # commands issued by completions go out with one write below
        sink = self.sink
        try:
            if direct is not None:
                left = self._direct_left
                if nbytes - left == BHS_LEN and self._fast and not self._trailer:
                    # The common large read: payload complete and the next BHS in the task
                    # buffer's RX_ROOM.  _direct_done + _take_header, inlined; the BHS is
                    # decoded (or staged) before the task's callback can reuse its buffer.
                    h = _unpack_bhs(direct, left)
                    dlen = h[4]
                    big = h[0] & 0x3F == OP_DATA_IN and DIRECT_MIN <= dlen <= self.max_recv and not dlen & 3
                    if not big:
                        self._buf[:BHS_LEN] = direct[left:nbytes]
                    self._direct = None
                    sink.rx_data_in(self._direct_hdr, None)
                    if big:
                        dest = sink.rx_data_in_dest(h[6], h[12], dlen, _PLAIN_ROOM)
                        self._direct = dest if dest is not None else self._scratch_view(dlen)
                        self._direct_left = dlen
                        self._direct_hdr = h
                    else:
                        self._end = BHS_LEN
                        self._parse_fast()
                else:
                    self._direct_done(direct, nbytes)
            elif self._hdr_wait:
                # The BHS after a large payload, read on its own.
                self._hdr_wait = False
                if nbytes == BHS_LEN:
                    self._take_header()
                else:
                    self._buf[:nbytes] = self._hmv[:nbytes]     # staging is empty here
                    self._end = nbytes
            else:
                self._end += nbytes
                if self._fast:
                    self._parse_fast()
                elif self._dg:
                    self._parse_dg()
                elif not self._hold:
                    self._parse()
            if self.ffp and sink.sn_pending is not None:
                sink.apply_sn()
        except (ProtocolViolation, P.PduFormatError) as exc:
            event(log, "conn.protocol_error", logging.WARNING, conn=self.name, error=exc)
            self._shutdown(ProtocolViolation(str(exc)))
        finally:
            out = self.out
            if out:
                self.out = []
                if not self.closed:
                    self.transport.writelines(out)
            self.flush_pending = self._soon
            # What the next read goes into (get_buffer), for the common states.
            if self._direct is not None:
                self._rbuf = self._direct
            elif self._hdr_wait:
                self._rbuf = self._hmv
            elif self._end == 0 and not self._lean:
                self._rbuf = self._mv
            else:
                self._rbuf = None

    def _direct_done(self, direct: memoryview, nbytes: int) -> None:
        """A payload received in place is complete; ``nbytes - _direct_left`` bytes of the next
        PDU came with it (into the task buffer's RX_ROOM)."""
        if self._dg:
            self._direct_done_dg(direct, nbytes)
            return
        left = self._direct_left
        extra = nbytes - left
        if extra:
            self._hbuf[:extra] = direct[left:nbytes]    # out of the task's buffer before its callback
        self._direct = None
        if self._trailer:
            # Pad and/or data digest follow: _parse takes them (and checks the digest).
            self._lean = self._trailer + BHS_LEN + (4 if self.header_digest else 0)
            return
        h = self._direct_hdr
        self._direct_hdr = self._direct_full = None
        self.sink.rx_data_in(h, None)
        if not self._fast:
            self._lean = BHS_LEN + (4 if self.header_digest else 0)
        elif extra == BHS_LEN:
            self._take_header()
        elif extra:
            self._buf[:extra] = self._hmv[:extra]          # staging is empty in direct mode
            self._end = extra
        else:
            self._hdr_wait = True

    def _take_header(self) -> None:
        """A whole BHS is in ``_hbuf`` and nothing is staged (fast mode, after a direct payload):
        another large Data-In goes straight to its task; anything else is parsed as usual."""
        h = _unpack_bhs(self._hbuf)
        dlen = h[4]
        if h[0] & 0x3F == OP_DATA_IN and DIRECT_MIN <= dlen <= self.max_recv and not dlen & 3:
            dest = self.sink.rx_data_in_dest(h[6], h[12], dlen, _PLAIN_ROOM)
            if dest is None:
                dest = self._scratch_view(dlen)
            self._direct = dest
            self._direct_left = dlen
            self._direct_hdr = h
            self._trailer = 0
            return
        self._buf[:BHS_LEN] = self._hbuf
        self._end = BHS_LEN
        self._parse_fast()

    def _compact(self, want_free: int) -> None:
        """Move the unparsed tail to the front (or grow the buffer) so ``want_free`` bytes fit."""
        start, end = self._start, self._end
        n = end - start
        if n + want_free > len(self._buf):
            new = bytearray(max(len(self._buf) * 2, n + want_free))
            new[:n] = self._mv[start:end]
            self._mv.release()
            self._buf = new
            self._mv = memoryview(new)
        elif start:
            self._buf[:n] = bytes(self._mv[start:end])
        self._start, self._end = 0, n

    def _parse(self) -> None:
        """Parse every complete PDU in the staging buffer (the per-PDU hot loop)."""
        mv = self._mv
        hd = 4 if self.header_digest else 0
        dd = 4 if self.data_digest else 0
        ffp = self.ffp
        sink = self.sink
        max_recv = self.max_recv
        unpack = BHS.unpack_from
        start = self._start
        end = self._end
        while True:
            avail = end - start
            if self._trailer:
                if avail < self._trailer:
                    break
                trailer = bytes(mv[start:start + self._trailer])
                start += self._trailer
                self._start = start
                self._trailer = 0
                self._direct_complete(trailer)
                continue
            if avail < BHS_LEN:
                break
            h = unpack(mv, start)
            lw = h[4]
            dlen = lw & 0xFFFFFF
            ahs_len = (lw >> 24) << 2
            if dlen > max_recv or ahs_len > MAX_AHS_LENGTH:
                raise ProtocolViolation(f"data segment {dlen} (MaxRecvDataSegmentLength {max_recv}) "
                                        f"or AHS {ahs_len} too long")
            hlen = BHS_LEN + ahs_len + hd
            total = hlen + dlen + (-dlen & 3) + dd if dlen else hlen
            op = h[0] & 0x3F
            if avail < total:
                if (avail >= hlen and ffp and op == OP_DATA_IN and dlen >= DIRECT_MIN and avail - hlen < dlen
                        and self.sink is not None):
                    self._check_header_digest(mv, start, hlen, hd)
                    self._begin_direct(h, start, hlen, dlen)
                    return
                self._start = start
                self._lean = 0
                if start + total > len(self._buf):
                    self._compact(total)
                return
            self._lean = 0
            if hd:
                self._check_header_digest(mv, start, hlen, hd)
            pstart = start + hlen
            start += total
            if ffp:
                if op == OP_DATA_IN:
                    if dlen:
                        if dd:
                            self._check_data_digest(mv, pstart, dlen)
                        sink.rx_data_in(h, mv[pstart:pstart + dlen])
                    else:
                        sink.rx_data_in(h, None)
                    continue
                if op == OP_R2T:
                    sink.rx_r2t(h)
                    continue
            if dlen and dd:
                self._check_data_digest(mv, pstart, dlen)
            payload = bytes(mv[pstart:pstart + dlen]) if dlen else b""
            if ffp and op == OP_SCSI_RESPONSE:
                sink.rx_response(h, payload)
                continue
            hstart = pstart - hlen
            ahs = bytes(mv[hstart + BHS_LEN:hstart + BHS_LEN + ahs_len]) if ahs_len else b""
            pdu = P.decode(mv[hstart:hstart + BHS_LEN], ahs, payload, allowed=P.TARGET_OPCODES)
            self._start = start
            self._deliver(pdu)
            if self._hold:
                return
        self._start = start
        if start == end:
            self._start = self._end = 0
        elif len(self._buf) - end < BHS_LEN * 4:
            self._compact(BHS_LEN * 4)

    def _parse_fast(self) -> None:
        """:meth:`_parse` for full feature phase without digests (the per-I/O hot loop).

        Whole Data-In / SCSI Response / R2T PDUs go to the sink straight from the staging
        buffer; a large Data-In not yet complete switches to in-place receive; anything else
        (AHS, a trailer, other opcodes) is left to :meth:`_parse`, which knows every case.
        """
        if self._trailer:
            self._parse()
            return
        mv = self._mv
        sink = self.sink
        data_in = self._rx_data_in
        max_recv = self.max_recv
        unpack = _unpack_bhs
        start = self._start
        end = self._end
        need = BHS_LEN
        while end - start >= BHS_LEN:
            h = unpack(mv, start)
            dlen = h[4]                # TotalAHSLength is the top byte: an AHS lands in _parse
            if dlen > max_recv:
                self._start = start
                self._parse()
                return
            pstart = start + BHS_LEN
            pend = pstart + dlen
            total = dlen + (-dlen & 3) + BHS_LEN
            op = h[0] & 0x3F
            if end - start < total:
                if op == OP_DATA_IN and dlen >= DIRECT_MIN and pend > end:
                    # _begin_direct inlined: the rest of the payload goes straight to the task
                    # (with RX_ROOM for the next BHS when no pad follows).
                    self._lean = 0
                    pad = -dlen & 3
                    dest = sink.rx_data_in_dest(h[6], h[12], dlen, 0 if pad else _PLAIN_ROOM)
                    if dest is None:
                        dest = self._scratch_view(dlen)
                    have = end - pstart
                    if have:
                        dest[:have] = mv[pstart:end]
                        self._direct = dest[have:]
                    else:
                        self._direct = dest
                    self._direct_left = dlen - have
                    self._start = self._end = 0
                    self._direct_full = dest
                    self._direct_hdr = h
                    self._trailer = pad
                    return
                need = total
                break
            start += total
            if op == OP_DATA_IN:
                data_in(h, mv[pstart:pend] if dlen else None)
            elif op == OP_SCSI_RESPONSE:
                sink.rx_response(h, bytes(mv[pstart:pend]) if dlen else b"")
            elif op == OP_R2T:
                sink.rx_r2t(h)
            else:
                self._start = start - total
                self._parse()
                return
            if self.closed:
                return
        self._lean = 0
        if start == end:
            self._start = self._end = 0
            return
        self._start = start
        if start + need > len(self._buf) or len(self._buf) - end < BHS_LEN * 4:
            self._compact(max(need, BHS_LEN * 4))

    # ------------------------------------------------------------------ receive with digests
    def _parse_dg(self) -> None:
        """:meth:`_parse_fast` with a header and/or data digest (RFC 7143 §12.1).

        The same framing with the digest bytes counted in: BHS + header digest, then (when the
        data segment is not empty) data + pad + data digest.  Each digest costs one CRC call
        over the bytes it covers *and* the digest itself (:data:`DIGEST_RESIDUE`), checked
        once, when the whole PDU (or, for a payload received in place, its header) is there.
        A pending trailer (pad + data digest after a payload received in place) comes first:
        it completes that Data-In.  Anything unusual is left to :meth:`_parse`.
        """
        mv = self._mv
        crc = _crc
        data_in = self._rx_data_in
        hd = self._hd
        dd = self._dd
        hlen = BHS_LEN + hd
        residue = DIGEST_RESIDUE
        start = self._start
        end = self._end
        if self._trailer:
            t = self._trailer
            if end - start < t:
                return                  # _lean keeps the reads to the trailer + next header
            if dd and crc(mv[start:start + t], self._dcrc) != residue:
                raise ProtocolViolation(DATA_DIGEST_ERROR + " on Data-In")
            start += t
            self._start = start
            self._trailer = 0
            self._lean = hlen           # still just the next header, for another in-place payload
            h = self._direct_hdr
            self._direct_hdr = self._direct_full = None
            data_in(h, None)            # payload already in place
            if self.closed:
                return
        sink = self.sink
        max_recv = self.max_recv
        unpack = _unpack_bhs
        first = start
        need = hlen
        while end - start >= hlen:
            h = unpack(mv, start)
            dlen = h[4]                # TotalAHSLength is the top byte: an AHS lands in _parse
            if dlen > max_recv:
                self._start = start
                self._parse()
                return
            pstart = start + hlen
            pend = pstart + dlen
            total = pend + (-dlen & 3) + dd - start if dlen else hlen
            op = h[0] & 0x3F
            if end - start < total:
                if op == OP_DATA_IN and dlen >= DIRECT_MIN and pend > end:
                    if hd and crc(mv[start:pstart]) != residue:
                        raise ProtocolViolation(HEADER_DIGEST_ERROR)
                    self._go_direct(h, dlen, mv[pstart:end])
                    self._start = self._end = 0
                    return
                need = total
                break
            if hd and crc(mv[start:pstart]) != residue:
                raise ProtocolViolation(HEADER_DIGEST_ERROR)
            if dd and dlen and crc(mv[pstart:start + total]) != residue:
                raise ProtocolViolation(DATA_DIGEST_ERROR)
            start += total
            if op == OP_DATA_IN:
                data_in(h, mv[pstart:pend] if dlen else None)
            elif op == OP_SCSI_RESPONSE:
                sink.rx_response(h, bytes(mv[pstart:pend]) if dlen else b"")
            elif op == OP_R2T:
                sink.rx_r2t(h)
            else:
                self._start = start - total
                self._parse()          # checks this PDU's digests again: rare opcodes only
                return
            if self.closed:
                return
        if start != first or end - start >= hlen:
            self._lean = 0             # a header was seen: reads need no limit any more
        if start == end:
            self._start = self._end = 0
            return
        self._start = start
        if start + need > len(self._buf) or len(self._buf) - end < BHS_LEN * 4:
            self._compact(max(need, BHS_LEN * 4))

    def _go_direct(self, h: tuple, dlen: int, staged: memoryview | None) -> None:
        """Receive a large Data-In payload in place (digest mode; header digest checked).

        The view asked for runs past the payload by the trailer (pad + data digest) and the
        next header when the task's buffer has that room: then one read completes the
        payload, its digest and the next BHS (see :meth:`_direct_done_dg`).
        """
        trailer = (-dlen & 3) + self._dd
        dest = self.sink.rx_data_in_dest(h[6], h[12], dlen, trailer + self._hlen)
        if dest is None:
            dest = self._scratch_view(dlen)
        if staged:
            have = len(staged)
            dest[:have] = staged
            self._direct = dest[have:]
            self._direct_left = dlen - have
        else:
            self._direct = dest
            self._direct_left = dlen
        self._direct_full = dest
        self._direct_hdr = h
        self._trailer = trailer
        self._lean = 0

    def _direct_done_dg(self, direct: memoryview, nbytes: int) -> None:
        """A payload received in place is complete (digest mode); ``nbytes - _direct_left``
        bytes of its trailer and the next header came with it, into the task buffer's room."""
        extra = nbytes - self._direct_left
        full = self._direct_full
        h = self._direct_hdr
        dlen = h[4] & 0xFFFFFF
        t = self._trailer
        hlen = self._hlen
        self._direct = None
        if extra == t + hlen:
            # All of it: check the data digest where it landed (payload + pad + digest, no copy),
            # decode the next BHS before the task's callback may reuse its buffer.
            hs = dlen + t
            if self._dd and _crc(full[:hs]) != DIGEST_RESIDUE:
                raise ProtocolViolation(DATA_DIGEST_ERROR + " on Data-In")
            nh = _unpack_bhs(full, hs)
            ndlen = nh[4]
            big = nh[0] & 0x3F == OP_DATA_IN and DIRECT_MIN <= ndlen <= self.max_recv
            # The next header's digest is checked now (its bytes are the task's) and acted on
            # after this Data-In, which is whole and sound, has completed.
            bad = False
            if not big:
                self._buf[:hlen] = full[hs:hs + hlen]      # staging is empty in direct mode
            elif self._hd:
                bad = _crc(full[hs:hs + hlen]) != DIGEST_RESIDUE
            self._trailer = 0
            self._direct_hdr = self._direct_full = None
            self._rx_data_in(h, None)
            if big:
                if bad:
                    raise ProtocolViolation(HEADER_DIGEST_ERROR)
                self._go_direct(nh, ndlen, None)
            else:
                self._end = hlen
                self._parse_dg()
            return
        # Part of the trailer / header (or none of it): what came goes to staging, where
        # _parse_dg takes the trailer and then the header; _lean keeps the next read to them.
        if extra:
            self._buf[:extra] = full[dlen:dlen + extra]
        self._start = 0
        self._end = extra
        if t:
            if self._dd:
                self._dcrc = _crc(full[:dlen])
            self._lean = t + hlen
        else:
            # No pad, no data digest: the Data-In is complete now.
            self._direct_hdr = self._direct_full = None
            self._lean = hlen
            self._rx_data_in(h, None)
            if self.closed:
                return
        self._parse_dg()

    def _begin_direct(self, h: tuple, start: int, hlen: int, dlen: int) -> None:
        """Receive the rest of a large Data-In straight into its task's buffer (§11.7.5 offset)."""
        mv = self._mv
        pstart = start + hlen
        have = self._end - pstart
        dest = self.sink.rx_data_in_dest(h[6], h[12], dlen)
        if dest is None:
            dest = self._scratch_view(dlen)
        if have:
            dest[:have] = mv[pstart:pstart + have]
        self._start = self._end = 0
        self._direct_full = dest
        self._direct = dest[have:]
        self._direct_left = dlen - have
        self._direct_hdr = h
        self._trailer = (-dlen & 3) + (4 if self.data_digest else 0)

    @staticmethod
    def _check_header_digest(mv: memoryview, start: int, hlen: int, hd: int) -> None:
        if hd:
            hdr_end = start + hlen - hd
            if crc32c(mv[start:hdr_end + 4]) != DIGEST_RESIDUE:  # header and digest summed together
                raise ProtocolViolation(HEADER_DIGEST_ERROR)

    @staticmethod
    def _check_data_digest(mv: memoryview, pstart: int, dlen: int) -> None:
        padded = pstart + dlen + (-dlen & 3)
        if crc32c(mv[pstart:padded + 4]) != DIGEST_RESIDUE:
            raise ProtocolViolation(DATA_DIGEST_ERROR)

    def stop_receiving_into(self, itt: int) -> None:
        """Task ``itt`` was given back to its caller unfinished (cancelled, or its abort
        failed): a Data-In payload now arriving in place into its buffer goes on into scratch
        memory instead, with what came so far copied along (the data digest covers all of it).
        Without this the rest of the payload would land in a buffer the caller may be reusing.
        """
        direct = self._direct
        h = self._direct_hdr
        if direct is None or h is None or h[6] != itt:
            return
        full = self._direct_full
        if full is not None:
            copy = memoryview(bytearray(full))
            self._direct_full = copy
            self._direct = copy[len(full) - len(direct):]
        else:
            self._direct = memoryview(bytearray(len(direct)))
        self._rbuf = self._direct

    def _scratch_view(self, n: int) -> memoryview:
        if self._scratch is None or len(self._scratch) < n:
            self._scratch = bytearray(max(n, 65536))
        return memoryview(self._scratch)[:n]

    def _direct_complete(self, trailer: bytes | None) -> None:
        h = self._direct_hdr
        dest = self._direct_full
        self._direct_hdr = self._direct_full = None
        assert h is not None and dest is not None
        if self.data_digest:
            assert trailer is not None
            dlen = h[4] & 0xFFFFFF
            # The trailer is the padding and the digest: summed on from the payload's CRC.
            if crc32c(trailer, crc32c(dest[:dlen])) != DIGEST_RESIDUE:
                raise ProtocolViolation(DATA_DIGEST_ERROR + " on Data-In")
        self.sink.rx_data_in(h, None)   # payload already in place

    def _deliver(self, pdu: P.Pdu) -> None:
        if self.ffp and self.sink is not None:
            self.sink.rx_pdu(pdu)
            return
        if (isinstance(pdu, P.LoginResponse) and pdu.transit and pdu.nsg == 3
                and pdu.status_class == 0):
            self._hold = True
        self._login_queue.append(pdu)
        w = self._login_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def start_ffp(self, sink: Any, *, header_digest: bool, data_digest: bool, max_recv: int) -> None:
        """Switch to full feature phase with the negotiated digests and MaxRecvDataSegmentLength."""
        self.header_digest = header_digest
        self.data_digest = data_digest
        self.max_recv = max_recv
        self.sink = sink
        self._rx_data_in = sink.rx_data_in
        self.ffp = True
        self._fast = not header_digest and not data_digest
        self._dg = not self._fast
        self._hd = 4 if header_digest else 0
        self._dd = 4 if data_digest else 0
        self._hlen = BHS_LEN + self._hd
        self._hold = False
        self._rbuf = None
        if self._end > self._start:
            try:
                self._parse_fast() if self._fast else self._parse_dg()
            except (ProtocolViolation, P.PduFormatError) as exc:
                self._shutdown(ProtocolViolation(str(exc)))

    async def recv_pdu(self, timeout: float) -> P.Pdu:
        """Next PDU before full feature phase (login, discovery text, logout)."""
        deadline = self.loop.time() + timeout
        while not self._login_queue:
            if self.closed:
                raise ConnectionLost(str(self.close_reason))
            self._login_waiter = self.loop.create_future()
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                raise asyncio.TimeoutError()
            try:
                await asyncio.wait_for(self._login_waiter, remaining)
            finally:
                self._login_waiter = None
        return self._login_queue.popleft()

    # ------------------------------------------------------------------ send
    def send(self, parts: list | tuple) -> None:
        """Queue buffers for the wire; flushed once per loop iteration."""
        if self.closed:
            return
        self.out.extend(parts)
        if not self.flush_pending:
            self.schedule_flush()

    def send1(self, buf: bytes) -> None:
        """Queue one buffer (a header without digest: the per-command fast path)."""
        if self.closed:
            return
        self.out.append(buf)
        if not self.flush_pending:
            self.schedule_flush()

    def send_pdu(self, pdu: P.Pdu) -> None:
        self.send(encode_pdu(pdu, header_digest=self.header_digest, data_digest=self.data_digest))

    def schedule_flush(self) -> None:
        """Write ``out`` later in this loop iteration (or at the end of the read being parsed)."""
        if not self.flush_pending:
            self.flush_pending = True
            if not self._soon:
                self._soon = True
                self.loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._soon = False
        self.flush_pending = False
        if self.out:
            self._write_out(self.out)

    def _write_out(self, out: list) -> None:
        self.out = []
        if self.closed or self.transport is None:
            return
        self.transport.writelines(out)

    def flush_now(self) -> None:
        if self.out:
            self._write_out(self.out)

    def header_parts(self, header: bytes) -> list:
        """Header [+ digest] as buffers to send."""
        if self.header_digest:
            return [header, pack_digest(_crc(header))]
        return [header]

    def data_parts(self, data: bytes | memoryview) -> list:
        """Data segment + padding [+ digest] as buffers to send (data not copied)."""
        n = len(data)
        pad = -n & 3
        parts: list = [data]
        if pad:
            parts.append(b"\0" * pad)
        if self.data_digest:
            # The digest covers data + pad (RFC 7143 §12.1): the CRC continued over the pad
            # bytes, so the data is not copied to append them.
            parts.append(pack_digest(_crc(b"\0" * pad, _crc(data)) if pad else _crc(data)))
        return parts


async def open_connection(host: str, port: int, *, timeout: float, name: str = "") -> Connection:
    """TCP connect with a bound wait; returns the protocol object."""
    loop = asyncio.get_running_loop()
    portal = format_portal(host, port)
    try:
        _t, conn = await asyncio.wait_for(
            loop.create_connection(lambda: Connection(name=name or portal), host, port), timeout)
    except asyncio.TimeoutError:
        raise ConnectionLost(f"connect to {portal} timed out after {timeout:.0f}s") from None
    except OSError as exc:
        raise ConnectionLost(f"connect to {portal}: {_connect_reason(exc)}") from None
    return conn


def _connect_reason(exc: OSError) -> str:
    """Why a connect failed, in the system's words.  asyncio's message is "Connect call
    failed (...)", so the errno is named instead; a name lookup error (socket.gaierror)
    carries a resolver code, which os.strerror would misread, and its own text."""
    if isinstance(exc, socket.gaierror) or not exc.errno:
        return exc.strerror or str(exc)
    return os.strerror(exc.errno)
