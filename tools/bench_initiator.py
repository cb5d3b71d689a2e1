"""``iscsi-initiator bench`` against libiscsi's ``iscsi-perf``, same tgtd, one run.

Starts one isolated tgtd (tools/peers/tgt.py) with a LUN, then for each workload runs the
two initiators in alternation for ``--rounds`` rounds of ``--seconds`` each (so drift in
the machine's load hits both alike) and prints the median IOPS/MB/s of each and the ratio
ours / libiscsi.  Workloads (issue 6): 4 KiB random read at QD 32, 128 KiB sequential read
at QD 16.  Aim: ratio ≥ 1.0.

    python -m tools.bench_initiator [--seconds 5] [--rounds 3] [--size 1G] [--fill] [--json]

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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.peers.tgt import TgtPeer, available as tgt_problem  # noqa: E402

INITIATOR = "iqn.2026-11.org.sanstack:bench"
#: (name, bytes per I/O, queue depth, random?)
WORKLOADS = [("4k-randread-qd32", 4096, 32, True), ("128k-seqread-qd16", 131072, 16, False)]
_IOPS = re.compile(r"iops average (\d+)")


def run_iscsi_perf(url: str, bs: int, qd: int, random: bool, seconds: int) -> dict:
    cmd = ["iscsi-perf", "-i", INITIATOR, "-m", str(qd), "-b", str(bs // 512), "-t", str(seconds)]
    if random:
        cmd.append("-r")
    res = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=seconds + 60)
    found = _IOPS.findall(res.stdout.replace("\r", "\n"))
    if not found:
        raise RuntimeError(f"iscsi-perf printed no result: {res.stdout[-500:]} {res.stderr[-500:]}")
    iops = float(found[-1])
    return {"iops": iops, "MB/s": iops * bs / 1e6}


#: The initiator logs its negotiated digests at INFO ("session.login ... digests=True/False").
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
    return {"iops": out["iops"], "MB/s": out["MB/s"], "p99_us": out["lat_us"]["p99"], "errors": out["errors"],
            "digests": digests}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--fill", action="store_true", help="write random data over the LUN image first")
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
            theirs, ours = [], []
            for _ in range(args.rounds):
                theirs.append(run_iscsi_perf(url, bs, qd, rnd, args.seconds))
                ours.append(run_ours(url, bs, qd, rnd, args.seconds))
            t = statistics.median(r["iops"] for r in theirs)
            o = statistics.median(r["iops"] for r in ours)
            results[name] = {"libiscsi_iops": round(t), "ours_iops": round(o),
                             "libiscsi_MB/s": round(t * bs / 1e6, 1), "ours_MB/s": round(o * bs / 1e6, 1),
                             "ratio": round(o / t, 3) if t else None,
                             "rounds": {"libiscsi": [round(r["iops"]) for r in theirs],
                                        "ours": [round(r["iops"]) for r in ours]}}
            if not args.json:
                r = results[name]
                print(f"{name:>20}: libiscsi {r['libiscsi_iops']:>7} IOPS {r['libiscsi_MB/s']:>8} MB/s | "
                      f"ours {r['ours_iops']:>7} IOPS {r['ours_MB/s']:>8} MB/s | ratio {r['ratio']}", flush=True)
    finally:
        peer.stop()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
