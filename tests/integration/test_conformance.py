"""libiscsi's iscsi-test-cu against our target, judged per test against a checked-in file.

Issues 2 and 3: ``iscsi-test-cu -t ALL --dataloss --allow-sanitize`` with two initiator names
and two portal URLs (MultipathIO) against a scratch 1 GiB LUN. The target must never hang or
crash; no test may do worse than tests/conformance/sanstack-expected.json records; tests that
now do better are printed so the file gets refreshed with

    python -m tools.conformance --peer sanstack --write-expected

The tgt figures run the same way are in tests/conformance/tgt-full.json (and tgt-baseline.json
for issue 2's form without sanitize and multipath).
"""
from __future__ import annotations

import pytest

from tools import conformance as cf

from .conftest import require

pytestmark = pytest.mark.slow

EXPECTED = cf.EXPECT_DIR / "sanstack-expected.json"
TGT_SAME_WAY = cf.default_expectation_path("tgt", "full")
#: CI budget for this run (the whole CI job aims at ~20 min): tgt needs ~16 s for all 230
#: tests; a hang costs IDLE_TIMEOUT and is itself a failure, so a short one is enough.
IDLE_TIMEOUT = 30.0
RUN_TIMEOUT = 600.0


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> cf.Report:
    require("iscsi-test-cu")
    workdir = tmp_path_factory.mktemp("conformance")
    report, _peer = cf.run_against_peer(
        "sanstack", workdir, profile="full", idle_timeout=IDLE_TIMEOUT, timeout=RUN_TIMEOUT, progress=print,
    )
    print(cf.format_table(report, cf.load_expected(EXPECTED)["results"]))
    print(cf.format_summary(report))
    for note in report.notes:
        print("note:", note)
    return report


def test_suite_runs_without_hang_or_crash(report):
    problems = [n for n in report.notes if "did not start" in n or "target died" in n or "not running" in n]
    assert not problems, problems
    broken = {n: report.results[n].detail[-300:] for n in report.broken()}
    assert not broken, f"target hung or the suite died in: {broken}"
    assert report.counts()["notrun"] == 0, {n: r.detail for n, r in report.results.items() if r.outcome == cf.NOTRUN}


def test_no_regression_against_expectation_file(report):
    expected = cf.load_expected(EXPECTED)["results"]
    regressions, improvements = cf.compare(report, expected)
    for name, want, now in improvements:
        print(f"improved: {name}: {want} -> {now}  (refresh {EXPECTED.name})")
    assert not regressions, "\n".join(
        f"{n}: expected {want}, got {now}: {report.results[n].reason if n in report.results else ''}"
        for n, want, now in regressions
    )


def test_at_least_as_many_clean_passes_as_tgt(report):
    """Issue 2's yardstick: clean passes >= tgt 1.0.85's when run the same way."""
    tgt = cf.load_expected(TGT_SAME_WAY)["counts"]["pass"]
    ours = report.counts()["pass"]
    if not cf.load_expected(EXPECTED).get("meets_tgt_baseline"):
        # Not claimed yet: report honestly, do not pretend either way.
        pytest.xfail(f"not yet at tgt's level: {ours} clean passes vs tgt {tgt} (sanstack-expected.json "
                     "records meets_tgt_baseline=false)")
    assert ours >= tgt, f"{ours} clean passes, tgt has {tgt}"
