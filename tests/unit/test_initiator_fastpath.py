"""The initiator's per-I/O paths, driven without sockets so every byte boundary can be tested.

A real :class:`Session` sits on a real :class:`Connection` whose transport only records what
is written; the "target" is a byte stream built with the shared codec (iscsi.pdu /
iscsi.framing) and fed through ``get_buffer``/``buffer_updated`` in chunks chosen by the
test, the way the event loop would.  Whatever the chunking, the same commands must complete
with the same data, status and sequence numbers — through the digest-free fast parse, the
in-place receive of large Data-In, the separately read header after it, and (with digests)
the general parse.
"""
from __future__ import annotations

import asyncio
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from iscsi import framing
from iscsi import pdu as P
from iscsi.initiator import scsi
from iscsi.initiator.connection import Connection
from iscsi.initiator.login import LoginConfig, LoginResult
from iscsi.initiator.session import Session, SessionOptions, Task
from iscsi.keys import ConnectionParams, Negotiated

INI = "iqn.2026-11.org.sanstack:unit-initiator"
TGT = "iqn.2026-11.org.sanstack:unit-target"
STATSN0 = 500
MRDSL = 262144


class Wire:
    """A transport that keeps what the initiator writes (one entry per writelines call)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.aborted = False

    def writelines(self, parts) -> None:
        self.writes.append(b"".join(bytes(p) for p in parts))

    def write(self, data) -> None:
        self.writes.append(bytes(data))

    def get_extra_info(self, name, default=None):
        return default

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        pass

    def pdus(self, *, header_digest: bool = False) -> list[P.Pdu]:
        reader = framing.PduReader(allowed=P.INITIATOR_OPCODES, header_digest=header_digest,
                                   max_data_segment=1 << 24)
        return reader.feed(b"".join(self.writes))


def logged_in(*, header_digest: bool = False, data_digest: bool = False, window: int = 64,
              cmdsn: int = 7) -> tuple[Session, Connection, Wire]:
    """A session in full feature phase on a socket-less connection (must run inside a loop)."""
    s = Session("127.0.0.1", 3260, LoginConfig(INI, TGT), SessionOptions(noop_interval=0, reconnect=False))
    conn = Connection(name="fake")
    wire = Wire()
    conn.transport = wire
    params = Negotiated(connection=ConnectionParams(header_digest=header_digest, data_digest=data_digest,
                                                     max_recv_data_segment_length=MRDSL,
                                                     max_send_data_segment_length=65536))
    result = LoginResult(params=params, tsih=1, isid=s.isid, cid=0, statsn=STATSN0 - 1, expcmdsn=cmdsn,
                         maxcmdsn=cmdsn + window - 1, cmdsn=cmdsn, target_keys={}, auth_method=None)
    s._enter_ffp(conn, result)
    return s, conn, wire


def feed(conn: Connection, data: bytes, sizes: list[int]) -> None:
    """Deliver ``data`` as the event loop would, each read at most the next size in ``sizes``."""
    pos, i = 0, 0
    while pos < len(data):
        assert not conn.closed, conn.close_reason
        buf = conn.get_buffer(-1)
        n = min(len(buf), len(data) - pos, sizes[i % len(sizes)] if sizes else len(data))
        assert n > 0
        buf[:n] = data[pos:pos + n]
        conn.buffer_updated(n)
        pos += n
        i += 1


def feed_arriving(conn: Connection, data: bytes, first: int) -> list[int]:
    """The first read finds ``first`` bytes, every later one all it asks for; returns the asks."""
    asked: list[int] = []
    pos, arrived = 0, first
    while pos < len(data):
        buf = conn.get_buffer(-1)
        asked.append(len(buf))
        n = min(len(buf), arrived - pos)
        buf[:n] = data[pos:pos + n]
        conn.buffer_updated(n)
        pos += n
        arrived = len(data)
    return asked


# ---------------------------------------------------------------------------------------------
# commands out

async def test_fast_submit_writes_what_the_shared_codec_writes():
    s, conn, wire = logged_in()
    done: list[Task] = []
    tasks = [Task(3, scsi.read16(1000 + i, 8), 4096, None, None, attr, done.append) for i, attr in
             enumerate([1, 2, 0, 3])]
    for t in tasks:
        s.submit(t)
    await asyncio.sleep(0)      # the one flush per loop iteration
    assert len(wire.writes) == 1, "four commands issued together go out in one write"
    got = wire.pdus()
    assert [p.cmdsn for p in got] == [7, 8, 9, 10]
    for t, p in zip(tasks, got):
        ref = P.ScsiCommandPdu(read=True, final=True, attr=t.attr, lun=P.encode_lun(3), itt=t.itt, edtl=4096,
                               cmdsn=t.cmdsn, expstatsn=STATSN0, cdb=t.cdb)
        assert framing.encode_bytes(p) == framing.encode_bytes(ref)


async def test_window_closed_commands_wait_and_go_when_status_opens_it():
    s, conn, wire = logged_in(window=2)
    done: list[Task] = []
    tasks = [Task(0, scsi.read16(i, 1), 512, None, None, 1, done.append) for i in range(4)]
    for t in tasks:
        s.submit(t)
    await asyncio.sleep(0)
    assert [p.cmdsn for p in wire.pdus()] == [7, 8]        # MaxCmdSN 8
    assert s.queued == 4 and s.in_flight == 2
    # One read carries both statuses; the window they open is used before that read's write.
    stream = b"".join(
        framing.encode_bytes(P.DataIn(itt=t.itt, final=True, has_status=True, statsn=STATSN0 + i,
                                      expcmdsn=8 + i, maxcmdsn=9 + i, data=bytes(512)))
        for i, t in enumerate(tasks[:2]))
    feed(conn, stream, [])
    assert [t.status for t in done] == [0, 0]
    assert [p.cmdsn for p in wire.pdus()] == [7, 8, 9, 10]
    assert [p.expstatsn for p in wire.pdus()[2:]] == [STATSN0 + 2] * 2
    assert s.window == (9, 10)


async def test_stale_sequence_numbers_in_a_later_pdu_do_not_move_back():
    s, conn, wire = logged_in()
    done: list[Task] = []
    a, b = (Task(0, scsi.read16(i, 1), 512, None, None, 1, done.append) for i in range(2))
    s.submit(a)
    s.submit(b)
    feed(conn, framing.encode_bytes(P.DataIn(itt=a.itt, final=True, has_status=True, statsn=STATSN0 + 1,
                                             expcmdsn=9, maxcmdsn=80, data=bytes(512))), [])
    # StatSN and MaxCmdSN older than what is known: ignored (RFC 7143 §4.2.2.1, §4.2.2.2).
    feed(conn, framing.encode_bytes(P.DataIn(itt=b.itt, final=True, has_status=True, statsn=STATSN0,
                                             expcmdsn=9, maxcmdsn=70, data=bytes(512))), [])
    assert len(done) == 2
    assert s._expstatsn == STATSN0 + 2 and s.window[1] == 80


# ---------------------------------------------------------------------------------------------
# responses in, any chunking

KIND = st.sampled_from(["small", "large", "split", "separate", "odd", "sense", "underflow"])


def _script(kinds: list[str], tasks: list[Task], seed: int) -> tuple[bytes, dict[int, bytes], int]:
    """The target's answer to ``tasks`` (one per kind) and the data each should end with."""
    rnd = random.Random(seed)
    pdus: list[P.Pdu] = []
    expect: dict[int, bytes] = {}
    statsn = STATSN0
    cmd = 8
    for kind, t in zip(kinds, tasks):
        data = rnd.randbytes(t.read_len)
        win = dict(expcmdsn=cmd, maxcmdsn=cmd + 63)
        cmd += 1
        if kind == "split":          # two large PDUs, status in the second
            half = t.read_len // 2
            pdus.append(P.DataIn(itt=t.itt, datasn=0, offset=0, data=data[:half], statsn=statsn, **win))
            pdus.append(P.DataIn(itt=t.itt, datasn=1, offset=half, data=data[half:], final=True,
                                 has_status=True, statsn=statsn, **win))
        elif kind == "separate":     # Data-In without status, then a SCSI Response (no collapse)
            pdus.append(P.DataIn(itt=t.itt, data=data, final=True, statsn=statsn, **win))
            pdus.append(P.ScsiResponse(itt=t.itt, status=0, statsn=statsn, **win))
        elif kind == "sense":        # CHECK CONDITION: no data, sense in the SCSI Response
            data = b""
            sense = bytes([0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0])
            pdus.append(P.ScsiResponse(itt=t.itt, status=2, statsn=statsn, data=P.ScsiResponse.sense_segment(sense),
                                       **win))
        elif kind == "underflow":
            data = data[:t.read_len - 1000]
            pdus.append(P.DataIn(itt=t.itt, data=data, final=True, has_status=True, underflow=True,
                                 residual=1000, statsn=statsn, **win))
        else:                        # small, large, odd (length not a multiple of 4: pad bytes)
            pdus.append(P.DataIn(itt=t.itt, data=data, final=True, has_status=True, statsn=statsn, **win))
        expect[t.itt] = data
        statsn += 1
    return pdus, expect, statsn


