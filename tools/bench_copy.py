"""What a 128 KiB Data-In costs the sender, by the way its bytes reach the socket.

The target's large-read figure is bounded by the kernel work per I/O: copying the blocks out
of the page cache and pushing them through loopback TCP.  This measures that bound without
iSCSI: one process serves 128 KiB chunks of a page-cached image file to a reader process over
loopback, by each method, and prints throughput and the sender's CPU per chunk.

  buffer    send from one user buffer, no file read (what iperf3 measures)
  pread     pread into a new buffer, then sendmsg (header + data): what the target does
  mmap      sendmsg straight from a mapping of the file: one copy fewer
  sendfile  header with MSG_MORE, then sendfile: no copy in the sender at all
  corked    sendfile, in turns of 16 chunks under TCP_CORK (each chunk's short tail shares
            a segment with the next header instead of going out alone)

Why the target keeps ``pread``: ``mmap`` turns an I/O error or an image truncated behind the
daemon's back into SIGBUS (every session lost instead of one MEDIUM ERROR), and
``sendfile`` queues references to page-cache pages, so a WRITE executed after the READ
completed could still change bytes the initiator has not received yet (docs/performance.md).

    python -m tools.bench_copy [--seconds 3] [--rounds 3] [--size 512M]

Rounds alternate the methods; medians are printed (the machine is shared and noisy).
"""
from __future__ import annotations

import argparse
import mmap
import os
import resource
import socket
import statistics
import tempfile
import time

CHUNK = 128 << 10
HEADER = bytes(48)          # stands in for the Data-In BHS sent before each chunk
METHODS = ("buffer", "pread", "mmap", "sendfile", "corked")
TURN = 16                   # chunks per loop turn for "corked" (what iscsi-perf -m 16 brings)


def _reader(port: int) -> None:
    """Child process: read everything into one reused buffer until the sender closes."""
    sock = socket.create_connection(("127.0.0.1", port))
    view = memoryview(bytearray(1 << 20))
    while sock.recv_into(view):
        pass
    os._exit(0)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(method: str, fd: int, size: int, seconds: float) -> tuple[float, float]:
    """(MB/s, sender CPU microseconds per 128 KiB chunk) for one method."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    pid = os.fork()
    if pid == 0:
        listener.close()
        _reader(port)
    conn, _ = listener.accept()
    listener.close()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = conn.fileno()
    mapping = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    view = memoryview(mapping)
    buffer = os.urandom(CHUNK)
    offset = sent = 0
    cpu0, t0 = _cpu(), time.monotonic()
    try:
        while time.monotonic() - t0 < seconds:
            for i in range(64):
                if method == "corked" and i % TURN == 0:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
                if method == "buffer":
                    conn.sendmsg([HEADER, buffer])
                elif method == "pread":
                    conn.sendmsg([HEADER, os.pread(fd, CHUNK, offset)])
                elif method == "mmap":
                    conn.sendmsg([HEADER, view[offset:offset + CHUNK]])
                else:
                    conn.send(HEADER, socket.MSG_MORE)
                    done = 0
                    while done < CHUNK:
                        done += os.sendfile(out, fd, offset + done, CHUNK - done)
                if method == "corked" and i % TURN == TURN - 1:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
                offset = (offset + CHUNK) % size
                sent += CHUNK
        wall, cpu = time.monotonic() - t0, _cpu() - cpu0
    finally:
        conn.close()
        os.waitpid(pid, 0)
        view.release()
        mapping.close()
    return sent / wall / 1e6, cpu / (sent / CHUNK) * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=512, help="image size in MiB (read once to cache it)")
    args = ap.parse_args(argv)
    size = args.size << 20
    with tempfile.TemporaryDirectory(prefix="bench-copy-") as tmp:
        path = os.path.join(tmp, "image")
        with open(path, "wb") as f:
            for _ in range(args.size):
                f.write(os.urandom(1 << 20))
        fd = os.open(path, os.O_RDONLY)
        try:
            while os.read(fd, 1 << 20):
                pass                                  # page-cache it, as a warmed-up LUN is
            results: dict[str, list[tuple[float, float]]] = {m: [] for m in METHODS}
            for r in range(args.rounds):
                order = METHODS[r % len(METHODS):] + METHODS[:r % len(METHODS)]
                for method in order:
                    results[method].append(measure(method, fd, size, args.seconds))
        finally:
            os.close(fd)
    base = statistics.median(mb for mb, _ in results["buffer"])
    print(f"{'method':<10}{'MB/s':>8}{'vs buffer':>11}{'sender CPU us/128K':>20}   (medians of {args.rounds})")
    for method in METHODS:
        mb = statistics.median(x for x, _ in results[method])
        us = statistics.median(y for _, y in results[method])
        print(f"{method:<10}{mb:>8.0f}{mb / base:>10.0%}{us:>20.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
