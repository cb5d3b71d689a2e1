"""Run libiscsi's conformance suite (``iscsi-test-cu``) against a target and judge each test.

Outcome per test (``Suite.Test``), from the suite's verbose CUnit output:
- ``pass``   -- CUnit passed and the test printed no ``[SKIPPED]`` line (a clean pass);
- ``skip``   -- CUnit passed but the test skipped itself (``CU_PASS("[SKIPPED] ...")``: feature
               not implemented, LU not thin-provisioned, flag not given...);
- ``fail``   -- CUnit FAILED;
- ``hang``   -- no output for ``idle_timeout`` seconds: the run was killed in this test;
- ``crash``  -- the suite process died in this test (or the target died under it);
- ``notrun`` -- never reached (time budget spent, target gone, suite set-up failed).

Some tests log ``[FAILED]`` for a probe that is *expected* to fail and still pass (e.g.
WriteSame10.UnmapVPD when WRITE SAME UNMAP is not offered); those stay clean passes. The
stricter reading (any ``[FAILED]`` line disqualifies) is reported separately as ``strict_pass``
because that is how the "tgt passes 157 of 230" figure in issue 2 was counted.

A target that hangs in one test does not cost the rest of the run: after a kill, the rest of the
interrupted suite runs one test per process and the remaining suites run together again.

    python -m tools.conformance --peer tgt                 # start tgtd, run, print the table
    python -m tools.conformance --peer sanstack --compare tests/conformance/sanstack-expected.json
    python -m tools.conformance --peer sanstack --write-expected   # refresh the expectation file
    python -m tools.conformance --url iscsi://127.0.0.1:3260/iqn.../0   # an already running target
    python -m tools.conformance --variant bs4096 --compare tests/conformance/sanstack-bs4096.json
                                          # our target configured as a deployment variant (VARIANTS)
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from tools.peers.base import work_dir

SUITE_TOOL = "iscsi-test-cu"
INITIATOR_1 = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test"
INITIATOR_2 = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2"
REPO_ROOT = Path(__file__).resolve().parents[1]
EXPECT_DIR = REPO_ROOT / "tests" / "conformance"

#: The slowest tests against tgt take ~2 s, but Sanitize.Reset polls TEST UNIT READY with a
#: sleep(60) between tries and prints nothing meanwhile; 100 s of silence means the target
#: stopped answering.
IDLE_TIMEOUT = 100.0
#: Whole run (all 230 tests) against tgt: ~15 s on the 2-core CI machine. A Python target is
#: slower; 15 min keeps CI bounded even if many tests run into the idle timeout.
RUN_TIMEOUT = 900.0
#: Restarts after a hang/crash; each restart costs at most one idle timeout.
MAX_RUNS = 40

PASS, SKIP, FAIL, HANG, CRASH, NOTRUN = "pass", "skip", "fail", "hang", "crash", "notrun"
OUTCOMES = (PASS, SKIP, FAIL, HANG, CRASH, NOTRUN)
#: Ordering for regressions: lower is worse.
RANK = {PASS: 3, SKIP: 2, FAIL: 1, HANG: 0, CRASH: 0, NOTRUN: 0}

PROFILES = {
    # Issue 2's yardstick: how the "tgt passes 157 of 230" figure was taken.
    "basic": {"flags": ["--dataloss"], "multipath": False},
    # Issue 3's goal: everything, with a second portal for the MultipathIO suite.
    "full": {"flags": ["--dataloss", "--allow-sanitize"], "multipath": True},
    # Issue 3: suites that skip on a plain LU run against a read-only / a removable one.
    "readonly": {"flags": ["--dataloss"], "multipath": False, "tests": "ALL.ReadOnly",
                 "lun": {"read_only": True}},
    "removable": {"flags": ["--dataloss"], "multipath": False,
                  "tests": "ALL.NoMedia,ALL.PreventAllow,ALL.StartStopUnit", "lun": {"removable": True}},
    # Sanitize on one path. In the full (two-path) run the suite keeps one session per path for
    # the whole Sanitize suite, so the RESERVE(6) that Sanitize.Reservations takes on the second
    # path is still held when Sanitize.Reset starts and its SANITIZE rightly meets RESERVATION
    # CONFLICT (SPC-2 §5.5.1). With one path the suite logs the second nexus out after each
    # test, which releases the reservation, and Sanitize.Reset runs as intended.
    "sanitize": {"flags": ["--dataloss", "--allow-sanitize"], "multipath": False, "tests": "ALL.Sanitize"},
    # Issue 3: tests that skip unless a physical block holds several logical blocks ("LBPPB < 2")
    # run against a 512e LU (4096-byte physical blocks). GetLBAStatus.UnmapSingle stays in the
    # full profile: with LBPPB > 1 it wants a first descriptor that does not start at the
    # requested LBA, which SBC-4 §5.7.2 forbids.
    "pbs4096": {"flags": ["--dataloss"], "multipath": False,
                "tests": "ALL.CompareAndWrite.InvalidDataOutSize,ALL.WriteSame10.UnmapUnaligned,"
                         "ALL.WriteSame10.InvalidDataOutSize,ALL.WriteSame16.UnmapUnaligned,"
                         "ALL.WriteSame16.InvalidDataOutSize",
                "lun": {"physical_block_size": 4096}},
}

#: Deployment variants: the CI profiles all use one configuration shape (no digests, no CHAP,
#: 512-byte blocks, a 1 GiB LUN 0, IPv4 loopback). Each variant runs our target configured the
#: way real deployments differ, like profile "basic" (``--dataloss``, one portal), against its
#: own expectation file tests/conformance/sanstack-<variant>.json (a whole run). ``ci_tests`` is
#: the subset tests/integration/test_conformance_variants.py runs: the families that depend on
#: what the variant changes, a few seconds each.
#:
#: Keys: ``peer`` -> SanstackPeer.create() arguments; ``url`` -> libiscsi URL arguments;
#: ``lun_numbers`` -> the LUN numbers of the target's LUNs (default 0, 1, ...); ``lun_index`` ->
#: which LUN the suite runs against; ``url_lun`` -> the LUN as written in the URL when it
#: differs from the LUN number (see lun16383).
VARIANT_CHAP = ("suite-user", "suite-secret-0123", "sanstack-target", "target-secret-4567")
VARIANTS: dict[str, dict] = {
    # RFC 7143 §13.1: the target requires CRC32C header digests (libiscsi has no data digest).
    "hdigest": {
        "peer": {"params": {"HeaderDigest": "CRC32C"}}, "url": {"header_digest": "crc32c"},
        "ci_tests": "ALL.Inquiry,ALL.Read10,ALL.Write10,ALL.CompareAndWrite,ALL.iSCSITMF,ALL.iSCSIcmdsn,"
                    "ALL.iSCSIdatasn,ALL.iSCSIResiduals",
    },
    # RFC 7143 §12.1.3: the target requires CHAP, and authenticates itself to the initiator.
    "chap": {
        "peer": {"chap": VARIANT_CHAP},
        "ci_tests": "ALL.Inquiry,ALL.Read10,ALL.Write10,ALL.iSCSITMF,ALL.Reserve6",
    },
    # SBC-4 §6.5.2: a 4Kn LU (4096-byte logical blocks).
    "bs4096": {
        "peer": {"block_size": 4096},
        "ci_tests": "ALL.Read10,ALL.Read16,ALL.Write10,ALL.Write16,ALL.WriteSame10,ALL.WriteSame16,ALL.Unmap,"
                    "ALL.CompareAndWrite,ALL.GetLBAStatus,ALL.Verify16,ALL.WriteVerify16,ALL.OrWrite,"
                    "ALL.ReadCapacity10,ALL.ReadCapacity16,ALL.ExtendedCopy",
    },
    # SBC-4 §5.19: more than 2^32 blocks, so READ CAPACITY(10) says FFFFFFFFh and the suite
    # switches to 16-byte CDBs. Sparse: the image holds only what the suite writes.
    "large": {
        "peer": {"size": "3T"},
        # Failures of the suite, not of the target: these tests address "num_blocks + 1",
        # "num_blocks - i" or 2^31 with 10/12-byte CDBs, whose 32-bit LBA field truncates them
        # to LBAs inside a LUN of more than 2^32 blocks (Read10/Write10 skip "LUN too big" here).
        "not_ours": {
            "Verify10.ZeroBlocks": "LBAs 2^31 and 0xFFFFFFFF are in range; VERIFY of 0 blocks there is GOOD (SBC-4 §5.38)",
            "Verify12.ZeroBlocks": "as Verify10.ZeroBlocks (SBC-4 §5.39)",
            "WriteSame10.UnmapUntilEnd": "NUMBER OF LOGICAL BLOCKS 0 from the truncated LBA 7FFFFFFFh means ~2^32 "
                                         "blocks, more than MAXIMUM WRITE SAME LENGTH: INVALID FIELD IN CDB "
                                         "(SBC-4 §5.48, WSNZ=0)",
        },
        "ci_tests": "ALL.ReadCapacity10,ALL.ReadCapacity16,ALL.Read16,ALL.Write16,ALL.WriteSame16,"
                    "ALL.Unmap,ALL.GetLBAStatus,ALL.Verify16,ALL.Prefetch16",
    },
    # A LUN of a few MiB: the suite's "end of LUN" arithmetic with a small num_blocks.
    "small": {
        "peer": {"size": "8M"},
        "ci_tests": "ALL.Read10,ALL.Write10,ALL.WriteSame10,ALL.Unmap,ALL.GetLBAStatus,ALL.Prefetch10",
    },
    # A multi-LUN target, the suite on LUN 1 / LUN 255 (LUN 0 is another, smaller LU).
    "lun1": {
        "peer": {"sizes": ["64M", "1G"]}, "lun_index": 1,
        "ci_tests": "ALL.Inquiry,ALL.ReportSupportedOpcodes,ALL.Read10,ALL.Write10,ALL.iSCSITMF",
    },
    "lun255": {
        "peer": {"sizes": ["64M", "1G"]}, "lun_numbers": [0, 255], "lun_index": 1,
        "ci_tests": "ALL.Inquiry,ALL.Read10,ALL.Write10,ALL.iSCSITMF,ALL.PrinReadKeys,ALL.ProutRegister",
    },
    # LUN 16383, the highest flat-space LUN (SAM-5 §4.7.7). libiscsi copies the URL's LUN into
    # LUN bytes 0-1 as is, so the URL must carry the flat-space form 0x4000 | 16383 = 32767;
    # "/16383" would be peripheral device addressing with BUS IDENTIFIER 3Fh, which names a
    # different bus (SAM-5 §4.7.6) and is rightly LOGICAL UNIT NOT SUPPORTED.
    "lun16383": {
        "peer": {"sizes": ["64M", "1G"]}, "lun_numbers": [0, 16383], "lun_index": 1, "url_lun": 0x4000 | 16383,
        "ci_tests": "ALL.Inquiry,ALL.Read10,ALL.Write10,ALL.iSCSITMF",
    },
    # An IPv6 portal.
    "ipv6": {
        "peer": {"host": "::1"},
        "ci_tests": "ALL.Inquiry,ALL.Read10,ALL.Write10,ALL.iSCSITMF,ALL.iSCSIcmdsn",
    },
    # Target login keys pinned the conservative way (RFC 7143 §13.10-§13.14): no immediate
    # data, an R2T for every write, small bursts and PDUs. MaxBurstLength below the default
    # FirstBurstLength (262144) without a FirstBurstLength of its own once failed every login.
    "keys": {
        "peer": {"params": {"ImmediateData": "No", "InitialR2T": "Yes", "MaxBurstLength": "8192",
                            "MaxRecvDataSegmentLength": "4096"}},
        "ci_tests": "ALL.Write10,ALL.Write16,ALL.WriteVerify10,ALL.CompareAndWrite,ALL.WriteSame10,"
                    "ALL.ExtendedCopy,ALL.iSCSITMF,ALL.iSCSIdatasn,ALL.iSCSIResiduals",
    },
}


@dataclass
class TestResult:
    name: str
    outcome: str
    detail: str = ""
    #: Passed but logged a "[FAILED]" line (an expected-failure probe or cleanup noise).
    logged_failure: bool = False

    @property
    def reason(self) -> str:
        """The first line that says why: for a failure its first [FAILED] line or failed
        assertion, for a skip its [SKIPPED] line; else the first line of the detail."""
        lines = [l.strip() for l in self.detail.splitlines() if l.strip()]
        if self.outcome == FAIL:
            for line in lines:
                if line.startswith("[FAILED]") or re.match(r"\d+\. \S+:\d+", line):
                    return line
        if self.outcome == SKIP:
            for line in lines:
                if line.startswith("[SKIPPED]"):
                    return line
        return lines[0] if lines else ""


@dataclass
class Report:
    results: dict[str, TestResult] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    runs: int = 0
    elapsed: float = 0.0
    notes: list[str] = field(default_factory=list)

    def outcome(self, name: str) -> str:
        r = self.results.get(name)
        return r.outcome if r else NOTRUN

    def counts(self) -> dict[str, int]:
        c = Counter(self.outcome(n) for n in self.order)
        out = {k: c.get(k, 0) for k in OUTCOMES}
        out["total"] = len(self.order)
        out["strict_pass"] = sum(
            1 for n in self.order if self.outcome(n) == PASS and not self.results[n].logged_failure
        )
        return out

    def outcomes(self) -> dict[str, str]:
        return {n: self.outcome(n) for n in self.order}

    def broken(self) -> list[str]:
        """Tests in which the target hung or the run died: never acceptable."""
        return [n for n in self.order if self.outcome(n) in (HANG, CRASH)]


# --------------------------------------------------------------------------- parsing

_SUITE_RE = re.compile(r"^Suite: (\S+)\s*$")
_TEST_RE = re.compile(r"^  Test: (\S+) \.\.\.(.*)$")
_RESULT_RE = re.compile(r"^(passed|FAILED)(?=\s|$)")


def parse_output(text: str) -> tuple[dict[str, TestResult], str | None, str]:
    """Parse verbose CUnit output into results.

    Returns (finished results, the test that started but never finished or None, and the
    partial output of that unfinished test).
    """
    results: dict[str, TestResult] = {}
    suite = "?"
    current: str | None = None
    buf: list[str] = []
    last: TestResult | None = None  # collects the "  1. file.c:NN - CU_ASSERT..." lines

    def finish(token: str, rest: str) -> TestResult:
        detail = "\n".join(buf)
        if token == "FAILED":
            res = TestResult(current, FAIL, detail)
        elif "[SKIPPED]" in detail:
            res = TestResult(current, SKIP, detail)
        else:
            res = TestResult(current, PASS, detail, logged_failure="[FAILED]" in detail + rest)
        results[current] = res
        return res

    for line in text.splitlines():
        m = _SUITE_RE.match(line)
        if m:
            suite, current, last = m.group(1), None, None
            continue
        m = _TEST_RE.match(line)
        if m:
            current, buf, last = f"{suite}.{m.group(1)}", [], None
            line = m.group(2)
            # fall through: the result may sit on the same line ("Test: X ...passed")
        if current is None:
            if last is not None and last.outcome == FAIL and line.strip():
                last.detail += ("\n" if last.detail else "") + line.strip()
            continue
        r = _RESULT_RE.match(line)
        if r:
            last = finish(r.group(1), line[r.end():])
            current, buf = None, []
        elif line.strip():
            buf.append(line.strip())
    return results, current, "\n".join(buf)


# --------------------------------------------------------------------------- test inventory

def list_tests(tool: str = SUITE_TOOL) -> list[str]:
    """Every test of the ALL family as ``Suite.Test``, in the suite's own order."""
    out = subprocess.run([tool, "--list"], capture_output=True, text=True, timeout=30, check=True).stdout
    names = []
    for line in out.splitlines():
        parts = line.strip().split(".")
        if len(parts) == 3 and parts[0] == "ALL":
            names.append(f"{parts[1]}.{parts[2]}")
    return names


