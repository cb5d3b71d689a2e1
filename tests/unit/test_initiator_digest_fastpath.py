"""The initiator's per-I/O paths with CRC32C digests (RFC 7143 §12.1), driven without sockets.

Same harness as test_initiator_fastpath: a real Session on a real Connection, the target's
bytes built with the shared codec and fed in chunks chosen by the test.  With a header and/or
data digest the connection runs ``_parse_dg`` and receives large Data-In payloads in place
with the trailer (pad + data digest) and the next header in the task buffer's spare room;
every chunking must give the same data and status, and a wrong digest anywhere must drop the
connection before the command is reported done.
"""
from __future__ import annotations

import asyncio
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from iscsi import digest, framing
from iscsi import pdu as P
from iscsi.initiator import connection as C
from iscsi.initiator import scsi
from iscsi.initiator.errors import ProtocolViolation
from iscsi.initiator.session import Task
from tests.unit.test_initiator_fastpath import (
    STATSN0, _run_script, feed, feed_arriving, logged_in,
)

#: (header digest, data digest) combinations that take the digest path.
DIGESTS = [(True, True), (True, False), (False, True)]
DIG_IDS = ["H+D", "H", "D"]


def enc(pdu: P.Pdu, hd: bool, dd: bool) -> bytes:
    return framing.encode_bytes(pdu, header_digest=hd, data_digest=dd)


def data_in(t: Task, data: bytes, i: int, **kw) -> P.DataIn:
    kw.setdefault("final", True)
    kw.setdefault("has_status", True)
    return P.DataIn(itt=t.itt, data=data, statsn=STATSN0 + i, expcmdsn=8 + i, maxcmdsn=70 + i, **kw)


def test_residue_is_what_iscsi_digest_makes():
    rnd = random.Random(5)
    for n in (0, 1, 3, 48, 4096, 70001):
        data = rnd.randbytes(n)
        assert C._crc(data + digest.digest_bytes(data)) == C.DIGEST_RESIDUE
        assert C._crc(digest.digest_bytes(data), C._crc(data)) == C.DIGEST_RESIDUE
        bad = bytearray(data + digest.digest_bytes(data))
        bad[rnd.randrange(len(bad))] ^= 0x10
        assert C._crc(bad) != C.DIGEST_RESIDUE


# ---------------------------------------------------------------------------------------------
# commands out

async def test_submit_with_header_digest_writes_what_the_shared_codec_writes():
    s, conn, wire = logged_in(header_digest=True, data_digest=True)
    done: list[Task] = []
    tasks = [Task(3, scsi.read16(1000 + i, 8), 4096, None, None, attr, done.append)
             for i, attr in enumerate([1, 2, 0, 3])]
    tasks.append(Task(3, scsi.test_unit_ready(), 0, None, None, 1, done.append))
    for t in tasks:
        s.submit(t)
    await asyncio.sleep(0)
    assert len(wire.writes) == 1 and len(wire.writes[0]) == 5 * 52     # BHS + digest each
    got = wire.pdus(header_digest=True)        # the reader checks every header digest
    assert [p.cmdsn for p in got] == [7, 8, 9, 10, 11]
    for t, p in zip(tasks, got):
        ref = P.ScsiCommandPdu(read=bool(t.read_len), final=True, attr=t.attr, lun=P.encode_lun(3), itt=t.itt,
                               edtl=t.read_len, cmdsn=t.cmdsn, expstatsn=STATSN0, cdb=t.cdb)
        assert framing.encode_bytes(p, header_digest=True) == framing.encode_bytes(ref, header_digest=True)


# ---------------------------------------------------------------------------------------------
# responses in: every split point of a small stream

