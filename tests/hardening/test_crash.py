"""Short version of tools/crashtest.py: kill -9 of the target at random moments during verified
writes; every write acknowledged with FUA, or followed by an acknowledged SYNCHRONIZE CACHE, is in
the image and served by the restarted target.  SANSTACK_CRASH_TRIALS sets the count (default 5;
the full run is ``python -m tools.crashtest`` with 100)."""
from __future__ import annotations

import os

from tools.crashtest import run_trials, summary

TRIALS = int(os.environ.get("SANSTACK_CRASH_TRIALS", "5"))


def test_acknowledged_durable_writes_survive_kill9(tmp_path):
    results = run_trials(tmp_path, TRIALS, seed=20261126, verbose=True)
    print(summary(results))
    assert len(results) == TRIALS
    # A kill in the first 100 ms may come before the first acknowledgement; later ones may not.
    assert all(t.durable > 0 for t in results if t.killed_at >= 0.1), "a trial acknowledged nothing durable"
    assert sum(t.durable for t in results) > 0, "nothing acknowledged durable: the test proved nothing"
    assert sum(t.fua_acked for t in results) > 0 and sum(t.synced for t in results) > 0
    lost = [(t.index, t.lost, t.lost_after_restart) for t in results if t.lost or t.lost_after_restart]
    assert not lost, f"acknowledged durable writes lost (trial, LBAs in image, LBAs after restart): {lost}"
