"""Sans-IO session rules: serial arithmetic, the CmdSN window, R2T arithmetic, Data-In split."""
import pytest

from iscsi import pdu as P
from iscsi.session import (CommandWindow, DataOutError, StatSequence, WriteTransfer, residual, sn_add,
                           sn_diff, sn_gt, sn_le, sn_lt, split_data_in)


def test_serial_arithmetic_wraps():
    assert sn_lt(0xFFFFFFFF, 0)
    assert sn_gt(5, 0xFFFFFFF0)
    assert sn_le(7, 7)
    assert sn_add(0xFFFFFFFF, 2) == 1
    assert sn_diff(1, 0xFFFFFFFF) == 2
    assert not sn_lt(0, 0x80000000) or not sn_lt(0x80000000, 0)  # undefined pair never both


def test_window_orders_by_cmdsn_and_drops_outside():
    w = CommandWindow(10, depth=4)
    assert w.maxcmdsn == 13
    assert w.arrive(11, "b") == []          # held: 10 missing
    assert w.arrive(10, "a") == ["a", "b"]  # delivered in CmdSN order
    assert w.expcmdsn == 12
    assert w.arrive(9, "old") == []         # below ExpCmdSN: silently ignored (§4.2.2.1)
    assert w.arrive(12 + 4, "far") == []    # beyond MaxCmdSN: silently ignored
    assert w.arrive(12, "c") == ["c"]


def test_window_immediate_does_not_advance():
    w = CommandWindow(5)
    assert w.arrive(5, "imm", immediate=True) == ["imm"]
    assert w.expcmdsn == 5


def test_window_closes_with_in_flight_commands():
    w = CommandWindow(0, depth=2)
    w.in_flight = 2
    assert w.maxcmdsn == sn_add(w.expcmdsn, -1)  # closed window: MaxCmdSN = ExpCmdSN - 1


def test_window_wraps_around_2_32():
    w = CommandWindow(0xFFFFFFFF, depth=8)
    assert w.arrive(0, "second") == []
    assert w.arrive(0xFFFFFFFF, "first") == ["first", "second"]
    assert w.expcmdsn == 1


def test_statsn_acknowledge_only_forward():
    s = StatSequence(100)
    assert [s.next(), s.next()] == [100, 101]
    s.acknowledge(101)
    assert s.expstatsn == 101
    s.acknowledge(50)
    assert s.expstatsn == 101


def _ttts():
    n = iter(range(1, 1000))
    return lambda: next(n)


def test_r2t_arithmetic_1mib_with_64k_first_burst_256k_max_burst():
    mib = 1 << 20
    t = WriteTransfer(total=mib, edtl=mib, max_burst=256 * 1024, first_burst=64 * 1024,
                      max_outstanding_r2t=1, initial_r2t=False)
    t.start(b"\1" * 8192, final=False)  # immediate data, unsolicited Data-Out follows
    assert t.r2ts(_ttts()) == []        # no R2T while unsolicited data is still coming
    # unsolicited Data-Out up to FirstBurstLength
    off, sn = 8192, 0
    while off < 64 * 1024:
        n = min(8192, 64 * 1024 - off)
        t.data_out(P.DataOut(ttt=P.RESERVED_TAG, datasn=sn, offset=off, final=off + n == 64 * 1024,
                             data=b"\2" * n))
        off += n
        sn += 1
    gen = _ttts()
    r2ts = t.r2ts(gen)
    assert r2ts == [(1, 0, 65536, 262144)]  # one outstanding, MaxBurstLength long
    bursts = []
    while r2ts:
        ttt, r2tsn, offset, length = r2ts[0]
        bursts.append((r2tsn, offset, length))
        for i, o in enumerate(range(offset, offset + length, 65536)):
            t.data_out(P.DataOut(ttt=ttt, datasn=i, offset=o, final=o + 65536 >= offset + length,
                                 data=b"\3" * 65536))
        r2ts = t.r2ts(gen)
    assert bursts == [(0, 65536, 262144), (1, 327680, 262144), (2, 589824, 262144), (3, 851968, 196608)]
    assert t.complete
    assert bytes(t.buffer[:8192]) == b"\1" * 8192
    assert t.buffer[-1] == 3


def test_r2t_respects_max_outstanding():
    t = WriteTransfer(total=4 * 4096, edtl=4 * 4096, max_burst=4096, first_burst=65536,
                      max_outstanding_r2t=2, initial_r2t=True)
    t.start(b"", final=True)
    assert len(t.r2ts(_ttts())) == 2


def test_data_out_rejects_bad_datasn_and_offsets():
    t = WriteTransfer(total=8192, edtl=8192, max_burst=8192, first_burst=0, max_outstanding_r2t=1,
                      initial_r2t=True)
    t.start(b"", final=True)
    (ttt, _, _, _), = t.r2ts(_ttts())
    with pytest.raises(DataOutError):
        t.data_out(P.DataOut(ttt=ttt, datasn=1, offset=0, data=b"x" * 512))
    with pytest.raises(DataOutError):
        t.data_out(P.DataOut(ttt=ttt, datasn=0, offset=512, data=b"x" * 512))
    with pytest.raises(DataOutError):
        t.data_out(P.DataOut(ttt=999, datasn=0, offset=0, data=b"x"))
    with pytest.raises(DataOutError):  # more than the R2T asked for
        t.data_out(P.DataOut(ttt=ttt, datasn=0, offset=0, data=b"x" * 8193))


def test_unsolicited_data_refused_when_initial_r2t():
    t = WriteTransfer(total=512, edtl=512, max_burst=512, first_burst=512, max_outstanding_r2t=1,
                      initial_r2t=True)
    with pytest.raises(DataOutError):
        t.start(b"", final=False)


def test_short_target_need_keeps_only_needed_bytes():
    t = WriteTransfer(total=512, edtl=10000, max_burst=65536, first_burst=65536, max_outstanding_r2t=1,
                      initial_r2t=False)
    t.start(b"a" * 10000, final=True)
    assert len(t.buffer) == 512 and t.complete


def test_split_data_in_by_max_recv_data_segment_length():
    assert split_data_in(0, 8192) == []
    assert split_data_in(20000, 8192) == [(0, 8192), (8192, 8192), (16384, 3616)]


@pytest.mark.parametrize("expected,actual,out", [
    (512, 512, (False, False, 0)), (512, 1024, (True, False, 512)), (10000, 512, (False, True, 9488)),
])
def test_residual(expected, actual, out):
    assert residual(expected, actual) == out
