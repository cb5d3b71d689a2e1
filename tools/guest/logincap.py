"""Record the login keys each side sends, from the namespace's loopback (AF_PACKET, no tcpdump).

The guest's connections reach the target through slirp, i.e. from 127.0.0.1 to 127.0.0.1:PORT
inside the harness's namespace, so every login PDU crosses ``lo`` there. For each TCP connection
to a target port this follows the byte stream from the SYN, cuts it into PDUs (RFC 7143 §11.2:
48-byte BHS, TotalAHSLength in 4-byte words at byte 4, DataSegmentLength in bytes 5-7, data
padded to 4 bytes) and keeps the Login Request / Login Response PDUs (opcodes 0x03 / 0x23, §11.12,
§11.13). The first PDU of any other kind ends the login phase and the flow is dropped, so bulk
I/O costs one recv and a dict lookup per packet. No digests exist during login (§13.1).

Only what is needed for a log: no retransmission or out-of-order handling (loopback delivers in
order); a gap stops following that connection.
"""
from __future__ import annotations

import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4  # each loopback packet is seen twice: outgoing and incoming; keep one
ETH_HLEN = 14
#: Login PDUs are small; a stream whose login phase grows past this is not followed further.
MAX_LOGIN_BYTES = 256 * 1024
BHS_LEN = 48
OP_LOGIN_REQ, OP_LOGIN_RSP = 0x03, 0x23
STAGES = {0: "security", 1: "operational", 3: "full-feature"}
_IP = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBB")


@dataclass
class LoginPdu:
    when: float
    direction: str  # "initiator" or "target"
    transit: bool
    csg: int
    nsg: int
    status: int | None
    keys: list[str]

    def describe(self) -> str:
        if self.direction == "initiator":
            head = "initiator -> target  Login Request "
        else:
            head = f"target -> initiator  Login Response status 0x{self.status:04x} "
        stage = f"{STAGES.get(self.csg, self.csg)}"
        if self.transit:
            stage += f" -> {STAGES.get(self.nsg, self.nsg)}"
        return head + f"[{stage}]\n" + "".join(f"      {k}\n" for k in self.keys)


@dataclass
class _Flow:
    client: tuple[str, int]
    port: int
    started: float
    next_seq: dict[bool, int] = field(default_factory=dict)  # keyed by "from initiator"
    buf: dict[bool, bytearray] = field(default_factory=lambda: {True: bytearray(), False: bytearray()})
    pdus: list[LoginPdu] = field(default_factory=list)
    done: bool = False


class LoginCapture:
    """Follow logins to ``ports`` on ``iface`` in a thread; :meth:`report` renders them."""

    def __init__(self, ports: set[int] | tuple[int, ...], iface: str = "lo") -> None:
        self.ports = set(ports)
        self.iface = iface
        self.flows: list[_Flow] = []
        self._live: dict[tuple, _Flow] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None
        self.packets = 0

    def start(self) -> "LoginCapture":
        try:
            self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            self._sock.bind((self.iface, 0))
        except OSError as exc:
            self.error = f"cannot capture on {self.iface}: {exc}"
            return self
        self._thread = threading.Thread(target=self._loop, name="logincap", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._sock.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._sock], [], [], 0.2)
            if not ready:
                continue
            try:
                frame, addr = self._sock.recvfrom(1 << 17)
            except OSError:
                return
            if addr[2] == PACKET_OUTGOING:
                continue
            self.packets += 1
            try:
                self._packet(frame)
            except (struct.error, IndexError, ValueError):
                continue

    def _packet(self, frame: bytes) -> None:
        ip = frame[ETH_HLEN:]
        if len(ip) < 20 or ip[0] >> 4 != 4:
            return
        vihl, _, total, _, _, _, proto, _, src, dst = _IP.unpack_from(ip)
        if proto != 6:
            return
        ihl = (vihl & 0xF) * 4
        tcp = ip[ihl:total]
        sport, dport, seq, _, off, flags = _TCP.unpack_from(tcp)
        if dport in self.ports:
            key, from_init = (src, sport, dport), True
        elif sport in self.ports:
            key, from_init = (dst, dport, sport), False
        else:
            return
        payload = tcp[(off >> 4) * 4:]
        if flags & 0x02:  # SYN (a new connection) or SYN-ACK
            if from_init:
                flow = _Flow((socket.inet_ntoa(key[0]), key[1]), key[2], time.time())
                self._live[key] = flow
                self.flows.append(flow)
            flow = self._live.get(key)
            if flow is not None:
                flow.next_seq[from_init] = (seq + 1) & 0xFFFFFFFF
            return
        flow = self._live.get(key)
        if flow is None or flow.done or not payload:
            return
        if flow.next_seq.get(from_init) != seq:
            flow.done = True  # a gap: stop following this connection
            return
        flow.next_seq[from_init] = (seq + len(payload)) & 0xFFFFFFFF
        buf = flow.buf[from_init]
        buf += payload
        if len(buf) > MAX_LOGIN_BYTES:
            flow.done = True
            return
        self._pdus(flow, from_init)

    def _pdus(self, flow: _Flow, from_init: bool) -> None:
        buf = flow.buf[from_init]
        while len(buf) >= BHS_LEN:
            ahs = buf[4] * 4
            dlen = int.from_bytes(buf[5:8], "big")
            size = BHS_LEN + ahs + dlen + (-dlen % 4)
            if len(buf) < size:
                return
            op = buf[0] & 0x3F
            if op not in (OP_LOGIN_REQ, OP_LOGIN_RSP):
                flow.done = True  # full feature phase: nothing more to record here
                return
            data = bytes(buf[BHS_LEN + ahs:BHS_LEN + ahs + dlen])
            flags = buf[1]
            flow.pdus.append(LoginPdu(
                when=time.time(),
                direction="initiator" if op == OP_LOGIN_REQ else "target",
                transit=bool(flags & 0x80), csg=(flags >> 2) & 3, nsg=flags & 3,
                status=(buf[36] << 8 | buf[37]) if op == OP_LOGIN_RSP else None,
                keys=[k.decode(errors="replace") for k in data.split(b"\0") if k],
            ))
            del buf[:size]

    def report(self) -> str:
        if self.error:
            return f"(login capture unavailable: {self.error})\n"
        out = []
        for n, flow in enumerate(self.flows, 1):
            if not flow.pdus:
                continue
            stamp = time.strftime("%H:%M:%S", time.localtime(flow.started))
            out.append(f"connection {n} at {stamp}: {flow.client[0]}:{flow.client[1]} -> port {flow.port}\n")
            out.extend("    " + p.describe() for p in flow.pdus)
        return "".join(out) or "(no login seen)\n"