async def _small_stream(hd: bool, dd: bool) -> tuple[bytes, list[int], callable]:
    """Four small-command answers covering pad, no data, sense and a separate status."""
    s, conn, wire = logged_in(header_digest=hd, data_digest=dd)
    done: list[Task] = []
    tasks = [Task(0, scsi.read16(i, 1), n, None, None, 1, done.append) for i, n in enumerate([512, 301, 0, 64])]
    for t in tasks:
        s.submit(t)
    rnd = random.Random(7)          # the same stream on every call
    data = [rnd.randbytes(512), rnd.randbytes(301), b"", rnd.randbytes(64)]
    sense = bytes([0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0])
    pdus = [data_in(tasks[0], data[0], 0),
            data_in(tasks[1], data[1], 1),                                  # 3 pad bytes
            P.ScsiResponse(itt=tasks[2].itt, status=2, statsn=STATSN0 + 2, expcmdsn=10, maxcmdsn=72,
                           data=P.ScsiResponse.sense_segment(sense)),
            data_in(tasks[3], data[3], 3, has_status=False),                # status separately
            P.ScsiResponse(itt=tasks[3].itt, status=0, statsn=STATSN0 + 3, expcmdsn=11, maxcmdsn=73),
            P.NopIn(itt=P.RESERVED_TAG, ttt=P.RESERVED_TAG, statsn=STATSN0 + 4, expcmdsn=11, maxcmdsn=74)]
    stream = b"".join(enc(p, hd, dd) for p in pdus)

    def check() -> None:
        assert not conn.closed, conn.close_reason
        assert [t.itt for t in done] == [t.itt for t in (tasks[0], tasks[1], tasks[2], tasks[3])]
        assert [bytes(t.data) for t in (tasks[0], tasks[1], tasks[3])] == [data[0], data[1], data[3]]
        assert [t.status for t in tasks] == [0, 0, 2, 0]
        assert tasks[2].sense.asc_ascq == (0x24, 0)
        assert s._expstatsn == STATSN0 + 4 and s.window == (11, 74) and s.in_flight == 0
    return stream, conn, check


async def _release_now() -> None:
    """Let the loop run the flush each session scheduled: without it thousands of pending
    callbacks kept every finished session and its 1 MiB staging buffer alive, which took this
    process to ~3 GB (and a later subprocess, e.g. a fuzz run, inherits that peak RSS)."""
    await asyncio.sleep(0)


@pytest.mark.parametrize("hd,dd", DIGESTS, ids=DIG_IDS)
async def test_every_split_point_of_a_small_stream(hd, dd):
    stream, _, _ = await _small_stream(hd, dd)
    for cut in range(1, len(stream)):
        _, conn, check = await _small_stream(hd, dd)
        feed(conn, stream, [cut, len(stream)])
        check()
        await _release_now()


@pytest.mark.parametrize("hd,dd", DIGESTS, ids=DIG_IDS)
async def test_every_split_point_three_reads(hd, dd):
    # Two cuts: the second read starts anywhere in the first 120 bytes after the first cut.
    stream, _, _ = await _small_stream(hd, dd)
    rnd = random.Random(hash((hd, dd)))
    for cut in range(1, len(stream), 7):
        for second in (1, rnd.randrange(1, 60), rnd.randrange(60, 120)):
            _, conn, check = await _small_stream(hd, dd)
            feed(conn, stream, [cut, second, len(stream)])
            check()
        await _release_now()


# ---------------------------------------------------------------------------------------------
# mixed sizes, large payloads in place, any chunking

async def _run_dg(kinds: list[str], sizes: list[int], seed: int, hd: bool, dd: bool, room: int) -> None:
    """_run_script with the header and data digests chosen separately."""
    await _run_script(kinds, sizes, seed, digests=hd, data_digest=dd, room=room)


