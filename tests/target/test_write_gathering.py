"""Writes gathered by the image file (iscsi/backstore/gather.py) reach the file before the
target acknowledges them: the transport drains every pending run before it writes responses."""
from __future__ import annotations

import os
import struct

from iscsi import pdu as P
from iscsi.backstore import gather as G
from iscsi.backstore.file import FileBackstore
from iscsi.framing import PduReader, encode_bytes
from iscsi.scsi.lu import LogicalUnit

from .fakes import StubTransport, logged_in_connection


class CheckingTransport(StubTransport):
    """Records, at the moment each batch of responses is written, what the image file holds."""

    def __init__(self, path) -> None:
        self.path = path
        self.sent = bytearray()
        self.file_when_sent: list[bytes] = []

    def writelines(self, parts) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            self.file_when_sent.append(os.pread(fd, 64 * 4096, 0))
        finally:
            os.close(fd)
        for p in parts:
            self.sent += p



async def test_gathered_writes_are_in_the_file_before_their_responses_leave(tmp_path, monkeypatch):
    pwritev_calls = []
    real = os.pwritev
    monkeypatch.setattr(os, "pwritev", lambda fd, b, off: pwritev_calls.append(len(b)) or real(fd, b, off))
    img = tmp_path / "lun.img"
    backstore = FileBackstore(img, size=16 << 20, block_size=512, gather_writes=True)
    lu = LogicalUnit(backstore, serial="gather01", lun_id=0)
    transport = CheckingTransport(img)
    conn = logged_in_connection(lu, transport)
    transport.file_when_sent.clear()
    start = len(transport.sent)

    # Eight contiguous 4 KiB WRITE(16)s in one read of the socket, as a QD32 writer sends them.
    chunks = [os.urandom(4096) for _ in range(8)]
    raw = b"".join(
        encode_bytes(P.ScsiCommandPdu(write=True, edtl=4096, cmdsn=2 + i, itt=10 + i,
                                      cdb=struct.pack(">BBQIBB", 0x8A, 0, i * 8, 8, 0, 0), data=c))
        for i, c in enumerate(chunks))
    conn.data_received(raw)
    conn._flush()

    assert pwritev_calls == [8]                       # one syscall for the eight writes
    assert transport.file_when_sent, "no response was written"
    assert transport.file_when_sent[0][:8 * 4096] == b"".join(chunks)
    responses = PduReader().feed(bytes(transport.sent[start:]))
    assert [(r.itt, r.status) for r in responses] == [(10 + i, 0) for i in range(8)]
    assert not G.pending_runs
    backstore.close()
