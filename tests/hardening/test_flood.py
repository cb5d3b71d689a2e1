"""Half-open connections and logins that never finish (RFC 7143 §6: the login phase is bounded).

300 connections that open and stall -- one third silent, one third with half a BHS, one third
in the middle of a login (first PDU sent, T=0, never continued) -- while a witness session keeps
doing verified I/O.  Every stalled connection is closed by the target within its login timeout
(LOGIN_TIMEOUT, 15 s), its memory and file descriptors come back, and the witness never fails.
"""
from __future__ import annotations

import socket
import time

from iscsi import keys as K
from iscsi import pdu as P
from iscsi.target.connection import LOGIN_TIMEOUT

from .conftest import RSS_GROWTH_LIMIT, open_fds, rss_bytes

FLOOD = 300
#: The target's login timer plus the time to notice the close on a loaded 2-core machine.
DROP_DEADLINE = LOGIN_TIMEOUT + 10


def _stalled(host: str, port: int, kind: int, iqn: str) -> socket.socket:
    s = socket.create_connection((host, port), timeout=5)
    if kind == 1:
        s.sendall(P.NopOut(itt=1).header()[:20])
    elif kind == 2:
        text = K.encode_text([("InitiatorName", "iqn.2026-11.org.sanstack.hardening:stall"),
                              ("TargetName", iqn), ("SessionType", "Normal"), ("AuthMethod", "None")])
        s.sendall(P.LoginRequest(transit=False, csg=0, nsg=1, isid=0x400000000100 + kind, itt=1, data=text).encode())
    s.setblocking(False)
    return s


def test_half_open_flood_is_reaped_and_others_keep_working(daemon, witness):
    pid = daemon.proc.pid
    host, port = daemon.portals[0].host, daemon.portals[0].port
    rss0, fds0 = rss_bytes(pid), open_fds(pid)
    socks = [_stalled(host, port, i % 3, daemon.iqn) for i in range(FLOOD)]
    t0 = time.monotonic()
    peak_rss, peak_fds, checks = rss0, fds0, 0
    open_socks = set(range(FLOOD))
    while open_socks and time.monotonic() - t0 < DROP_DEADLINE:
        witness.check()  # verified I/O on the established sessions throughout
        checks += 1
        peak_rss, peak_fds = max(peak_rss, rss_bytes(pid)), max(peak_fds, open_fds(pid))
        for i in list(open_socks):
            try:
                data = socks[i].recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data and i % 3 != 2:
                raise AssertionError(f"target answered a connection that sent no whole PDU: {data[:48]!r}")
            if not data:  # closed by the target (a login response before that is fine)
                open_socks.discard(i)
        time.sleep(0.5)
    elapsed = time.monotonic() - t0
    for s in socks:
        s.close()
    assert not open_socks, f"{len(open_socks)} stalled connections still open after {elapsed:.0f} s"
    assert peak_fds >= fds0 + FLOOD * 0.9, "the flood did not reach the target (test broken?)"
    assert checks >= 5
    time.sleep(1)
    assert daemon.alive()
    assert rss_bytes(pid) - rss0 < RSS_GROWTH_LIMIT
    assert peak_rss - rss0 < RSS_GROWTH_LIMIT, f"{FLOOD} stalled logins cost {(peak_rss - rss0) >> 20} MiB"
    assert open_fds(pid) <= fds0 + 2, "file descriptors of reaped connections leaked"
    witness.check()
    print(f"flood: {FLOOD} stalled connections reaped in {elapsed:.1f} s; peak RSS +{(peak_rss - rss0) >> 10} KiB, "
          f"peak fds {peak_fds} (base {fds0}); witness checks during flood: {checks}")
