"""Scale check of issue 6: 256 concurrent sessions and 1024 LUNs on one daemon, no error.

For each daemon (our target; tgtd too when installed, for comparison):

1. memory per LUN: the daemon's idle RSS serving 1 LUN, then (a fresh daemon) serving
   ``--luns`` LUNs of small sparse images, one target: (RSS_n - RSS_1) / (n - 1);
2. memory per idle session: RSS before and after ``--sessions`` sessions have logged in
   (our initiator library, one process, logins ``LOGIN_CONCURRENCY`` at a time, distinct
   initiator names), all held open at once: delta / sessions;
3. I/O on every session at once: each session opens its share of the LUNs (every LUN is used
   by some session), writes 4 KiB of a pattern unique to (session, LUN), reads it back and
   compares, and reads 64 KiB; RSS again (per active session);
4. all sessions log out; the daemon must still be alive, its log free of tracebacks.

Errors (failed logins, SCSI errors, miscompares, a dead daemon, a traceback in its log) are
counted and listed; the exit status is 1 when there is any, 2 when a tool is missing.

    python -m tools.bench_scale [--sessions 256] [--luns 1024] [--peers sanstack,tgt] [--json FILE]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from iscsi.initiator import BlockDevice, Session, SessionOptions
from iscsi.initiator.login import LoginConfig
from tools.peers import TargetPeer, make_peer
from tools.peers.base import work_dir

#: Logins in flight at once: a burst of 256 SYNs at once would only measure the listen backlog.
LOGIN_CONCURRENCY = 32
#: Each LUN image: small and sparse (1024 of them must cost no disk).
LUN_SIZE = "1M"
#: Let the daemon finish what a burst left behind before its RSS is read.
SETTLE_SECONDS = 1.5
#: Whole phases must end; a hang is an error, not a wait.
PHASE_TIMEOUT = 300.0
#: Our daemon opens every image before it listens; 1024 of them on a busy machine.
START_TIMEOUT = 300.0
IO_BYTES = 4096
READ_BYTES = 65536
INITIATOR_PREFIX = "iqn.2026-11.org.sanstack:scale"


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (proc(5) /proc/PID/status VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class ScaleResult:
    peer: str
    sessions: int
    luns: int
    rss_1lun_kib: int = 0
    rss_nluns_kib: int = 0
    per_lun_kib: float = 0.0
    start_seconds: float = 0.0          # daemon start with all LUNs until it listens
    rss_before_kib: int = 0
    rss_idle_kib: int = 0
    per_idle_session_kib: float = 0.0
    rss_active_kib: int = 0
    per_active_session_kib: float = 0.0
    rss_after_logout_kib: int = 0
    login_seconds: float = 0.0
    io_seconds: float = 0.0
    sessions_up: int = 0
    luns_used: int = 0
    ios: int = 0
    errors: list[str] = field(default_factory=list)


def _scaled_peer(kind: str, workdir: Path, luns: int) -> TargetPeer:
    peer = make_peer(kind, workdir, size=LUN_SIZE, luns=luns)
    if kind == "sanstack":
        peer.use_config = True  # 1024 --lun arguments would work too; a config file is how an admin does it
        peer.start_timeout = START_TIMEOUT
    return peer


def _start(peer: TargetPeer) -> float:
    t0 = time.monotonic()
    peer.start()
    return time.monotonic() - t0


def _stop(peer: TargetPeer) -> None:
    if peer.alive():
        peer.stop()
    if hasattr(peer, "cleanup"):
        peer.cleanup()


def idle_rss(peer: TargetPeer) -> int:
    time.sleep(SETTLE_SECONDS)
    return rss_kib(peer.proc.pid)


def _pattern(sid: int, lun: int) -> bytes:
    head = f"scale session {sid} lun {lun} ".encode()
    return (head * (IO_BYTES // len(head) + 1))[:IO_BYTES]


async def _login_all(peer: TargetPeer, n: int, errors: list[str]) -> list[Session | None]:
    portal = peer.portals[0]
    sem = asyncio.Semaphore(LOGIN_CONCURRENCY)
    # No pings from our side: idle means idle (the target's own NOP-In still runs).
    opts = SessionOptions(noop_interval=0, reconnect=False, fail_fast=True, command_timeout=60.0)

    async def one(sid: int) -> Session | None:
        cfg = LoginConfig(initiator_name=f"{INITIATOR_PREFIX}-{sid:04d}", target_name=peer.iqn)
        async with sem:
            try:
                return await Session.open(portal.host, portal.port, cfg, opts)
            except Exception as exc:  # counted, the run goes on
                errors.append(f"session {sid}: login failed: {type(exc).__name__}: {exc}")
                return None

    return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), PHASE_TIMEOUT)


async def _io_all(peer: TargetPeer, sessions: list[Session | None], errors: list[str]) -> tuple[int, set[int]]:
    nsess, nluns = len(sessions), len(peer.lun_ids)
    used: set[int] = set()
    counter = [0]

    async def one(sid: int, s: Session) -> None:
        # LUN k belongs to session k % nsess; with more sessions than LUNs, sessions share a
        # LUN and write different LBAs.
        mine = [peer.lun_ids[k] for k in range(nluns) if k % nsess == sid % nsess] or \
               [peer.lun_ids[sid % nluns]]
        for lun in mine:
            try:
                dev = await BlockDevice.open(s, lun)
                count = IO_BYTES // dev.block_size
                lba = (sid // nluns) * count % max(1, dev.blocks - count)
                data = _pattern(sid, lun)
                await dev.write(lba, data)
                back = await dev.read(lba, count)
                if bytes(back) != data:
                    errors.append(f"session {sid} lun {lun}: read back differs from what was written")
                await dev.read(0, min(READ_BYTES // dev.block_size, dev.blocks))
                counter[0] += 3
                used.add(lun)
            except Exception as exc:
                errors.append(f"session {sid} lun {lun}: {type(exc).__name__}: {exc}")

    live = [(i, s) for i, s in enumerate(sessions) if s is not None]
    await asyncio.wait_for(asyncio.gather(*(one(i, s) for i, s in live)), PHASE_TIMEOUT)
    return counter[0], used


async def _logout_all(sessions: list[Session | None], errors: list[str]) -> None:
    async def one(i: int, s: Session) -> None:
        try:
            await s.close()
        except Exception as exc:
            errors.append(f"session {i}: logout failed: {type(exc).__name__}: {exc}")

    await asyncio.wait_for(asyncio.gather(*(one(i, s) for i, s in enumerate(sessions) if s is not None)),
                           PHASE_TIMEOUT)


def _log_problems(peer: TargetPeer) -> list[str]:
    text = peer.log_text()
    bad = [ln for ln in text.splitlines() if "Traceback" in ln or " CRITICAL " in ln or " ERROR " in ln]
    return [f"{peer.kind} log: {ln.strip()[:300]}" for ln in bad[:20]]


def run_peer(kind: str, workdir: Path, sessions: int, luns: int, log) -> ScaleResult:
    res = ScaleResult(kind, sessions, luns)
    # -- memory per LUN: 1 LUN, then n LUNs (fresh daemons, same form of configuration)
    one = _scaled_peer(kind, workdir / f"{kind}-1lun", 1)
    try:
        _start(one)
        res.rss_1lun_kib = idle_rss(one)
    finally:
        _stop(one)
    peer = _scaled_peer(kind, workdir / f"{kind}-{luns}luns", luns)
    try:
        res.start_seconds = _start(peer)
        res.rss_nluns_kib = res.rss_before_kib = idle_rss(peer)
        res.per_lun_kib = (res.rss_nluns_kib - res.rss_1lun_kib) / max(1, luns - 1)
        log(f"{kind}: {luns} LUNs up in {res.start_seconds:.1f} s; RSS {res.rss_1lun_kib} KiB with 1 LUN, "
            f"{res.rss_nluns_kib} KiB with {luns} ({res.per_lun_kib:.1f} KiB per LUN)")

        async def drive() -> None:
            t0 = time.monotonic()
            held = await _login_all(peer, sessions, res.errors)
            res.login_seconds = time.monotonic() - t0
            res.sessions_up = sum(1 for s in held if s is not None and s.is_up)
            try:
                await asyncio.sleep(SETTLE_SECONDS)
                res.rss_idle_kib = rss_kib(peer.proc.pid)
                res.per_idle_session_kib = (res.rss_idle_kib - res.rss_before_kib) / max(1, res.sessions_up)
                log(f"{kind}: {res.sessions_up}/{sessions} sessions up in {res.login_seconds:.1f} s; RSS "
                    f"{res.rss_idle_kib} KiB ({res.per_idle_session_kib:.1f} KiB per idle session)")
                t0 = time.monotonic()
                res.ios, used = await _io_all(peer, held, res.errors)
                res.io_seconds = time.monotonic() - t0
                res.luns_used = len(used)
                await asyncio.sleep(SETTLE_SECONDS)
                res.rss_active_kib = rss_kib(peer.proc.pid)
                res.per_active_session_kib = (res.rss_active_kib - res.rss_before_kib) / max(1, res.sessions_up)
                log(f"{kind}: {res.ios} I/Os on {res.luns_used} LUNs through {res.sessions_up} sessions in "
                    f"{res.io_seconds:.1f} s; RSS {res.rss_active_kib} KiB")
                still = sum(1 for s in held if s is not None and s.is_up)
                if still != res.sessions_up:
                    res.errors.append(f"{res.sessions_up - still} sessions dropped during the run")
            finally:
                await _logout_all(held, res.errors)

        asyncio.run(drive())
        if res.sessions_up != sessions:
            res.errors.append(f"only {res.sessions_up} of {sessions} sessions logged in")
        if res.luns_used != luns:
            res.errors.append(f"I/O reached {res.luns_used} of {luns} LUNs")
        if not peer.alive():
            res.errors.append(f"{kind} died (status {peer.proc.returncode})")
        else:
            res.rss_after_logout_kib = idle_rss(peer)
        res.errors += _log_problems(peer)
    except Exception as exc:
        res.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
    finally:
        _stop(peer)
    return res


def format_table(results: list[ScaleResult]) -> str:
    rows = [
        ("sessions logged in, all at once", lambda r: f"{r.sessions_up}/{r.sessions}"),
        ("LUNs on the daemon / reached by I/O", lambda r: f"{r.luns}/{r.luns_used}"),
        ("I/Os (write+verify+64K read per LUN)", lambda r: f"{r.ios}"),
        ("errors", lambda r: f"{len(r.errors)}"),
        ("start with all LUNs (s)", lambda r: f"{r.start_seconds:.1f}"),
        ("log in all sessions (s)", lambda r: f"{r.login_seconds:.1f}"),
        ("RSS, 1 LUN (MiB)", lambda r: f"{r.rss_1lun_kib / 1024:.1f}"),
        ("RSS, all LUNs, no session (MiB)", lambda r: f"{r.rss_nluns_kib / 1024:.1f}"),
        ("memory per LUN (KiB)", lambda r: f"{r.per_lun_kib:.1f}"),
        ("RSS, sessions idle (MiB)", lambda r: f"{r.rss_idle_kib / 1024:.1f}"),
        ("memory per idle session (KiB)", lambda r: f"{r.per_idle_session_kib:.1f}"),
        ("RSS after I/O on every session (MiB)", lambda r: f"{r.rss_active_kib / 1024:.1f}"),
        ("memory per session after I/O (KiB)", lambda r: f"{r.per_active_session_kib:.1f}"),
        ("RSS after all logged out (MiB)", lambda r: f"{r.rss_after_logout_kib / 1024:.1f}"),
    ]
    head = f"{'':<40}" + "".join(f"{r.peer:>14}" for r in results)
    lines = [head, "-" * len(head)]
    for label, fn in rows:
        lines.append(f"{label:<40}" + "".join(f"{fn(r):>14}" for r in results))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=256)
    ap.add_argument("--luns", type=int, default=1024)
    ap.add_argument("--peers", default=None, help="comma list of sanstack,tgt (default: both when tgtd is installed)")
    ap.add_argument("--workdir", type=Path, help="keep images and logs here (default: temp dir, removed)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.peers is None:
        kinds = ["sanstack"] + (["tgt"] if shutil.which("tgtd") and shutil.which("tgtadm") else [])
    else:
        kinds = [k.strip() for k in args.peers.split(",") if k.strip()]
    if "tgt" in kinds and not shutil.which("tgtd"):
        print("tgtd missing (Debian package tgt)", file=sys.stderr)
        return 2
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    load_start = os.getloadavg()
    with work_dir(args.workdir, "bench-scale-") as workdir:
        results = [run_peer(k, workdir, args.sessions, args.luns, log) for k in kinds]
    load_end = os.getloadavg()
    print(format_table(results))
    for r in results:
        for e in r.errors[:50]:
            print(f"ERROR {r.peer}: {e}")
    print(f"load average at start {load_start[0]:.2f}/{load_start[1]:.2f}/{load_start[2]:.2f}, "
          f"at end {load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f}; {os.cpu_count()} CPUs")
    if args.json:
        args.json.write_text(json.dumps({"results": [asdict(r) for r in results], "load_start": load_start,
                                         "load_end": load_end}, indent=1) + "\n")
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
