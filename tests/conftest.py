"""Options shared by every test directory."""
from __future__ import annotations


def pytest_addoption(parser) -> None:
    group = parser.getgroup("sanstack")
    group.addoption(
        "--peers",
        default="sanstack,tgt",
        help="comma list of targets the interop tests run against (sanstack, tgt); default both",
    )