def _spec_tests(spec: str, inventory: list[str]) -> list[str]:
    """The tests a ``-t`` spec selects (only the forms this module builds)."""
    wanted: list[str] = []
    for part in spec.split(","):
        bits = part.split(".")
        if bits == ["ALL"]:
            wanted += inventory
        elif len(bits) == 2:
            wanted += [n for n in inventory if n.split(".")[0] == bits[1]]
        elif len(bits) == 3:
            wanted += [f"{bits[1]}.{bits[2]}"]
    return wanted


def _resume_specs(remaining: list[str], partial_suite: str | None) -> list[str]:
    """Specs for the rest: the interrupted suite one test per run, whole suites in one run.

    (iscsi-test-cu registers a suite once per pattern, so two patterns of one suite in one
    process fail with a duplicate-suite error: a partial suite needs one process per test.)
    """
    singles = [f"ALL.{n}" for n in remaining if n.split(".")[0] == partial_suite]
    suites: list[str] = []
    for n in remaining:
        s = n.split(".")[0]
        if s != partial_suite and s not in suites:
            suites.append(s)
    specs = singles
    if suites:
        specs.append(",".join(f"ALL.{s}" for s in suites))
    return specs


# --------------------------------------------------------------------------- running

@dataclass
class RunOutput:
    text: str
    returncode: int | None
    killed: str | None  # None, "idle" or "deadline"


