"""Options and fixtures shared by every test directory."""
from __future__ import annotations

import logging

import pytest


def pytest_addoption(parser) -> None:
    group = parser.getgroup("sanstack")
    group.addoption(
        "--peers",
        default="sanstack,tgt",
        help="comma list of targets the interop tests run against (sanstack, tgt); default both",
    )


@pytest.fixture(autouse=True)
def _logger_levels_restored():
    """A test that runs a CLI in-process may set the root or ``iscsi`` logger's level; put
    them back so later tests that assert on logged events do not depend on test order."""
    loggers = [logging.getLogger(), logging.getLogger("iscsi")]
    levels = [lg.level for lg in loggers]
    yield
    for lg, level in zip(loggers, levels):
        lg.setLevel(level)
