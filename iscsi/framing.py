"""Sans-IO PDU stream framing for one TCP connection (RFC 7143 §11.1, §12.1).

:class:`PduReader` takes whatever bytes the socket delivered and returns the
complete PDUs found so far; :func:`encode` turns a PDU into the buffers to
write.  Both know about header/data digests and the negotiated limits but
nothing about sockets, so the target and the initiator share them and tests
feed them byte by byte.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .digest import RESIDUE, crc32c, crc32c_extend, digest_bytes, pack_digest
import struct

from .pdu import BHS_LEN, BHS_STRUCT, Pdu, PduFormatError, RejectReason, decode, pad4

# RFC 7143 §13.12 caps MaxRecvDataSegmentLength at 2^24-1; login PDUs are limited to 8192
# bytes of data before negotiation (§13.12: "the default ... is 8192").
LOGIN_MAX_DATA_SEGMENT = 8192
_BHS_UNPACK = BHS_STRUCT.unpack_from  # field 4: TotalAHSLength(8) | DataSegmentLength(24)
# AHS of more than 1 KiB has no legitimate use (the longest standard one is a 260-byte CDB).
MAX_AHS_LENGTH = 1024


class HeaderDigestError(Exception):
    """The header digest did not match: lengths cannot be trusted, drop the connection (§7.8)."""


@dataclass(slots=True)
class BadPdu:
    """A PDU whose lengths were sound but whose contents are not acceptable (unknown opcode,
    unknown AHS type): the stream stays in sync, so the answer is a Reject carrying this
    header (RFC 7143 §11.17) and the connection goes on."""

    header: bytes
    reason: int
    message: str


@dataclass(slots=True)
class DataDigestFailure:
    """A PDU whose header was sound but whose data digest did not match (RFC 7143 §7.8).

    The connection survives: the target answers with a Reject (reason 0x02) and, at
    ErrorRecoveryLevel 0, the affected task is ended by the caller.
    """

    pdu: Pdu
    header: bytes


class PduReader:
    """Incremental parser of a PDU stream.

    ``max_data_segment`` is *our* MaxRecvDataSegmentLength: a peer that sends more
    broke the protocol (§13.12) and gets a :class:`PduFormatError`.
    """

    __slots__ = ("allowed", "header_digest", "data_digest", "max_data_segment", "_buf", "_pos", "take_command")

    def __init__(self, *, allowed: frozenset[int] | None = None, header_digest: bool = False,
                 data_digest: bool = False, max_data_segment: int = LOGIN_MAX_DATA_SEGMENT) -> None:
        self.allowed = allowed
        self.header_digest = header_digest
        self.data_digest = data_digest
        self.max_data_segment = max_data_segment
        self._buf = bytearray()
        self._pos = 0
        # take_command(fields, buf, pos, data_start) -> bool: offered each non-immediate SCSI
        # Command PDU without AHS (its digests checked; a data segment, if any, from
        # ``data_start``) before it is decoded, while no PDU of this feed is waiting in the
        # result (so order is kept); True: it was handled and is consumed.  A bad data digest
        # is not offered: the regular path reports it.
        self.take_command: Callable[[tuple, bytearray, int, int], bool] | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete PDU."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> list[Pdu | BadPdu | DataDigestFailure]:
        """Add received bytes; return every PDU now complete, in order."""
        buf = self._buf
        buf += data
        out: list[Pdu | BadPdu | DataDigestFailure] = []
        pos = self._pos
        end = len(buf)
        hd = 4 if self.header_digest else 0
        dd = 4 if self.data_digest else 0
        max_data = self.max_data_segment
        allowed = self.allowed
        take = self.take_command
        while end - pos >= BHS_LEN:
            fields = _BHS_UNPACK(buf, pos)  # the whole BHS at once: decode() takes it as is
            length_word = fields[4]
            ahs_len = (length_word >> 24) << 2
            data_len = length_word & 0xFFFFFF
            if ahs_len > MAX_AHS_LENGTH or data_len > max_data:
                err = PduFormatError(
                    f"TotalAHSLength {ahs_len} too large" if ahs_len > MAX_AHS_LENGTH else
                    f"data segment of {data_len} bytes exceeds MaxRecvDataSegmentLength {max_data}",
                    RejectReason.PROTOCOL_ERROR)
                err.header = bytes(buf[pos:pos + BHS_LEN])  # type: ignore[attr-defined]
                raise err
            hdr_end = pos + BHS_LEN + ahs_len
            data_start = hdr_end + hd
            total = data_start - pos + ((data_len + 3) & ~3) + dd if data_len else data_start - pos
            if end - pos < total:
                break
            # Header and digest summed together (see digest.RESIDUE); a 52-byte copy costs less
            # than a memoryview and its slice.
            if hd and crc32c(buf[pos:data_start]) != RESIDUE:
                raise HeaderDigestError("header digest mismatch")
            if take is not None and fields[0] == 0x01 and not ahs_len and not out and (
                    not dd or not data_len
                    or crc32c(memoryview(buf)[data_start:pos + total]) == RESIDUE) \
                    and take(fields, buf, pos, data_start):
                pos += total
                continue
            payload = bytes(buf[data_start:data_start + data_len]) if data_len else b""
            try:
                if ahs_len:
                    pdu = decode(buf, bytes(buf[pos + BHS_LEN:hdr_end]), payload, allowed=allowed,
                                 offset=pos, fields=fields)
                else:
                    pdu = decode(buf, b"", payload, allowed=allowed, offset=pos, fields=fields)
            except PduFormatError as err:
                out.append(BadPdu(bytes(buf[pos:pos + BHS_LEN]), err.reason, str(err)))
                pos += total
                continue
            if dd and data_len:
                padded_end = data_start + ((data_len + 3) & ~3)
                if crc32c(memoryview(buf)[data_start:padded_end + 4]) != RESIDUE:
                    out.append(DataDigestFailure(pdu, bytes(buf[pos:pos + BHS_LEN])))
                    pos += total
                    continue
            pos += total
            out.append(pdu)
        # Compact once per feed, not once per PDU.
        if pos:
            del buf[:pos]
            pos = 0
        self._pos = pos
        return out


def encode(pdu: Pdu, *, header_digest: bool = False, data_digest: bool = False) -> list[bytes | memoryview]:
    """Buffers for one PDU on the wire (header [+digest], data, padding [+digest]).

    The data segment is not copied: a memoryview passed as ``pdu.data`` goes out as is.
    """
    header = pdu.header()
    parts: list[bytes | memoryview] = [header]
    if header_digest:
        parts.append(digest_bytes(header))
    data = pdu.data
    n = len(data)
    if n:
        parts.append(data)
        pad = pad4(n)
        if pad:
            parts.append(b"\0" * pad)
        if data_digest:
            crc = crc32c(data)
            if pad:
                crc = crc32c_extend(crc, b"\0" * pad)
            parts.append(pack_digest(crc))
    return parts


def encode_bytes(pdu: Pdu, *, header_digest: bool = False, data_digest: bool = False) -> bytes:
    return b"".join(encode(pdu, header_digest=header_digest, data_digest=data_digest))