def _run_once(cmd: list[str], idle_timeout: float, deadline: float, log: Path | None) -> RunOutput:
    """Run one suite process unbuffered, killing it after ``idle_timeout`` s of silence."""
    if shutil.which("stdbuf"):
        # CUnit prints "Test: X ..." without a newline and stdio buffers pipes: without this
        # a killed run loses the very line that names the hanging test.
        cmd = ["stdbuf", "-o0", "-e0", *cmd]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    chunks: list[bytes] = []
    last_output = [time.monotonic()]

    def reader() -> None:
        while True:
            data = os.read(proc.stdout.fileno(), 65536)
            if not data:
                return
            chunks.append(data)
            last_output[0] = time.monotonic()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    killed = None
    while proc.poll() is None:
        now = time.monotonic()
        if now - last_output[0] > idle_timeout:
            killed = "idle"
        elif now > deadline:
            killed = "deadline"
        if killed:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
            break
        time.sleep(0.1)
    t.join(timeout=10)
    proc.stdout.close()
    text = b"".join(chunks).decode("utf-8", "replace")
    if log is not None:
        with open(log, "a") as f:
            f.write(f"### {' '.join(cmd)}\n{text}\n### exit={proc.returncode} killed={killed}\n")
    return RunOutput(text, proc.returncode, killed)