SIZES = {"small": 4096, "large": 131072, "split": 262144, "separate": 65536, "odd": 70001, "sense": 4096,
         "underflow": 40960}


async def _run_script(kinds: list[str], sizes: list[int], seed: int, *, digests: bool, room: int = 0,
                      data_digest: bool | None = None) -> None:
    """Complete ``kinds`` of reads from one scripted stream fed in ``sizes`` chunks.

    ``digests`` sets the header digest, and the data digest too unless ``data_digest`` says."""
    hd = digests
    dd = digests if data_digest is None else data_digest
    s, conn, wire = logged_in(header_digest=hd, data_digest=dd)
    done: list[Task] = []
    # ``room`` spare bytes after read_len: the connection may read the next BHS into them.
    tasks = [Task(0, scsi.read16(i * 1024, SIZES[k] // 512 + 1), SIZES[k], None, bytearray(SIZES[k] + room), 1,
                  done.append) for i, k in enumerate(kinds)]
    for t in tasks:
        s.submit(t)
    pdus, expect, statsn = _script(kinds, tasks, seed)
    stream = b"".join(framing.encode_bytes(p, header_digest=hd, data_digest=dd) for p in pdus)
    feed(conn, stream, sizes)
    assert not conn.closed, conn.close_reason
    assert [t.itt for t in done] == [t.itt for t in tasks], "each command completes once, in order"
    for k, t in zip(kinds, tasks):
        data = expect[t.itt]
        if k != "sense":
            assert bytes(t.data) == data
        assert t.status == (2 if k == "sense" else 0)
        assert (t.underflow, t.residual) == ((True, 1000) if k == "underflow" else (False, 0))
        if k == "sense":
            assert t.sense.asc_ascq == (0x24, 0)
    assert s._expstatsn == statsn and s.window[1] == 8 + len(kinds) - 1 + 63
    assert s.in_flight == 0 and s.sn_pending is None


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(KIND, min_size=1, max_size=8),
       sizes=st.lists(st.one_of(st.integers(1, 100), st.integers(40, 56), st.integers(1, 300000)),
                      min_size=0, max_size=5),
       big=st.integers(4096, 300000), seed=st.integers(0, 1 << 30), digests=st.booleans(),
       room=st.sampled_from([0, 47, 48, 100]))
