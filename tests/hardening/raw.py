"""A raw-socket iSCSI initiator for hardening tests: sends exactly the bytes a test builds.

Synchronous and bounded (every receive has a timeout).  It logs in with open-iscsi's keys,
keeps CmdSN/ExpStatSN, answers the target's NOP-In pings on its own (so a witness session
that waits between checks is not dropped for not answering) and can send any byte string.
"""
from __future__ import annotations

import os
import socket
import struct
import time

from iscsi import keys as K
from iscsi import pdu as P
from iscsi.framing import PduReader, encode_bytes

INITIATOR = "iqn.2026-11.org.sanstack.hardening:raw"
OPERATIONAL = [
    ("HeaderDigest", "None"), ("DataDigest", "None"), ("DefaultTime2Wait", "2"), ("DefaultTime2Retain", "0"),
    ("ErrorRecoveryLevel", "0"), ("InitialR2T", "No"), ("ImmediateData", "Yes"),
    ("MaxBurstLength", "262144"), ("FirstBurstLength", "65536"), ("MaxOutstandingR2T", "1"),
    ("MaxConnections", "1"), ("DataPDUInOrder", "Yes"), ("DataSequenceInOrder", "Yes"),
    ("MaxRecvDataSegmentLength", "262144"),
]
#: Bound on one receive: the target answers a loopback command in milliseconds.
RECV_TIMEOUT = 5.0


class Closed(Exception):
    """The target closed the connection."""


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0).ljust(16, b"\0")


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0).ljust(16, b"\0")


def write16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, 0, lba, blocks, 0, 0)