def run_suite(
    urls: Sequence[str],
    *,
    flags: Sequence[str] = PROFILES["full"]["flags"],
    initiators: tuple[str, str] = (INITIATOR_1, INITIATOR_2),
    tests: str = "ALL",
    idle_timeout: float = IDLE_TIMEOUT,
    timeout: float = RUN_TIMEOUT,
    log: Path | None = None,
    target_alive: Callable[[], bool] = lambda: True,
    tool: str = SUITE_TOOL,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Run the suite against ``urls`` (a second URL enables the MultipathIO tests)."""
    inventory = list_tests(tool)
    report = Report(order=_spec_tests(tests, inventory) if tests != "ALL" else inventory)
    start = time.monotonic()
    deadline = start + timeout
    queue = [tests]
    base = [tool, "-i", initiators[0], "-I", initiators[1], *flags]
    while queue:
        spec = queue.pop(0)
        selected = [n for n in _spec_tests(spec, inventory) if n not in report.results]
        if not selected:
            continue
        if report.runs >= MAX_RUNS or time.monotonic() > deadline:
            why = "run limit reached" if report.runs >= MAX_RUNS else "time budget spent"
            _mark(report, selected, NOTRUN, why)
            continue
        if not target_alive():
            _mark(report, selected, NOTRUN, "target process is gone")
            continue
        report.runs += 1
        out = _run_once([*base, "-t", spec, *urls], idle_timeout, deadline, log)
        finished, unfinished, partial = parse_output(out.text)
        report.results.update({k: v for k, v in finished.items() if k in selected})
        if progress:
            progress(f"run {report.runs}: -t {spec[:60]}: {len(finished)} finished"
                     + (f", interrupted in {unfinished} ({out.killed or 'exit %s' % out.returncode})" if unfinished else ""))
        if unfinished is not None and unfinished in selected:
            if out.killed == "idle":
                outcome, why = HANG, f"no output for {idle_timeout:.0f}s; killed"
            elif out.killed == "deadline":
                outcome, why = NOTRUN, "time budget spent during this test"
            else:
                outcome, why = CRASH, f"suite process ended (exit {out.returncode}) inside this test"
            if not target_alive():
                outcome, why = CRASH, "the target died during this test"
                report.notes.append(f"target died during {unfinished}")
            report.results[unfinished] = TestResult(unfinished, outcome, (partial + "\n" + why).strip())
        remaining = [n for n in selected if n not in report.results]
        if not remaining:
            continue
        if unfinished is None and not finished:
            # Nothing ran at all: the suite could not even log in or set up. Say why, once.
            tail = "\n".join(out.text.strip().splitlines()[-5:])
            _mark(report, remaining, NOTRUN, f"suite did not start: {tail}")
            report.notes.append(f"iscsi-test-cu -t {spec[:60]} ran nothing: {tail}")
            continue
        if unfinished is None and out.killed is None:
            # Clean exit with tests missing: their suite's set-up (login) failed.
            _mark(report, remaining, NOTRUN, "not run (suite initialisation failed?)")
            continue
        partial_suite = unfinished.split(".")[0] if unfinished else None
        queue[:0] = _resume_specs(remaining, partial_suite)
    report.elapsed = time.monotonic() - start
    return report


def _mark(report: Report, names: Iterable[str], outcome: str, why: str) -> None:
    for n in names:
        report.results.setdefault(n, TestResult(n, outcome, why))


# --------------------------------------------------------------------------- expectations

def load_expected(path: Path) -> dict:
    data = json.loads(Path(path).read_text())
    data.setdefault("results", {})
    return data


def compare(report: Report, expected: dict[str, str]) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(regressions, improvements) as (test, expected, now); tests missing from ``expected``
    count as improvements when they pass clean and are otherwise not judged."""
    regressions, improvements = [], []
    for name in report.order:
        now = report.outcome(name)
        want = expected.get(name)
        if want is None:
            if now == PASS:
                improvements.append((name, "-", now))
            continue
        if RANK[now] < RANK[want]:
            regressions.append((name, want, now))
        elif RANK[now] > RANK[want]:
            improvements.append((name, want, now))
    return regressions, improvements


def expectation_document(report: Report, *, peer: str, profile: str, flags: Sequence[str], urls: int,
                         peer_version: str = "", extra: dict | None = None, tests: str = "ALL") -> dict:
    doc = {
        "about": "Per-test outcome of iscsi-test-cu against this peer; written by "
                 "`python -m tools.conformance --write-expected`. pass = clean pass (no [SKIPPED]).",
        "peer": peer,
        "peer_version": peer_version,
        "suite": f"iscsi-test-cu ({_libiscsi_version()})",
        "profile": profile,
        "command": f"iscsi-test-cu -t {tests} -i {INITIATOR_1} -I {INITIATOR_2} {' '.join(flags)} "
                   + " ".join(["URL"] * urls),
        "recorded": _dt.date.today().isoformat(),
        "commit": _git_describe(),
        "counts": report.counts(),
        **(extra or {}),
        "results": report.outcomes(),
        "reasons": {n: report.results[n].reason for n in report.order
                    if n in report.results and report.outcome(n) != PASS},
    }
    return doc


def _git_describe() -> str:
    """The commit the results were taken at; '+dirty' when the work tree had changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "") if head else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _libiscsi_version() -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "libiscsi-bin"],
                             capture_output=True, text=True, timeout=10)
        return f"libiscsi-bin {out.stdout.strip()}" if out.returncode == 0 else "libiscsi"
    except (OSError, subprocess.SubprocessError):
        return "libiscsi"


def tgt_version() -> str:
    try:
        return subprocess.run(["tgtd", "-V"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# --------------------------------------------------------------------------- printing

def format_table(report: Report, expected: dict[str, str] | None = None) -> str:
    lines = []
    width = max((len(n) for n in report.order), default=20)
    for name in report.order:
        r = report.results.get(name)
        outcome = report.outcome(name)
        mark = ""
        if expected is not None and name in expected and expected[name] != outcome:
            mark = f" (expected {expected[name]})"
        why = r.reason if r and outcome != PASS else ""
        lines.append(f"{name:<{width}}  {outcome:<6}{mark}  {why[:100]}".rstrip())
    return "\n".join(lines)


def format_summary(report: Report) -> str:
    c = report.counts()
    return (f"{c['pass']} clean pass, {c['skip']} skipped, {c['fail']} failed, {c['hang']} hung, "
            f"{c['crash']} crashed, {c['notrun']} not run, of {c['total']} "
            f"(strict clean: {c['strict_pass']}; {report.runs} suite run(s), {report.elapsed:.0f}s)")


# --------------------------------------------------------------------------- peers

def run_against_peer(peer_kind: str, workdir: Path, *, profile: str = "full", size: str = "1G",
                     tests: str = "ALL", idle_timeout: float = IDLE_TIMEOUT, timeout: float = RUN_TIMEOUT,
                     progress: Callable[[str], None] | None = None, peer_kwargs: dict | None = None):
    """Start a fresh peer with a scratch LUN, run the suite, stop the peer. Returns (report, peer)."""
    from tools.peers import make_peer

    prof = PROFILES[profile]
    if tests == "ALL":
        tests = prof.get("tests", "ALL")
    kwargs = {**prof.get("lun", {}), **(peer_kwargs or {})}
    peer = make_peer(peer_kind, workdir, size=size, portals=2 if prof["multipath"] else 1, **kwargs)
    peer.start()
    try:
        urls = [peer.url(0, portal=p) for p in range(len(peer.portals))]
        report = run_suite(urls, flags=prof["flags"], tests=tests, idle_timeout=idle_timeout, timeout=timeout,
                           log=workdir / "iscsi-test-cu.log", target_alive=peer.alive, progress=progress)
    finally:
        if peer.alive():
            status = peer.stop()
            if peer.kind == "sanstack" and status not in (0, None):
                # Not a conformance outcome, but worth a line: SIGTERM should stop it cleanly.
                report_note = f"daemon exit status after SIGTERM: {status}"
                if "report" in locals():
                    report.notes.append(report_note)
        else:
            if "report" in locals():
                report.notes.append(f"target was not running at the end (exit {peer.proc.returncode})")
    return report, peer


def variant_peer(variant: str, workdir: Path, *, host: str | None = None):
    """A not-yet-started SanstackPeer configured as ``VARIANTS[variant]`` says."""
    from tools.peers.base import Chap
    from tools.peers.sanstack import SanstackPeer

    spec = VARIANTS[variant]
    kwargs = {"size": "1G", **spec.get("peer", {})}
    if isinstance(kwargs.get("chap"), tuple):
        kwargs["chap"] = Chap(*kwargs["chap"])
    if host is not None:
        kwargs["host"] = host
    numbers = spec.get("lun_numbers")
    if numbers is None:
        return SanstackPeer.create(workdir, **kwargs)
    kwargs["use_config"] = True  # LUN numbers other than 0, 1, ... need the config-file form

    class NumberedLunPeer(SanstackPeer):
        def config_dict(self) -> dict:
            doc = super().config_dict()
            for lun, number in zip(doc["targets"][0]["luns"], numbers):
                lun["number"] = number
            return doc

        def start(self):
            super().start()
            self.lun_ids = list(numbers)
            return self

    return NumberedLunPeer.create(workdir, **kwargs)


def variant_url(variant: str, peer) -> str:
    spec = VARIANTS[variant]
    index = spec.get("lun_index", 0)
    if "url_lun" in spec:
        from tools.peers.base import iscsi_url

        return iscsi_url(peer.portals[0], peer.iqn, spec["url_lun"], chap=peer.chap, **spec.get("url", {}))
    return peer.url(index, **spec.get("url", {}))


def run_variant(variant: str, workdir: Path, *, tests: str = "ALL", idle_timeout: float = IDLE_TIMEOUT,
                timeout: float = RUN_TIMEOUT, progress: Callable[[str], None] | None = None):
    """Start our target configured as variant ``variant``, run the suite like profile "basic"
    (``--dataloss``, one portal), stop the target. Returns (report, peer)."""
    peer = variant_peer(variant, workdir)
    peer.start()
    report = None
    try:
        report = run_suite([variant_url(variant, peer)], flags=PROFILES["basic"]["flags"], tests=tests,
                           idle_timeout=idle_timeout, timeout=timeout, log=workdir / "iscsi-test-cu.log",
                           target_alive=peer.alive, progress=progress)
    finally:
        if peer.alive():
            status = peer.stop()
            if report is not None and status not in (0, None):
                report.notes.append(f"daemon exit status after SIGTERM: {status}")
        elif report is not None:
            report.notes.append(f"target was not running at the end (exit {peer.proc.returncode})")
    return report, peer


def variant_expectation_path(variant: str) -> Path:
    return EXPECT_DIR / f"sanstack-{variant}.json"


def default_expectation_path(peer: str, profile: str) -> Path:
    if peer == "tgt":
        return EXPECT_DIR / ("tgt-baseline.json" if profile == "basic" else f"tgt-{profile}.json")
    return EXPECT_DIR / ("sanstack-expected.json" if profile == "full" else f"sanstack-{profile}.json")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", choices=["sanstack", "tgt"], default="sanstack",
                    help="start this target on free loopback ports with a scratch LUN (default sanstack)")
    ap.add_argument("--url", action="append", help="run against an already running target instead (repeat for multipath)")
    ap.add_argument("--profile", choices=sorted(PROFILES), default="full",
                    help="full: --dataloss --allow-sanitize + 2 portals; basic: --dataloss, 1 portal (issue 2); "
                         "readonly / removable: the suites that need such a LU")
    ap.add_argument("--variant", choices=sorted(VARIANTS),
                    help="run our target configured as this deployment variant (header digest, CHAP, 4096-byte "
                         "blocks, a 3 TiB LUN, LUN 1/255/16383, IPv6, pinned login keys...) like profile basic; "
                         "expectation file tests/conformance/sanstack-<variant>.json")
    ap.add_argument("--size", default="1G", help="scratch LUN size (default 1G)")
    ap.add_argument("-t", "--tests", default="ALL", help="ALL, ALL.Suite, ALL.Suite.Test or a comma list")
    ap.add_argument("--compare", type=Path, help="expectation file: exit 1 on any regression")
    ap.add_argument("--write-expected", nargs="?", const="", metavar="FILE",
                    help="write the results as the expectation file (default tests/conformance/<peer>-...json)")
    ap.add_argument("--json", type=Path, help="also write the full report here")
    ap.add_argument("--workdir", type=Path, help="keep images and logs here (default: a temp dir, removed)")
    ap.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT)
    ap.add_argument("--timeout", type=float, default=RUN_TIMEOUT)
    ap.add_argument("-q", "--quiet", action="store_true", help="summary only, no per-test table")
    args = ap.parse_args(argv)

    if shutil.which(SUITE_TOOL) is None:
        print(f"{SUITE_TOOL} not found: apt-get install libiscsi-bin", file=sys.stderr)
        return 2
    prof = PROFILES[args.profile]
    progress = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    with work_dir(args.workdir, "conformance-") as workdir:
        if args.variant:
            report, _ = run_variant(args.variant, workdir, tests=args.tests, idle_timeout=args.idle_timeout,
                                    timeout=args.timeout, progress=progress)
            peer_name = "sanstack"
        elif args.url:
            report = run_suite(args.url, flags=prof["flags"], tests=prof.get("tests", "ALL") if args.tests == "ALL" else args.tests, idle_timeout=args.idle_timeout,
                               timeout=args.timeout, log=workdir / "iscsi-test-cu.log", progress=progress)
            peer_name = "url"
        else:
            report, _ = run_against_peer(args.peer, workdir, profile=args.profile, size=args.size, tests=args.tests,
                                         idle_timeout=args.idle_timeout, timeout=args.timeout, progress=progress)
            peer_name = args.peer
        expected = None
        if args.compare:
            expected = load_expected(args.compare)["results"]
        if not args.quiet:
            print(format_table(report, expected))
            print()
        for note in report.notes:
            print(f"note: {note}")
        print(format_summary(report))
        rc = 0
        if report.broken():
            print(f"BROKEN (hang/crash): {', '.join(report.broken())}")
            rc = 1
        if expected is not None:
            regressions, improvements = compare(report, expected)
            for name, want, now in improvements:
                print(f"improved: {name}: {want} -> {now}")
            for name, want, now in regressions:
                print(f"REGRESSION: {name}: expected {want}, got {now}")
            print(f"{len(regressions)} regression(s), {len(improvements)} improvement(s) against {args.compare}")
            rc = rc or (1 if regressions else 0)
        if args.write_expected is not None:
            if args.variant:
                prof = PROFILES["basic"]
                path = Path(args.write_expected) if args.write_expected else variant_expectation_path(args.variant)
                extra = {"variant": args.variant, "variant_config": _variant_description(args.variant)}
            else:
                path = Path(args.write_expected) if args.write_expected else default_expectation_path(peer_name, args.profile)
                extra = {}
                if peer_name == "sanstack":
                    extra = parity_fields(report, args.profile)
            doc = expectation_document(report, peer=peer_name, profile="basic" if args.variant else args.profile,
                                       flags=prof["flags"], urls=2 if prof["multipath"] else 1,
                                       tests=args.tests if args.tests != "ALL" else prof.get("tests", "ALL"),
                                       peer_version=tgt_version() if peer_name == "tgt" else "", extra=extra)
            path.write_text(json.dumps(doc, indent=1) + "\n")
            print(f"wrote {path}")
        if args.json:
            args.json.write_text(json.dumps({
                "counts": report.counts(), "notes": report.notes,
                "results": {n: {"outcome": report.outcome(n), "detail": report.results[n].detail if n in report.results else ""}
                            for n in report.order},
            }, indent=1) + "\n")
        return rc


def _variant_description(variant: str) -> dict:
    spec = VARIANTS[variant]
    peer = dict(spec.get("peer", {}))
    if "chap" in peer:
        peer["chap"] = "mutual CHAP required"  # no secrets in the expectation file
    return {k: v for k, v in {**spec, "peer": peer}.items() if k != "ci_tests"}


def parity_fields(report: Report, profile: str) -> dict:
    """For our target: how it stands against tgt run the same way (issue 2's yardstick)."""
    path = default_expectation_path("tgt", profile)
    if not path.exists():
        return {}
    tgt = load_expected(path)
    ours, theirs = report.counts()["pass"], tgt["counts"]["pass"]
    return {"tgt_clean_pass": theirs, "meets_tgt_baseline": ours >= theirs}


if __name__ == "__main__":
    raise SystemExit(main())
