"""A recording TCP relay for loopback tests: sits between an initiator and a target, forwards
bytes unchanged both ways, and keeps a copy so a test can check what was really on the wire
(negotiated login keys, header digests) without trusting either end's logs.

    with Relay(peer.portals[0]) as relay:
        run(["iscsi-inq", url_through(relay.portal)])
    keys = login_keys(relay.connections[0].s2c)
"""
from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field
from typing import Iterator

from tools.peers.base import Portal

BHS_LEN = 48
DIGEST_LEN = 4
#: Socket timeout of the relay threads: a stuck peer never blocks a test forever.
IO_TIMEOUT = 60.0
OP_LOGIN_REQ, OP_LOGIN_RSP = 0x03, 0x23
FULL_FEATURE = 3  # RFC 7143 §11.12: NSG/CSG value 3 = FullFeaturePhase


@dataclass
class Connection:
    c2s: bytearray = field(default_factory=bytearray)
    s2c: bytearray = field(default_factory=bytearray)


class Relay:
    def __init__(self, upstream: Portal, host: str = "127.0.0.1"):
        self.upstream = upstream
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(16)
        self._listener.settimeout(0.2)
        self.portal = Portal(host, self._listener.getsockname()[1])
        self.connections: list[Connection] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> "Relay":
        t = threading.Thread(target=self._accept_loop, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._listener.close()
        for t in self._threads:
            t.join(timeout=5)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection((self.upstream.host, self.upstream.port), timeout=IO_TIMEOUT)
            except OSError:
                client.close()
                continue
            client.settimeout(IO_TIMEOUT)
            conn = Connection()
            self.connections.append(conn)
            for src, dst, buf in ((client, server, conn.c2s), (server, client, conn.s2c)):
                t = threading.Thread(target=self._pump, args=(src, dst, buf), daemon=True)
                t.start()
                self._threads.append(t)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, record: bytearray) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                record += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
                try:
                    s.shutdown(how)
                except OSError:
                    pass


@dataclass
class Pdu:
    bhs: bytes
    ahs: bytes
    header_digest: bytes | None
    data: bytes
    full_feature: bool

    @property
    def opcode(self) -> int:
        return self.bhs[0] & 0x3F


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def split_pdus(stream: bytes, *, from_target: bool, header_digest: bool, data_digest: bool = False) -> Iterator[Pdu]:
    """Cut one direction of a connection into PDUs (RFC 7143 §11.2).

    Digests apply only once the login phase is over: in the target's stream after the Login
    Response that moves to full feature phase (T=1, NSG=3); in the initiator's stream after
    its last Login Request. ``header_digest``/``data_digest`` say what was negotiated.
    """
    pos, ff = 0, False
    last_login_end = 0
    if not from_target:
        # Find where the initiator's login requests end: the last Login Request PDU.
        p = 0
        while p + BHS_LEN <= len(stream):
            bhs = stream[p:p + BHS_LEN]
            if bhs[0] & 0x3F != OP_LOGIN_REQ:
                break
            p += BHS_LEN + bhs[4] * 4 + _pad4(int.from_bytes(bhs[5:8], "big"))
            last_login_end = p
    while pos + BHS_LEN <= len(stream):
        if not from_target and pos >= last_login_end:
            ff = True
        bhs = bytes(stream[pos:pos + BHS_LEN])
        ahs_len = bhs[4] * 4
        dlen = int.from_bytes(bhs[5:8], "big")
        p = pos + BHS_LEN
        ahs = bytes(stream[p:p + ahs_len])
        p += ahs_len
        hd = None
        if ff and header_digest:
            hd = bytes(stream[p:p + DIGEST_LEN])
            p += DIGEST_LEN
        data = bytes(stream[p:p + dlen])
        p += _pad4(dlen)
        if ff and data_digest and dlen:
            p += DIGEST_LEN
        if p > len(stream):
            return  # truncated tail (connection cut)
        yield Pdu(bhs, ahs, hd, data, ff)
        if from_target and bhs[0] & 0x3F == OP_LOGIN_RSP and bhs[1] & 0x80 and bhs[1] & 0x03 == FULL_FEATURE:
            ff = True
        pos = p


def login_keys(stream: bytes, *, from_target: bool = True) -> dict[str, str]:
    """Every key=value sent in Login PDUs of one direction (later values win)."""
    keys: dict[str, str] = {}
    for pdu in split_pdus(stream, from_target=from_target, header_digest=False):
        if pdu.full_feature or pdu.opcode not in (OP_LOGIN_REQ, OP_LOGIN_RSP):
            break
        for item in pdu.data.split(b"\0"):
            if b"=" in item:
                k, v = item.decode(errors="replace").split("=", 1)
                keys[k] = v
    return keys
