"""Structured logging: one event name plus key=value fields (logfmt), never a secret.

Every module logs through :func:`event` so that a line reads
``login.ok initiator=iqn... target=iqn... isid=... tsih=3 params="..."`` and can be
grepped or parsed. Fields whose name suggests a secret are masked here, once,
instead of relying on every caller to remember.
"""
from __future__ import annotations

import logging
from typing import Any

_SECRET_WORDS = ("secret", "password", "passwd", "chap_r", "chap_c")
_MASK = "***"


def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(c: str) -> str:
    """One character inside a quoted value: control and other unprintable characters
    (an initiator's name is peer input) become escapes, so a log line can neither carry
    terminal sequences nor be split or overwritten (ESC, CR, NUL, C1 controls...)."""
    if c in _ESCAPES:
        return _ESCAPES[c]
    if c.isprintable():
        return c
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _quote(value: Any) -> str:
    text = str(value)
    if text and text.isprintable() and not any(c in text for c in ' "='):
        return text
    return '"' + "".join(map(_escape, text)) + '"'


def format_fields(fields: dict[str, Any]) -> str:
    """Render fields as logfmt, masking anything that looks like a secret."""
    parts = []
    for key, value in fields.items():
        if value is None:
            continue
        parts.append(f"{key}={_MASK if _is_secret(key) else _quote(value)}")
    return " ".join(parts)


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event, e.g. ``event(log, "login.failed", reason="acl", initiator=iqn)``."""
    if logger.isEnabledFor(level):
        rendered = format_fields(fields)
        logger.log(level, "%s %s" % (name, rendered) if rendered else name)


def setup(level: str | int = "INFO") -> None:
    """Configure the root logger for daemons and CLIs: timestamp, level, logger, event."""
    logging.basicConfig(
        level=level if isinstance(level, int) else level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