KIND = st.sampled_from(["small", "large", "split", "separate", "odd", "sense", "underflow"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(KIND, min_size=1, max_size=8),
       sizes=st.lists(st.one_of(st.integers(1, 100), st.integers(48, 64), st.integers(1, 300000)),
                      min_size=0, max_size=5),
       big=st.integers(4096, 300000), seed=st.integers(0, 1 << 30), dig=st.sampled_from(DIGESTS),
       room=st.sampled_from([0, 50, 55, 56, 59, 64, 100]))
def test_any_chunking_with_digests(kinds, sizes, big, seed, dig, room):
    asyncio.run(_run_dg(kinds, sizes + [big], seed, *dig, room))


@pytest.mark.parametrize("sizes", [[1, 65536], [52], [56, 131072], [131072 + 56], [131072 + 59], [1 << 20],
                                   [7, 52, 4096], [131072 + 20, 28], [131072 + 4, 52], [131072, 3, 1, 52]])
@pytest.mark.parametrize("hd,dd", DIGESTS, ids=DIG_IDS)
@pytest.mark.parametrize("room", [0, 64])
async def test_chosen_chunkings_with_digests(sizes, hd, dd, room):
    kinds = ["large", "large", "small", "odd", "large", "odd", "large", "split", "separate", "large", "sense",
             "large", "underflow", "large"]
    await _run_dg(kinds, sizes, 1, hd, dd, room)


def _large_reads(n: int, room: int, hd: bool = True, dd: bool = True, size: int = 131072):
    s, conn, wire = logged_in(header_digest=hd, data_digest=dd)
    done: list[Task] = []
    bufs = [bytearray(size + room) for _ in range(n)]
    tasks = [Task(0, scsi.read16(i * 256, 256), size, None, bufs[i], 1, done.append) for i in range(n)]
    for t in tasks:
        s.submit(t)
    payloads = [os.urandom(size) for _ in tasks]
    pdus = [enc(data_in(t, d, i), hd, dd) for i, (t, d) in enumerate(zip(tasks, payloads))]
    return s, conn, done, tasks, bufs, payloads, pdus


async def test_room_takes_data_digest_and_next_header_with_the_payload():
    s, conn, done, tasks, bufs, payloads, pdus = _large_reads(4, C.RX_ROOM)
    pdus.append(enc(P.NopIn(itt=P.RESERVED_TAG, ttt=P.RESERVED_TAG, statsn=STATSN0 + 4, expcmdsn=12,
                            maxcmdsn=75), True, True))
    asked = feed_arriving(conn, b"".join(pdus), 65536)
    # After the first (partly staged) PDU: payload + data digest + BHS + header digest per read.
    assert asked[2:] == [131072 + 4 + 52] * 3
    assert [bytes(b[:131072]) for b in bufs] == payloads and [t.itt for t in done] == [t.itt for t in tasks]
    assert s.window[1] == 75 and not conn.closed


@pytest.mark.parametrize("hd,dd,tail", [(True, True, 56), (True, False, 52), (False, True, 52)])
async def test_without_room_trailer_and_header_are_read_alone_then_payload_in_place(hd, dd, tail):
    s, conn, done, tasks, bufs, payloads, pdus = _large_reads(3, 0, hd, dd)
    targets: list[object] = []
    real = conn.get_buffer

    def spy(n):
        b = real(n)
        targets.append(b.obj)
        return b
    conn.get_buffer = spy
    asked = feed_arriving(conn, b"".join(pdus), 65536)
    # Read 1: header + half the payload staged, read 2: the rest in place; then the trailer
    # and next header alone, the next payload in place, and so on.
    assert asked[2:6] == [tail, 131072, tail, 131072]
    assert targets[1] is bufs[0] and targets[3] is bufs[1] and targets[5] is bufs[2], \
        "the payload goes straight into the task's buffer"
    assert [bytes(b) for b in bufs] == payloads and len(done) == 3


async def test_padded_large_payload_in_place_with_room():
    s, conn, wire = logged_in(header_digest=True, data_digest=True)
    done: list[Task] = []
    n = 70001                                   # 3 pad bytes
    bufs = [bytearray(n + C.RX_ROOM) for _ in range(3)]
    tasks = [Task(0, scsi.read16(i * 256, 137), n, None, bufs[i], 1, done.append) for i in range(3)]
    for t in tasks:
        s.submit(t)
    payloads = [os.urandom(n) for _ in tasks]
    stream = b"".join(enc(data_in(t, d, i), True, True) for i, (t, d) in enumerate(zip(tasks, payloads)))
    asked = feed_arriving(conn, stream, 100)
    assert asked[2:] == [n + 3 + 4 + 52] * 2
    assert [bytes(b[:n]) for b in bufs] == payloads and len(done) == 3 and not conn.closed


async def test_large_data_digest_is_computed_in_the_task_buffer(monkeypatch):
    # No copy of the payload for its digest: every CRC over more than a header runs on a view
    # of the task's own buffer.
    s, conn, done, tasks, bufs, payloads, pdus = _large_reads(3, C.RX_ROOM)
    seen: list[tuple[int, object]] = []
    real = C._crc

    def spy(data, *crc):
        seen.append((len(data), getattr(data, "obj", None)))
        return real(data, *crc)
    monkeypatch.setattr(C, "_crc", spy)
    feed_arriving(conn, b"".join(pdus), 100)     # the first payload entirely in place, too
    big = [(n, o) for n, o in seen if n > 1000]
    # Payload + digest in one call where the next header followed in the same read; the last
    # PDU's digest comes alone, so its payload CRC is continued over the 4 digest bytes.
    assert big == [(131072 + 4, bufs[0]), (131072 + 4, bufs[1]), (131072, bufs[2])]
    assert seen[-1][0] == 4
    assert len(done) == 3


# ---------------------------------------------------------------------------------------------
# digest errors

def _corrupt(pdu: bytes, where: int) -> bytes:
    b = bytearray(pdu)
    b[where] ^= 0x01
    return bytes(b)


async def _expect_drop(conn, done, t, stream, sizes, what):
    feed_until_closed(conn, stream, sizes)
    assert conn.closed and isinstance(conn.close_reason, ProtocolViolation)
    assert what in str(conn.close_reason)
    assert t in done and t.exc is not None and t.status == -1, "failed by the loss, never completed"


def feed_until_closed(conn, data: bytes, sizes: list[int]) -> None:
    pos, i = 0, 0
    while pos < len(data) and not conn.closed:
        buf = conn.get_buffer(-1)
        n = min(len(buf), len(data) - pos, sizes[i % len(sizes)] if sizes else len(data))
        buf[:n] = data[pos:pos + n]
        conn.buffer_updated(n)
        pos += n
        i += 1


@pytest.mark.parametrize("sizes", [[], [1], [30, 2000]])
@pytest.mark.parametrize("field", ["bhs", "hdigest"])
async def test_bad_header_digest_in_staging_drops_the_connection(sizes, field):
    s, conn, wire = logged_in(header_digest=True, data_digest=True)
    done: list[Task] = []
    t = Task(0, scsi.read16(0, 8), 4096, None, None, 1, done.append)
    s.submit(t)
    pdu = enc(data_in(t, os.urandom(4096), 0), True, True)
    await _expect_drop(conn, done, t, _corrupt(pdu, 20 if field == "bhs" else 49), sizes, "header digest")


@pytest.mark.parametrize("where", ["payload", "digest", "pad"])
@pytest.mark.parametrize("sizes", [[], [1], [100, 3000]])
async def test_bad_data_digest_in_staging_drops_the_connection(where, sizes):
    s, conn, wire = logged_in(header_digest=True, data_digest=True)
    done: list[Task] = []
    t = Task(0, scsi.read16(0, 8), 4095, None, None, 1, done.append)
    s.submit(t)
    pdu = enc(data_in(t, os.urandom(4095), 0), True, True)
    at = {"payload": 52 + 1000, "pad": 52 + 4095, "digest": len(pdu) - 2}[where]
    await _expect_drop(conn, done, t, _corrupt(pdu, at), sizes, "data digest")


@pytest.mark.parametrize("room", [0, C.RX_ROOM])
@pytest.mark.parametrize("n", [131072, 70001])
@pytest.mark.parametrize("where", ["payload", "digest"])
@pytest.mark.parametrize("first", [100, 65536])
async def test_bad_data_digest_of_a_payload_in_place_drops_the_connection(room, n, where, first):
    s, conn, wire = logged_in(header_digest=True, data_digest=True)
    done: list[Task] = []
    tasks = [Task(0, scsi.read16(i, 1), n, None, bytearray(n + room), 1, done.append) for i in range(2)]
    for t in tasks:
        s.submit(t)
    pdus = [enc(data_in(t, os.urandom(n), i), True, True) for i, t in enumerate(tasks)]
    pad = -n & 3
    second = _corrupt(pdus[1], 52 + 5000 if where == "payload" else 52 + n + pad + 1)
    # A NOP-In after it: with room, the bad digest is found in the read that also brings that.
    stream = pdus[0] + second + enc(P.NopIn(itt=P.RESERVED_TAG, ttt=P.RESERVED_TAG, statsn=STATSN0 + 2,
                                            expcmdsn=10, maxcmdsn=75), True, True)
    asked: list[int] = []
    pos, arrived = 0, first
    while pos < len(stream) and not conn.closed:
        buf = conn.get_buffer(-1)
        asked.append(len(buf))
        k = min(len(buf), arrived - pos)
        buf[:k] = stream[pos:pos + k]
        conn.buffer_updated(k)
        pos += k
        arrived = len(stream)
    assert done[0] is tasks[0] and tasks[0].status == 0 and bytes(tasks[0].data) == pdus[0][52:52 + n]
    assert conn.closed and "data digest" in str(conn.close_reason)
    assert tasks[1].exc is not None and tasks[1].status == -1


@pytest.mark.parametrize("room", [0, C.RX_ROOM])
async def test_bad_header_digest_after_a_payload_in_place_drops_the_connection(room):
    s, conn, done, tasks, bufs, payloads, pdus = _large_reads(3, room)
    stream = pdus[0] + _corrupt(pdus[1], 49) + pdus[2]
    feed_until_closed(conn, stream, [65536, 1 << 20])
    assert conn.closed and "header digest" in str(conn.close_reason)
    assert tasks[0].status == 0 and tasks[1].status == -1 and tasks[1].exc is not None


async def test_digest_options_separately_frame_correctly():
    # Header digest only: no 4 bytes after the data; data digest only: none after the BHS.
    for hd, dd in DIGESTS:
        s, conn, done, tasks, bufs, payloads, pdus = _large_reads(2, C.RX_ROOM, hd, dd, size=40000)
        feed(conn, b"".join(pdus), [3000, 1 << 20])
        assert not conn.closed, (hd, dd, conn.close_reason)
        assert [bytes(b[:40000]) for b in bufs] == payloads and len(done) == 2


@pytest.mark.parametrize("n", [4096, 4097, 130001])
async def test_write_with_digests_sends_what_the_shared_reader_accepts(n):
    # The first burst as immediate data, the rest as Data-Out on an R2T; every header and data
    # segment (pad included) digested, and the shared codec's reader checks every digest.
    s, conn, wire = logged_in(header_digest=True, data_digest=True)
    s._immediate, s._initial_r2t, s._first_burst = True, False, 65536
    done: list[Task] = []
    data = os.urandom(n)
    t = Task(0, scsi.write16(0, (n + 511) // 512), 0, data, None, 1, done.append)
    s.submit(t)
    await asyncio.sleep(0)
    if n > 65536:      # the rest on an R2T
        feed(conn, enc(P.R2T(itt=t.itt, ttt=77, statsn=STATSN0, expcmdsn=8, maxcmdsn=70, r2tsn=0,
                             offset=65536, length=n - 65536), True, True), [])
    reader = framing.PduReader(allowed=P.INITIATOR_OPCODES, header_digest=True, data_digest=True,
                               max_data_segment=1 << 24)
    got = reader.feed(b"".join(wire.writes))
    sent = bytearray(n)
    for p in got:
        off = p.offset if isinstance(p, P.DataOut) else 0
        sent[off:off + len(p.data)] = p.data
    assert bytes(sent) == data
    assert isinstance(got[0], P.ScsiCommandPdu) and len(got[0].data) == min(n, 65536)


async def test_too_long_data_segment_drops_the_connection():
    s, conn, wire = logged_in(header_digest=True, data_digest=True)
    done: list[Task] = []
    t = Task(0, scsi.read16(0, 8), 4096, None, None, 1, done.append)
    s.submit(t)
    header = bytearray(enc(data_in(t, b"", 0), True, True))
    header[5:8] = (300000).to_bytes(3, "big")            # > our MaxRecvDataSegmentLength
    header[48:52] = digest.digest_bytes(bytes(header[:48]))
    await _expect_drop(conn, done, t, bytes(header) + bytes(4096), [], "too long")


async def test_large_data_in_for_an_unknown_task_is_discarded_in_place():
    s, conn, done, tasks, bufs, payloads, pdus = _large_reads(2, C.RX_ROOM)
    stray = P.DataIn(itt=0x7777, data=os.urandom(131072), statsn=STATSN0, expcmdsn=8, maxcmdsn=70)
    stream = pdus[0] + enc(stray, True, True) + pdus[1]
    feed(conn, stream, [100, 1 << 20])
    assert not conn.closed, conn.close_reason
    assert [bytes(b[:131072]) for b in bufs] == payloads and len(done) == 2


async def test_many_small_pdus_through_a_full_staging_buffer():
    # More than the staging buffer holds, in reads that end mid-PDU: the unparsed tail moves
    # to the front (compaction) and nothing is lost.
    s, conn, wire = logged_in(header_digest=True, data_digest=True, window=1024)
    done: list[Task] = []
    tasks = [Task(0, scsi.read16(i, 8), 4093, None, None, 1, done.append) for i in range(400)]
    for t in tasks:
        s.submit(t)
    payloads = [os.urandom(4093) for _ in tasks]
    stream = b"".join(enc(data_in(t, d, i), True, True) for i, (t, d) in enumerate(zip(tasks, payloads)))
    feed(conn, stream, [C.STAGING_SIZE - 1000, 333333])
    assert not conn.closed, conn.close_reason
    assert [bytes(t.data) for t in tasks] == payloads and len(done) == 400
