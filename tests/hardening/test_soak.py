"""Short version of tools/soak.py against a fresh daemon (the full run: python -m tools.soak).

64 sessions x 32 commands in flight with verified data for SANSTACK_SOAK_SECONDS (default 20 s),
then 1000 login/logout cycles: no error, target RSS flat, NOP-Out answered within 1 s while
loaded, memory and file descriptors back after the cycles.
"""
from __future__ import annotations

import asyncio
import os

from tools.peers.sanstack import SanstackPeer
from tools.soak import NOP_LIMIT, lun_bytes_needed, soak

SECONDS = float(os.environ.get("SANSTACK_SOAK_SECONDS", "20"))
SESSIONS, DEPTH, CYCLES = 64, 32, 1000


def test_soak_64_sessions_32_deep_and_1000_logins(tmp_path):
    peer = SanstackPeer.create(tmp_path, size=lun_bytes_needed(SESSIONS + 2, DEPTH))
    peer.start()
    try:
        fig = asyncio.run(soak(peer.portals[0].host, peer.portals[0].port, peer.iqn, peer.proc.pid,
                               sessions=SESSIONS, depth=DEPTH, seconds=SECONDS, cycles=CYCLES))
        report = fig.report()
        print("\n" + report)
        assert peer.alive(), "target died during the soak"
        assert not fig.errors, report
        assert fig.reads > 0 and fig.writes > 0 and fig.verified > 0, report
        assert fig.rss_flat[0], report
        assert fig.nop_dedicated and max(fig.nop_dedicated) < NOP_LIMIT, report
        assert fig.nop_loaded_sep and max(fig.nop_loaded_sep) < NOP_LIMIT, report
        assert fig.cycles == CYCLES and not fig.cycle_errors, report
        assert fig.ok(), report
    finally:
        peer.stop()
        peer.cleanup()
