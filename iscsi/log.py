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


def _quote(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\t\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


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
