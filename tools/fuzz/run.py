"""Run one fuzz target for a bounded time: ``python -m tools.fuzz.run TARGET --seconds 25``.

Engines:
- ``atheris`` (pip install atheris; wheels for CPython 3.11 on x86-64/arm64 Linux): libFuzzer's
  coverage-guided mutation over the bytecode of iscsi/, instrumented at import;
- ``builtin``: the same idea without the dependency: line coverage of iscsi/ through
  sys.settrace, inputs that reach new lines join the corpus, random mutations and splices of
  the corpus.  Slower (10-50x) but finds the same class of bug, so CI still fuzzes where
  atheris is missing;
- ``auto`` (default): atheris when importable, else builtin.

The checked-in corpus (tests/fuzz/corpus/TARGET/) is only read; new inputs go to ``--work``
(a temporary directory unless given), and a crashing input is written to
``<work>/crash-<sha1>`` and printed.  Exit status 0 = no bug found in the time given,
1 = a target raised, 2 = usage error.  ``--replay`` just runs every corpus file once.
``--merge DIR`` adds the inputs of ``DIR`` that reach new lines of iscsi/ to the corpus.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CORPUS_ROOT = REPO / "tests" / "fuzz" / "corpus"
TARGET_NAMES = ("pdu_stream", "login")
#: Largest input the mutators make: a login text of 8 KiB plus its record headers, or a
#: few PDUs with data segments; longer inputs only slow the search down.
MAX_LEN = 20000
#: One input taking longer than this is a hang (the targets are pure computation).
INPUT_TIMEOUT = 10
#: libFuzzer's memory ceiling for the fuzzing process (the reader must not buffer unbounded).
RSS_LIMIT_MB = 2048


def _quiet_logs() -> None:
    # The targets log every refused login; millions of lines would only slow the search.
    logging.getLogger("iscsi").setLevel(logging.CRITICAL + 1)


def corpus_files(target: str, corpus: Path | None = None) -> list[Path]:
    d = corpus or CORPUS_ROOT / target
    return sorted(p for p in d.iterdir() if p.is_file()) if d.is_dir() else []


def replay(target: str, corpus: Path | None = None) -> int:
    from tools.fuzz import targets

    _quiet_logs()
    fn = targets.TARGETS[target]
    files = corpus_files(target, corpus)
    for path in files:
        try:
            fn(path.read_bytes())
        except Exception:
            print(f"{target}: {path} fails:", file=sys.stderr)
            traceback.print_exc()
            return 1
    print(f"{target}: replayed {len(files)} corpus inputs, no failure")
    return 0


# -- atheris -------------------------------------------------------------------------------

def merge_into_corpus(target: str, corpus: Path, new: Path) -> int:
    """Add to ``corpus`` the inputs of ``new`` that reach lines of iscsi/ the corpus does not
    (smallest first, so the checked-in corpus stays small); returns how many were added."""
    from tools.fuzz import targets

    _quiet_logs()
    fn = targets.TARGETS[target]
    cov = _Coverage()
    seen: set[tuple[str, int]] = set()
    for path in corpus_files(target, corpus):
        seen |= cov.run(fn, path.read_bytes())
    added = 0
    for path in sorted((p for p in new.iterdir() if p.is_file()), key=lambda p: p.stat().st_size):
        data = path.read_bytes()
        try:
            lines = cov.run(fn, data)
        except Exception:  # a crashing input belongs in a bug report, not in the corpus
            print(f"{path} fails its target; not merged", file=sys.stderr)
            continue
        if not lines <= seen:
            seen |= lines
            (corpus / hashlib.sha1(data).hexdigest()).write_bytes(data)
            added += 1
    print(f"{target}: merged {added} inputs into {corpus}; corpus covers {len(seen)} lines of iscsi/")
    return 0


def run_atheris(target: str, seconds: int, work: Path, corpus: Path) -> int:
    import atheris

    with atheris.instrument_imports(include=["iscsi"]):
        from tools.fuzz import targets
    _quiet_logs()
    fn = targets.TARGETS[target]
    args = [sys.argv[0], f"-max_len={MAX_LEN}", f"-timeout={INPUT_TIMEOUT}", f"-rss_limit_mb={RSS_LIMIT_MB}",
            f"-artifact_prefix={work}/", "-print_final_stats=1"]
    args += [f"-max_total_time={seconds}", str(work / "new"), str(corpus)]
    (work / "new").mkdir(parents=True, exist_ok=True)
    atheris.Setup(args, fn)
    atheris.Fuzz()  # exits the process: 0 when the time is up, non-zero on a crash
    return 0


# -- builtin -------------------------------------------------------------------------------

_INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x3F, 0x40, 0x20, 0x03, 0x05, 0xC0]


class _Coverage:
    """(file, line) pairs executed under iscsi/ while one input runs."""

    def __init__(self) -> None:
        self.prefix = str(REPO / "iscsi")
        self.lines: set[tuple[str, int]] = set()

    def _local(self, frame, event, arg):
        if event == "line":
            self.lines.add((frame.f_code.co_filename, frame.f_lineno))
        return self._local

    def _global(self, frame, event, arg):
        if frame.f_code.co_filename.startswith(self.prefix):
            return self._local
        return None

    def run(self, fn, data: bytes) -> set[tuple[str, int]]:
        self.lines = set()
        sys.settrace(self._global)
        try:
            fn(data)
        finally:
            sys.settrace(None)
        return self.lines


def _mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        if op == 0 and buf:
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[rng.randrange(len(buf))] = rng.choice(_INTERESTING)
        elif op == 2 and buf:
            i = rng.randrange(len(buf))
            del buf[i:i + rng.randint(1, 16)]
        elif op == 3:
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 4 and buf:
            i = rng.randrange(len(buf))
            chunk = buf[i:i + rng.randint(1, 64)]
            j = rng.randrange(len(buf) + 1)
            buf[j:j] = chunk
        elif op == 5 and pool:
            other = rng.choice(pool)
            if other:
                i, j = rng.randrange(len(buf) + 1), rng.randrange(len(other))
                buf = buf[:i] + other[j:j + rng.randint(1, 256)]
        elif op == 6 and len(buf) >= 4:
            i = rng.randrange(len(buf) - 3)
            buf[i:i + 4] = rng.choice([b"\0\0\0\0", b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff",
                                       b"\x00\x00\x20\x00", b"\x00\xff\xff\xff"])
    return bytes(buf[:MAX_LEN])


def run_builtin(target: str, seconds: int, work: Path, corpus: Path, seed: int | None) -> int:
    from tools.fuzz import targets

    _quiet_logs()
    fn = targets.TARGETS[target]
    rng = random.Random(seed)
    cov = _Coverage()
    seen: set[tuple[str, int]] = set()
    pool: list[bytes] = []
    execs, deadline = 0, time.monotonic() + seconds
    new_dir = work / "new"
    new_dir.mkdir(parents=True, exist_ok=True)
    seeds = [p.read_bytes() for p in corpus_files(target, corpus)] or [b""]
    while time.monotonic() < deadline:
        data = seeds.pop(0) if seeds else _mutate(rng, rng.choice(pool), pool)
        execs += 1
        try:
            lines = cov.run(fn, data)
        except Exception:
            name = work / f"crash-{hashlib.sha1(data).hexdigest()}"
            name.write_bytes(data)
            traceback.print_exc()
            print(f"{target}: crash after {execs} inputs; input saved to {name}", file=sys.stderr)
            return 1
        if not pool:
            pool.append(data)
        if not lines <= seen:
            seen |= lines
            pool.append(data)
            (new_dir / hashlib.sha1(data).hexdigest()).write_bytes(data)
    print(f"{target}: builtin engine, {execs} inputs in {seconds} s, corpus {len(pool)}, "
          f"{len(seen)} lines of iscsi/ covered, no failure")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target", choices=TARGET_NAMES)
    ap.add_argument("--seconds", type=int, default=25)
    ap.add_argument("--engine", choices=("auto", "atheris", "builtin"), default="auto")
    ap.add_argument("--corpus", type=Path, help="seed corpus (default tests/fuzz/corpus/TARGET)")
    ap.add_argument("--work", type=Path, help="where new inputs and crashes go (default: a temp dir)")
    ap.add_argument("--seed", type=int, help="builtin engine: random seed")
    ap.add_argument("--replay", action="store_true", help="run every corpus input once and stop")
    ap.add_argument("--merge", type=Path, help="add the inputs of this dir that reach new lines to the corpus")
    args = ap.parse_args(argv)
    corpus = args.corpus or CORPUS_ROOT / args.target
    if args.replay:
        return replay(args.target, corpus)
    if args.merge:
        return merge_into_corpus(args.target, corpus, args.merge)
    work = args.work or Path(tempfile.mkdtemp(prefix=f"fuzz-{args.target}-"))
    work.mkdir(parents=True, exist_ok=True)
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "builtin"
    print(f"{args.target}: engine {engine}, {args.seconds} s, corpus {corpus}, work {work}", flush=True)
    if engine == "atheris":
        return run_atheris(args.target, args.seconds, work, corpus)
    return run_builtin(args.target, args.seconds, work, corpus, args.seed)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