def test_any_chunking_completes_the_same_commands(kinds, sizes, big, seed, digests, room):
    # Reads cycle through ``sizes`` and one larger size (so a run is not a million 1-byte reads).
    asyncio.run(_run_script(kinds, sizes + [big], seed, digests=digests, room=room))


@pytest.mark.parametrize("sizes", [[1, 65536], [48], [48, 131072], [131072 + 48], [1 << 20], [7, 48, 4096],
                                   [131072 + 20, 28]])
@pytest.mark.parametrize("digests,room", [(False, 0), (False, 48), (True, 0), (True, 48)])
async def test_chosen_chunkings(sizes, digests, room):
    kinds = ["large", "large", "small", "odd", "large", "split", "separate", "large", "sense", "large", "underflow"]
    await _run_script(kinds, sizes, 1, digests=digests, room=room)


async def test_large_data_in_back_to_back_reads_header_alone_then_payload_in_place():
    s, conn, wire = logged_in()
    done: list[Task] = []
    bufs = [bytearray(131072) for _ in range(3)]
    tasks = [Task(0, scsi.read16(i * 256, 256), 131072, None, bufs[i], 1, done.append) for i in range(3)]
    for t in tasks:
        s.submit(t)
    payloads = [os.urandom(131072) for _ in tasks]
    stream = b"".join(framing.encode_bytes(P.DataIn(itt=t.itt, data=d, final=True, has_status=True,
                                                    statsn=STATSN0 + i, expcmdsn=8 + i, maxcmdsn=70 + i))
                      for i, (t, d) in enumerate(zip(tasks, payloads)))
    asked = feed_arriving(conn, stream, 65536)
    # First PDU: header and part of the payload staged, the rest in place; after it: one
    # 48-byte header read, then the whole payload straight into the task's buffer.
    assert asked[-4:] == [48, 131072, 48, 131072]
    assert [bytes(b) for b in bufs] == payloads and len(done) == 3


