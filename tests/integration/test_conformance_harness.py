"""The conformance runner itself (tools/conformance.py), on canned CUnit output and on a fake
suite that fails, skips and hangs -- no target needed."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from tools import conformance as cf

REAL_OUTPUT = """\
Suite: CompareAndWrite
  Test: Simple ...    [SKIPPED] COMPAREANDWRITE is not implemented.
    [SKIPPED] COMPAREANDWRITE is not implemented.
passed
Suite: GetLBAStatus
  Test: Simple ...passed
  Test: BeyondEol ...    [FAILED] GET_LBA_STATUS successful but should have failed
FAILED
    1. test_get_lba_status_beyond_eol.c:38  - CU_ASSERT_EQUAL(_r,0)
Suite: Reserve6
  Test: LUNReset ...passed    [FAILED] PRIN command: failed with sense. SENSE KEY:UNIT_ATTENTION(6)

Suite: WriteSame10
  Test: UnmapVPD ...    [FAILED] WRITESAME10 command failed with status 2
passed
  Test: Check ...passed
Suite: iSCSITMF
  Test: AbortTaskSimpleAsync ...
"""


def test_parse_real_cunit_output():
    results, unfinished, _ = cf.parse_output(REAL_OUTPUT)
    outcome = {k: v.outcome for k, v in results.items()}
    assert outcome == {
        "CompareAndWrite.Simple": "skip",
        "GetLBAStatus.Simple": "pass",
        "GetLBAStatus.BeyondEol": "fail",
        "Reserve6.LUNReset": "pass",
        "WriteSame10.UnmapVPD": "pass",
        "WriteSame10.Check": "pass",
    }
    assert unfinished == "iSCSITMF.AbortTaskSimpleAsync"
    assert "test_get_lba_status_beyond_eol.c:38" in results["GetLBAStatus.BeyondEol"].detail
    # Expected-failure probes and cleanup noise stay clean passes, but count against "strict".
    assert results["WriteSame10.UnmapVPD"].logged_failure
    assert results["Reserve6.LUNReset"].logged_failure
    assert not results["WriteSame10.Check"].logged_failure
    assert results["CompareAndWrite.Simple"].reason.startswith("[SKIPPED] COMPAREANDWRITE")


FAKE_SUITE = '''\
#!{python}
"""Fake iscsi-test-cu: suites A, B, C; A.Two fails, C.One skips, B.Two hangs."""
import fnmatch, sys, time
TESTS = {{"A": ["One", "Two"], "B": ["One", "Two", "Three"], "C": ["One", "Two"]}}
if "--list" in sys.argv:
    print("ALL")
    for s, ts in TESTS.items():
        print(f"ALL.{{s}}")
        for t in ts:
            print(f"ALL.{{s}}.{{t}}")
    sys.exit(0)
spec = sys.argv[sys.argv.index("-t") + 1]
with open({calls!r}, "a") as f:
    f.write(spec + "\\n")
for s, ts in TESTS.items():
    chosen = []
    for part in spec.split(","):
        bits = part.split(".") + ["*", "*"]
        if fnmatch.fnmatch(s, bits[1]):
            chosen += [t for t in ts if fnmatch.fnmatch(t, bits[2]) and t not in chosen]
    if not chosen:
        continue
    print(f"Suite: {{s}}", flush=True)
    for t in chosen:
        print(f"  Test: {{t}} ...", end="", flush=True)
        name = f"{{s}}.{{t}}"
        if name == "B.Two":
            time.sleep(3600)
        if name == "A.Two":
            print("    [FAILED] wrong answer\\nFAILED\\n    1. test_a.c:1  - CU_ASSERT(0)", flush=True)
        elif name == "C.One":
            print("    [SKIPPED] not implemented\\npassed", flush=True)
        else:
            print("passed", flush=True)
'''


def test_runner_survives_a_hang_and_resumes(tmp_path: Path):
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "fake-iscsi-test-cu"
    fake.write_text(FAKE_SUITE.format(python=sys.executable, calls=str(calls)))
    fake.chmod(0o755)
    report = cf.run_suite(["iscsi://127.0.0.1:1/iqn.x:y/0"], tool=str(fake), idle_timeout=1.0, timeout=60)
    assert report.outcomes() == {
        "A.One": "pass", "A.Two": "fail", "B.One": "pass", "B.Two": "hang", "B.Three": "pass",
        "C.One": "skip", "C.Two": "pass",
    }
    assert report.broken() == ["B.Two"]
    # After the hang: the rest of B one test per process, then the remaining suites together.
    assert calls.read_text().split() == ["ALL", "ALL.B.Three", "ALL.C"]
    c = report.counts()
    assert (c["pass"], c["fail"], c["skip"], c["hang"], c["total"]) == (4, 1, 1, 1, 7)


def test_compare_flags_regressions_and_improvements():
    report = cf.Report(order=["S.a", "S.b", "S.c", "S.d"])
    for name, outcome in {"S.a": "pass", "S.b": "skip", "S.c": "fail", "S.d": "pass"}.items():
        report.results[name] = cf.TestResult(name, outcome)
    regressions, improvements = cf.compare(report, {"S.a": "pass", "S.b": "pass", "S.c": "skip", "S.d": "fail"})
    assert regressions == [("S.b", "pass", "skip"), ("S.c", "skip", "fail")]
    assert improvements == [("S.d", "fail", "pass")]


def test_checked_in_expectation_files_are_consistent():
    for path in sorted(cf.EXPECT_DIR.glob("*.json")):
        doc = json.loads(path.read_text())
        results = doc["results"]
        assert set(results.values()) <= set(cf.OUTCOMES), path
        if doc.get("counts"):
            assert doc["counts"]["total"] == len(results), path
            if doc["profile"] in ("basic", "full"):
                assert len(results) == 230, path
            assert doc["counts"]["pass"] == sum(v == "pass" for v in results.values()), path
    tgt = json.loads((cf.EXPECT_DIR / "tgt-baseline.json").read_text())
    # Issue 2: "tgt 1.0.85 passes 157 of 230 clean" -- the strict reading of the same run.
    assert tgt["counts"]["strict_pass"] == 157
