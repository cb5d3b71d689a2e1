"""The coverage-guided fuzz job (tools/fuzz), bounded, as part of the normal test run.

- every input of the checked-in corpus (tests/fuzz/corpus/) passes its target: a crash found
  once and fixed stays fixed;
- a bounded fuzz run per target (atheris when installed, else the builtin engine) finds
  nothing: SANSTACK_FUZZ_SECONDS sets the time (default 20 s each);
- the builtin engine works too (it is what runs where atheris cannot be installed).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.fuzz import targets
from tools.fuzz.run import CORPUS_ROOT, TARGET_NAMES, corpus_files

REPO = Path(__file__).resolve().parents[2]
FUZZ_SECONDS = int(os.environ.get("SANSTACK_FUZZ_SECONDS", "20"))
#: Start-up, corpus load and libFuzzer's final merge come on top of the fuzzing time.
SLACK = 90


@pytest.fixture
def quiet_iscsi_logs():
    logger = logging.getLogger("iscsi")
    old = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    yield
    logger.setLevel(old)


@pytest.mark.parametrize("target", TARGET_NAMES)
def test_corpus_replays_clean(target, quiet_iscsi_logs):
    files = corpus_files(target)
    assert len(files) >= 5, f"corpus of {target} missing under {CORPUS_ROOT}"
    fn = targets.TARGETS[target]
    for path in files:
        fn(path.read_bytes())


def _run(target: str, seconds: int, work: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run(
        [sys.executable, "-m", "tools.fuzz.run", target, "--seconds", str(seconds), "--work", str(work), *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=seconds + SLACK, stdin=subprocess.DEVNULL)


def _explain(res: subprocess.CompletedProcess, work: Path) -> str:
    crashes = sorted(p.name for p in work.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-", "leak-")))
    tail = "\n".join((res.stdout + res.stderr).splitlines()[-60:])
    return f"fuzz run exited {res.returncode}; artifacts {crashes} in {work}\n{tail}"


@pytest.mark.parametrize("target", TARGET_NAMES)
def test_bounded_fuzz_run_finds_nothing(target, tmp_path):
    res = _run(target, FUZZ_SECONDS, tmp_path)
    assert res.returncode == 0, _explain(res, tmp_path)
    assert "engine" in res.stdout


def test_builtin_engine_runs_and_grows_coverage(tmp_path):
    res = _run("login", 4, tmp_path, "--engine", "builtin", "--seed", "1")
    assert res.returncode == 0, _explain(res, tmp_path)
    assert "no failure" in res.stdout and "lines of iscsi/ covered" in res.stdout


def test_builtin_engine_reports_a_crash(tmp_path, monkeypatch):
    """The harness itself can fail: a target that raises is caught, saved and reported."""
    from tools.fuzz import run

    calls = []

    def boom(data: bytes) -> None:
        calls.append(data)
        if len(calls) > 3:
            raise AssertionError("planted bug")

    monkeypatch.setitem(targets.TARGETS, "login", boom)
    assert run.run_builtin("login", 5, tmp_path, CORPUS_ROOT / "login", seed=1) == 1
    assert any(p.name.startswith("crash-") for p in tmp_path.iterdir())
