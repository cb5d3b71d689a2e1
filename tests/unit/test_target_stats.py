"""iscsi/target/stats.py: rates between two ``status`` samples, as ``iscsi-target stats`` prints them."""
from __future__ import annotations

import pytest

from iscsi.target import stats as S

T, A, B = "iqn.2026-11.org.x:t", "iqn.2026-11.org.x:a", "iqn.2026-11.org.x:b"


def _session(initiator: str, tsih: int, commands: int, rx: int, tx: int, seconds: float) -> dict:
    return {"target": T, "initiator": initiator, "isid": "400000000001", "tsih": tsih, "type": "Normal",
            "stats": {"commands": commands, "rx_bytes": rx, "tx_bytes": tx, "seconds": seconds}}


def test_rates_divide_by_the_daemon_clock_between_samples():
    before = {"clock": 100.0, "sessions": [_session(A, 1, 1_000, 10_000_000, 0, 50.0)]}
    after = {"clock": 102.0, "sessions": [_session(A, 1, 5_000, 30_000_000, 8_000_000, 52.0)]}
    (row,) = S.rates(before, after)
    assert row["cmds_per_s"] == pytest.approx(2_000)
    assert row["rx_mb_per_s"] == pytest.approx(10.0)
    assert row["tx_mb_per_s"] == pytest.approx(4.0)


def test_a_session_that_logged_in_between_samples_counts_from_its_login():
    before = {"clock": 10.0, "sessions": [_session(A, 1, 0, 0, 0, 5.0)]}
    after = {"clock": 12.0, "sessions": [_session(A, 1, 0, 0, 0, 7.0), _session(B, 2, 500, 0, 1_000_000, 0.5)]}
    rows = {r["initiator"]: r for r in S.rates(before, after)}
    assert rows[A]["cmds_per_s"] == 0
    assert rows[B]["cmds_per_s"] == pytest.approx(1_000)   # 500 commands in its 0.5 s
    assert rows[B]["tx_mb_per_s"] == pytest.approx(2.0)


def test_ended_sessions_are_dropped_and_a_relogin_is_a_new_session():
    before = {"clock": 0.0, "sessions": [_session(A, 1, 9_000, 0, 0, 30.0)]}
    # Same initiator, new TSIH: its counters started again at its login 1 s ago.
    after = {"clock": 1.0, "sessions": [_session(A, 3, 100, 0, 0, 1.0)]}
    (row,) = S.rates(before, after)
    assert row["tsih"] == 3 and row["cmds_per_s"] == pytest.approx(100)


def test_counters_that_went_backwards_are_measured_from_zero():
    # The daemon restarted between samples and TSIHs repeat: never a negative rate.
    before = {"clock": 500.0, "sessions": [_session(A, 1, 9_000, 9_000, 9_000, 400.0)]}
    after = {"clock": 2.0, "sessions": [_session(A, 1, 10, 2_000_000, 0, 2.0)]}
    (row,) = S.rates(before, after)
    assert row["cmds_per_s"] == pytest.approx(5) and row["rx_mb_per_s"] == pytest.approx(1.0)


def test_totals_and_display():
    before = {"clock": 0.0, "sessions": [_session(A, 1, 0, 0, 0, 1.0), _session(B, 2, 0, 0, 0, 1.0)]}
    after = {"clock": 1.0, "sessions": [_session(A, 1, 10, 1_500_000, 0, 2.0),
                                        _session(B, 2, 20, 0, 2_250_000, 2.0)]}
    total = S.totals(S.rates(before, after))
    assert total["cmds_per_s"] == 30 and total["initiator"] == "2 session(s)"
    shown = S.display(total)
    assert (shown["cmds_per_s"], shown["rx_mb_per_s"], shown["tx_mb_per_s"]) == ("30", "1.5", "2.2")


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 << 30, "5.0 GiB")])
def test_human_bytes(n, text):
    assert S.human_bytes(n) == text


# ------------------------------------------------------------------ lun list: thin images


def _lun(path: str, size: int, allocated: int | None, fs_free: int | None, fs_id: int | None = 7) -> dict:
    return {"path": path, "size": size, "allocated": allocated, "fs_free": fs_free, "fs_id": fs_id}


def test_allocation_cell():
    assert S.allocation(None, 1 << 30) == "-"
    assert S.allocation(256 << 20, 1 << 30) == "256.0 MiB (25%)"
    assert S.allocation(4096, None) == "4.0 KiB"


def test_overcommitted_filesystem_is_named_once_with_its_luns():
    gib = 1 << 30
    luns = [_lun("/a.img", 10 * gib, 1 * gib, 5 * gib), _lun("/b.img", 4 * gib, 4 * gib, 5 * gib),
            _lun("/other/c.img", 100 * gib, 0, 1 * gib, fs_id=8)]
    (first, second) = S.overcommitted(luns)
    # fs 7: a.img can grow by 9 GiB, b.img is full: 9 GiB against 5 GiB free.
    assert "/a.img, /b.img" in first and "9.0 GiB" in first and "5.0 GiB free" in first
    assert "/other/c.img" in second and "100.0 GiB" in second
    # Enough room, or nothing known about the image: no warning.
    assert S.overcommitted([_lun("/a.img", 10 * gib, 1 * gib, 9 * gib)]) == []
    assert S.overcommitted([_lun("/a.img", 10 * gib, None, None, fs_id=None)]) == []


# ------------------------------------------------------------------ stats --luns


def _lu(lun: int, reads: int, read_bytes: int, writes: int, written: int, other: int) -> dict:
    return {"target": T, "lun": lun, "reads": reads, "read_bytes": read_bytes, "writes": writes,
            "written_bytes": written, "other_commands": other}


def test_lun_rates_per_second_over_the_daemon_clock():
    before = {"clock": 50.0, "lun_io": [_lu(0, 100, 409_600, 10, 40_960, 3), _lu(1, 0, 0, 0, 0, 0)]}
    after = {"clock": 52.0, "lun_io": [_lu(0, 2_100, 8_409_600, 1_010, 4_040_960, 7), _lu(1, 0, 0, 0, 0, 0),
                                       _lu(2, 10, 1_000_000, 0, 0, 0)]}
    rows = {r["lun"]: r for r in S.lun_rates(before, after)}
    assert rows[0]["reads_per_s"] == pytest.approx(1_000) and rows[0]["read_mb_per_s"] == pytest.approx(4.0)
    assert rows[0]["writes_per_s"] == pytest.approx(500) and rows[0]["write_mb_per_s"] == pytest.approx(2.0)
    assert rows[0]["other_per_s"] == pytest.approx(2)
    assert rows[1]["reads_per_s"] == 0
    assert rows[2]["reads_per_s"] == pytest.approx(5)  # added between the samples: from zero
    shown = S.display_lun(rows[0])
    assert (shown["reads_per_s"], shown["read_mb_per_s"]) == ("1000", "4.0")


def test_lun_counters_that_went_backwards_count_from_zero():
    before = {"clock": 0.0, "lun_io": [_lu(0, 9_000, 9_000, 9_000, 9_000, 9)]}
    after = {"clock": 1.0, "lun_io": [_lu(0, 4, 4_000_000, 0, 0, 1)]}
    (row,) = S.lun_rates(before, after)
    assert row["reads_per_s"] == 4 and row["read_mb_per_s"] == pytest.approx(4.0) and row["writes_per_s"] == 0
