"""Benchmark our target against tgtd, side by side in one go (issue 2; DESIGN.md: "measure
before and after each change against tgt, in one run").

Both daemons run at the same time, each with its own sparse image of the same size (not
pre-written unless ``--prefill``: reads of unwritten blocks then cost both targets the same
kernel path), on loopback. Workloads run one at a time, alternating between the targets, so
neither competes with the other for the 2 CPUs; each figure is the median of ``--runs``.

- 4K random read, QD32:      ``iscsi-perf -r -m 32 -b 8 -t DURATION``   (512-byte blocks)
- 128K sequential read, QD16: ``iscsi-perf -m 16 -b 256 -t DURATION``
- 4K write, QD32:             ``qemu-img bench -f raw -t none -w -s 4096 -d 32 -c N``
  (N calibrated per target so one run lasts about DURATION)

The table shows tgt's figure, ours, and ours/tgt, plus each daemon's CPU use during the run
(from /proc: user+system time of the daemon process over wall time).

    python -m tools.bench_target [--runs 3] [--duration 10] [--size 1G] [--prefill] [--json out.json]

Two helpers for "before/after" work (docs/performance.md):

- ``--before TREE`` adds a peer ``before``: our target run from another checkout (e.g.
  ``git worktree add /tmp/old <commit>``), beside today's, against the same tgtd;
- ``--profile-live DIR`` runs py-spy (sampling, CPU-active stacks only) on our daemon during
  one 4K random read QD32 iscsi-perf run per sanstack peer and prints where its CPU time goes,
  per I/O: each function's share of the samples times the daemon's CPU microseconds per I/O.
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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from tools.peers import TargetPeer, make_peer, parse_size
from tools.peers.base import process_cpu_seconds, work_dir
from tools.peers.sanstack import SanstackPeer

#: A run may take this much longer than asked before it counts as hung (login, ramp-up).
RUN_SLACK = 60.0
PREFILL_CHUNK = 1 << 20


@dataclass
class Workload:
    name: str
    unit: str  # "IOPS" or "MB/s"
    run: Callable[[TargetPeer, float], tuple[float, float]]  # -> (figure, seconds)


@dataclass
class Sample:
    figure: float
    seconds: float
    cpu: float  # daemon CPU seconds / wall seconds


@dataclass
class Result:
    samples: dict[str, list[Sample]] = field(default_factory=dict)  # peer kind -> samples

    def median(self, kind: str) -> float:
        return statistics.median(s.figure for s in self.samples[kind]) if self.samples.get(kind) else float("nan")

    def cpu(self, kind: str) -> float:
        return statistics.median(s.cpu for s in self.samples[kind]) if self.samples.get(kind) else float("nan")


@dataclass
class TreePeer(SanstackPeer):
    """Our target run from another source tree (an older commit checked out beside this one)."""

    kind = "before"
    tree: Path | None = None

    def _env(self) -> dict[str, str]:
        env = super()._env()
        if self.tree is not None:  # first on the path: that tree's iscsi package wins
            env["PYTHONPATH"] = os.pathsep.join([str(self.tree), env["PYTHONPATH"]])
        return env


def build_peer(kind: str, workdir: Path, *, size: str, before: Path | None = None) -> TargetPeer:
    if kind == "before":
        if before is None:
            raise ValueError("peer 'before' needs --before TREE")
        return TreePeer.create(workdir, size=size, tree=before.resolve())
    return make_peer(kind, workdir, size=size)


# --------------------------------------------------------------------------- clients

def _iscsi_perf(peer: TargetPeer, duration: float, *, random: bool, depth: int, blocks: int) -> tuple[str, float]:
    cmd = ["iscsi-perf", "-m", str(depth), "-b", str(blocks), "-t", str(max(1, round(duration)))]
    if random:
        cmd.append("-r")
    start = time.monotonic()
    res = subprocess.run([*cmd, peer.url()], capture_output=True, text=True, errors="replace",
                         timeout=duration + RUN_SLACK, stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - start
    if res.returncode != 0 or "ABORTED" in res.stdout:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stdout[-500:]} {res.stderr[-500:]}")
    return res.stdout, elapsed


def _perf_average(out: str) -> tuple[int, int]:
    """The final 'iops average N (M MB/s)' of iscsi-perf (it redraws one line with \\r)."""
    found = re.findall(r"iops average (\d+) \((\d+) MB/s\)", out)
    if not found:
        raise RuntimeError(f"no 'iops average' in iscsi-perf output: {out[-300:]}")
    iops, mbps = found[-1]
    return int(iops), int(mbps)


def rand_read_4k_qd32(peer: TargetPeer, duration: float) -> tuple[float, float]:
    out, elapsed = _iscsi_perf(peer, duration, random=True, depth=32, blocks=4096 // peer.luns[0].block_size)
    return float(_perf_average(out)[0]), elapsed


def seq_read_qd16(peer: TargetPeer, duration: float, size: int) -> tuple[float, float]:
    """Sequential READs of ``size`` bytes, 16 in flight: (MB/s, seconds)."""
    block = peer.luns[0].block_size
    out, elapsed = _iscsi_perf(peer, duration, random=False, depth=16, blocks=size // block)
    iops, _ = _perf_average(out)
    return iops * size / 1e6, elapsed  # MB/s from IOPS (iscsi-perf's own MB/s is rounded)


def seq_read_128k_qd16(peer: TargetPeer, duration: float) -> tuple[float, float]:
    return seq_read_qd16(peer, duration, 128 << 10)


def _qemu_bench(peer: TargetPeer, count: int, timeout: float) -> float:
    cmd = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-w", "-s", "4096", "-d", "32", "-c", str(count), peer.url()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    m = re.search(r"Run completed in ([\d.]+) seconds", res.stdout)
    if res.returncode != 0 or not m:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stdout[-300:]} {res.stderr[-300:]}")
    return float(m.group(1))


_write_counts: dict[int, int] = {}


def write_4k_qd32(peer: TargetPeer, duration: float) -> tuple[float, float]:
    """qemu-img bench has a count, not a duration: calibrate once per target (also a warm-up)."""
    key = id(peer)
    if key not in _write_counts:
        probe = 2000
        secs = _qemu_bench(peer, probe, RUN_SLACK * 2)
        _write_counts[key] = max(probe, int(probe * duration / max(secs, 1e-3)))
    # qemu-img bench wraps to offset 0 at the end of the image, so the count may exceed the LUN.
    count = _write_counts[key]
    secs = _qemu_bench(peer, count, duration * 10 + RUN_SLACK)
    return count / secs, secs


WORKLOADS = [
    Workload("4K random read QD32 (iscsi-perf)", "IOPS", rand_read_4k_qd32),
    Workload("128K seq read QD16 (iscsi-perf)", "MB/s", seq_read_128k_qd16),
    Workload("4K write QD32 (qemu-img bench)", "IOPS", write_4k_qd32),
]


# --------------------------------------------------------------------------- measuring

def measure(peer: TargetPeer, workload: Workload, duration: float) -> Sample:
    if not peer.alive():
        raise RuntimeError(f"{peer.kind} is not running{peer.log_text()[-1000:]}")
    cpu0, t0 = process_cpu_seconds(peer.proc.pid), time.monotonic()
    figure, seconds = workload.run(peer, duration)
    cpu = (process_cpu_seconds(peer.proc.pid) - cpu0) / max(time.monotonic() - t0, 1e-6)
    return Sample(figure, seconds, cpu)


def prefill(path: Path, size: int) -> None:
    """Write every block (a repeating random MiB) so reads hit data, not holes."""
    block = os.urandom(PREFILL_CHUNK)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "r+b" if path.exists() else "wb") as f:
        for _ in range(size // PREFILL_CHUNK):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())


#: Native frames of a thread that waits rather than runs (idle pool workers, the loop's poll).
IDLE_FRAMES = ("PyThread_acquire_lock_timed", "epoll_wait", "epoll_pwait")
#: py-spy samples per second: enough for shares of a few %, light enough not to slow the daemon.
PYSPY_RATE = 250


def profile_live(peer: TargetPeer, workload: Workload, duration: float, out: Path,
                 top: int = 22, native: bool = False) -> tuple[Sample, list[str]]:
    """Run ``workload`` once under py-spy attached to the daemon; (sample, report lines).

    py-spy without ``--idle`` records only stacks of a running thread, so the share of the
    samples that end in a function is its share of the daemon's CPU time. ``--nonblocking``
    keeps the sampled process running (at the cost of a rare torn stack). ``native`` adds C
    frames (uvloop, libc: where syscalls show up), blocking the process at each sample.
    """
    if shutil.which("py-spy") is None:
        raise RuntimeError("py-spy missing (pip install py-spy)")
    out.parent.mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen(["py-spy", "record", "-p", str(peer.proc.pid), "-d", str(int(duration) + 1),
                            "-r", str(PYSPY_RATE), "-f", "raw", "-F", "-o", str(out),
                            *(["--native"] if native else ["--nonblocking"])],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # attach before the load starts
        sample = measure(peer, workload, duration)
        spy.wait(timeout=duration + RUN_SLACK)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    ios = sample.figure if workload.unit == "IOPS" else sample.figure * 1e6 / (128 << 10)
    us_per_io = sample.cpu * 1e6 / ios if ios else float("nan")
    return sample, summarize_stacks(out, us_per_io, top)


def summarize_stacks(path: Path, us_per_io: float, top: int = 22) -> list[str]:
    """Self and inclusive shares per function from py-spy's raw (collapsed) stacks."""
    self_n: dict[str, int] = {}
    incl_n: dict[str, int] = {}
    total = waiting = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        if any(w in stack for w in IDLE_FRAMES):
            waiting += n  # --native: a thread blocked in a wait can pass py-spy's idle test
            continue
        frames = [_short_frame(f) for f in stack.split(";")]
        total += n
        self_n[frames[-1]] = self_n.get(frames[-1], 0) + n
        for f in set(frames):
            incl_n[f] = incl_n.get(f, 0) + n
    if not total:
        return ["(no samples)"]
    lines = [f"daemon CPU per I/O: {us_per_io:.1f} us; {total} samples"
             + (f" ({waiting} more in lock/epoll waits left out)" if waiting else ""),
             f"{'self %':>7} {'us/IO':>6} {'incl %':>7}  function"]
    for f, n in sorted(self_n.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{n * 100 / total:>6.1f}% {n / total * us_per_io:>6.2f} {incl_n[f] * 100 / total:>6.1f}%  {f}")
    return lines


def _short_frame(frame: str) -> str:
    """'data_received (iscsi/target/connection.py:163)' -> 'data_received (target/connection.py)'."""
    m = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    name, path = m.groups()
    parts = path.replace("\\", "/").split("/")
    return f"{name} ({'/'.join(parts[-2:])})"


def run_bench(kinds: Sequence[str], workdir: Path, *, runs: int, duration: float, size: str,
              do_prefill: bool, workloads: Sequence[Workload] = WORKLOADS,
              log: Callable[[str], None] = print, before: Path | None = None,
              profile_dir: Path | None = None, profile_workload: int = 0,
              profile_native: bool = False) -> dict[str, Result]:
    peers = [build_peer(kind, workdir / kind, size=size, before=before) for kind in kinds]
    if do_prefill:
        for peer in peers:
            for spec in peer.luns:
                log(f"prefilling {spec.path} ({spec.size >> 20} MiB)")
                prefill(spec.path, spec.size)
    results = {w.name: Result() for w in workloads}
    try:
        for peer in peers:
            peer.start()
        if profile_dir is not None:
            for peer in peers:
                if isinstance(peer, SanstackPeer):
                    pw = WORKLOADS[profile_workload]
                    out = profile_dir / f"pyspy-{peer.kind}-{profile_workload}.txt"
                    sample, lines = profile_live(peer, pw, duration, out, native=profile_native)
                    log(f"py-spy on {peer.kind} during {pw.name}: {sample.figure:.0f} {pw.unit}, "
                        f"daemon cpu {sample.cpu * 100:.0f}% (raw stacks: {out})\n" + "\n".join(lines))
        for r in range(runs):
            for w in workloads:
                for peer in peers:
                    sample = measure(peer, w, duration)
                    results[w.name].samples.setdefault(peer.kind, []).append(sample)
                    log(f"run {r + 1}/{runs}  {w.name:<34} {peer.kind:<9} {sample.figure:>10.0f} {w.unit}"
                        f"  cpu {sample.cpu * 100:.0f}%")
    finally:
        for peer in peers:
            if peer.alive():
                peer.stop()
            if hasattr(peer, "cleanup"):
                peer.cleanup()
    return results


def format_table(results: dict[str, Result], kinds: Sequence[str], runs: int) -> str:
    """One column per peer; each peer other than the first also gets its ratio to the first."""
    base = "tgt" if "tgt" in kinds else kinds[0]
    others = [k for k in kinds if k != base]
    head = f"{'workload (median of %d)' % runs:<36}{base:>16}"
    for k in others:
        head += f"{k:>16}{k[:5] + '/' + base[:5]:>12}"
    head += "".join(f"{'cpu ' + k:>14}" for k in [base, *others])
    lines = [head, "-" * len(head)]
    for name, res in results.items():
        unit = next((w.unit for w in WORKLOADS if w.name == name), "")
        row = f"{name:<36}{res.median(base):>11.0f} {unit:<4}"
        for k in others:
            ratio = res.median(k) / res.median(base) if res.median(base) else float("nan")
            row += f"{res.median(k):>11.0f} {unit:<4}{ratio:>12.2f}"
        row += "".join(f"{res.cpu(k) * 100:>13.0f}%" for k in [base, *others])
        lines.append(row)
    if others:
        lines.append(f"ratio = peer / {base}; cpu = daemon CPU time / wall time (100% = one core)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Benchmark our target against tgtd side by side.")
    ap.add_argument("--runs", type=int, default=3, help="median of this many runs (default 3)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measurement (default 10)")
    ap.add_argument("--size", default="1G", help="image size per target (default 1G, sparse)")
    ap.add_argument("--prefill", action="store_true", help="write the images fully first (reads hit data)")
    ap.add_argument("--peers", default="tgt,sanstack", help="comma list; default tgt,sanstack")
    ap.add_argument("--workdir", type=Path, help="keep images and logs here (default: temp dir, removed)")
    ap.add_argument("--json", type=Path, help="write all samples here")
    ap.add_argument("--before", type=Path, metavar="TREE",
                    help="also run our target from this source tree as peer 'before'")
    ap.add_argument("--profile-live", type=Path, metavar="DIR",
                    help="py-spy each of our daemons during one run first; raw stacks to DIR")
    ap.add_argument("--profile-workload", type=int, default=0, choices=range(len(WORKLOADS)),
                    help="which workload --profile-live samples: " +
                         ", ".join(f"{i} = {w.name}" for i, w in enumerate(WORKLOADS)))
    ap.add_argument("--profile-native", action="store_true", help="py-spy --native (C frames too)")
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.peers.split(",") if k.strip()]
    if args.before and "before" not in kinds:
        kinds.append("before")
    missing = [t for t in ("iscsi-perf", "qemu-img") if shutil.which(t) is None]
    if missing:
        print(f"missing {', '.join(missing)} (apt-get install libiscsi-bin qemu-utils qemu-block-extra)", file=sys.stderr)
        return 2
    parse_size(args.size)
    with work_dir(args.workdir, "bench-") as workdir:
        results = run_bench(kinds, workdir, runs=args.runs, duration=args.duration, size=args.size,
                            do_prefill=args.prefill, log=lambda m: print(m, file=sys.stderr, flush=True),
                            before=args.before, profile_dir=args.profile_live,
                            profile_workload=args.profile_workload, profile_native=args.profile_native)
        print(format_table(results, kinds, args.runs))
        print(f"(images: {args.size} {'prefilled' if args.prefill else 'sparse, not pre-written'}; "
              f"{args.duration:g}s per measurement; {os.cpu_count()} CPUs)")
        if args.json:
            args.json.write_text(json.dumps({
                name: {kind: [s.__dict__ for s in samples] for kind, samples in res.samples.items()}
                for name, res in results.items()
            }, indent=1) + "\n")
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
