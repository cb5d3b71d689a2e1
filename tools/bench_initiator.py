"""``iscsi-initiator bench`` against libiscsi's ``iscsi-perf``, same tgtd, one run.

Starts one isolated tgtd (tools/peers/tgt.py) with a LUN, then for each workload runs the
two initiators in alternation for ``--runs`` runs of ``--seconds`` each (so drift in the
machine's load hits both alike) and prints the median IOPS/MB/s of each and the ratio
ours / libiscsi.  Workloads (issue 6): 4 KiB random read at QD 32, 128 KiB sequential read
at QD 16.  Aim: ratio ≥ 1.0.

CPU per I/O (user+system µs) is printed beside the rates because it survives a busy machine
better than IOPS do: ours as measured by the benchmark loop around its I/O, iscsi-perf's for
its whole process (login included), and tgtd's over each run (all its threads).

    python -m tools.bench_initiator [--seconds 5] [--runs 3] [--size 1G] [--fill] [--json]

Benchmarks are not tests: nothing here asserts; it prints numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.peers.base import children_cpu_seconds, process_cpu_seconds  # noqa: E402
from tools.peers.tgt import TgtPeer, available as tgt_problem  # noqa: E402

INITIATOR = "iqn.2026-11.org.sanstack:bench"
#: (name, bytes per I/O, queue depth, random?)
WORKLOADS = [("4k-randread-qd32", 4096, 32, True), ("128k-seqread-qd16", 131072, 16, False)]
_IOPS = re.compile(r"iops average (\d+)")


def _proc_cpu(pid: int | None) -> float:
    """User+system seconds of a process and all its threads so far (0 if unknown or gone)."""
    if pid is None:
        return 0.0
    try:
        return process_cpu_seconds(pid)
    except OSError:
        return 0.0


def run_iscsi_perf(url: str, bs: int, qd: int, random: bool, seconds: int) -> dict:
    cmd = ["iscsi-perf", "-i", INITIATOR, "-m", str(qd), "-b", str(bs // 512), "-t", str(seconds)]
    if random:
        cmd.append("-r")
    cpu0 = children_cpu_seconds()
    res = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=seconds + 60)
    cpu = children_cpu_seconds() - cpu0
    found = _IOPS.findall(res.stdout.replace("\r", "\n"))
    if not found:
        raise RuntimeError(f"iscsi-perf printed no result: {res.stdout[-500:]} {res.stderr[-500:]}")
    iops = float(found[-1])
    ios = iops * seconds
    return {"iops": iops, "MB/s": iops * bs / 1e6, "ios": ios, "cpu_us": cpu / ios * 1e6 if ios else 0.0}


_DIGESTS = re.compile(r"session\.login .*digests=(True|False)/(True|False)")


def run_ours(url: str, bs: int, qd: int, random: bool, seconds: float,
             keys: dict[str, str] | None = None) -> dict:
    """``iscsi-initiator bench``; ``keys`` are login preferences (``-k``), e.g. digests.

    The result's ``digests`` is what the login negotiated, "header/data" (e.g. "CRC32C/None"),
    read from the initiator's own INFO log so a caller can check digests really were on.
    """
    cmd = [sys.executable, "-m", "iscsi.initiator.cli", "-i", INITIATOR, "--log-level", "INFO"]
    for name, value in (keys or {}).items():
        cmd += ["-k", f"{name}={value}"]
    cmd += ["bench", url, "--rw", "randread" if random else "read", "--bs", str(bs), "--qd", str(qd),
            "--runtime", f"{seconds:g}", "--json"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, env=env,
                         stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise RuntimeError(f"iscsi-initiator bench failed: {res.stderr[-800:]}")
    out = json.loads(res.stdout)
    m = _DIGESTS.search(res.stderr)
    digests = "/".join("CRC32C" if v == "True" else "None" for v in m.groups()) if m else "unknown"
    cpu = out.get("cpu_us_per_io", {})
    return {"iops": out["iops"], "MB/s": out["MB/s"], "ios": out["ios"], "errors": out["errors"],
            "p99_us": out["lat_us"]["p99"], "cpu_us": cpu.get("user", 0.0) + cpu.get("sys", 0.0),
            "digests": digests}


def _with_tgtd_cpu(peer: TgtPeer, fn: Callable[..., dict], *args) -> dict:
    """Run one benchmark and add tgtd's CPU per I/O over it."""
    pid = peer.proc.pid if peer.proc is not None else None
    before = _proc_cpu(pid)
    r = fn(*args)
    r["tgtd_cpu_us"] = (_proc_cpu(pid) - before) / r["ios"] * 1e6 if r["ios"] else 0.0
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--runs", "--rounds", dest="runs", type=int, default=3,
                    help="alternating runs of each initiator per workload (medians are reported)")
    ap.add_argument("--size", default="1G")
    ap.add_argument("--fill", action="store_true", help="write random data over the LUN image first")
    ap.add_argument("--only", choices=[w[0] for w in WORKLOADS], help="run one workload")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    problem = tgt_problem() or (None if shutil.which("iscsi-perf") else "iscsi-perf missing (libiscsi-bin)")
    if problem:
        print(f"cannot run: {problem}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-initiator-"))
    peer = TgtPeer.create(work, size=args.size)
    if args.fill:
        with open(peer.luns[0].path, "wb") as f:
            left = peer.luns[0].size
            while left:
                n = min(left, 1 << 24)
                f.write(os.urandom(n))
                left -= n
    results = {}
    try:
        peer.start()
        url = peer.url()
        for name, bs, qd, rnd in WORKLOADS:
            if args.only and name != args.only:
                continue
            theirs, ours = [], []
            for _ in range(args.runs):
                theirs.append(_with_tgtd_cpu(peer, run_iscsi_perf, url, bs, qd, rnd, args.seconds))
                ours.append(_with_tgtd_cpu(peer, run_ours, url, bs, qd, rnd, args.seconds))

            def med(rs: list[dict], key: str) -> float:
                return statistics.median(r[key] for r in rs)

            t, o = med(theirs, "iops"), med(ours, "iops")
            results[name] = {
                "libiscsi_iops": round(t), "ours_iops": round(o),
                "libiscsi_MB/s": round(t * bs / 1e6, 1), "ours_MB/s": round(o * bs / 1e6, 1),
                "ratio": round(o / t, 3) if t else None,
                "cpu_us_per_io": {"libiscsi": round(med(theirs, "cpu_us"), 2), "ours": round(med(ours, "cpu_us"), 2),
                                  "tgtd_with_libiscsi": round(med(theirs, "tgtd_cpu_us"), 2),
                                  "tgtd_with_ours": round(med(ours, "tgtd_cpu_us"), 2)},
                "runs": {"libiscsi": [round(r["iops"]) for r in theirs], "ours": [round(r["iops"]) for r in ours]},
            }
            if not args.json:
                r = results[name]
                c = r["cpu_us_per_io"]
                print(f"{name:>20}: libiscsi {r['libiscsi_iops']:>7} IOPS {r['libiscsi_MB/s']:>8} MB/s | "
                      f"ours {r['ours_iops']:>7} IOPS {r['ours_MB/s']:>8} MB/s | ratio {r['ratio']}\n"
                      f"{'':>20}  CPU us/IO: libiscsi {c['libiscsi']}, ours {c['ours']}; tgtd "
                      f"{c['tgtd_with_libiscsi']} (with libiscsi) / {c['tgtd_with_ours']} (with ours); "
                      f"runs {r['runs']['libiscsi']} / {r['runs']['ours']}", flush=True)
    finally:
        peer.stop()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
