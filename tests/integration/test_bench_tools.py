"""The benchmark scripts stay runnable: each is run in its smallest form and must produce
every figure it promises (a benchmark that silently loses a row is how a regression hides).

These are smoke runs on a shared machine: they check that each figure was measured and is
sane, never how fast anything was (speed is for tools/bench_all.py runs, docs/performance.md).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from .conftest import require, run

REPO_ROOT = Path(__file__).resolve().parents[2]

QUICK_TIMEOUT = 600  # bench_all --quick takes ~40 s; a hung peer must fail, not stall CI


def test_bench_all_quick_measures_every_ratio(tmp_path):
    require("iscsi-perf", "qemu-img", "tgtd", "tgtadm")
    out = tmp_path / "bench.json"
    res = run([sys.executable, "-m", "tools.bench_all", "--quick", "--json", str(out)],
              timeout=QUICK_TIMEOUT, cwd=REPO_ROOT, check=False)
    assert res.returncode == 0, f"bench_all failed:\n{res.stderr[-3000:]}"
    doc = json.loads(out.read_text())
    assert doc["rows"], "no ratio rows"
    for row in doc["rows"]:
        num, den = row["numerator"]["median"], row["denominator"]["median"]
        assert math.isfinite(row["ratio"]) and num > 0 and den > 0, f"row not measured: {row['label']}"
    # The digest rows really ran with digests (the initiator reports what it negotiated).
    notes = {key: {s["note"] for s in samples} for key, samples in doc["samples"].items()}
    assert any("CRC32C/CRC32C" in n for k, ns in notes.items() if "+d" in k for n in ns), notes
    # The printed table is the same rows, with a verdict each.
    for row in doc["rows"]:
        assert row["label"] in res.stdout
        assert row["verdict"] in ("PASS", "MISS", "info")


def test_bench_hotpath_reports_per_command_cost():
    res = run([sys.executable, "-m", "tools.bench_hotpath", "--ops", "3000", "--digests"],
              timeout=120, cwd=REPO_ROOT)
    lines = [l for l in res.stdout.splitlines() if "us/command" in l]
    assert len(lines) == 2 and all("H+D digests" in l for l in lines), res.stdout


def test_bench_all_says_before_measuring_that_chart_needs_matplotlib(monkeypatch, capsys, tmp_path):
    """--chart without matplotlib fails at once with the install line, not after the run."""
    import importlib.util

    from tools import bench_all

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(bench_all.Bench, "setup", lambda self: pytest.fail("measured anyway"))
    assert bench_all.main(["--chart", str(tmp_path / "c.png")]) == 2
    assert ".[bench]" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()
