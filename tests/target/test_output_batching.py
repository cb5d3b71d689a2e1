"""How the target batches its output: the first EARLY_FLUSH responses of a loop turn are
written at once (so a single-threaded initiator can start on them), the rest together when
the turn ends; PDUs are never reordered."""
from __future__ import annotations

import struct

import pytest

from iscsi import pdu as P
from iscsi.backstore.ram import RamBackstore
from iscsi.framing import PduReader, encode_bytes
from iscsi.scsi.lu import LogicalUnit
from iscsi.target import connection as C

from .fakes import StubTransport, logged_in_connection


class RecordingTransport(StubTransport):
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def writelines(self, parts) -> None:
        self.writes.append(b"".join(bytes(p) for p in parts))


def _reads(n: int, first_itt: int = 100, cmdsn: int = 2) -> bytes:
    return b"".join(
        encode_bytes(P.ScsiCommandPdu(read=True, edtl=4096, cmdsn=cmdsn + i, itt=first_itt + i,
                                      cdb=struct.pack(">BBQIBB", 0x88, 0, i * 8, 8, 0, 0)))
        for i in range(n))


def _itts(raw: bytes) -> list[int]:
    return [pdu.itt for pdu in PduReader(max_data_segment=1 << 24).feed(raw)]


@pytest.mark.parametrize("early", [8, 0])
async def test_first_responses_of_a_turn_go_out_early_the_rest_at_its_end(monkeypatch, early):
    monkeypatch.setattr(C, "EARLY_FLUSH", early)
    transport = RecordingTransport()
    conn = logged_in_connection(LogicalUnit(RamBackstore(1 << 20), serial="batch01", lun_id=0), transport)
    transport.writes.clear()
    conn.data_received(_reads(20))
    if early:
        assert len(transport.writes) == 1 and _itts(transport.writes[0]) == list(range(100, 100 + early))
    else:
        assert transport.writes == []
    conn._flush()  # the end of the loop turn
    assert _itts(b"".join(transport.writes)) == list(range(100, 120))
    assert len(transport.writes) == (2 if early else 1)
    # The next turn writes early again.
    transport.writes.clear()
    conn.data_received(_reads(10, first_itt=200, cmdsn=22))
    conn._flush()
    assert _itts(b"".join(transport.writes)) == list(range(200, 210))
    assert len(transport.writes) == (2 if early else 1)