async def test_room_after_read_len_takes_the_next_header_with_the_payload():
    s, conn, wire = logged_in()
    done: list[Task] = []
    bufs = [bytearray(131072 + 48) for _ in range(4)]
    tasks = [Task(0, scsi.read16(i * 256, 256), 131072, None, bufs[i], 1, done.append) for i in range(4)]
    for t in tasks:
        s.submit(t)
    payloads = [os.urandom(131072) for _ in tasks]
    pdus = [framing.encode_bytes(P.DataIn(itt=t.itt, data=d, final=True, has_status=True, statsn=STATSN0 + i,
                                          expcmdsn=8 + i, maxcmdsn=70 + i))
            for i, (t, d) in enumerate(zip(tasks, payloads))]
    pdus.append(framing.encode_bytes(P.NopIn(itt=P.RESERVED_TAG, ttt=P.RESERVED_TAG, statsn=STATSN0 + 4,
                                             expcmdsn=12, maxcmdsn=75)))
    asked = feed_arriving(conn, b"".join(pdus), 65536)
    # After the first (partly staged) PDU every read is payload + the next BHS: one per PDU.
    assert asked[2:] == [131072 + 48] * 3
    assert [bytes(b[:131072]) for b in bufs] == payloads and [t.itt for t in done] == [t.itt for t in tasks]
    assert s.window[1] == 75 and not conn.closed     # the NOP-In's BHS came with the last payload


async def test_commands_issued_by_completions_go_out_at_the_end_of_each_read():
    s, conn, wire = logged_in()
    n = 6
    tasks: list[Task] = []

    def again(task: Task) -> None:
        nxt = Task(0, scsi.read16(0, 8), 4096, None, None, 1, None)
        tasks.append(nxt)
        s.submit(nxt)

    first = [Task(0, scsi.read16(i, 8), 4096, None, None, 1, again) for i in range(n)]
    for t in first:
        s.submit(t)
    await asyncio.sleep(0)
    wire.writes.clear()
    stream = [framing.encode_bytes(P.DataIn(itt=t.itt, data=bytes(4096), final=True, has_status=True,
                                            statsn=STATSN0 + i, expcmdsn=8 + i, maxcmdsn=70 + i))
              for i, t in enumerate(first)]
    feed(conn, b"".join(stream[:4]), [])     # one read with four statuses: one write of four
    feed(conn, stream[4], [])
    feed(conn, stream[5], [4000, 200])      # a status split over two reads: written after the second
    assert [len(w) for w in wire.writes] == [4 * 48, 48, 48]
    assert [p.itt for p in wire.pdus()] == [t.itt for t in tasks]
    assert not conn.flush_pending, "nothing left for a later flush"


async def test_protocol_violation_in_the_fast_path_drops_the_connection():
    s, conn, wire = logged_in()
    done: list[Task] = []
    t = Task(0, scsi.read16(0, 8), 4096, None, None, 1, done.append)
    s.submit(t)
    # More data than the command asked for (§11.7.5: Buffer Offset + length within EDTL).
    feed(conn, framing.encode_bytes(P.DataIn(itt=t.itt, data=bytes(8192), final=True, has_status=True,
                                             statsn=STATSN0, expcmdsn=8, maxcmdsn=70)), [])
    assert conn.closed and wire.aborted
    assert done == [t] and t.exc is not None and t.status == -1   # failed by the loss, not completed
