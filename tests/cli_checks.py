"""Checks shared by the admin CLI tests: an error is one line, no traceback."""
from __future__ import annotations


def one_line_error(output: str, *needles: str) -> str:
    """The single ``iscsi-target: error:`` line of ``output``, holding every one of ``needles``."""
    assert "Traceback" not in output and "internal error" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("iscsi-target: error:")]
    assert len(errors) == 1, output
    for needle in needles:
        assert needle in errors[0], output
    return errors[0]