class RawSession:
    def __init__(self, host: str, port: int, *, timeout: float = RECV_TIMEOUT) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.reader = PduReader(allowed=P.TARGET_OPCODES, max_data_segment=1 << 24)
        self.queue: list = []
        self.cmdsn = 1
        self.expstatsn = 0
        self.itt = 0x1000
        self.header_digest = self.data_digest = False
        self.max_send = 8192
        self.expcmdsn = self.maxcmdsn = 1
        self.tsih = 0
        self.immediate_data = True

    # -- bytes ------------------------------------------------------------------------------
    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, pdu: P.Pdu) -> None:
        self.sock.sendall(encode_bytes(pdu, header_digest=self.header_digest, data_digest=self.data_digest))

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no PDU from the target in time")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(1 << 20)
        except socket.timeout:
            raise TimeoutError("no PDU from the target in time") from None
        except (ConnectionResetError, BrokenPipeError) as err:
            raise Closed(str(err)) from err
        if not data:
            raise Closed("target closed the connection")
        self.queue += self.reader.feed(data)

    def recv(self, timeout: float | None = None) -> P.Pdu:
        """Next PDU from the target (NOP-In pings are answered and skipped)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            while not self.queue:
                self._fill(deadline)
            pdu = self.queue.pop(0)
            pdu = getattr(pdu, "pdu", pdu)
            if hasattr(pdu, "maxcmdsn") and not isinstance(pdu, P.LoginResponse):
                self.expcmdsn, self.maxcmdsn = pdu.expcmdsn, pdu.maxcmdsn
            if isinstance(pdu, (P.ScsiResponse, P.TextResponse, P.NopIn, P.LogoutResponse, P.TaskMgmtResponse,
                                P.Reject, P.AsyncMessage)) or (isinstance(pdu, P.DataIn) and pdu.has_status):
                if not (isinstance(pdu, P.NopIn) and pdu.itt == P.RESERVED_TAG):
                    self.expstatsn = (pdu.statsn + 1) & 0xFFFFFFFF
            if isinstance(pdu, P.NopIn) and pdu.itt == P.RESERVED_TAG and pdu.ttt != P.RESERVED_TAG:
                self.send(P.NopOut(itt=P.RESERVED_TAG, ttt=pdu.ttt, lun=pdu.lun, cmdsn=self.cmdsn,
                                   expstatsn=self.expstatsn, immediate=True))
                continue
            return pdu

    def closed_by_target(self, timeout: float = RECV_TIMEOUT) -> bool:
        """True when the target closes the connection within ``timeout`` (PDUs before are dropped)."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                self._fill(deadline)
                self.queue.clear()
        except Closed:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # -- protocol ---------------------------------------------------------------------------
    def next_itt(self) -> int:
        self.itt = (self.itt + 1) & 0x7FFFFFFF
        return self.itt

    def login(self, target: str, *, initiator: str = INITIATOR, extra=(), isid: int | None = None,
              operational=OPERATIONAL, ready: bool = True) -> P.LoginResponse:
        keys = [("InitiatorName", initiator), ("TargetName", target), ("SessionType", "Normal")]
        keys += [(k, v) for k, v in operational if k not in dict(extra)] + list(extra)
        isid = isid if isid is not None else 0x400000000000 | int.from_bytes(os.urandom(3), "big")
        self.send(P.LoginRequest(transit=True, csg=1, nsg=3, isid=isid, itt=self.next_itt(), cmdsn=self.cmdsn,
                                 data=K.encode_text(keys)))
        resp = self.recv()
        assert isinstance(resp, P.LoginResponse), resp
        self.login_answers = dict(K.parse_text(resp.data)) if resp.status_class == 0 else {}
        self.expstatsn = (resp.statsn + 1) & 0xFFFFFFFF
        if resp.status_class == 0:
            self.tsih = resp.tsih
            self.expcmdsn, self.maxcmdsn = resp.expcmdsn, resp.maxcmdsn
            ans = {**dict(keys), **self.login_answers}
            self.header_digest = ans.get("HeaderDigest") == "CRC32C"
            self.data_digest = ans.get("DataDigest") == "CRC32C"
            self.reader.header_digest, self.reader.data_digest = self.header_digest, self.data_digest
            self.max_send = int(self.login_answers.get("MaxRecvDataSegmentLength", 8192))
            self.immediate_data = ans.get("ImmediateData", "Yes") == "Yes"
            if ready:
                self.clear_unit_attentions()
        return resp

    def command(self, cdb: bytes, *, read: bool = False, write: bool = False, edtl: int = 0,
                data: bytes = b"", final: bool = True, immediate: bool = False, cmdsn: int | None = None,
                itt: int | None = None) -> int:
        itt = self.next_itt() if itt is None else itt
        sn = self.cmdsn if cmdsn is None else cmdsn
        self.send(P.ScsiCommandPdu(read=read, write=write, edtl=edtl, cmdsn=sn, expstatsn=self.expstatsn,
                                   cdb=cdb, itt=itt, final=final, data=data, immediate=immediate))
        if not immediate and cmdsn is None:
            self.cmdsn = (self.cmdsn + 1) & 0xFFFFFFFF
        return itt

    def wait_status(self, itt: int, timeout: float | None = None) -> tuple[P.Pdu, bytes]:
        """Collect Data-In for ``itt`` until its status; answer R2Ts with ``self.pending_write``."""
        data = bytearray()
        while True:
            pdu = self.recv(timeout)
            if isinstance(pdu, P.DataIn) and pdu.itt == itt:
                data[pdu.offset:pdu.offset + len(pdu.data)] = pdu.data
                if pdu.has_status:
                    return pdu, bytes(data)
            elif isinstance(pdu, P.R2T) and pdu.itt == itt:
                payload = self.pending_write[pdu.offset:pdu.offset + pdu.length]
                for i, off in enumerate(range(0, len(payload), self.max_send)):
                    chunk = payload[off:off + self.max_send]
                    self.send(P.DataOut(itt=itt, ttt=pdu.ttt, datasn=i, offset=pdu.offset + off,
                                        final=off + len(chunk) >= len(payload), expstatsn=self.expstatsn,
                                        data=chunk))
            elif isinstance(pdu, P.ScsiResponse) and pdu.itt == itt:
                return pdu, bytes(data)
            elif isinstance(pdu, P.Reject):
                raise AssertionError(f"unexpected Reject reason {pdu.reason:#x}")

    def clear_unit_attentions(self, tries: int = 10) -> None:
        """TEST UNIT READY until GOOD: a new I_T nexus first sees POWER ON / RESET (SPC-4 §6.47)."""
        for _ in range(tries):
            itt = self.command(bytes(16))
            status, _ = self.wait_status(itt)
            if status.status == 0:
                return
        raise AssertionError("unit attentions never cleared")

    def write(self, lba: int, payload: bytes, block: int = 512) -> int:
        self.pending_write = payload
        first = payload[:min(len(payload), self.max_send, 65536)] if self.immediate_data else b""
        itt = self.command(write10(lba, len(payload) // block), write=True, edtl=len(payload), data=first)
        status, _ = self.wait_status(itt)
        return status.status

    def read(self, lba: int, nbytes: int, block: int = 512) -> tuple[int, bytes]:
        itt = self.command(read10(lba, nbytes // block), read=True, edtl=nbytes)
        status, data = self.wait_status(itt)
        return status.status, data

    def ping(self, payload: bytes = b"ping", timeout: float | None = None) -> float:
        """NOP-Out with a reply wanted (§11.18); returns the round-trip time in seconds."""
        itt = self.next_itt()
        t0 = time.monotonic()
        self.send(P.NopOut(itt=itt, ttt=P.RESERVED_TAG, cmdsn=self.cmdsn, expstatsn=self.expstatsn,
                           immediate=True, data=payload))
        while True:
            pdu = self.recv(timeout)
            if isinstance(pdu, P.NopIn) and pdu.itt == itt:
                assert bytes(pdu.data) == payload
                return time.monotonic() - t0

    def logout(self) -> P.Pdu:
        self.send(P.LogoutRequest(reason=0, itt=self.next_itt(), cmdsn=self.cmdsn, expstatsn=self.expstatsn,
                                  immediate=True))
        while True:
            pdu = self.recv()
            if isinstance(pdu, P.LogoutResponse):
                return pdu


# -- helpers of the hostile-peer and RFC review cases ----------------------------------------

def logged_in(daemon, **login_kw) -> RawSession:
    """A raw session logged in to ``daemon``'s target (a SanstackPeer) at its first portal."""
    s = RawSession(daemon.portals[0].host, daemon.portals[0].port)
    resp = s.login(daemon.iqn, **login_kw)
    assert resp.status_class == 0, resp
    return s


def still_works(s: RawSession, lba: int, size: int = 2048) -> None:
    """The session still writes and reads back ``size`` bytes at ``lba``."""
    payload = (bytes(range(256)) * (size // 256 + 1))[:size]
    assert s.write(lba, payload) == 0
    status, data = s.read(lba, len(payload))
    assert status == 0 and data == payload


def expect_reject(s: RawSession, header: bytes, reason: int) -> None:
    """A Reject with ``reason`` carrying ``header`` (RFC 7143 §11.17), the connection kept."""
    try:
        pdu = s.recv(timeout=3.0)
    except Closed:
        raise AssertionError("connection dropped instead of a Reject") from None
    assert isinstance(pdu, P.Reject), f"expected Reject, got {pdu}"
    assert pdu.reason == reason, f"Reject reason {pdu.reason:#x}"
    assert bytes(pdu.data)[:P.BHS_LEN] == header[:P.BHS_LEN]
