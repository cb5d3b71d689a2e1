"""Zero-copy READs on the real daemon (uvloop, file LU): a slow reader, and writes into ranges in flight.

The daemon here has one session at a time on its LU, so its large READs are sent with
``sendfile`` and held (iscsi/scsi/zerocopy.py).  These cases check what a client sees.
"""
from __future__ import annotations

import os
import socket
import time

import pytest

from tools.peers.sanstack import SanstackPeer

from .conftest import running_daemon
from .raw import RawSession, read10, write10

BLOCK = 512
CHUNK = 128 << 10


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    with running_daemon(tmp_path_factory.mktemp("zero-copy-target")) as peer:
        yield peer


def session(peer: SanstackPeer, rcvbuf: int | None = None) -> RawSession:
    host, port = peer.portals[0].host, peer.portals[0].port
    raw = RawSession(host, port)
    if rcvbuf is not None:
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    assert raw.login(peer.iqn, initiator="iqn.2026-11.org.sanstack.hardening:zc").status_class == 0
    return raw


def collect(raw: RawSession, itts: list[int]) -> dict[int, tuple[int, bytes]]:
    """Status and Data-In of each command, whatever order they come in (pings answered)."""
    data = {itt: bytearray() for itt in itts}
    done: dict[int, tuple[int, bytes]] = {}
    while len(done) < len(itts):
        pdu = raw.recv(timeout=20)
        itt = pdu.itt
        assert itt in data, f"unexpected PDU {pdu!r}"
        if pdu.data and pdu.__class__.__name__ == "DataIn":
            data[itt][pdu.offset:pdu.offset + len(pdu.data)] = pdu.data
        if getattr(pdu, "has_status", True):
            done[itt] = (pdu.status, bytes(data[itt]))
    return done


def test_slow_reader_gets_every_byte_of_32_reads_in_flight(target):
    """32 READs of 128 KiB queued at once into a 16 KiB receive buffer read slowly: the
    socket fills, the rest goes through the transport's buffer, and every byte arrives in
    order and right."""
    raw = session(target)
    content = os.urandom(32 * CHUNK)
    for i in range(0, len(content), 64 << 10):
        assert raw.write(i // BLOCK, content[i:i + (64 << 10)]) == 0
    raw.close()
    raw = session(target, rcvbuf=16 << 10)
    itts = [raw.command(read10(i * CHUNK // BLOCK, CHUNK // BLOCK), read=True, edtl=CHUNK) for i in range(32)]
    time.sleep(0.5)  # let the target fill the socket and queue the rest
    results = collect(raw, itts)
    for i, itt in enumerate(itts):
        status, data = results[itt]
        assert status == 0 and data == content[i * CHUNK:(i + 1) * CHUNK], f"READ {i} differs"
    raw.logout()
    raw.close()


def test_a_write_into_a_read_in_flight_waits_for_it(target):
    """READ then an overlapping WRITE, pipelined: the READ returns what was there before
    the WRITE, the WRITE completes, and a second READ sees it."""
    raw = session(target)
    old = os.urandom(CHUNK)
    for i in (0, 64 << 10):
        assert raw.write(i // BLOCK, old[i:i + (64 << 10)]) == 0
    expected = old  # the region as the next READ must see it
    for round_ in range(20):
        lba = 32 + round_ % 3 * 16
        new = os.urandom(64 << 10)
        r = raw.command(read10(0, CHUNK // BLOCK), read=True, edtl=CHUNK)
        w = raw.command(write10(lba, len(new) // BLOCK), write=True, edtl=len(new), data=new)
        results = collect(raw, [r, w])
        assert results[w][0] == 0 and results[r][0] == 0
        assert results[r][1] == expected, f"round {round_}: the READ saw bytes of the WRITE issued after it"
        expected = expected[:lba * BLOCK] + new + expected[lba * BLOCK + len(new):]
        status, now = raw.read(0, CHUNK)
        assert status == 0 and now == expected
    raw.logout()
    raw.close()
